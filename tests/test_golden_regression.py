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

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "results" / "golden" / "mini.json"


def test_golden_file_covers_the_mini_grid():
    golden = json.loads(GOLDEN.read_text())
    assert golden["profile"] == "ci" and golden["dataset"] == "mini"
    jobs = set(golden["results"])
    models = [("cls", m) for m in ("mini-vit", "mini-deit", "mini-swin")]
    models += [("det", "mini-mask-rcnn-swin"), ("det", "mini-cascade-mask-rcnn-swin"),
               ("seg", "mini-upernet-swin")]
    for task, model in models:
        assert f"{task}/{model}/fp/fp/0" in jobs
        for method in ("minmax-ptq", "noise-ptq", "psaq-vit", "psaq-vit-v2", "mimiq"):
            for bits in ("w4a4", "w6a6", "w8a8", "w4a8"):
                assert f"{task}/{model}/{method}/{bits}/0" in jobs
    assert all(tol >= 0 for tol in golden["tolerance"].values())


def test_mini_grid_matches_golden(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "regress", "--golden", str(GOLDEN), "--results", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
