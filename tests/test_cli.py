"""Command line: validation (exit 2, nothing written), run/resume, tables, list, regress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bench_fakes
import pytest
import torch
from bench_fakes import CALLS

import bench.cli as cli
from bench import api
from bench.regress import ToleranceRule, compare
from bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = f"{ROOT / 'tests' / 'bench_fakes.py'}:install"
VALID_METHODS = "fp, toy-ptq, toy-dfq"


def bench_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(cli.PLUGIN_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.delenv(cli.PLUGIN_ENV, raising=False)
    monkeypatch.setitem(api.REGRESS_GRID, "tasks", "toy")  # the golden grid, on the fake task
    with bench_fakes.installed():
        yield


# --- validation through the real entry point (subprocess) ---------------------------------------------


def test_subprocess_unknown_method_exits_2_and_writes_nothing(tmp_path):
    res = bench_subprocess(
        "run",
        "--plugin",
        PLUGIN,
        "--tasks",
        "toy",
        "--methods",
        "toy-ptq,nope",
        "--results",
        str(tmp_path / "out"),
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"error: unknown method 'nope'; valid: {VALID_METHODS}"
    assert res.stdout == "" and not (tmp_path / "out").exists()


def test_subprocess_bad_bits_exits_2_and_writes_nothing(tmp_path):
    res = bench_subprocess(
        "run", "--plugin", PLUGIN, "--tasks", "toy", "--bits", "w4a4,w9a9", "--results", str(tmp_path / "out")
    )
    assert res.returncode == 2
    assert res.stderr.startswith(
        "error: bit spec 'w9a9': bit-width 9 not supported; use one of [2, 3, 4, 5, 6, 8]"
    )
    assert not (tmp_path / "out").exists()


def test_subprocess_task_error_is_one_line(tmp_path):
    res = bench_subprocess(
        "run",
        "--plugin",
        PLUGIN,
        "--tasks",
        "toy",
        "--dataset",
        "full",
        "--models",
        "toy-nodata",
        "--methods",
        "fp",
        "--results",
        str(tmp_path / "out"),
    )
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "error: weights for toy-nodata not found: put toy.pth under $VITQ_DATA"
    ]
    assert "Traceback" not in res.stdout + res.stderr
    assert not list((tmp_path / "out").glob("runs/*.json"))


# --- validation in-process ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "det"], "error: unknown task 'det'; valid: toy"),
        (
            ["--tasks", "toy", "--models", "toy-a,vit-huge"],
            "error: unknown model 'vit-huge'; valid: toy-a, toy-b",
        ),
        (["--tasks", "toy", "--profile", "turbo"], "error: unknown profile 'turbo'; valid: ci, fast, paper"),
        (["--tasks", "toy", "--dataset", "imagenet"], "error: unknown dataset 'imagenet'; valid: mini, full"),
        (
            ["--tasks", "toy", "--bits", "mp9"],
            "error: bit spec 'mp9': mixed-precision budget 9 outside [2, 8]",
        ),
        (["--tasks", "toy", "--bits", "w4"], "error: unknown bit spec 'w4'; valid: fp, w4a4"),
        (["--tasks", "toy", "--seeds", "0,x"], "error: invalid --seeds '0,x'"),
        (["--tasks", "toy", "--seeds", "1,1"], "error: invalid --seeds '1,1'"),
        (["--tasks", "toy", "--device", "tpu"], "error: unknown device 'tpu'; valid: cpu, cuda, cuda:N"),
        (
            ["--tasks", "toy", "--weights", "/no/such.pth", "--models", "toy-a"],
            "error: --weights /no/such.pth",
        ),
    ],
)
def test_validation_errors(tmp_path, fakes, capsys, args, message):
    out = tmp_path / "out"
    assert cli.main(["run", *args, "--results", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and sum(CALLS.values()) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda(tmp_path, fakes, capsys):
    assert cli.main(["run", "--tasks", "toy", "--device", "cuda", "--results", str(tmp_path / "o")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_weights_need_exactly_one_model(tmp_path, fakes, capsys):
    w = tmp_path / "toy.pth"
    w.write_bytes(b"weights")
    assert cli.main(["run", "--tasks", "toy", "--weights", str(w), "--results", str(tmp_path / "o")]) == 2
    assert "select exactly one with --models (got 2)" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "run",
                "--tasks",
                "toy",
                "--weights",
                str(w),
                "--models",
                "toy-a",
                "--methods",
                "fp",
                "--results",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    (rec,) = ResultStore(tmp_path / "o").records()
    assert rec["weights"].startswith("toy.pth@sha256:") and rec["target"]["info"]["weights"] == str(w)


# --- run / resume / tables / list -------------------------------------------------------------------------


def test_run_then_resume_then_tables(tmp_path, fakes, capsys):
    out = tmp_path / "res"
    assert cli.main(["run", "--tasks", "toy", "--bits", "w4a4", "--results", str(out)]) == 0
    stdout = capsys.readouterr().out
    # --methods all = fp + toy-ptq + toy-dfq; 2 models; fp once per model; the mini default is seeds 0,1,2.
    assert "14 jobs: 14 run, 0 cached, 0 failed" in stdout
    assert "### toy · mini · top1 (profile ci)" in stdout and "not paper numbers" in stdout
    assert sorted(p.name for p in (out / "tables").iterdir()) == [
        "toy_mini.csv",
        "toy_mini.md",
        "toy_mini.tex",
    ]
    CALLS.clear()
    assert cli.main(["run", "--tasks", "toy", "--bits", "w4a4", "--results", str(out)]) == 0
    assert "14 jobs: 0 run, 14 cached, 0 failed" in capsys.readouterr().out and sum(CALLS.values()) == 0

    assert cli.main(["tables", "--results", str(out), "--format", "md"]) == 0
    assert "| toy-ptq" in capsys.readouterr().out
    assert cli.main(["tables", "--results", str(out), "--format", "html"]) == 2
    assert "unknown format 'html'; valid: md, csv, tex" in capsys.readouterr().err
    assert cli.main(["tables", "--results", str(tmp_path / "empty")]) == 1


def test_quant_scope_is_a_recorded_task_option(tmp_path, fakes, capsys):
    out = tmp_path / "res"
    base = ["run", "--tasks", "toy", "--models", "toy-a", "--methods", "fp,toy-ptq", "--bits", "w4a4",
            "--seeds", "0"]
    assert cli.main([*base, "--results", str(out)]) == 0
    default_keys = {r["key"] for r in ResultStore(out).records()}
    # the default scope named explicitly is the same job (same keys: everything cached)
    assert cli.main([*base, "--quant-scope", "backbone", "--results", str(out)]) == 0
    assert "2 jobs: 0 run, 2 cached" in capsys.readouterr().out
    assert cli.main([*base, "--quant-scope", "all", "--results", str(out)]) == 0
    assert "2 jobs: 2 run, 0 cached" in capsys.readouterr().out
    scoped = [r for r in ResultStore(out).records() if r["key"] not in default_keys]
    assert len(scoped) == 2
    assert all(r["options"] == {"quant_scope": "all"} for r in scoped)
    assert all(r["target"]["info"]["quant_scope"] == "all" for r in scoped)
    assert {r["job_id"] for r in scoped} == {"toy/toy-a/fp/fp/0?quant_scope=all",
                                              "toy/toy-a/toy-ptq/w4a4/0?quant_scope=all"}
    assert cli.main(["tables", "--results", str(out), "--format", "md"]) == 0
    table = capsys.readouterr().out
    assert "toy-a[quant_scope=all] w4a4" in table  # a column of its own beside the default scope
    assert "toy-a w4a4" in table


def test_method_args_set_config_fields_and_get_their_own_rows(tmp_path, fakes, capsys):
    out = tmp_path / "res"
    base = ["run", "--tasks", "toy", "--models", "toy-a", "--methods", "toy-ptq", "--bits", "w4a4",
            "--seeds", "0"]
    assert cli.main([*base, "--results", str(out)]) == 0
    args = "calib_size=2,clip=1,layers=(fc,head)"
    assert cli.main([*base, "--method-args", args, "--results", str(out)]) == 0
    assert "2 jobs: 1 run, 1 cached" in capsys.readouterr().out  # the fp job is shared
    (rec,) = [r for r in ResultStore(out).records() if r.get("method_args")]
    # values take the field's type: clip 1 -> 1.0, the tuple stays a tuple (a list in JSON)
    assert rec["method_args"] == {"calib_size": 2, "clip": 1.0, "layers": ["fc", "head"]}
    assert rec["config"] == {"calib_size": 2, "clip": 1.0, "layers": ["fc", "head"], "data_source": None}
    assert rec["job_id"] == "toy/toy-a/toy-ptq[calib_size=2,clip=1.0,layers=['fc', 'head']]/w4a4/0"
    assert CALLS["calib_n:2"] == 1  # the method really got the field
    assert cli.main(["tables", "--results", str(out), "--format", "md"]) == 0
    table = capsys.readouterr().out
    top1 = table.split("### ")[1]  # the first table (top1): one row for the default, one for the args
    rows = [line.split("|")[1].strip() for line in top1.splitlines() if line.startswith("| toy-ptq")]
    assert rows == ["toy-ptq", "toy-ptq[calib_size=2,clip=1.0,layers=['fc', 'head']]"]


def test_method_args_sweep_gives_one_row_per_set(tmp_path, fakes, capsys):
    """``;`` separates the sets of a sweep: one job (and one table row) per set, the fp job shared; an
    empty set is the profile's own row."""
    out = tmp_path / "res"
    sweep = "clip=0.5;calib_size=2,clip=0.25;"
    assert cli.main(["run", "--tasks", "toy", "--models", "toy-a", "--methods", "toy-ptq", "--bits", "w4a4",
                     "--seeds", "0", "--method-args", sweep, "--results", str(out)]) == 0
    assert "4 jobs: 4 run" in capsys.readouterr().out
    args = sorted((r.get("method_args") or {}).get("clip", 1.0) for r in ResultStore(out).records()
                  if r["method"] == "toy-ptq")
    assert args == [0.25, 0.5, 1.0]
    assert CALLS["calib_n:2"] == 1 and CALLS["calib_n:4"] == 2  # each set reached its own job
    assert cli.main(["tables", "--results", str(out), "--format", "md"]) == 0
    top1 = capsys.readouterr().out.split("### ")[1]
    rows = [line.split("|")[1].strip() for line in top1.splitlines() if line.startswith("| toy-ptq")]
    assert rows == ["toy-ptq", "toy-ptq[calib_size=2,clip=0.25]", "toy-ptq[clip=0.5]"]


