"""The ``table:`` section (an Iceberg table) and the Iceberg sink's commit step, without Ray: a real
PyIceberg SQL catalog in a SQLite file, the warehouse in tmp_path. (Runs on Ray, with the warehouse
on disk and on S3, are in tests/integration/test_iceberg.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from segray.config import (
    ConfigError,
    IcebergTableConfig,
    InferJobConfig,
    NightlyJobConfig,
    StorageOptions,
    build_config,
    load_config,
)
from segray.infer.iceberg import IcebergSink, _strings, open_table, props_of

REPO = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema([("source_path", pa.string()), ("status", pa.string()), ("score", pa.float64())])


def table_cfg(tmp_path: Path, **kw) -> dict:
    return {"identifier": "segray.rows", "catalog": {"uri": f"sqlite:///{tmp_path}/cat/catalog.db",
                                                     "warehouse": str(tmp_path / "wh"), **kw}}


def nightly(table: dict) -> NightlyJobConfig:
    return build_config(NightlyJobConfig, {"source": {"images": "s3://a/b"}, "checkpoint": "c", "output": "o",
                                           "table": table})


def test_table_section_of_nightly_and_infer_jobs(tmp_path):
    cfg = nightly(table_cfg(tmp_path))
    assert cfg.table.identifier == "segray.rows" and cfg.table.namespace == ("segray",)
    assert cfg.table.catalog.type == "sql" and cfg.table.catalog.name == "segray"
    assert build_config(NightlyJobConfig, {"source": {"images": "x"}, "checkpoint": "c", "output": "o"}).table is None
    infer = build_config(InferJobConfig, {"source": {"images": "x"}, "checkpoint": "c", "output": "o",
                                          "table": {"identifier": "a.b.c", "catalog": {
                                              "type": "rest", "uri": "https://cat:8181", "warehouse": "prod",
                                              "properties": {"credential": "id:secret"}}}})
    assert infer.table.namespace == ("a", "b") and infer.table.catalog.properties == {"credential": "id:secret"}


@pytest.mark.parametrize("table, field", [
    ({"identifier": "rows", "catalog": {"uri": "sqlite:///c.db", "warehouse": "w"}}, "table.identifier"),
    ({"identifier": "a.b-c", "catalog": {"uri": "sqlite:///c.db", "warehouse": "w"}}, "table.identifier"),
    ({"identifier": "a.b", "catalog": {"uri": "sqlite:///c.db"}}, "warehouse"),
    ({"identifier": "a.b", "catalog": {"uri": "http://cat:8181", "warehouse": "w"}}, "uri"),
    ({"identifier": "a.b", "catalog": {"type": "rest", "uri": "sqlite:///c.db"}}, "uri"),
    ({"identifier": "a.b", "catalog": {"type": "hive", "uri": "thrift://h:9083"}}, "table.catalog.type"),
    ({"identifier": "a.b", "catalog": {"uri": "sqlite:///c.db", "warehouse": "w", "wharehouse": "w"}},
     "table.catalog.wharehouse"),
    ({"identifier": "a.b"}, "table.catalog"),
])
def test_bad_table_sections_fail_naming_the_field(table, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        nightly(table)


def test_catalog_properties_take_storage_then_aws_variables(tmp_path):
    cfg = IcebergTableConfig.model_validate(table_cfg(tmp_path, properties={"s3.region": "eu-west-1"}))
    storage = StorageOptions(endpoint_url="http://127.0.0.1:9000", key="k", secret="s")
    kw = cfg.catalog_kwargs(storage, env={"AWS_ACCESS_KEY_ID": "env-key", "AWS_REGION": "us-west-2"})
    assert kw["name"] == "segray" and kw["type"] == "sql" and kw["uri"].startswith("sqlite:///")
    assert kw["warehouse"] == f"file://{tmp_path}/wh", "a local warehouse becomes a file:// URI"
    assert (kw["s3.endpoint"], kw["s3.access-key-id"], kw["s3.secret-access-key"]) == ("http://127.0.0.1:9000", "k", "s")
    assert kw["s3.region"] == "eu-west-1", "catalog.properties win"
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "ek", "AWS_SECRET_ACCESS_KEY": "es"}
    kw = IcebergTableConfig.model_validate(table_cfg(tmp_path)).catalog_kwargs(StorageOptions(), env=env)
    assert (kw["s3.endpoint"], kw["s3.access-key-id"], kw["s3.secret-access-key"], kw["s3.region"]) == (
        "http://minio:9000", "ek", "es", "us-east-1")
    assert not any(k.startswith("s3.") for k in IcebergTableConfig.model_validate(table_cfg(tmp_path)).catalog_kwargs(None, env={}))


def test_sample_config_loads():
    cfg = load_config(NightlyJobConfig, REPO / "configs" / "nightly_iceberg.yaml")
    assert cfg.table.catalog.type == "rest" and cfg.table.identifier == "segmentation.nightly"


def _sink(tmp_path, inputs, schema=SCHEMA, **kw) -> IcebergSink:
    cfg = IcebergTableConfig.model_validate(table_cfg(tmp_path))
    return IcebergSink(cfg, None, schema, inputs, {"job": "test", "run_date": "2025-01-01"}, **kw)


def _write(sink: IcebergSink, paths: list[str]) -> None:
    """What write_iceberg does at its end: one snapshot with the sink's properties."""
    rows = pa.table({"source_path": paths, "status": ["ok"] * len(paths), "score": [1.0] * len(paths)}, schema=SCHEMA)
    sink.table().append(rows, snapshot_properties=_strings(sink.properties))


