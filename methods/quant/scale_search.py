"""PTQ4ViT-style layer-wise scale search, with MPTQ-ViT's OPT-m for post-GELU inputs.

Given a layer's full-precision inputs and output (and, for the Hessian metric, dL/d(output)),
:func:`search_layer` picks the steps of the layer's searchable quantizers by trying a fixed grid of
candidates and keeping the one whose quantized layer output is most similar to the FP output,
alternating between the operands for ``rounds`` rounds. The caller collects the tensors (PTQ4ViT's
``utils/quant_calib.py:173-176,250-259``: a forward hook for inputs/outputs, a backward hook for
``grad_output[0]`` of ``KL(softmax(FP logits) || log_softmax(pred))``).

What follows PTQ4ViT's released code (``hahnyuan/PTQ4ViT``):

* the grid: multipliers ``alpha + i·(beta-alpha)/n`` of the min-max interval ``max|t| / (2^(b-1) -
  0.5)``; ``linear.py:247`` builds ``n+1`` of them but every loop stops at ``eq_n``
  (``linear.py:178,466``), so ``i = 0..n-1`` and ``beta`` itself is never tried. Defaults
  ``alpha=0.01, beta=1.2, n=100, rounds=3`` are ``configs/PTQ4ViT.py:25-35``;
* the quantization inside the search: ``clamp(round(t / step), -2^(b-1), 2^(b-1)-1)·step`` by division
  (``linear.py:184,214``); the post-GELU input's positive interval starts at ``max(x)/(2^(b-1)-0.5)``
  (the signed max, ``linear.py:597``) with ``Δneg = 0.16997…/2^(b-1)`` fixed (``linear.py:574,628``);
* the order: per round the weight then the input (``linear.py:546-550``), A then B for matmuls
  (``matmul.py:570-574``); the other operand keeps its current (initially min-max) step;
* the similarity: ``-(out-fp)^2`` (``"mse"`` = PTQ4ViT's ``L2_norm``) or ``-(grad·(out-fp))^2``
  (``"hessian"``, ``linear.py:417-420``), averaged. PTQ4ViT averages over the feature and token axes and
  sums over the batch (``linear.py:482-492``); for equal-sized batches that is the batch size times the
  mean, so the argmax (first maximum, as ``torch.argmax``) is the same. The objective returned is the
  mean;
* groups searched in parallel, each with its own argmax: PTQ4ViT's ``n_V`` output-row blocks of a weight
  (``linear.py:193-199``; its config uses ``n_V=1``, 3 for qkv) and head-wise matmul operands
  (``matmul.py:415-416,519``). Here the groups are the quantizer's own: per-output-channel weights are
  searched per channel (``n_V = out_features``), matmul operands quantized per channel along the head
  axis (``ch_axis=1`` of a 4-D operand) per head, per-tensor quantizers as one group;
* the post-softmax operand (``twin_softmax``): splits ``2^-i, i = 0..19`` (``matmul.py:636``) chosen by
  the same similarity with the *other operand unquantized* (``matmul.py:606``: ``B_sim = B``).

Reconstructed (MPTQ-ViT §3.4, no code): OPT-m. For each ``k = 0..optm_max_k`` and each grid candidate
``Δpos``, ``Δneg = Δpos / 2^k``; the (k, Δpos) with the best objective on the layer's output wins
(ties: the smaller k, then the smaller Δpos). With ``optm=False`` only Δpos is searched (PTQ4ViT).

Not PTQ4ViT: the layer's ``out_quant`` is not part of the objective (PTQ4ViT has no output quantizer);
quantizers that are not searchable (asymmetric, LSQ, log2, dynamic, ``mode="off"``) are applied as
they are (identity unless in "quant" mode). The chosen steps are written into the quantizers
(``UniformQuantizer.scale``/``zero_point``, the two-scale quantizers' ``set_params``), which renews
their state keys; a UniformQuantizer's later ``set_bits`` recomputes from its statistics and so drops
the search (re-run the search after a bit change, MPTQ-ViT §3.5). A UniformQuantizer with the default
``arith="reciprocal"`` can differ from the search's division on rounding ties; ``arith="divide"``
applies exactly what was searched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from methods.quant.qfunc import EPS, bshape
from methods.quant.quantizers import FakeQuantizer, UniformQuantizer
from methods.quant.twin_quantizers import (
    Outlier2SFQuantizer,
    TwinGeluQuantizer,
    TwinSoftmaxQuantizer,
    outlier_2sf_quant,
    twin_gelu_quant,
    twin_softmax_quant,
)

METRICS = ("mse", "hessian")
SOFTMAX_SPLITS = 20  # PTQ4ViT matmul.py:636: splits 2^-i, i < 20


@dataclass
class SearchConfig:
    """PTQ4ViT's search settings (``configs/PTQ4ViT.py``; metric "hessian" there, "mse" here by
    default, MPTQ-ViT §3.4 [CHOICE]) and OPT-m's (``optm``, k = 0..``optm_max_k``). ``chunk``: grid
    candidates evaluated per batched forward (PTQ4ViT's ``parallel_eq_n``; memory only)."""

    candidates: int = 100
    alpha: float = 0.01
    beta: float = 1.2
    rounds: int = 3
    metric: str = "mse"
    optm: bool = True
    optm_max_k: int = 10
    chunk: int = 10

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"SearchConfig.metric {self.metric!r} not in {METRICS}")
        if self.candidates < 1 or self.rounds < 1 or self.chunk < 1 or self.optm_max_k < 0:
            raise ValueError("candidates, rounds and chunk must be >= 1, optm_max_k >= 0")


