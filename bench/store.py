"""Result store: one JSON record per job under ``<results>/runs/<key>.json``.

Records are written atomically (temp file in the same directory, fsync, ``os.replace``)
so an interrupted run never leaves a partial record behind: a record either exists
completely or not at all, which is what makes "skip jobs whose record exists" safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import pandas as pd

from bench.record import read_record

KEY_LENGTH = 16
# The fields a job key is computed from (the record stores each of them at top level).
KEY_FIELDS = ("method", "config", "model", "weights", "task", "dataset", "bits", "seed", "profile")

log = logging.getLogger("vitq.store")


def jsonable(obj: Any) -> Any:
    """Plain JSON data from configs, BitSpecs, paths, tuples, numpy/torch scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = [jsonable(v) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return obj.item()
    return str(obj)


def canonical_json(obj: Any) -> str:
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def method_args_suffix(method_args: Mapping[str, Any] | None) -> str:
    """``[adv_weight=10.0,rounds=24]`` for config fields set on the command line, "" otherwise
    (job ids and table rows)."""
    if not method_args:
        return ""
    return "[" + ",".join(f"{k}={v}" for k, v in sorted(jsonable(dict(method_args)).items())) + "]"


def job_key(parts: Mapping[str, Any]) -> str:
    """First 16 hex digits of sha256 over the canonical JSON of the key parts."""
    missing = set(KEY_FIELDS) - set(parts)
    if missing:
        raise ValueError(f"job key parts missing: {sorted(missing)}")
    keyed = {k: parts[k] for k in KEY_FIELDS}
    if parts.get("options"):  # non-default task options only, so default keys stay what they were
        keyed["options"] = parts["options"]
    payload = canonical_json(keyed)
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def atomic_write(path: Path, write: Callable[[IO[str]], None]) -> None:
    """Write a file so that readers see the old content or the new one, never half of it.

    ``write`` fills a temp file in the same directory (same filesystem, so the final
    ``os.replace`` is atomic); on any error the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_json(path: Path, obj: Any) -> None:
    data = jsonable(obj)

    def write(f: IO[str]) -> None:
        json.dump(data, f, indent=2)
        f.write("\n")

    atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ResultStore:
    """The records of one results directory (``<root>/runs/*.json``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def path(self, key: str) -> Path:
        return self.runs_dir / f"{key}.json"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict | None:
        path = self.path(key)
        return _read(path) if path.is_file() else None

    def write(self, record: Mapping[str, Any]) -> Path:
        """Write a record (``Record.to_dict()``) atomically under its key."""
        path = self.path(record["key"])
        atomic_write_json(path, record)
        return path

    def records(self) -> list[dict]:
        if not self.runs_dir.is_dir():
            return []
        out = []
        for path in sorted(self.runs_dir.glob("*.json")):
            if path.name.startswith("."):
                continue
            rec = _read(path)
            if rec is not None:
                out.append(rec)
        return out

    def dataframe(self, keys: Iterable[str] | None = None) -> pd.DataFrame:
        recs = self.records()
        if keys is not None:
            wanted = set(keys)
            recs = [r for r in recs if r.get("key") in wanted]
        return records_frame(recs)


def _read(path: Path) -> dict | None:
    """The record in ``path`` (upgraded to the current schema); None when it is not valid JSON.
    A record of a schema this version cannot read raises RecordSchemaError (one line, says the fix)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("skipping unreadable record %s: %s", path, e)
        return None
    return read_record(raw, where=str(path))


FRAME_COLUMNS = ("key", "job_id", "task", "model", "weights", "dataset", "method", "bits", "seed", "profile")


def records_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record: key parts, ``metric.<name>``, ``fp.<name>``, size, memory, timings."""
    rows = []
    for r in records:
        row: dict[str, Any] = {c: r.get(c) for c in FRAME_COLUMNS}
        opts = r.get("options") or {}  # non-default task options, e.g. quant_scope=all
        row["options"] = "&".join(f"{k}={v}" for k, v in sorted(opts.items()))
        # a run with --method-args is its own table row: "mimiq[lr=0.001]"
        row["method"] = f"{row['method']}{method_args_suffix(r.get('method_args'))}"
        row["created"] = r.get("created")
        row["model_size_bits"] = r.get("model_size_bits")
        row["peak_memory_mb"] = r.get("peak_memory_mb")
        for name, value in (r.get("cost") or {}).items():
            row[f"cost.{name}"] = value
        for phase, seconds in (r.get("timings") or {}).items():
            row[f"time.{phase}"] = seconds
        for name, value in (r.get("metrics") or {}).items():
            row[f"metric.{name}"] = value
        for name, value in (r.get("fp_metrics") or {}).items():
            row[f"fp.{name}"] = value
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else [*FRAME_COLUMNS, "created"])
