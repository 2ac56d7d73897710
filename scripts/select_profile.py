"""Choose a method profile's knobs without touching evaluation data.

For every combination of the ``--set`` values, quantizes each mini classifier with the method and
scores the result against its FP teacher on the real *calibration* split (disjoint from the
evaluation set; its labels are not read): top-1 agreement with the teacher and KL(teacher||student).
The ci profiles of the data-free methods that train a student were chosen with this script, so a
profile choice can be re-run and checked:

    .venv/bin/python scripts/select_profile.py --method mimiq --bits w4a4 \
        --set lr=1e-3,1e-4 --set quantizer_lr_scale=1,100

Prints one line per (setting, model) and the mean over models per setting, as JSON lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.grid import coerce_method_args, parse_value, split_top_level  # noqa: E402
from methods.base import RunContext, get_method  # noqa: E402
from methods.quant.bits import parse_bits  # noqa: E402
from tasks.cls import ClassificationTask  # noqa: E402
from tasks.mini import fashion  # noqa: E402


def parse_set(text: str) -> tuple[str, list]:
    """``key=v1,v2`` -> (key, [v1, v2]), each value read as ``--method-args`` reads one
    (``1e-3``, ``True``, a tuple ``(8,50)``): ``lr_steps=(8,),(16,)`` tries two tuples."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values.strip():
        raise argparse.ArgumentTypeError(f"--set wants key=v1,v2 (got {text!r})")
    return key, [parse_value(v) for v in split_top_level(values)]


@torch.no_grad()
def teacher_scores(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (%) and batch-mean KL(teacher||student) of the logits on ``x``."""
    t, s = teacher(x), student(x)
    agree = 100.0 * float((t.argmax(1) == s.argmax(1)).float().mean())
    kl = float(torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True,
                                          reduction="batchmean"))
    return {"agreement": round(agree, 2), "kl": round(kl, 5)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--models", default="mini-vit,mini-deit,mini-swin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="synthetic-image cache (default: a temporary one)")
    ap.add_argument("--set", dest="sets", action="append", type=parse_set, default=[],
                    help="config field and the values to try, e.g. lr=1e-3,1e-4 (repeatable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = ClassificationTask()
    try:
        method_cls = get_method(args.method)
        bits = parse_bits(args.bits)
        keys = [k for k, _ in args.sets]
        # the same field check and type coercion as `bench run --method-args`, before any work
        settings = [coerce_method_args(args.method, dict(zip(keys, values, strict=True)))
                    for values in itertools.product(*[v for _, v in args.sets])]
    except (KeyError, ValueError) as e:
        ap.error(str(e.args[0]))  # KeyError's str() would add quotes
    calib_n = None
    with tempfile.TemporaryDirectory() as tmp:
        for overrides in settings:
            config = method_cls.make_config(args.profile, **overrides)
            per_model = []
            for model in args.models.split(","):
                handle = task.load(model, "mini")
                target = handle.target
                if calib_n is None:
                    calib_n = len(fashion.load_mini()["calib"].labels)
                x = task.calibration(handle, calib_n, 0)
                ctx = RunContext(device=torch.device("cpu"), seed=args.seed, profile=args.profile,
                                 cache_dir=args.cache_dir or f"{tmp}/cache", artifacts_dir=f"{tmp}/art",
                                 galleries=False, log=logging.getLogger("select_profile"))
                t0 = time.perf_counter()
                student = method_cls(config).quantize(target, bits, ctx).model
                seconds = round(time.perf_counter() - t0, 1)
                row = {"setting": overrides, "model": model, "bits": args.bits, "seed": args.seed,
                       **teacher_scores(target.model, student, x), "seconds": seconds}
                per_model.append(row)
                print(json.dumps(row), flush=True)
            mean = {k: round(sum(r[k] for r in per_model) / len(per_model), 4) for k in ("agreement", "kl")}
            print(json.dumps({"setting": overrides, "mean": mean, "calib_images": calib_n}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
