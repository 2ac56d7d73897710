"""Grid expansion and the local runner, on fake methods/tasks (tests/bench_fakes.py)."""

from __future__ import annotations

import io

import bench_fakes
import pytest
import torch
from bench_fakes import CALLS

import bench.store as store_mod
from bench.grid import FP_SEED, expand
from bench.progress import PlainReporter
from bench.runner import run_jobs
from bench.store import ResultStore
from methods.quant.bits import BitSpec, parse_bits
from tasks.base import TaskError, get_task

BITS = [parse_bits("w4a4"), parse_bits("w8a8")]


@pytest.fixture
def fakes(monkeypatch):
    with bench_fakes.installed():
        yield _fakes(monkeypatch)


def _fakes(monkeypatch):
    # Stand-in for model_size_bits (tested in test_policy.py): records what the runner passes.
    seen = []

    def model_size_bits(module, bits):
        seen.append((module, bits))
        return 1000 + len(bits.layers)

    monkeypatch.setattr("bench.runner.model_size_bits", model_size_bits)
    return seen


def _run(
    tmp_path,
    methods=("toy-ptq", "toy-dfq"),
    models=("toy-a",),
    bits=BITS,
    seeds=(0,),
    force=False,
    dataset="mini",
    profile="ci",
):
    jobs = expand({"toy": list(models)}, list(methods), list(bits), list(seeds), dataset, profile)
    out = io.StringIO()
    summary = run_jobs(
        jobs,
        ResultStore(tmp_path),
        {"toy": get_task("toy")},
        torch.device("cpu"),
        force=force,
        reporter=PlainReporter(out),
    )
    return jobs, summary, out.getvalue()


def test_expand_fp_once_per_model_first(fakes):
    jobs = expand(
        {"toy": ["toy-a", "toy-b"]}, ["fp", "toy-ptq"], [*BITS, parse_bits("fp")], [0, 1], "mini", "ci"
    )
    ids = [j.job_id for j in jobs]
    assert ids[0] == f"toy/toy-a/fp/fp/{FP_SEED}" and ids[5] == f"toy/toy-b/fp/fp/{FP_SEED}"
    assert sum(j.method == "fp" for j in jobs) == 2  # once per model, whatever --bits/--seeds say
    assert sorted(ids[1:5]) == sorted(f"toy/toy-a/toy-ptq/{b}/{s}" for b in ("w4a4", "w8a8") for s in (0, 1))
    assert len({j.key for j in jobs}) == len(jobs)
    # FP job is added even when fp is not asked for.
    assert expand({"toy": ["toy-a"]}, ["toy-dfq"], BITS, [0], "mini", "ci")[0].method == "fp"
    # Profile changes the resolved config (ci overrides), hence the key.
    ci = expand({"toy": ["toy-a"]}, ["toy-ptq"], BITS[:1], [0], "mini", "ci")[1]
    paper = expand({"toy": ["toy-a"]}, ["toy-ptq"], BITS[:1], [0], "mini", "paper")[1]
    assert ci.config["calib_size"] == 4 and paper.config["calib_size"] == 32 and ci.key != paper.key


def test_run_writes_records_then_resumes_with_zero_work(tmp_path, fakes):
    jobs, summary, log = _run(tmp_path)
    assert len(jobs) == 5 and summary.count("done") == 5 and not summary.failed
    assert CALLS["quantize:fp"] == 1 and CALLS["quantize:toy-ptq"] == 2 and CALLS["quantize:toy-dfq"] == 2
    assert CALLS["load"] == 5 and CALLS["evaluate"] == 5
    assert len(list((tmp_path / "runs").glob("*.json"))) == 5
    assert len(log.strip().splitlines()) == 5  # plain log: one line per job

    CALLS.clear()
    _, summary2, log2 = _run(tmp_path)
    assert summary2.count("cached") == 5 and summary2.count("done") == 0
    assert sum(CALLS.values()) == 0  # nothing loaded, quantized or evaluated
    assert all(" cached " in line for line in log2.strip().splitlines())


