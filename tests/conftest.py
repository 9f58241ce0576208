"""Shared fixtures: a free loopback port and a headless Debian Chromium for browser tests."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keep_sigterm():
    """`flows.cli.main` turns SIGTERM into KeyboardInterrupt; give pytest its handler back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope="session")
def compiled_kernels() -> None:
    """Compile (or load) the flow's numba kernels once per test process, so a served page or
    a notebook started next does not compile them while a test waits for it."""
    from flows.warmup import warm_up

    warm_up()


@pytest.fixture(scope="session")
def chromium():
    """A Playwright Chromium browser (the system one). Skips only outside CI when missing."""
    if not CHROMIUM.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{CHROMIUM} is missing but CI is set: browser tests must run in CI")
        pytest.skip(f"{CHROMIUM} not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    headless=True)
        yield browser
        browser.close()
