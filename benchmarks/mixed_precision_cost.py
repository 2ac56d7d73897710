"""MPTQ-ViT's scale searches and one Greedy MP step, as ratios to one FP forward of the same model on
the same images, at two depths (goal: the allocator's cost per FP forward grows linearly with depth,
i.e. the ratio at depth 2d is at most ``GOAL`` times twice the ratio at depth d).

Run: ``.venv/bin/python -m benchmarks.mixed_precision_cost [--depths 4 8 --batch 32]``

The model is mini-vit's architecture (28x28x1 input, patch 4, width 96, 3 heads) with random weights
at each depth; the images are N(0, 1). Measured, each in units of one FP forward (process CPU time,
best of ``--rounds``):

* ``search``: MPTQ-ViT's calibration at w4a4 (SQ-b fold, min-max pass, the sequential PTQ4ViT search
  of every site with OPT-m), at the ci and the paper search settings;
* ``mp step``: one exact Greedy MP step: every unit trial-lowered one notch and measured (KL of the
  logits; its site's search re-run for the new bits with the ci settings; block outputs cached, so a
  trial re-runs only the blocks from the unit's onwards), then undone;
* ``trial``: that step divided by the number of units; ``memo``: the same step again, when every
  site's search for those bits is remembered (what a later step costs).

A step's units grow with depth and each trial re-runs a share of the forward, so "mp step / FP
forward" is expected to double when the depth doubles (linear), not to quadruple.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from benchmarks import cpu_seconds  # noqa: E402
from methods.base import RunContext, allocate_bits  # noqa: E402
from methods.mptq_vit import MPTQUnitBits, MPTQViT  # noqa: E402
from methods.quant.bits import BitSpec, parse_bits  # noqa: E402
from methods.quant.mixed import DownstreamForward, Unit, block_index, kl_loss, site_costs  # noqa: E402
from methods.quant.reconstruct import block_units  # noqa: E402
from methods.quant.surgery import prepare  # noqa: E402
from methods.quant.target import InputSpec, QuantTarget  # noqa: E402

GOAL = 1.25
SPEC = InputSpec(image_size=(28, 28), in_chans=1, mean=(0.5,), std=(0.5,))


def mini_vit(depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=depth,
                          num_heads=3, mlp_ratio=2.0)
    return prepare(m.eval())


def _ctx() -> RunContext:
    import tempfile
    tmp = Path(tempfile.mkdtemp())
    return RunContext(device=torch.device("cpu"), seed=0, profile="ci", cache_dir=tmp, artifacts_dir=tmp)


def measure(depth: int, batch: int, rounds: int) -> dict[str, float]:
    model = mini_vit(depth)
    target = QuantTarget(model=model, model_name=f"vit-d{depth}", quant_path="", input_spec=SPEC,
                         family="vit", logits=lambda m, x: m(x), num_classes=10)
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp = cpu_seconds(lambda: model(x), rounds)
    out = {"fp_forward_s": fp}
    for profile in ("ci", "paper"):
        method = MPTQViT(MPTQViT.make_config(profile))

        def search(method=method):
            built = method.build(target, parse_bits("w4a4"), _ctx())
            method.calibrate(built, x, target, _ctx())
        out[f"search_{profile}"] = cpu_seconds(search, 1, warmup=False) / fp

    # one exact Greedy MP step on a probe at 8 bits (ci search settings)
    method = MPTQViT(MPTQViT.make_config("ci"))
    probe = method.build(target, BitSpec("w8a8", 8, 8), _ctx())
    searcher = method._calibrate(probe, x, target, _ctx())
    set_bits = MPTQUnitBits(probe.qmodule, searcher)
    qmod = probe.qmodule
    blocks = block_units(qmod)
    runner = DownstreamForward(qmod, blocks, lambda: qmod(x))
    with torch.no_grad():
        loss_fn = kl_loss(model(x))
    runner.refresh()
    costs = site_costs(qmod, lambda: qmod(x), batch)
    units = [Unit(p, k, 1, block_index(p, blocks)) for p, (w, a) in probe.resolved_bits.layers.items()
             for k, b in (("w", w), ("a", a)) if b is not None and costs[p].macs + costs[p].act_elements]

    def step():
        for u in units:
            set_bits(u, 6)
            loss_fn(runner.run(u.block))
            set_bits(u, 8)
    out["mp_step"] = cpu_seconds(step, 1, warmup=False) / fp  # the searches for 6 bits included
    out["mp_step_memo"] = cpu_seconds(step, rounds, warmup=False) / fp  # searches remembered
    out["trial"] = out["mp_step"] / len(units)
    out["units"] = len(units)
    # the whole allocation (lazy greedy, ci) at mp5, for scale
    ctx = _ctx()
    ctx.data_sources["calibration"] = {"source": "noise", "images": batch}
    total = cpu_seconds(lambda: allocate_bits(method, probe, target, parse_bits("mp5"), x, set_bits, ctx,
                                              mode="lazy"), 1, warmup=False)
    out["allocation_mp5"] = total / fp
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs=2, default=(4, 8))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = {d: measure(d, args.batch, args.rounds) for d in args.depths}
    print(f"mini-vit architecture, batch {args.batch}, 1 thread; ratios to one FP forward of that depth")
    print(f"{'depth':>5} {'units':>5} {'search ci':>10} {'search paper':>12} {'mp step':>8} {'trial':>6} "
          f"{'memo':>6} {'mp5 alloc':>9}")
    for d, r in rows.items():
        print(f"{d:>5} {r['units']:>5} {r['search_ci']:>10.0f} {r['search_paper']:>12.0f} "
              f"{r['mp_step']:>8.1f} {r['trial']:>6.2f} {r['mp_step_memo']:>6.1f} "
              f"{r['allocation_mp5']:>9.0f}")
    d1, d2 = args.depths
    growth = rows[d2]["mp_step"] / rows[d1]["mp_step"]
    linear = d2 / d1
    ok = growth <= GOAL * linear
    print(f"mp step per FP forward grows {growth:.2f}x from depth {d1} to {d2} (linear: {linear:.2f}x, "
          f"quadratic: {linear ** 2:.2f}x); goal <= {GOAL * linear:.2f}x: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
