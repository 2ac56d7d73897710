"""Determinism where it is promised, and a regression check that catches a broken quantizer.

* The same job twice on the same machine and thread count gives identical metrics and bit-identical
  synthetic images (their SHA-256 is in the record).
* ``bench regress`` on part of the committed golden grid passes, and fails once a plugin swaps in a
  wrong quantizer (rounding toward zero).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "results" / "golden" / "mini.json"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _bench(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_same_job_twice_gives_identical_metrics_and_images(tmp_path):
    records = []
    for run in ("a", "b"):  # separate results dirs: separate caches, so the images are generated twice
        proc = _bench("run", "--methods", "psaq-vit,mimiq", "--models", "mini-vit", "--bits", "w4a4",
                      "--seeds", "0", "--threads", "1", "--results", str(tmp_path / run))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records.append({r["job_id"]: r for r in ResultStore(tmp_path / run).records()})
    a, b = records
    assert set(a) == set(b) == {"cls/mini-vit/fp/fp/0", "cls/mini-vit/psaq-vit/w4a4/0",
                                "cls/mini-vit/mimiq/w4a4/0"}
    for job_id in a:
        assert a[job_id]["metrics"] == b[job_id]["metrics"], job_id
        assert a[job_id]["image_sha256"] == b[job_id]["image_sha256"], job_id
        assert a[job_id]["environment"]["torch_threads"] == 1
    assert len(a["cls/mini-vit/psaq-vit/w4a4/0"]["image_sha256"]["calibration"]) == 64
    assert a["cls/mini-vit/mimiq/w4a4/0"]["data_sources"]["calibration"]["source"] == "mimiq"


def test_regress_passes_then_catches_a_broken_quantizer(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    jobs = [j for j in golden["results"] if j.startswith("cls/mini-vit/") and "/minmax-ptq/" in j or
            j == "cls/mini-vit/fp/fp/0"]
    assert len(jobs) == 6  # fp + four uniform specs + mp5
    select = ["--methods", "minmax-ptq", "--models", "mini-vit", "--tasks", "cls", "--results",
              str(tmp_path / "r")]
    ok = _bench("regress", *select)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "CPU capability" in ok.stdout and "PASS" in ok.stdout
    broken = _bench("regress", *select, "--force", "--plugin", str(ROOT / "tests" / "plugins" /
                                                                   "broken_rounding.py"))
    assert broken.returncode == 1, broken.stdout[-3000:] + broken.stderr[-3000:]
    assert "FAIL" in broken.stdout and "regressed" in broken.stdout
