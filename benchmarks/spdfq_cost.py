"""SPDFQ's cost per step, as ratios measured in one run (goal: a generation step <= 1.5x one FP
forward+backward of the same model and batch).

Run: ``.venv/bin/python -m benchmarks.spdfq_cost [--model deit_tiny_patch16_224 --batch 8]``

* Generation step: the time of one step of :func:`methods.synth.spdfq_generation.generate_spdfq_images`
  (the difference of two runs of ``--steps`` and ``2 * --steps`` iterations, divided by ``--steps``,
  so set-up drops out), against one forward+backward to the pixels of the FP model on the same batch.
  Measured with every term (APA + MSR + SL + TV) and without MSR: MSR forwards m ~ U{1..4} region
  batches of full input size each step, so with it a step does ~3.5 forwards+backwards by design.
* Reconstruction: one iteration of block-wise reconstruction of the first transformer block (W4A4,
  SPDFQ's quantizers), against one forward+backward of the FP block on the same input; and the whole
  block's reconstruction (capture + ``--recon-iterations`` iterations) in units of that FP step.

Timings are process CPU time (the stabler number on a shared machine), best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from benchmarks import cpu_seconds  # noqa: E402
from methods.quant.bits import parse_bits  # noqa: E402
from methods.quant.policy import apply_policy, calibrate, freeze  # noqa: E402
from methods.quant.reconstruct import capture, reconstruct_blocks  # noqa: E402
from methods.quant.surgery import prepare  # noqa: E402
from methods.quant.target import InputSpec  # noqa: E402
from methods.spdfq import spdfq_policy  # noqa: E402
from methods.synth.spdfq_generation import generate_spdfq_images  # noqa: E402

GOAL = 1.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recon-iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = prepare(timm.create_model(args.model, pretrained=False).eval())
    family = "swin" if "swin" in args.model else "vit"
    size = tuple(model.default_cfg["input_size"][1:])
    spec = InputSpec(image_size=size, in_chans=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = torch.randn(spec.shape(args.batch), generator=torch.Generator().manual_seed(1))
    for p in model.parameters():
        p.requires_grad_(False)

    def fp_step() -> None:
        pixels = x.clone().requires_grad_(True)
        model(pixels).sum().backward()

    def generate(iterations: int, **kw) -> Callable[[], object]:
        grid = getattr(model.patch_embed, "grid_size", None)
        return lambda: generate_spdfq_images(
            model, model, spec, batch_size=args.batch, iterations=iterations, warmup=1, lr=0.2,
            generator=torch.Generator().manual_seed(0), num_classes=1000, family=family,
            prefix_tokens=0 if family == "swin" else int(model.num_prefix_tokens),
            patch_grid=tuple(grid) if grid is not None else None, jitter=15, apa_weight=10.0, **kw)

    def per_step(**kw) -> float:
        short, long = cpu_seconds(generate(args.steps, **kw), args.rounds), \
            cpu_seconds(generate(2 * args.steps, **kw), args.rounds)
        return (long - short) / args.steps

    fp = cpu_seconds(fp_step, args.rounds)
    full, no_msr = per_step(), per_step(use_msr=False)

    student = copy.deepcopy(model)
    apply_policy(student, spdfq_policy(), parse_bits("w4a4"))
    calibrate(student, [x], weights_quantized=True)
    freeze(student)
    name = "blocks.0" if family == "vit" else "layers.0.blocks.0"
    fp_block = model.get_submodule(name)
    block_in = capture(model, fp_block, x, lambda m, b: m(b))

    def fp_block_step() -> None:
        inp = block_in.clone().requires_grad_(True)
        fp_block(inp).sum().backward()

    def recon(iterations: int) -> Callable[[], object]:
        return lambda: reconstruct_blocks(model, copy.deepcopy(student), [name], x, lambda m, b: m(b),
                                          iterations=iterations)

    block_fp = cpu_seconds(fp_block_step, args.rounds)
    r_short = cpu_seconds(recon(args.recon_iterations), args.rounds)
    r_long = cpu_seconds(recon(2 * args.recon_iterations), args.rounds)
    recon_iter = (r_long - r_short) / args.recon_iterations
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), process CPU seconds, "
          f"best of {args.rounds}")
    print(f"FP forward+backward (to the pixels)     {fp * 1e3:8.1f} ms")
    print(f"generation step, APA+MSR+SL+TV          {full * 1e3:8.1f} ms  ratio {full / fp:5.2f}x  "
          f"(goal <= {GOAL}x; MSR adds ~2.5 region batches per step)")
    print(f"generation step, APA+SL+TV (no MSR)     {no_msr * 1e3:8.1f} ms  ratio {no_msr / fp:5.2f}x  "
          f"{'meets' if no_msr / fp <= GOAL else 'misses'} the goal")
    print(f"FP block forward+backward ({name})  {block_fp * 1e3:8.1f} ms")
    print(f"reconstruction iteration, W4A4 block    {recon_iter * 1e3:8.1f} ms  "
          f"ratio {recon_iter / block_fp:5.2f}x")
    print(f"whole block ({args.recon_iterations} its + capture)        {r_short * 1e3:8.1f} ms  = "
          f"{r_short / block_fp:6.1f} FP block steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