@pytest.mark.parametrize(
    "args, message",
    [
        ("clip=0.5;clip=0.5", "error: --method-args: set 2 repeats an earlier set"),
        ("steps=3", "error: method 'toy-ptq' has no config field 'steps'; fields: calib_size, clip, layers"),
        ("calib_size=big", "error: method 'toy-ptq': calib_size='big' should be int like the default 32"),
        ("calib_size", "error: --method-args: 'calib_size' is not key=value"),
    ],
)
def test_method_args_errors_are_one_line(tmp_path, fakes, capsys, args, message):
    out = tmp_path / "out"
    run = ["run", "--tasks", "toy", "--methods", "fp,toy-ptq", "--method-args", args, "--results", str(out)]
    assert cli.main(run) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and sum(CALLS.values()) == 0


def test_method_args_flags_take_true_and_false():
    """A bool field takes True/False (Python) and true/false (lm-eval, YAML); other words are errors."""
    from bench.grid import coerce_method_args

    assert coerce_method_args("mptq-vit", {"mp_trial_search": "false", "sq_b": True}) == {
        "mp_trial_search": False, "sq_b": True}
    assert coerce_method_args("mptq-vit", {"fully_quantized": "TRUE"}) == {"fully_quantized": True}
    with pytest.raises(ValueError, match="should be bool"):
        coerce_method_args("mptq-vit", {"sq_b": "yes"})


