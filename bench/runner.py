"""Local executor: runs grid jobs one after another and writes one record per job.

A job whose record exists is skipped (resume) unless ``force``. FP jobs come first
in the grid, so every quantized job finds its reference metric in ``fp_by_ref``.
A :class:`~tasks.base.TaskError` (missing data or weights) aborts the run — it
would fail every later job the same way; any other exception fails only its job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.env import environment
from bench.grid import Job
from bench.plots import plot_layer_bits
from bench.progress import Reporter, make_reporter
from bench.record import Record
from bench.store import ResultStore, jsonable
from methods.base import QuantMethod, RunContext, get_method
from methods.quant.bits import BitSpec, parse_bits
from methods.quant.mixed import average_bits, bops, site_costs
from methods.quant.policy import model_size_bits
from tasks.base import Task, TaskError

log = logging.getLogger("vitq.runner")
PHASES = ("generation", "calibration", "finetune")


@dataclass
class JobResult:
    job: Job
    status: str  # "done" | "cached" | "failed"
    record: dict | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class RunSummary:
    results: list[JobResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if r.status == "failed"]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python/numpy/torch and turn on deterministic algorithms for one job, then restore."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


class _PeakMemory:
    """Peak memory of a job: CUDA allocator peak on GPU; process peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            # ru_maxrss never decreases, so later jobs of the same process report at least earlier peaks.
            self.method = "resource.getrusage(RUSAGE_SELF).ru_maxrss (process peak RSS since start)"

    def read_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _cost(model: nn.Module, quant_path: str, bits: BitSpec, input_shape: tuple[int, ...],
          device: torch.device) -> tuple[int, dict[str, Any]]:
    """Size in bits of the quantized part (per-layer bits are keyed relative to it), and its per-image
    MACs, BOPs and average bits (one forward of a blank image: the counts depend on shapes only) with
    the size in MB (2^20 bytes)."""
    module = model.get_submodule(quant_path) if quant_path else model
    size_bits = int(model_size_bits(module, bits))
    x = torch.zeros(input_shape, device=device)
    with torch.no_grad():
        costs = site_costs(module, lambda: model(x), 1)
    w_avg, a_avg = average_bits(costs, bits.layers)
    return size_bits, {"macs": sum(c.macs for c in costs.values()), "bops": bops(costs, bits.layers),
                       "w_avg_bits": w_avg, "a_avg_bits": a_avg, "size_mb": size_bits / 8 / 2**20}


def _delta(metrics: Mapping[str, float], fp: Mapping[str, float] | None) -> dict[str, float] | None:
    if not fp:
        return None
    return {k: float(v) - float(fp[k]) for k, v in metrics.items() if k in fp}


def _measure(job: Job, task: Task, method: QuantMethod, ctx: RunContext) -> dict[str, Any]:
    """Load, quantize (timed), evaluate (timed) under the job's seed; peak memory over all three."""
    with seeded(job.seed):
        memory = _PeakMemory(ctx.device)
        t0 = time.perf_counter()
        handle = task.load(job.model, job.dataset, job.weights)
        handle.target.model.to(ctx.device)
        # only the "real" data source calls this: data-free methods never see the task's images
        ctx.real_images = lambda n: task.calibration(handle, n, job.seed)
        t1 = time.perf_counter()
        result = method.quantize(handle.target, parse_bits(job.bits), ctx)
        t2 = time.perf_counter()
        metrics = {k: float(v) for k, v in task.evaluate(handle, result.model, ctx.device).items()}
        t3 = time.perf_counter()
        return dict(
            target=handle.target,
            result=result,
            metrics=metrics,
            load=t1 - t0,
            quantize=t2 - t1,
            evaluation=t3 - t2,
            data=jsonable(task.dataset_info(handle)) or None,
            peak_mb=memory.read_mb(),
            memory_method=memory.method,
        )


