"""The result record: one typed, versioned schema for every job (the one place that lists its fields).

A record is written as JSON by :class:`bench.store.ResultStore` and read back through
:func:`read_record`, which upgrades older schemas and rejects unknown ones with one clear line.

Schema history:
1. the first layout (issues 1-10);
2. ``synthetic_sha256`` renamed ``image_sha256`` (real calibration batches are hashed too); new
   ``data_sources`` (label -> source name, image count, data-free, cached) and ``galleries``
   (label -> PNG path); the resolved bits come from the method's ``QuantResult``;
3. new ``cost`` (per image: MACs, BOPs, average weight / activation bits; model size in MB) and
   ``plots`` (name -> PNG path, e.g. the per-layer bit-width plot of a mixed-precision job).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)


class RecordSchemaError(ValueError):
    """A record this version cannot read: one line naming the file and the fix."""


@dataclass
class Record:
    """Every field of a result record (JSON-safe values only)."""

    key: str  # job key: hash of the key parts below (see bench.store.KEY_FIELDS)
    job_id: str  # task/model/method[args]/bits/seed[?options]: readable identity (golden file)
    # key parts
    method: str
    config: dict[str, Any]
    model: str
    weights: str
    task: str
    dataset: str
    bits: str
    seed: int
    profile: str
    # results
    metrics: dict[str, float]
    fp_metrics: dict[str, float] | None
    delta_to_fp: dict[str, float] | None
    timings: dict[str, float]  # seconds per phase: generation, calibration, finetune, load, ..., total
    peak_memory_mb: float
    peak_memory_method: str
    model_size_bits: int  # of the quantized part, with the resolved per-layer bits
    cost: dict[str, Any] | None  # per image of the quantized part: macs, bops, w/a average bits, size_mb
    bit_spec: dict[str, Any]  # the BitSpec asked for (name, w, a)
    layer_bits: dict[str, Any]  # resolved per-layer (w, a) bits
    policy: dict[str, Any] | None  # the placement policy as data
    # provenance
    target: dict[str, Any]  # model name, quant path, family, classes, input spec, weights info
    method_info: dict[str, Any]  # class, data_free, summary, provenance
    environment: dict[str, Any]  # versions, git commit, CPU capability, threads, device
    data: dict[str, Any] | None  # the task's dataset_info: eval / calibration sizes and provenance
    data_sources: dict[str, Any]  # label -> {source, images, data_free, cached}
    image_sha256: dict[str, str]  # label -> SHA-256 of the image batch
    galleries: dict[str, str]  # label -> PNG path
    plots: dict[str, str]  # name -> PNG path (layer_bits: per-layer bit-widths of an mp job)
    extra: dict[str, Any]  # method-specific diagnostics
    notes: list[str]
    created: str  # UTC ISO time
    schema: int = SCHEMA_VERSION
    options: dict[str, Any] | None = None  # non-default task options (only then part of the key)
    method_args: dict[str, Any] | None = None  # --method-args (already inside config)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for optional in ("options", "method_args"):  # absent rather than null: keys stay as before
            if not out[optional]:
                del out[optional]
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(Record))
_REQUIRED = tuple(f.name for f in dataclasses.fields(Record)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


def _upgrade_1(rec: dict[str, Any]) -> dict[str, Any]:
    rec["image_sha256"] = rec.pop("synthetic_sha256", None) or {}
    rec.setdefault("data_sources", {})
    rec.setdefault("galleries", {})
    rec.setdefault("data", None)
    rec["schema"] = 2
    return rec


def _upgrade_2(rec: dict[str, Any]) -> dict[str, Any]:
    rec.setdefault("cost", None)  # not measured by the version that wrote it
    rec.setdefault("plots", {})
    rec["schema"] = 3
    return rec


_UPGRADES = {1: _upgrade_1, 2: _upgrade_2}


def read_record(raw: Mapping[str, Any], where: str = "record") -> dict[str, Any]:
    """The record as a current-schema dict; older schemas are upgraded, others rejected."""
    rec = dict(raw)
    schema = rec.get("schema")
    if schema not in READABLE_SCHEMAS:
        raise RecordSchemaError(
            f"{where} has schema {schema!r}; this vitq-bench reads schemas {list(READABLE_SCHEMAS)}: "
            "rerun its job with --force (or use the vitq-bench version that wrote it)")
    while rec["schema"] != SCHEMA_VERSION:
        rec = _UPGRADES[rec["schema"]](rec)
    missing = [f for f in _REQUIRED if f not in rec]
    if missing:
        raise RecordSchemaError(f"{where} lacks fields {missing}: rerun its job with --force")
    return rec


__all__ = ["Record", "RecordSchemaError", "SCHEMA_VERSION", "FIELDS", "read_record"]
