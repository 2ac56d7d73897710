"""Cost of the PTQ4ViT-style scale search (:func:`methods.quant.scale_search.search_layer`) per layer,
as a ratio to one FP forward of the same layer on the same tensors, measured in one run.

Run: ``.venv/bin/python -m benchmarks.scale_search_cost [--images 32 --tokens 65 --dim 96]``

The tensors are mini-vit sized (32 calibration images, 65 tokens, width 96, 3 heads, MLP 4x), random:
the cost does not depend on the values. Layers: qkv and fc1 (per-channel W4, per-tensor symmetric A4),
fc2 with the post-GELU twin quantizer (PTQ4ViT's fixed Δneg, and OPT-m with k = 0..10), ``q @ kᵀ``
(symmetric A4 both) and ``attn @ v`` (twin_softmax attn). ``evals`` is the number of candidate
outputs the search computes (grid x rounds x operands, x 11 for OPT-m), so ``ratio / evals`` is the
cost of one candidate in FP forwards. Timings are process CPU time, best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cpu_seconds  # noqa: E402
from methods.quant.modules import MatMul, QuantLinear, QuantMatMul  # noqa: E402
from methods.quant.quantizers import QuantizerSpec, make_quantizer  # noqa: E402
from methods.quant.scale_search import SOFTMAX_SPLITS, SearchConfig, search_layer  # noqa: E402

W = QuantizerSpec(symmetric=True, per_channel=True, arith="divide")
A = QuantizerSpec(symmetric=True, arith="divide")
GELU = QuantizerSpec(kind="twin_gelu")
SOFTMAX = QuantizerSpec(kind="twin_softmax")


def cases(n: int, t: int, d: int, heads: int, gen: torch.Generator, cfg: SearchConfig) -> list[tuple]:
    """(name, fresh layer factory, inputs, FP forward, candidate evaluations)."""
    torch.manual_seed(0)
    qkv, fc1, fc2 = nn.Linear(d, 3 * d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
    x = torch.randn(n, t, d, generator=gen)
    h = F.gelu(torch.randn(n, t, 4 * d, generator=gen) * 2)
    hd = d // heads
    q, k, v = (torch.randn(n, heads, t, hd, generator=gen) for _ in range(3))
    attn = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, -1)
    kt = k.transpose(-2, -1).contiguous()
    two = 2 * cfg.rounds * cfg.candidates

    def lin(m, wq, aq):
        return lambda: QuantLinear.from_float(m, make_quantizer(wq, 4), make_quantizer(aq, 4))

    def mm(aq, bq):
        return lambda: QuantMatMul.from_float(MatMul(), make_quantizer(aq, 4), make_quantizer(bq, 4))

    gelu_optm = cfg.rounds * cfg.candidates * (1 + cfg.optm_max_k + 1)
    return [
        ("qkv", lin(qkv, W, A), (x,), lambda: F.linear(x, qkv.weight, qkv.bias), two, cfg),
        ("fc1", lin(fc1, W, A), (x,), lambda: F.linear(x, fc1.weight, fc1.bias), two, cfg),
        ("fc2 (PTQ4ViT fixed neg)", lin(fc2, W, GELU), (h,), lambda: F.linear(h, fc2.weight, fc2.bias), two,
         replace(cfg, optm=False)),
        ("fc2 (OPT-m)", lin(fc2, W, GELU), (h,), lambda: F.linear(h, fc2.weight, fc2.bias), gelu_optm, cfg),
        ("q @ kT", mm(A, A), (q, kt), lambda: q @ kt, two, cfg),
        ("attn @ v", mm(SOFTMAX, A), (attn, v), lambda: attn @ v,
         cfg.rounds * (SOFTMAX_SPLITS + cfg.candidates), cfg),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--search-rounds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds of each search (best of)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SearchConfig(rounds=args.search_rounds)
    gen = torch.Generator().manual_seed(0)
    print(f"{'layer':<26}{'forward ms':>11}{'search s':>10}{'ratio':>10}{'evals':>7}{'ratio/eval':>11}")
    for name, make, inputs, forward, evals, c in cases(args.images, args.tokens, args.dim, args.heads,
                                                       gen, cfg):
        with torch.no_grad():
            fp = forward()
            t_fwd = cpu_seconds(forward, 5)

        def search(make=make, inputs=inputs, fp=fp, c=c) -> None:
            search_layer(make(), inputs, fp, c)

        t_search = cpu_seconds(search, args.rounds, warmup=False)
        ratio = t_search / t_fwd
        row = f"{name:<26}{1e3 * t_fwd:>11.2f}{t_search:>10.2f}{ratio:>10.0f}{evals:>7}{ratio / evals:>11.2f}"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