def run_job(
    job: Job,
    task: Task,
    store: ResultStore,
    device: torch.device,
    fp_metrics: dict[str, float] | None,
    reporter_msg: Callable[[str], None] | None = None,
) -> dict:
    """Run one job end to end and write its record; returns the record (a dict of the Record fields)."""
    method_cls = get_method(job.method)
    method = method_cls(method_cls.make_config(job.profile, **job.method_args))
    ctx = RunContext(
        device=device,
        seed=job.seed,
        profile=job.profile,
        cache_dir=store.root / "cache",
        artifacts_dir=store.root / "artifacts" / job.key,
    )
    if reporter_msg is not None:
        ctx.progress = reporter_msg
    for d in (ctx.artifacts_dir, ctx.cache_dir):
        d.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        m = _measure(job, task, method, ctx)
    finally:
        for d in (ctx.artifacts_dir, ctx.artifacts_dir.parent):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when empty: keeps what a method saved
    target, metrics, result = m["target"], m["metrics"], m["result"]

    size, cost = _cost(result.model, target.quant_path, result.resolved_bits, target.input_spec.shape(1),
                       device)
    plots: dict[str, str] = {}
    if result.resolved_bits.is_mixed:
        title = f"{job.job_id}: average bits w {cost['w_avg_bits'] or 0:.2f}, a {cost['a_avg_bits'] or 0:.2f}"
        png = plot_layer_bits(result.resolved_bits.layers, ctx.artifacts_dir / "layer_bits.png", title)
        plots["layer_bits"] = str(png)
    notes: list[str] = []
    if job.is_fp:
        fp_metrics = metrics
    elif fp_metrics is None:
        notes.append("FP reference unavailable (the fp job failed)")

    timings = {p: float(ctx.timings.get(p, 0.0)) for p in PHASES}
    timings.update({k: float(v) for k, v in ctx.timings.items() if k not in timings})
    timings.update({k: m[k] for k in ("load", "quantize", "evaluation")}, total=time.perf_counter() - t_start)
    bit_record = result.resolved_bits.to_record()
    parts = job.key_parts()
    record = Record(
        key=job.key,
        job_id=job.job_id,
        method=parts["method"], config=parts["config"], model=parts["model"], weights=parts["weights"],
        task=parts["task"], dataset=parts["dataset"], bits=parts["bits"], seed=parts["seed"],
        profile=parts["profile"], options=parts.get("options"), method_args=parts.get("method_args"),
        metrics=metrics,
        fp_metrics=fp_metrics,
        delta_to_fp=_delta(metrics, fp_metrics),
        timings=timings,
        peak_memory_mb=round(m["peak_mb"], 2),
        peak_memory_method=m["memory_method"],
        model_size_bits=size,
        cost=cost,
        bit_spec={k: v for k, v in bit_record.items() if k != "layers"},
        layer_bits=bit_record["layers"],
        policy=result.policy,
        target={
            "model_name": target.model_name,
            "quant_path": target.quant_path,
            "family": target.family,
            "num_classes": target.num_classes,
            "input_spec": asdict(target.input_spec),
            "info": target.info,
        },
        method_info={
            "class": f"{method_cls.__module__}.{method_cls.__qualname__}",
            "data_free": bool(method_cls.data_free),
            "data_source": None if job.is_fp else method.source_name(),
            "summary": method_cls.summary,
            "provenance": dict(method_cls.provenance),
        },
        environment=environment(device),
        data=m["data"],
        data_sources=dict(ctx.data_sources),
        image_sha256=dict(ctx.image_hashes),
        galleries=dict(ctx.galleries_written),
        plots=plots,
        extra=dict(ctx.extra),
        notes=[*result.notes, *ctx.notes, *notes],
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    out = jsonable(record.to_dict())
    store.write(out)
    return out


def run_jobs(
    jobs: Sequence[Job],
    store: ResultStore,
    tasks: Mapping[str, Task],
    device: torch.device,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
) -> RunSummary:
    """Run (or skip) every job in order. Raises TaskError on missing data/weights."""
    reporter = reporter or make_reporter(stream=sys.stdout)
    primary_metric = {name: getattr(t, "primary_metric", "") for name, t in tasks.items()}
    summary = RunSummary()
    fp_by_ref: dict[tuple, dict[str, float] | None] = {}
    reporter.begin(jobs)
    try:
        for i, job in enumerate(jobs):
            metric = primary_metric.get(job.task, "")
            existing = None if force else store.load(job.key)
            if existing is not None:
                if job.is_fp:
                    fp_by_ref[job.reference] = existing.get("metrics")
                summary.results.append(JobResult(job, "cached", existing))
                reporter.finished(i, "cached", existing, metric, 0.0)
                continue
            reporter.started(i)
            t0 = time.perf_counter()
            try:
                record = run_job(
                    job,
                    tasks[job.task],
                    store,
                    device,
                    fp_by_ref.get(job.reference),
                    reporter_msg=lambda msg, _i=i: reporter.message(_i, msg),
                )
            except TaskError as e:
                reporter.finished(i, "failed", None, metric, time.perf_counter() - t0, error=str(e))
                raise
            except Exception as e:  # one broken job must not lose the rest of the grid
                seconds = time.perf_counter() - t0
                err = f"{type(e).__name__}: {e}"
                log.exception("job %s failed", job.job_id)
                summary.results.append(JobResult(job, "failed", None, seconds, err))
                reporter.finished(i, "failed", None, metric, seconds, error=err)
                continue
            if job.is_fp:
                fp_by_ref[job.reference] = record["metrics"]
            seconds = time.perf_counter() - t0
            summary.results.append(JobResult(job, "done", record, seconds))
            reporter.finished(i, "done", record, metric, seconds)
    finally:
        reporter.end()
    return summary