def test_failed_job_gives_exit_1(tmp_path, fakes, capsys):
    bench_fakes.register_fake("toy-broken", bench_fakes.ToyPTQ)
    code = cli.main(
        [
            "run",
            "--tasks",
            "toy",
            "--models",
            "toy-a",
            "--methods",
            "toy-broken,toy-dfq",
            "--bits",
            "w8a8",
            "--seeds",
            "0",
            "--results",
            str(tmp_path),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "3 jobs: 2 run, 0 cached, 1 failed" in captured.out
    assert "failed: toy/toy-a/toy-broken/w8a8/0: RuntimeError: boom inside the method" in captured.err


def test_list(fakes, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for text in (
        "toy-ptq",
        "toy-dfq",
        "paper, ci",
        "paper: min-max",
        "reconstructed: seeded noise",
        "toy-a, toy-b",
        "toy-a, toy-nodata",
        "w4a4",
        "top1",
    ):
        assert text in out, text


def test_list_one_methods_config(fakes, capsys):
    assert cli.main(["list", "--method", "toy-ptq"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "--method-args" in lines[0]
    assert lines[1].split() == ["field", "paper", "ci"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows == {"calib_size": ["32", "4"], "clip": ["1.0", "1.0"], "layers": ["['fc']", "['fc']"],
                    "data_source": ["None", "None"]}
    assert cli.main(["list", "--method", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown method 'nope'")


# --- regress ---------------------------------------------------------------------------------------------


def _regress(tmp_path, *extra):
    return cli.main(
        [
            "regress",
            "--golden",
            str(tmp_path / "golden.json"),
            "--results",
            str(tmp_path / "r"),
            "--bits",
            "w4a4",
            *extra,
        ]
    )


def _full_regress(tmp_path, *extra):
    return cli.main(
        ["regress", "--golden", str(tmp_path / "golden.json"), "--results", str(tmp_path / "r"), *extra]
    )


def _edit_golden(tmp_path, fn):
    path = tmp_path / "golden.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _set_cell(tmp_path, job, metric, **fields):
    _edit_golden(tmp_path, lambda d: d["results"][job][metric].update(fields))


def test_regress_update_then_pass_then_detect(tmp_path, fakes, capsys):
    assert _full_regress(tmp_path) == 2  # no golden file yet
    assert "create it with" in capsys.readouterr().err
    assert _full_regress(tmp_path, "--update") == 0
    assert "derive them with scripts/derive_golden.py" in capsys.readouterr().out
    golden = json.loads((tmp_path / "golden.json").read_text())
    assert golden["dataset"] == "mini" and golden["profile"] == "ci" and golden["schema"] == 2
    assert golden["rule"]["seed_k"] == ToleranceRule().seed_k
    assert "tolerance = max(floor" in golden["rule"]["text"]
    # 2 models x (fp + 2 methods x 5 default bits: four uniform and mp5) = 22 jobs with readable ids.
    assert len(golden["results"]) == 22 and "toy/toy-a/toy-ptq/w4a4/0" in golden["results"]
    assert "toy/toy-b/toy-dfq/mp5/0" in golden["results"]
    cell = golden["results"]["toy/toy-a/toy-ptq/w4a4/0"]["top1"]
    # one run: no spread measured, the tolerance is the floor (the toy task reports no eval size: 0)
    assert cell["seed_values"] == [] and cell["kernel_values"] == {} and cell["tolerance"] == cell["floor"]

    out = capsys.readouterr().out
    assert _full_regress(tmp_path) == 0
    out = capsys.readouterr().out
    assert "no metric moved" in out and "torch threads" in out and "CPU capability" in out

    job = "toy/toy-b/toy-dfq/w6a6/0"
    value = golden["results"][job]["top1"]["value"]
    _set_cell(tmp_path, job, "top1", value=value + 0.3, tolerance=0.5)  # within 0.5
    assert _full_regress(tmp_path) == 0
    out = capsys.readouterr().out
    assert job in out and "within" in out and "PASS" in out

    _set_cell(tmp_path, job, "top1", tolerance=0.1)  # same move, tighter tolerance
    assert _full_regress(tmp_path) == 1
    out = capsys.readouterr().out
    assert "regressed" in out and "FAIL" in out

    _set_cell(tmp_path, job, "top1", value=value - 2.0, tolerance=0.5)
    assert _full_regress(tmp_path) == 1
    assert "improved" in capsys.readouterr().out  # better than golden beyond tolerance: stale golden, fail


def test_regress_rejects_an_old_golden_schema(tmp_path, fakes, capsys):
    (tmp_path / "golden.json").write_text(json.dumps({"schema": 1, "results": {}}))
    assert _full_regress(tmp_path) == 2
    assert "derive_golden.py" in capsys.readouterr().err


def test_regress_missing_and_extra_jobs(tmp_path, fakes, capsys):
    assert _full_regress(tmp_path, "--update") == 0
    _edit_golden(tmp_path, lambda d: d["results"].pop("toy/toy-a/toy-ptq/w8a8/0"))
    assert _full_regress(tmp_path) == 1
    assert "extra-job" in capsys.readouterr().out
    assert _full_regress(tmp_path, "--update") == 0
    gone = {"toy/toy-a/gone/w4a4/0": {"top1": {"value": 1.0, "tolerance": 0.5}}}
    _edit_golden(tmp_path, lambda d: d["results"].update(gone))
    assert _full_regress(tmp_path) == 1
    assert "missing-job" in capsys.readouterr().out
    # A filtered run checks only the golden jobs inside its selection.
    assert _regress(tmp_path, "--methods", "toy-ptq") == 0


def test_regress_in_temp_dir(tmp_path, fakes, capsys):
    assert _full_regress(tmp_path, "--update") == 0
    code = cli.main(["regress", "--golden", str(tmp_path / "golden.json")])  # fresh temp results dir
    assert code == 0 and "PASS: 44 metric checks: 44 ok" in capsys.readouterr().out


def test_compare_unit():
    def c(value, tol):
        return {"value": value, "tolerance": tol}

    golden = {"results": {"a": {"top1": c(80.0, 0.5), "top5": c(95.0, 0.0)}, "b": {"top1": c(1.0, 0.5)}}}
    ok = compare(golden, {"a": {"top1": 80.4, "top5": 95.0}, "b": {"top1": 1.0}})
    assert not ok.failed and [r.status for r in ok.moved] == ["within"]
    bad = compare(golden, {"a": {"top1": 79.4, "top5": 94.9}, "c": {"top1": 2.0}})
    statuses = {(r.job_id, r.metric): r.status for r in bad.rows}
    assert statuses == {
        ("a", "top1"): "regressed",
        ("a", "top5"): "regressed",
        ("b", "top1"): "missing-job",
        ("c", "top1"): "extra-job",
    }
    assert compare(golden, {"a": {"top1": 80.0, "top5": 95.0}}, scope=["a"]).failed is False
    assert compare(golden, {"a": {"top1": float("nan"), "top5": 95.0}}, scope=["a"]).failed


def test_tolerance_rule_by_hand():

    rule = ToleranceRule()
    # floor: max(0.75 * 100 * sqrt(0.8 * 0.2 / 2000), 5 * 100 / 2000) = max(0.75 * 0.8944, 0.25)
    assert abs(rule.floor(80.0, 2000) - 0.6708) < 1e-4
    assert rule.floor(99.9, 2000) == 0.25  # near 100 %: five images' worth, not the vanishing se
    cell = rule.cell(80.0, 2000, [79.0, 80.0, 81.0], {"avx2": 80.5, "default": 78.0})
    # seed std of 79, 80, 81 = 1 -> 4 x 1 = 4; kernel deviation max(|80.5-80|, |78-80|) = 2 -> 2 x 2 = 4
    assert cell["seed_std"] == 1.0 and cell["kernel_dev"] == 2.0 and cell["tolerance"] == 4.0
    assert rule.cell(80.0, 2000, [78.0, 80.0, 82.0], {"avx2": 80.5})["tolerance"] == 8.0  # 4 x std 2
    assert rule.cell(80.0, 2000)["tolerance"] == round(rule.floor(80.0, 2000), 4)
