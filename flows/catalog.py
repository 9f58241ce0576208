"""Intake glue: where ``catalogs/*.yaml`` find the store.

An intake 2 user parameter can take its default from ``env(NAME)``, but it cannot fall back
to another value when the variable is unset, and a parameter's default is not formatted with
``CATALOG_DIR``. This module adds the template ``tapeflow_store(FALLBACK)``: the value of
``$TAPEFLOW_STORE`` when it is set, else ``FALLBACK`` formatted with the catalog's parameters
(so ``{CATALOG_DIR}`` works). A catalog names :class:`StoreParameter` in its YAML, so loading
the catalog imports this module, which registers the template.
"""
from __future__ import annotations

import os
import re

from intake.readers.user_parameters import SimpleUserParameter, register_template

STORE_ENV = "TAPEFLOW_STORE"


@register_template("tapeflow_store")
def store_default(match: re.Match, up: dict) -> str:
    """Return ``$TAPEFLOW_STORE``, or the template's argument formatted with ``up``."""
    values = {k: getattr(v, "default", v) for k, v in up.items()}
    return os.environ.get(STORE_ENV) or match.group(1).format_map(values)


class StoreParameter(SimpleUserParameter):
    """The store location (a path or fsspec URL), defaulting through ``tapeflow_store(...)``."""
