"""The repo stands alone: no file refers to the development workspace beside it or to an absolute
path of the machine it was written on."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# built from pieces so this file does not match itself
FORBIDDEN = ("../" + "shared", "/" + "work/", "/" + "root/", "/" + "home/")


def test_no_reference_to_shared_or_absolute_paths():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".pt", ".npz", ".png", ".jpg", ".onnx"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{name}: {bad}" for bad in FORBIDDEN if bad in text]
    assert not hits, hits
