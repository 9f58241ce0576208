"""Write ``catalogs/market.yaml``: the intake 2 catalog of the tapeflow store.

One entry per stored group: per timeframe ``bars_{tf}``, ``indicators_{tf}``, ``breadth_{tf}``,
``sectors_{tf}``, ``quality_{tf}`` and ``quality_feed_{tf}`` (group ``bars/{tf}`` ...), plus the
record groups ``quarantine`` and ``quality_flags``. Each is a ``datatypes.Zarr`` (the data:
store + group) read by ``XArrayDatasetReader`` (the reader), so ``cat["bars_1m"].read()``
equals ``xr.open_zarr(store, group="bars/1m")``. Groups appear in a store once written (the
analytics groups with analytics on, ``quality_flags`` after the first flagged trade). The store
is the user parameter ``store``: ``$TAPEFLOW_STORE`` when set, else ``data/market.zarr`` beside
this folder (see :mod:`flows.catalog`). Run ``make catalog`` (or this script) after changing it;
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

#: per timeframe: family -> description (the entry is ``{family}_{tf}``, the group ``{family}/{tf}``)
PER_TIMEFRAME: dict[str, str] = {
    "bars": "OHLCV bars, dims (time, symbol)",
    "indicators": "indicators (SMA, EMA, RSI, MACD, ...) and provisional, dims (time, symbol)",
    "breadth": "market breadth (advancers, A/D line, McClellan, ...), dim (time,)",
    "sectors": "sector returns, advancers/decliners and volume, dims (time, sector)",
    "quality": "data quality score and components per symbol, dims (time, symbol)",
    "quality_feed": "data quality score and components per feed, dims (time, feed)",
}
#: record groups (dim ``record``): entry name = group
RECORDS: dict[str, str] = {
    "quarantine": "rejected trades with reasons, dim (record,)",
    "quality_flags": "flagged trades (spikes, volume outliers, id gaps), dim (record,)",
}
#: entry name -> (group, description)
GROUPS: dict[str, tuple[str, str]] = {
    **{f"{family}_{tf}": (f"{family}/{tf}", f"{tf} {description}")
       for family, description in PER_TIMEFRAME.items() for tf in TIMEFRAMES},
    **{name: (name, description) for name, description in RECORDS.items()},
}


def build() -> Catalog:
    """Return the catalog: one entry per stored group, the store as a user parameter."""
    cat = Catalog(metadata={"description": "tapeflow market data (Zarr v3 store)"})
    cat.user_parameters["store"] = StoreParameter(
        dtype=str, default="tapeflow_store({CATALOG_DIR}/../data/market.zarr)",
        description=f"store path or URL; default ${STORE_ENV}, else data/market.zarr "
                    "next to the catalogs folder")
    for name, (group, description) in GROUPS.items():
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