def ratio_grid(cfg: SearchConfig) -> torch.Tensor:
    """The multipliers of the min-max interval that PTQ4ViT tries (see the module docstring)."""
    n, a, b = cfg.candidates, cfg.alpha, cfg.beta
    return torch.tensor([a + i * (b - a) / n for i in range(n)])


def sym_quant(t: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """PTQ4ViT's signed uniform quantization (linear.py:184): division, round half to even, clamp."""
    qmax = 2 ** (bits - 1)
    return (t / step).round_().clamp_(-qmax, qmax - 1).mul_(step)


def objective(out: torch.Tensor, fp: torch.Tensor, metric: str, grad: torch.Tensor | None = None,
              group_axis: int | None = None) -> torch.Tensor:
    """Similarity of candidate outputs ``out`` (leading candidate axis P) to ``fp``: ``-mean(d^2)`` with
    ``d = out - fp`` ("mse") or ``grad·(out - fp)`` ("hessian"); shape (P, G), G = 1 or the size of
    ``group_axis`` (an axis of ``fp``), averaged over every other axis."""
    d = out - fp
    if metric == "hessian":
        if grad is None:
            raise ValueError("the hessian metric needs grad = dL/d(output)")
        d = d * grad
    sq = d.square_()
    if group_axis is None:
        return -sq.flatten(1).mean(1, keepdim=True)
    return -sq.movedim(group_axis % fp.dim() + 1, 1).flatten(2).mean(2)


# ---- operands ------------------------------------------------------------------------------------
class _Operand:
    """One input of the layer (weight, activation, matmul operand), its quantizer and current step."""

    def __init__(self, name: str, t: torch.Tensor, q: nn.Module, out_axis: int | None) -> None:
        self.name, self.t, self.q = name, t.detach(), q
        self.kind = _searchable(q, t, name)
        self.bits = q.bits if isinstance(q, FakeQuantizer) else None
        self.axis = q.axis if self.kind == "uniform" else None
        self.out_axis = out_axis if self.axis is not None else None  # where its groups land
        self.info: dict[str, Any] = {"kind": self.kind or "fixed"}
        if self.kind == "uniform":  # PTQ4ViT's min-max init (linear.py:232, matmul.py:435)
            amax = self.t.abs().amax() if self.axis is None else self._chan(self.t.abs()).amax(1)
            self.base = (amax.reshape(-1).float() / (2 ** (self.bits - 1) - 0.5)).clamp_(min=EPS)
            self.step = self.base.clone()
        elif self.kind == "twin_gelu":  # linear.py:597, 574
            self.base = (self.t.max().reshape(1).float() / (2 ** (self.bits - 1) - 0.5)).clamp_(min=EPS)
            self.pos = self.base.clone()
            self.neg = torch.tensor([TwinGeluQuantizer.fixed_neg_scale(self.bits)])
            self.k: int | None = None
        elif self.kind == "twin_softmax":  # matmul.py:354
            self.split = torch.tensor([0.01])
        self.value = self.quantized()

    def _chan(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(self.axis, 0).flatten(1)

    def view(self, s: torch.Tensor) -> torch.Tensor:
        """Steps (P, G) shaped to broadcast against ``t[None]``."""
        return s.reshape(s.shape[0], *bshape(self.t.dim(), self.axis, s.shape[1]))

    def quantized(self) -> torch.Tensor:
        t = self.t
        if self.kind == "uniform":
            return sym_quant(t, self.view(self.step[None])[0], self.bits)
        if self.kind == "twin_gelu":
            return twin_gelu_quant(t, self.pos, self.neg, self.bits)
        if self.kind == "twin_softmax":
            return twin_softmax_quant(t, self.split, self.bits)
        q = self.q
        return q(t) if isinstance(q, FakeQuantizer) and q.mode == "quant" else t

    def commit(self) -> None:
        """Write the current choice into the quantizer."""
        q = self.q
        if self.kind == "uniform":
            q.scale = self.step.clone()
            q.zero_point = torch.zeros(self.step.shape, dtype=torch.int32)
            q.touch()
            self.info["scale"] = self.step.tolist()
        elif self.kind == "twin_gelu":
            q.set_params(self.pos, k=self.k)
            self.info.update(scale=float(self.pos), neg_scale=float(q.neg_scale), k=self.k)
        elif self.kind == "twin_softmax":
            q.set_params(self.split)
            self.info["split"] = float(self.split)


def _searchable(q: nn.Module, t: torch.Tensor, name: str) -> str | None:
    """The kind of search for this quantizer, or None (applied as it is)."""
    if not isinstance(q, FakeQuantizer) or q.bits is None or q.mode == "off":
        return None
    if isinstance(q, TwinGeluQuantizer) and name in ("input", "a", "b"):
        return "twin_gelu"
    if isinstance(q, TwinSoftmaxQuantizer) and name in ("a", "b"):
        return "twin_softmax"
    if type(q) is not UniformQuantizer or not q.spec.symmetric or q.spec.range == "dynamic":
        return None
    ax = q.axis
    if ax is None:
        return "uniform"
    ax %= t.dim()
    if (name == "weight" and ax == 0) or (name in ("a", "b") and t.dim() == 4 and ax == 1):
        return "uniform"  # output channels / heads: separable in the output
    return None


# ---- layers --------------------------------------------------------------------------------------
def _layer_fn(layer: nn.Module) -> Callable[[list[torch.Tensor], int | None], torch.Tensor]:
    """``f(values, cand)``: the layer's output, with a leading candidate axis (size 1 when ``cand`` is
    None, else the leading axis of ``values[cand]``)."""
    if isinstance(layer, QuantMatMul):
        def mm(v: list[torch.Tensor], cand: int | None) -> torch.Tensor:
            out = v[0] @ v[1]
            return out.unsqueeze(0) if cand is None else out
        return mm
    bias = layer.bias
    if isinstance(layer, QuantLinear):
        def run(x, w, b):
            return F.linear(x, w, b)
        ch = -1
    elif isinstance(layer, QuantConv2d):
        run = layer._conv_forward
        ch = 1
    else:
        raise TypeError(f"search_layer takes QuantLinear / QuantConv2d / QuantMatMul, got {type(layer)}")

    def f(v: list[torch.Tensor], cand: int | None) -> torch.Tensor:
        w, x = v
        if cand == 0:  # stacked weights: one output channel block per candidate
            p = w.shape[0]
            out = run(x, w.flatten(0, 1), None if bias is None else bias.repeat(p))
            return out.unflatten(ch, (p, w.shape[1])).movedim(ch - 1 if ch < 0 else ch, 0)
        if cand == 1:
            if ch == 1:  # conv: candidates into the batch
                return run(x.flatten(0, 1), w, bias).unflatten(0, x.shape[:2])
            return run(x, w, bias)
        return run(x, w, bias).unsqueeze(0)
    return f


def _operands(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[_Operand]:
    if isinstance(layer, QuantMatMul):
        a, b = inputs
        return [_Operand("a", a, layer.a_quant, 1), _Operand("b", b, layer.b_quant, 1)]
    (x,) = inputs
    out_axis = -1 if isinstance(layer, QuantLinear) else 1
    return [_Operand("weight", layer.weight, layer.w_quant, out_axis),
            _Operand("input", x, layer.a_quant, None)]


# ---- the search ----------------------------------------------------------------------------------
def _best(objs: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum per group: objs (N, G) -> (G,)."""
    return objs.argmax(0)


def _eval(op: _Operand, ops: list[_Operand], i: int, f, fp, grad, cfg, cands: torch.Tensor,
          quant: Callable[[torch.Tensor], torch.Tensor], raw_others: bool = False) -> torch.Tensor:
    """Objectives (N, G) of the candidate parameters ``cands`` (leading axis N) of operand i."""
    vals = [(o.t if raw_others else o.value) for o in ops]
    objs = []
    for c in cands.split(cfg.chunk):
        vals[i] = quant(c)
        objs.append(objective(f(vals, i), fp, cfg.metric, grad, op.out_axis))
    return torch.cat(objs)


def _search_operand(op: _Operand, ops: list[_Operand], i: int, f, fp, grad, cfg: SearchConfig) -> float:
    t = op.t[None]
    if op.kind == "uniform":
        cands = ratio_grid(cfg)[:, None] * op.base[None, :]  # (N, G), as linear.py:247
        objs = _eval(op, ops, i, f, fp, grad, cfg, cands, lambda c: sym_quant(t, op.view(c), op.bits))
        best = _best(objs)
        op.step = cands.gather(0, best[None])[0]
        op.info["ratio"] = ratio_grid(cfg)[best].tolist()
        return float(objs.gather(0, best[None]).mean())
    if op.kind == "twin_gelu":
        cands = ratio_grid(cfg)[:, None] * op.base[None, :]  # (N, 1)
        shape = (-1,) + (1,) * op.t.dim()
        ks = list(range(cfg.optm_max_k + 1)) if cfg.optm else [None]
        per_k = []
        for k in ks:
            def quant(c, k=k):
                neg = op.neg if k is None else c.reshape(shape) / 2.0**k
                return twin_gelu_quant(t, c.reshape(shape), neg, op.bits)
            per_k.append(_eval(op, ops, i, f, fp, grad, cfg, cands, quant)[:, 0])
        objs = torch.stack(per_k)  # (K, N); the flat argmax prefers the smaller k, then Δpos
        j = int(objs.flatten().argmax())
        kk, n = divmod(j, cands.shape[0])
        op.k, op.pos = ks[kk], cands[n].clone()
        op.neg = op.neg if op.k is None else op.pos / 2.0**op.k
        op.info.update(ratio=float(ratio_grid(cfg)[n]), k=op.k)
        return float(objs.flatten()[j])
    # twin_softmax: PTQ4ViT's splits, the other operand unquantized (matmul.py:606)
    splits = torch.tensor([2.0**-j for j in range(SOFTMAX_SPLITS)])[:, None]
    shape = (-1,) + (1,) * op.t.dim()
    objs = _eval(op, ops, i, f, fp, grad, cfg, splits,
                 lambda c: twin_softmax_quant(t, c.reshape(shape), op.bits), raw_others=True)
    j = int(_best(objs)[0])
    op.split = splits[j].clone()
    return float(objs[j, 0])


@torch.no_grad()
def search_layer(layer: nn.Module, inputs: tuple[torch.Tensor, ...], fp_out: torch.Tensor,
                 cfg: SearchConfig | None = None, grad: torch.Tensor | None = None) -> dict[str, Any]:
    """Search the steps of ``layer``'s searchable quantizers (module docstring) and set them in place.

    ``inputs``: ``(x,)`` for a QuantLinear / QuantConv2d, ``(a, b)`` for a QuantMatMul (full
    precision); ``fp_out``: the FP output; ``grad``: dL/d(output) for ``metric="hessian"``. Returns
    ``{"objective": final objective (all chosen steps applied), "<operand>": {"kind", chosen values,
    "objective" of its last search}}`` with operands "weight"/"input" or "a"/"b".
    """
    cfg = cfg or SearchConfig()
    fp = fp_out.detach().float()
    grad = None if grad is None else grad.detach().float()
    ops = _operands(layer, inputs)
    f = _layer_fn(layer)
    searched = [i for i, o in enumerate(ops) if o.kind is not None]
    for _ in range(cfg.rounds if searched else 0):
        for i in searched:
            ops[i].info["objective"] = _search_operand(ops[i], ops, i, f, fp, grad, cfg)
            ops[i].value = ops[i].quantized()
    for o in ops:
        o.commit()
    final = objective(f([o.value for o in ops], None), fp, cfg.metric, grad)
    return {"objective": float(final.mean()), **{o.name: o.info for o in ops}}


@torch.no_grad()
def search_tap(quantizer: Outlier2SFQuantizer, x: torch.Tensor,
               cfg: SearchConfig | None = None) -> dict[str, Any]:
    """Reconstructed O-2SF search for a tap (no layer): Δ over PTQ4ViT's grid of multipliers of the
    default Δ (``Outlier2SFQuantizer``'s [CHOICE] rule) and ``t = 1..T``, minimising the tap's own
    ``mean((q(x) - x)^2)``; the first best in (Δ candidate, t) order is set into the quantizer."""
    cfg = cfg or SearchConfig()
    if not isinstance(quantizer, Outlier2SFQuantizer) or quantizer.bits is None:
        raise TypeError("search_tap takes an outlier_2sf quantizer with bits set")
    x = x.detach().float()
    mode = quantizer.mode
    quantizer.start_calibration()
    quantizer(x)
    quantizer.finish_calibration()  # the default Δ: the grid's base
    cmax, base, bits = quantizer.channel_max(), quantizer.scale.clone(), quantizer.bits
    steps = ratio_grid(cfg) * base
    shape = (-1,) + (1,) * x.dim()
    T = quantizer.spec.outlier_max_shift
    objs = torch.empty(len(steps), T)
    for t in range(1, T + 1):
        for lo in range(0, len(steps), cfg.chunk):
            s = steps[lo:lo + cfg.chunk]
            shift = Outlier2SFQuantizer.layout(cmax[None], s[:, None], t, bits)  # (p, C)
            shift = shift.reshape(len(s), *[1] * (x.dim() - 1), -1)
            q = outlier_2sf_quant(x[None], s.reshape(shape), shift, bits)
            objs[lo:lo + len(s), t - 1] = (q - x).square_().flatten(1).mean(1)
    j = int(objs.flatten().argmin())
    n, t = divmod(j, T)
    quantizer.set_params(steps[n], t + 1, cmax)
    if mode == "off":
        quantizer.mode = "off"
    return {"scale": float(steps[n]), "t": t + 1, "ratio": float(ratio_grid(cfg)[n]),
            "outlier_channels": int((quantizer.channel_shift > 0).sum()), "mse": float(objs[n, t])}
