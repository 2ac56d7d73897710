"""The CI regression: the mini grid at the ci profile must reproduce results/golden/mini.json.

Runs the real CLI (`python -m bench regress`) exactly as a user would. Every mini job is
recomputed from scratch in a temporary results directory (nothing is resumed from the repo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.regress import ToleranceRule

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "results" / "golden" / "mini.json"


def test_golden_file_covers_the_mini_grid():
    golden = json.loads(GOLDEN.read_text())
    assert golden["profile"] == "ci" and golden["dataset"] == "mini" and golden["schema"] == 2
    jobs = set(golden["results"])
    models = [("cls", m) for m in ("mini-vit", "mini-deit", "mini-swin")]
    models += [("det", "mini-mask-rcnn-swin"), ("det", "mini-cascade-mask-rcnn-swin"),
               ("seg", "mini-upernet-swin")]
    for task, model in models:
        assert f"{task}/{model}/fp/fp/0" in jobs
        for method in ("minmax-ptq", "noise-ptq", "psaq-vit", "psaq-vit-v2", "mimiq", "spdfq", "mptq-vit"):
            for bits in ("w4a4", "w6a6", "w8a8", "w4a8", "mp5"):
                assert f"{task}/{model}/{method}/{bits}/0" in jobs
    assert len(golden["seeds_measured"]) >= 3 and len(golden["kernel_paths_measured"]) >= 2


def test_golden_tolerances_follow_from_their_stored_inputs():
    """Every tolerance is the stated rule applied to the spread stored beside it (nothing hand-set)."""
    golden = json.loads(GOLDEN.read_text())
    rule = ToleranceRule.from_dict(golden["rule"])
    assert golden["rule"]["text"] == rule.text()
    n = 0
    for job_id, metrics in golden["results"].items():
        for metric, cell in metrics.items():
            again = rule.cell(cell["value"], cell["eval_n"], cell["seed_values"], cell["kernel_values"])
            assert {k: cell[k] for k in again} == again, (job_id, metric)
            assert cell["tolerance"] >= cell["floor"] > 0, (job_id, metric)
            n += 1
            if "/fp/" in job_id:
                continue
            # every cell has at least three seeds and three other kernel paths; cls (cheap, and where the
            # chaotic cells are) has more of both
            assert len(cell["seed_values"]) >= 3, (job_id, metric)
            assert len(cell["kernel_values"]) >= 3, (job_id, metric)
            assert set(cell["kernel_values"]) <= set(golden["kernel_paths_measured"]), (job_id, metric)
    assert n > 300


@pytest.mark.slow
def test_mini_grid_matches_golden(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "regress", "--golden", str(GOLDEN), "--results", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