def test_sink_creates_the_table_commits_and_checks_one_row_per_input(tmp_path):
    empty = _sink(tmp_path, [])
    empty.prepare()  # creates namespace and table from the rows' schema
    table = open_table(empty.cfg)
    assert table.schema().column_names == SCHEMA.names and table.current_snapshot() is None
    rec = empty.commit({"n": 0})  # nothing written: still one snapshot, with the run's properties
    snap = open_table(empty.cfg).current_snapshot()
    assert rec["snapshot_id"] == snap.snapshot_id and props_of(snap)["run_date"] == "2025-01-01"
    assert props_of(snap)["attempt"] == empty.attempt == rec["attempt"]

    run = _sink(tmp_path, ["/a.png", "/b.png"])
    run.prepare()
    _write(run, ["/a.png", "/b.png"])
    rec = run.commit({"n": 2})
    assert rec["parent_snapshot_id"] == snap.snapshot_id and rec["table"] == "segray.rows"
    assert sorted(run.rows(["source_path"])["source_path"].to_pylist()) == ["/a.png", "/b.png"]

    # A snapshot that is not this run's (the write never committed): refused.
    lost = _sink(tmp_path, ["/c.png"])
    lost.prepare()
    with pytest.raises(RuntimeError, match="not this run's"):
        lost.commit({})

    # A run whose snapshot leaves an image twice: rolled back to the snapshot before, and refused.
    dup = _sink(tmp_path, ["/a.png"])
    dup.prepare()
    _write(dup, ["/a.png"])  # appended, not upserted: /a.png twice
    with pytest.raises(RuntimeError, match="1 images with several rows"):
        dup.commit({})
    assert open_table(dup.cfg).current_snapshot().snapshot_id == rec["snapshot_id"]


def test_sink_adds_new_columns_and_refuses_a_column_of_another_type(tmp_path):
    _sink(tmp_path, []).prepare()
    grown = pa.schema(list(SCHEMA) + [("source_path_bytes", pa.binary())])  # a family's schema grew
    _sink(tmp_path, [], schema=grown).prepare()
    assert "source_path_bytes" in open_table(_sink(tmp_path, []).cfg).schema().column_names
    other = pa.schema([("source_path", pa.string()), ("status", pa.int64())])
    with pytest.raises(ConfigError, match="status"):
        _sink(tmp_path, [], schema=other).prepare()
    with pytest.raises(ConfigError, match="source_path"):
        _sink(tmp_path, [], schema=pa.schema([("image_id", pa.string())]))