def test_fp_record_is_reused_for_new_jobs(tmp_path, fakes):
    _, first, _ = _run(tmp_path, methods=("toy-ptq",), bits=BITS[:1])
    fp_metrics = first.results[0].record["metrics"]
    CALLS.clear()
    _, second, _ = _run(tmp_path, methods=("toy-ptq", "toy-dfq"), bits=BITS[:1])
    assert CALLS["quantize:fp"] == 0 and CALLS["quantize:toy-dfq"] == 1 and CALLS["quantize:toy-ptq"] == 0
    new = [r.record for r in second.results if r.status == "done"]
    assert len(new) == 1 and new[0]["fp_metrics"] == fp_metrics
    assert new[0]["delta_to_fp"]["top1"] == pytest.approx(new[0]["metrics"]["top1"] - fp_metrics["top1"])


def test_force_reruns_with_identical_metrics(tmp_path, fakes):
    jobs, first, _ = _run(tmp_path, seeds=(0, 1))
    CALLS.clear()
    jobs2, second, _ = _run(tmp_path, seeds=(0, 1), force=True)
    assert second.count("done") == len(jobs) == 9 and CALLS["quantize:toy-dfq"] == 4
    assert [j.key for j in jobs] == [j.key for j in jobs2]
    assert [r.record["metrics"] for r in first.results] == [r.record["metrics"] for r in second.results]
    # Seeds matter for the seed-dependent method, and only for it.
    by_id = {r.job.job_id: r.record["metrics"]["top1"] for r in first.results}
    assert by_id["toy/toy-a/toy-dfq/w4a4/0"] != by_id["toy/toy-a/toy-dfq/w4a4/1"]
    assert by_id["toy/toy-a/toy-ptq/w4a4/0"] == by_id["toy/toy-a/toy-ptq/w4a4/1"]


def test_record_contents(tmp_path, fakes):
    _, summary, _ = _run(tmp_path, methods=("toy-ptq",), bits=BITS[:1])
    fp, rec = (r.record for r in summary.results)
    for field in (
        "key",
        "job_id",
        "method",
        "config",
        "model",
        "weights",
        "task",
        "dataset",
        "bits",
        "seed",
        "profile",
        "metrics",
        "fp_metrics",
        "timings",
        "peak_memory_mb",
        "peak_memory_method",
        "model_size_bits",
        "bit_spec",
        "layer_bits",
        "policy",
        "environment",
        "method_info",
        "notes",
        "created",
    ):
        assert field in rec, field
    # the ci profile, resolved
    assert rec["config"] == {"calib_size": 4, "clip": 1.0, "layers": ["fc"], "data_source": None}
    assert rec["layer_bits"] == {"fc": [4, 4]} and rec["bit_spec"]["name"] == "w4a4"
    assert rec["policy"]["name"] == "toy"
    assert set(rec["timings"]) >= {"generation", "calibration", "finetune", "evaluation", "total"}
    assert rec["timings"]["calibration"] > 0 and rec["timings"]["total"] >= rec["timings"]["evaluation"]
    assert rec["fp_metrics"] == fp["metrics"] and fp["fp_metrics"] == fp["metrics"]
    assert rec["method_info"]["provenance"]["calibration"] == "paper: min-max"
    assert rec["method_info"]["data_free"] is False
    assert "ru_maxrss" in rec["peak_memory_method"] and rec["peak_memory_mb"] > 0
    env = rec["environment"]
    for k in (
        "git_commit",
        "git_dirty",
        "python",
        "torch",
        "timm",
        "mmdet",
        "mmseg",
        "platform",
        "device_name",
        "torch_threads",
    ):
        assert k in env, k
    assert "toy ptq ran" in rec["notes"]
    # model size: the quantized module with the method's resolved BitSpec; FP falls back to the plain spec.
    assert rec["model_size_bits"] == 1001 and fp["model_size_bits"] == 1000
    module, bits = fakes[-1]
    assert isinstance(bits, BitSpec) and bits.layers == {"fc": (4, 4)} and isinstance(module, torch.nn.Module)
    # The PTQ method got real calibration images with the ci calib size; data-free methods get none.
    assert CALLS["calib_n:4"] == 1 and CALLS["calibration"] == 1
    _run(tmp_path, methods=("toy-dfq",), bits=BITS[:1])
    assert CALLS["calibration"] == 1  # the data-free method never asked the task for images


