"""The record schema: one typed list of fields, older schemas upgraded, unknown ones rejected."""

from __future__ import annotations

import json

import pytest

from bench.record import FIELDS, SCHEMA_VERSION, Record, RecordSchemaError, read_record
from bench.store import ResultStore


def make_record(**over) -> dict:
    """A complete current-schema record (every field), with ``over`` applied."""
    values = {name: None for name in FIELDS}
    values.update(key="k1", job_id="cls/m/fp/fp/0", method="fp", config={}, model="m", weights="default",
                  task="cls", dataset="mini", bits="fp", seed=0, profile="ci", metrics={"top1": 90.0},
                  timings={}, peak_memory_mb=1.0, peak_memory_method="rss", model_size_bits=8, bit_spec={},
                  layer_bits={}, target={}, method_info={}, environment={}, data_sources={}, image_sha256={},
                  galleries={}, plots={}, extra={}, notes=[], created="2026-12-01T00:00:00+00:00",
                  schema=SCHEMA_VERSION)
    values.update(over)
    return Record(**values).to_dict()


def test_round_trip_and_optional_fields_absent(tmp_path):
    rec = make_record()
    assert "options" not in rec and "method_args" not in rec  # absent when unset, as before
    store = ResultStore(tmp_path)
    store.write(rec)
    assert store.load("k1") == rec


def test_schema_1_is_upgraded():
    old = make_record()
    old["schema"] = 1
    old["synthetic_sha256"] = old.pop("image_sha256") | {"calibration": "ab" * 32}
    for name in ("data_sources", "galleries", "data"):
        old.pop(name)
    for name in ("cost", "plots"):
        old.pop(name)
    new = read_record(old)
    assert new["schema"] == SCHEMA_VERSION and new["image_sha256"] == {"calibration": "ab" * 32}
    assert new["data_sources"] == {} and new["galleries"] == {} and new["data"] is None
    assert "synthetic_sha256" not in new


def test_schema_2_is_upgraded_without_costs():
    old = make_record()
    old["schema"] = 2
    for name in ("cost", "plots"):
        old.pop(name)
    new = read_record(old)
    assert new["schema"] == 3 and new["cost"] is None and new["plots"] == {}


def test_unknown_schema_is_rejected_in_one_line(tmp_path):
    store = ResultStore(tmp_path)
    store.runs_dir.mkdir(parents=True)
    (store.runs_dir / "k2.json").write_text(json.dumps(make_record(key="k2", schema=7)))
    with pytest.raises(RecordSchemaError, match=r"k2.json has schema 7; this vitq-bench reads schemas \[1"):
        store.load("k2")
    with pytest.raises(RecordSchemaError, match="lacks fields"):
        read_record({"schema": 2, "key": "x"})
