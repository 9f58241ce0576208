"""The intake catalog: every entry reads exactly what ``xr.open_zarr`` reads, from any store.

The test store has every group: bars and, with analytics on (the default), indicators,
breadth, sectors, quality and quality_feed per timeframe; two invalid trades for
``quarantine`` and one price spike for ``quality_flags``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import intake
import pytest
import xarray as xr

from flows.pipeline import Flow, FlowConfig
from flows.schema import NS, TIMEFRAMES, TradeBatch

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "catalogs" / "market.yaml"
FAMILIES = ("bars", "indicators", "breadth", "sectors", "quality", "quality_feed")
GROUPS = {**{f"{family}_{tf}": f"{family}/{tf}" for family in FAMILIES for tf in TIMEFRAMES},
          "quarantine": "quarantine", "quality_flags": "quality_flags"}


def make_store(path: Path, minutes: int = 300, n_symbols: int = 20, rate: float = 5.0) -> Path:
    """Write ``minutes`` of a simulated market, two invalid trades and a price spike (flagged,
    kept in the bars) into a store at ``path``."""
    from flows.feeds.simulated import SimulatedMarket

    start = 1_700_000_000 * NS // (60 * NS) * (60 * NS)
    end = start + minutes * 60 * NS
    flow = Flow(FlowConfig(store=str(path)), clock=lambda: end)
    market = SimulatedMarket(flow.table, n_symbols=n_symbols, rate=rate, seed=7, start_ns=start,
                             batch_ms=60_000)
    for batch in market.batches(duration_s=minutes * 60):
        flow.push(batch)
    bad = flow.table.names[0]
    flow.push(TradeBatch.from_columns(flow.table, time=[end - NS, end - NS], symbol=[bad, bad],
                                      price=[-1.0, float("nan")], size=[1.0, 1.0]))
    spiked = 3 * float(flow.bars("1m", bad)["close"].iloc[-1])
    flow.push(TradeBatch.from_columns(flow.table, time=[end - NS], symbol=[bad], price=[spiked],
                                      size=[1.0]))
    flow.close()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("catalog") / "market.zarr", minutes=90)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("TAPEFLOW_STORE", raising=False)


def test_lists_every_group():
    cat = intake.from_yaml_file(str(CATALOG))
    assert sorted(cat) == sorted(GROUPS)


@pytest.mark.parametrize("entry", list(GROUPS))
def test_entry_equals_open_zarr(store, entry, no_env):
    cat = intake.from_yaml_file(str(CATALOG))
    ds = cat(store=str(store))[entry].read()
    expected = xr.open_zarr(str(store), group=GROUPS[entry])
    xr.testing.assert_identical(ds, expected)
    assert ds.sizes[next(iter(expected.dims))] > 0


def test_store_defaults_to_env(store, monkeypatch):
    monkeypatch.setenv("TAPEFLOW_STORE", str(store))
    ds = intake.from_yaml_file(str(CATALOG))["bars_1m"].read()
    xr.testing.assert_identical(ds, xr.open_zarr(str(store), group="bars/1m"))


def test_store_defaults_to_data_beside_catalogs(store, tmp_path, no_env):
    (tmp_path / "catalogs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "catalogs" / "market.yaml").write_text(CATALOG.read_text())
    (tmp_path / "data" / "market.zarr").symlink_to(store, target_is_directory=True)
    cat = intake.from_yaml_file(str(tmp_path / "catalogs" / "market.yaml"))
    xr.testing.assert_identical(cat["bars_5m"].read(), xr.open_zarr(str(store), group="bars/5m"))


def test_committed_yaml_is_the_script_output():
    spec = importlib.util.spec_from_file_location("make_catalog", ROOT / "catalogs" / "make_catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert CATALOG.read_text() == module.to_yaml(module.build()), "run `make catalog` and commit"