def test_crash_mid_write_leaves_no_record_and_job_reruns(tmp_path, fakes, monkeypatch):
    real_replace = store_mod.os.replace
    calls = {"n": 0}

    def replace_fails_once_for_second_job(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated crash at rename")
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", replace_fails_once_for_second_job)
    jobs, summary, _ = _run(tmp_path, methods=("toy-ptq",), bits=BITS[:1])
    assert [r.status for r in summary.results] == ["done", "failed"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        f"{jobs[0].key}.json"
    ]  # no temp, no partial
    CALLS.clear()
    _, again, _ = _run(tmp_path, methods=("toy-ptq",), bits=BITS[:1])
    assert [r.status for r in again.results] == ["cached", "done"] and CALLS["quantize:toy-ptq"] == 1


def test_failing_job_does_not_stop_the_grid(tmp_path, fakes):
    bench_fakes.register_fake("toy-broken", bench_fakes.ToyPTQ)
    _, summary, log = _run(tmp_path, methods=("toy-broken", "toy-dfq"), bits=BITS[:1])
    assert [r.status for r in summary.results] == ["done", "failed", "done"]
    assert "boom inside the method" in summary.failed[0].error and "failed" in log


def test_task_error_aborts_the_run(tmp_path, fakes):
    with pytest.raises(TaskError, match="toy-nodata"):
        _run(tmp_path, models=("toy-nodata",), dataset="full")
    assert not (tmp_path / "runs").exists()


def test_determinism_flag_restored(tmp_path, fakes):
    before = torch.are_deterministic_algorithms_enabled()
    _run(tmp_path, methods=("toy-dfq",), bits=BITS[:1])
    assert torch.are_deterministic_algorithms_enabled() == before


def test_task_weights_tag_hook_enters_the_key(fakes):
    class Tagged(bench_fakes.ToyTask):
        def weights_tag(self, model, dataset, weights):
            return f"{model}.ckpt@sha256:0123456789ab"

    plain = expand({"toy": ["toy-a"]}, ["toy-ptq"], BITS[:1], [0], "mini", "ci")
    tagged = expand({"toy": ["toy-a"]}, ["toy-ptq"], BITS[:1], [0], "mini", "ci", tasks={"toy": Tagged()})
    assert plain[1].weights_tag == "default" and tagged[1].weights_tag == "toy-a.ckpt@sha256:0123456789ab"
    assert plain[1].key != tagged[1].key  # a retrained default checkpoint does not resume stale records


def test_rich_reporter_renders_a_window_of_jobs(fakes):
    from rich.console import Console

    from bench.progress import MAX_ROWS, RichReporter

    jobs = expand({"toy": ["toy-a"]}, ["toy-ptq"], BITS, list(range(15)), "mini", "ci")  # 31 jobs
    buf = io.StringIO()
    rep = RichReporter(Console(file=buf, width=120, force_terminal=False))
    rep.begin(jobs)
    rep.finished(0, "cached", {"method": "fp", "metrics": {"top1": 80.0}}, "top1", 0.0)
    rep.started(1)
    rep.finished(
        1,
        "done",
        {"method": "toy-ptq", "metrics": {"top1": 70.0}, "delta_to_fp": {"top1": -10.0}},
        "top1",
        1.5,
    )
    rep.end()
    out = buf.getvalue()
    assert "top1=70.00 (Δ -10.00)" in out and "cached: 1" in out and "pending: 29" in out
    assert len(jobs) == 31 and sum("toy/toy-a/" in line for line in out.splitlines()) == MAX_ROWS  # a window
