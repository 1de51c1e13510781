"""The items a ``source.stac`` names: a STAC API search (pystac-client) or a static catalog.

A static catalog gets the same selection as the API would make (collections, bbox or
intersects, datetime, ``query`` operators, max items), so one config gives the same scenes
from either. Items come back in a stable order: by collection, then id.
"""

from __future__ import annotations

import datetime as dt
import json
import operator
from typing import Any, Callable

import pystac
from pystac.stac_io import StacIO
from pystac.utils import str_to_datetime

from segray.config import StacSourceConfig

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "neq": operator.ne, "lt": operator.lt, "lte": operator.le, "gt": operator.gt,
    "gte": operator.ge, "in": lambda v, allowed: v in allowed,
}


def _api_items(cfg: StacSourceConfig) -> list[pystac.Item]:
    from pystac_client import Client

    client = Client.open(cfg.api)
    search = client.search(collections=cfg.collections, bbox=cfg.bbox, intersects=cfg.intersects,
                           datetime=cfg.datetime, query=cfg.query, filter=cfg.filter, max_items=cfg.max_items)
    return list(search.items())


def _read_items(href: str, stac_io: StacIO) -> list[pystac.Item]:
    """Every item under a Catalog or Collection (recursively), of an ItemCollection, or one Item."""
    d = json.loads(stac_io.read_text(href))
    if d.get("type") == "FeatureCollection":
        return list(pystac.ItemCollection.from_dict(d, preserve_dict=False).items)
    obj = pystac.read_dict(d, href=href, stac_io=stac_io)
    if isinstance(obj, pystac.Item):
        return [obj]
    return list(obj.get_items(recursive=True))


def _moment(text: str, end: bool) -> dt.datetime | None:
    """A bound of a STAC datetime: '..' open; a bare date spans its whole day; naive is UTC."""
    if text in ("", ".."):
        return None
    t = str_to_datetime(text)
    t = t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    return t + dt.timedelta(days=1, microseconds=-1) if end and len(text) == 10 else t


def _interval(text: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    parts = text.split("/")
    return _moment(parts[0], False), _moment(parts[-1], True)


def _in_time(item: pystac.Item, start, end) -> bool:
    p = item.properties
    first = str_to_datetime(p["start_datetime"]) if p.get("start_datetime") else item.datetime
    last = str_to_datetime(p["end_datetime"]) if p.get("end_datetime") else item.datetime
    if first is None or last is None:
        return False
    return (start is None or last >= start) and (end is None or first <= end)


def _in_space(item: pystac.Item, cfg: StacSourceConfig) -> bool:
    if cfg.bbox is None and cfg.intersects is None:
        return True
    if item.geometry is None:
        return False
    from shapely.geometry import box, shape

    area = shape(cfg.intersects) if cfg.intersects is not None else box(*cfg.bbox)
    return area.intersects(shape(item.geometry))


def _matches(item: pystac.Item, query: dict[str, dict[str, Any]]) -> bool:
    for name, tests in query.items():
        value = item.properties.get(name)
        for op, arg in tests.items():
            if op not in _OPS:
                raise ValueError(f"source.stac.query: operator {op!r} on {name} (use one of {sorted(_OPS)})")
            if value is None or not _OPS[op](value, arg):
                return False
    return True


def _catalog_items(cfg: StacSourceConfig, stac_io: StacIO) -> list[pystac.Item]:
    items = _read_items(cfg.catalog, stac_io)
    if cfg.collections:
        items = [i for i in items if i.collection_id in cfg.collections]
    if cfg.datetime:
        start, end = _interval(cfg.datetime)
        items = [i for i in items if _in_time(i, start, end)]
    items = [i for i in items if _in_space(i, cfg) and _matches(i, cfg.query or {})]
    return items


def search_items(cfg: StacSourceConfig, stac_io: StacIO) -> list[pystac.Item]:
    """The selected items, sorted by (collection, id); ``max_items`` of them at most."""
    items = _api_items(cfg) if cfg.api else _catalog_items(cfg, stac_io)
    items = sorted(items, key=lambda i: (i.collection_id or "", i.id))
    return items[: cfg.max_items] if cfg.max_items else items
