"""The README's "Adding a method" example is a complete method: it registers from an installed entry
point, quantizes a model, and runs through the library API like a built-in."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tiny import SPEC, make_ctx, make_target, tiny_vit

from bench import api
from methods.base import METHODS
from methods.quant.bits import parse_bits

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> list[str]:
    section = README.read_text().split("## Adding a method", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def install(tmp_path: Path, monkeypatch) -> None:
    """The example as an installed plugin: its module plus a dist-info naming it in the entry-point group."""
    (tmp_path / "readme_method.py").write_text(readme_blocks()[0])
    info = tmp_path / "readme_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: readme-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vitq_bench.methods]\nmse-noise-ptq = readme_method\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_readme_method_from_an_entry_point(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch)
    with METHODS.scoped():
        assert "mse-noise-ptq" in METHODS.names()  # listed from the entry point, not imported yet
        cls = METHODS.get("mse-noise-ptq")
        assert cls.name == "mse-noise-ptq" and cls.data_free
        model = tiny_vit()
        ctx = make_ctx(tmp_path)
        out = cls(cls.make_config("ci")).quantize(make_target(model), parse_bits("w8a8"), ctx)
        assert out.policy["name"] == "mse-noise-ptq"
        assert out.resolved_bits.layers["blocks.0.attn.qkv"] == (8, 8)
        assert ctx.data_sources["calibration"]["source"] == "noise"
        assert ctx.data_sources["calibration"]["images"] == 16  # the ci profile
        x = torch.randn(SPEC.shape(4), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, q = model(x), out.model(x)
        assert 0 < float((q - ref).norm() / ref.norm()) < 0.05  # quantized, and close at 8 bits

        plan = api.make_plan(methods=["mse-noise-ptq"], tasks=["cls"], models=["mini-vit"], bits=["w8a8"],
                             seeds=[0])
        summary = api.run(plan, results=tmp_path / "results")
        assert not summary.failed
        fp, job = (r.record for r in summary.results)
        assert job["method_info"]["data_source"] == "noise" and job["image_sha256"]["calibration"]
        assert abs(job["metrics"]["top1"] - fp["metrics"]["top1"]) < 3.0


def test_readme_api_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes under ./results
    namespace: dict = {}
    exec(readme_blocks()[1], namespace)
    summary = namespace["summary"]
    assert [r.status for r in summary.results] == ["done", "done"]  # fp reference + the w4a4 job
    assert (tmp_path / "results" / "runs").is_dir()
