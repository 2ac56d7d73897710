"""Result store: atomic writes, job keys, loading records into a DataFrame."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_record import make_record

import bench.store as store_mod
from bench.store import KEY_FIELDS, ResultStore, atomic_write_json, canonical_json, job_key, records_frame


def _parts(**changes):
    parts = {
        "method": "toy-ptq",
        "config": {"calib_size": 4, "clip": 1.0, "layers": ["fc"]},
        "model": "toy-a",
        "weights": "default",
        "task": "toy",
        "dataset": "mini",
        "bits": "w4a4",
        "seed": 0,
        "profile": "ci",
    }
    parts.update(changes)
    return parts


def _record(key: str, top1: float = 70.0) -> dict:
    return make_record(key=key, **_parts(), metrics={"top1": top1, "top5": 90.0}, fp_metrics={"top1": 80.0})


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_atomic_write_roundtrip(tmp_path):
    store = ResultStore(tmp_path)
    path = store.write(_record("abc"))
    assert path == tmp_path / "runs" / "abc.json"
    assert store.load("abc")["metrics"] == {"top1": 70.0, "top5": 90.0}
    assert _files(store.runs_dir) == ["abc.json"]  # no temp file left behind


def test_crash_during_dump_leaves_no_partial_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)

    def dump_half_then_die(obj, f, **kw):
        f.write('{"key": "abc", "metr')  # part of the record reaches the temp file
        raise KeyboardInterrupt  # e.g. Ctrl-C or OOM-kill mid-write

    monkeypatch.setattr(store_mod.json, "dump", dump_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.write(_record("abc"))
    assert _files(store.runs_dir) == []  # neither the record nor the temp file
    assert not store.exists("abc") and store.load("abc") is None and store.records() == []


def test_crash_at_rename_keeps_the_old_record(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.write(_record("abc", top1=70.0))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write(_record("abc", top1=11.0))
    assert _files(store.runs_dir) == ["abc.json"]
    assert store.load("abc")["metrics"]["top1"] == 70.0  # old content intact, not a mix


def test_write_is_fsynced_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        store_mod.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert events[:2] == ["fsync", "replace"]
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_job_key_is_stable_and_sensitive():
    base = job_key(_parts())
    assert len(base) == 16 and int(base, 16) >= 0
    # Same content, different dict order: same key.
    reordered = dict(reversed(list(_parts(config={"layers": ["fc"], "clip": 1.0, "calib_size": 4}).items())))
    assert job_key(reordered) == base
    # Fields outside the key (metrics, notes) do not matter.
    assert job_key({**_parts(), "metrics": {"top1": 1.0}}) == base
    changed = [
        _parts(config={"calib_size": 8, "clip": 1.0, "layers": ["fc"]}),
        _parts(seed=1),
        _parts(bits="w8a8"),
        _parts(profile="paper"),
        _parts(model="toy-b"),
        _parts(weights="toy.pth@sha256:0123456789ab"),
        _parts(dataset="full"),
        _parts(method="toy-dfq"),
        _parts(task="cls"),
    ]
    keys = {job_key(p) for p in changed}
    assert base not in keys and len(keys) == len(changed)


def test_job_key_requires_every_part():
    parts = _parts()
    del parts["seed"]
    with pytest.raises(ValueError, match="seed"):
        job_key(parts)
    assert set(KEY_FIELDS) == set(_parts())


def test_canonical_json_handles_dataclasses_tuples_paths():
    @dataclass
    class Cfg:
        steps: int = 3
        names: tuple[str, ...] = ("a", "b")
        out: Path = Path("/tmp/x")

    assert canonical_json(Cfg()) == '{"names":["a","b"],"out":"/tmp/x","steps":3}'


def test_records_and_dataframe(tmp_path):
    store = ResultStore(tmp_path)
    store.write(_record("k1", 70.0))
    store.write({**_record("k2", 72.0), "seed": 1})
    (store.runs_dir / "broken.json").write_text("{not json")  # skipped with a warning, not fatal
    df = store.dataframe()
    assert sorted(df["key"]) == ["k1", "k2"]
    assert sorted(df["metric.top1"]) == [70.0, 72.0]
    assert set(df["fp.top1"]) == {80.0}
    assert list(store.dataframe(keys=["k2"])["seed"]) == [1]
    assert records_frame([]).empty
