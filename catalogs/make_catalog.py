"""Write ``catalogs/market.yaml``: the intake 2 catalog of the tapeflow store.

One entry per bar timeframe (``bars_1m`` ... ``bars_1d``) and ``quarantine``; each is a
``datatypes.Zarr`` (the data: store + group) read by ``XArrayDatasetReader`` (the reader), so
``cat["bars_1m"].read()`` equals ``xr.open_zarr(store, group="bars/1m")``. The store is the
user parameter ``store``: ``$TAPEFLOW_STORE`` when set, else ``data/market.zarr`` beside this
folder (see :mod:`flows.catalog`). Run ``make catalog`` (or this script) after changing it;
``tests/test_catalog.py`` fails when the committed YAML differs from this script's output.

Usage::

    import intake
    cat = intake.from_yaml_file("catalogs/market.yaml")
    ds = cat["bars_1m"].read()                             # the default store
    ds = cat(store="/tmp/x.zarr")["bars_1m"].read()        # another store
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml
from intake.readers.datatypes import Zarr
from intake.readers.entry import Catalog
from intake.readers.readers import XArrayDatasetReader

from flows.catalog import STORE_ENV, StoreParameter
from flows.schema import TIMEFRAMES

HERE = Path(__file__).resolve().parent


def build() -> Catalog:
    """Return the catalog: one entry per stored group, the store as a user parameter."""
    cat = Catalog(metadata={"description": "tapeflow market data (Zarr v3 store)"})
    cat.user_parameters["store"] = StoreParameter(
        dtype=str, default="tapeflow_store({CATALOG_DIR}/../data/market.zarr)",
        description=f"store path or URL; default ${STORE_ENV}, else data/market.zarr "
                    "next to the catalogs folder")
    groups = {f"bars_{tf}": (f"bars/{tf}", f"{tf} OHLCV bars, dims (time, symbol)") for tf in TIMEFRAMES}
    groups["quarantine"] = ("quarantine", "rejected trades with reasons, dim (record,)")
    for name, (group, description) in groups.items():
        reader = XArrayDatasetReader(Zarr(url="{store}", root=group),
                                     metadata={"description": description})
        cat[name] = reader
        cat.aliases[name] = name  # so list(cat) and repr(cat) name the entries
    return cat


def to_yaml(cat: Catalog) -> str:
    """Serialize ``cat``, keeping each user parameter's class (intake drops it)."""
    spec = cat.to_dict()
    for name, up in cat.user_parameters.items():
        spec["user_parameters"][name]["cls"] = up.qname()
    return yaml.safe_dump(spec, sort_keys=True)


def main(path: Path = HERE / "market.yaml") -> None:
    path.write_text(to_yaml(build()))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
