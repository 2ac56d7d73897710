"""Mixed precision: per-site cost accounting, the greedy bit allocator, and cached re-forwards.

Definitions (the budget of an ``mpN`` / ``mpwXaY`` spec, BOPs and model size use the same counts):

* a **site** is a quantized Linear / Conv / MatMul / Tap (its path relative to the quant module);
* **average weight bits** = Σ params·w_bits / Σ params over the sites with quantized weights;
* **average activation bits** = Σ elements·a_bits / Σ elements over the sites with quantized
  activations, ``elements`` = values one image sends through the site's activation quantizers
  (every input operand, and the output where an output quantizer sits);
* **BOPs** = Σ over Linear / Conv / MatMul sites of MACs · w_bits · a_bits per image (MatMul: both
  operands are activations, a_bits²; an unquantized side counts 32 bits).

Greedy allocation (MPTQ-ViT's Greedy MP, spec 3.5, and the harness's generic allocator): every
site's weights and activations are separate units starting at the largest candidate; a *cut* lowers
one unit by one candidate notch; its cost is ΔL / Δ(average bits of its kind), L the calibration loss
(KL(FP ‖ quantized) on the method's calibration images, or the normalised output MSE without logits).
Cuts are committed cheapest first until both averages are within budget (a kind whose budget holds
takes no more cuts). ``mode="exact"`` re-measures every unit's next cut at every step (the spec's
rule: steps × units trials); ``mode="lazy"`` keeps the last measured cost of each unit in a queue and
re-measures only the unit about to be cut, committing it when it is still the cheapest (a standard
lazy greedy: about one trial per step; equal to exact when costs of other units do not fall).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.quant.modules import MatMul, Tap
from methods.quant.quantizers import FakeQuantizer
from methods.quant.reconstruct import flatten_output

FP_BITS = 32  # an unquantized operand in BOPs
GREEDY_MODES = ("lazy", "exact")
_TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# Costs


@dataclass
class SiteCost:
    """What one site costs per image."""

    macs: int = 0  # multiply-accumulates (Linear / Conv / MatMul)
    weights: int = 0  # weight parameters (Linear / Conv)
    act_elements: int = 0  # values through its activation quantizers that have bits


def _is_site(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | nn.Conv2d | MatMul | Tap)


def _macs(m: nn.Module, args: tuple, out: Tensor) -> int:
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return out.numel() * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, MatMul):
        return out.numel() * args[0].shape[-1]
    return 0


def activation_quantizers(site: nn.Module) -> list[FakeQuantizer]:
    """The site's non-weight quantizers that have bits (inputs, matmul operands, output, tap)."""
    names = ("a_quant", "b_quant", "out_quant", "quant")
    qs = [getattr(site, n, None) for n in names]
    return [q for q in qs if isinstance(q, FakeQuantizer) and not q.is_weight and q.bits is not None]


@torch.no_grad()
def site_costs(module: nn.Module, run: Callable[[], Any], batch: int) -> dict[str, SiteCost]:
    """Per-image cost of every site below ``module`` from one call of ``run()`` (a forward of
    ``batch`` images through a model containing ``module``); sites the forward does not reach cost 0."""
    costs: dict[str, SiteCost] = {}
    handles = []

    def on_site(path: str):
        def hook(m, args, out):
            c = costs.setdefault(path, SiteCost())
            if isinstance(out, Tensor):
                c.macs += _macs(m, args, out)
        return hook

    def on_quant(path: str):
        def hook(_q, args):
            costs.setdefault(path, SiteCost()).act_elements += args[0].numel()
        return hook

    for path, m in module.named_modules():
        if not path or not _is_site(m):
            continue
        costs[path] = SiteCost(weights=int(m.weight.numel()) if isinstance(m, nn.Linear | nn.Conv2d) else 0)
        handles.append(m.register_forward_hook(on_site(path)))
        for q in activation_quantizers(m):
            handles.append(q.register_forward_pre_hook(on_quant(path)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for c in costs.values():
        c.macs //= batch
        c.act_elements //= batch
    return costs


def average_bits(costs: Mapping[str, SiteCost], layers: Mapping[str, Sequence[int | None]]
                 ) -> tuple[float | None, float | None]:
    """(average weight bits, average activation bits) of the sites in ``layers`` (None: none quantized)."""
    w_num = w_den = a_num = a_den = 0
    for path, (w, a) in layers.items():
        c = costs.get(path)
        if c is None:
            continue
        if w is not None:
            w_num, w_den = w_num + c.weights * w, w_den + c.weights
        if a is not None:
            a_num, a_den = a_num + c.act_elements * a, a_den + c.act_elements
    return (w_num / w_den if w_den else None), (a_num / a_den if a_den else None)


def bops(costs: Mapping[str, SiteCost], layers: Mapping[str, Sequence[int | None]]) -> int:
    """Bit operations per image: Σ MACs · w_bits · a_bits (an unquantized operand at 32 bits)."""
    total = 0
    for path, c in costs.items():
        if not c.macs:
            continue
        w, a = layers.get(path, (None, None))
        a = a or FP_BITS
        w = a if c.weights == 0 else (w or FP_BITS)  # a matmul's second operand is an activation
        total += c.macs * w * a
    return total


# ---------------------------------------------------------------------------------------------
# Setting a unit's bits


@dataclass(frozen=True)
class Unit:
    """One allocation decision: the weights ("w") or the activations ("a") of one site."""

    path: str
    kind: str  # "w" | "a"
    count: int  # params (w) or elements per image (a)
    block: int = 0  # index of the cached block it lives in (0: re-forward from the start)


def quantizer_states(qs: Sequence[FakeQuantizer]) -> list[dict[str, Tensor]]:
    """Copies of the quantizers' parameters and buffers (to put back with :func:`load_quantizer_states`)."""
    return [{k: v.clone() for k, v in q.state_dict().items()} for q in qs]


def load_quantizer_states(qs: Sequence[FakeQuantizer], states: Sequence[Mapping[str, Tensor]]) -> None:
    for q, state in zip(qs, states, strict=True):
        q.load_state_dict(state)


class SiteBits:
    """Sets a unit's bit-width on the quantizers of a module, remembering each quantizer's parameters
    per bit-width so a trial and its undo do not recompute them (the same calibration statistics give
    the same parameters: see FakeQuantizer.set_bits)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._memo: dict[tuple[int, int], list[dict[str, Tensor]]] = {}

    def quantizers(self, unit: Unit) -> list[FakeQuantizer]:
        site = self.module.get_submodule(unit.path)
        if unit.kind == "w":
            wq = getattr(site, "w_quant", None)
            return [wq] if isinstance(wq, FakeQuantizer) else []
        return activation_quantizers(site)

    def __call__(self, unit: Unit, bits: int) -> None:
        for q in self.quantizers(unit):
            key = (id(q), bits)
            if key in self._memo:
                q.bits = bits
                load_quantizer_states([q], self._memo[key])
            else:
                q.set_bits(bits)
                self._memo[key] = quantizer_states([q])


# ---------------------------------------------------------------------------------------------
# Re-forwards that skip the blocks a change cannot reach


class _Cached(nn.Module):
    """Stands in for a block: returns the block's recorded output, whatever it is called with."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


class DownstreamForward:
    """``run(i)``: the model's forward with blocks ``0..i-1`` replaced by their outputs recorded at
    the last :meth:`refresh`, so a change inside block ``i`` re-runs only block ``i`` onwards.

    ``blocks`` are paths below ``module`` in execution order; the glue between them (position
    embedding, norms) still runs. A block not called exactly once by the forward is never replaced.
    """

    def __init__(self, module: nn.Module, blocks: Sequence[str], forward: Callable[[], Any]) -> None:
        self.module, self.blocks, self.forward = module, list(blocks), forward
        self.outputs: dict[int, Any] = {}
        self.calls: dict[int, int] = {}
        self.forwards = 0.0  # full-forward equivalents run (blocks skipped count as saved)

    def refresh(self, start: int = 0) -> Any:
        """A forward recording the outputs of blocks ``start`` onwards (the earlier ones replaced by
        their recorded outputs, which a change at block ``start`` cannot reach); returns its result."""
        if start == 0:
            self.outputs.clear()
            self.calls = dict.fromkeys(range(len(self.blocks)), 0)
        handles = []
        for i in range(start, len(self.blocks)):
            self.calls[i] = 0

            def hook(_m, _a, out, i=i):
                self.calls[i] += 1
                self.outputs[i] = out
            handles.append(self.module.get_submodule(self.blocks[i]).register_forward_hook(hook))
        try:
            return self.run(start)
        finally:
            for h in handles:
                h.remove()

    def run(self, start: int) -> Any:
        """The forward with blocks before ``start`` replaced by their recorded outputs."""
        swapped = []
        for i in range(min(start, len(self.blocks))):
            if self.calls.get(i) != 1:
                continue
            parent_path, _, name = self.blocks[i].rpartition(".")
            parent = self.module.get_submodule(parent_path) if parent_path else self.module
            swapped.append((parent, name, getattr(parent, name)))
            setattr(parent, name, _Cached(self.outputs[i]))
        try:
            with torch.no_grad():
                return self.forward()
        finally:
            for parent, name, block in reversed(swapped):
                setattr(parent, name, block)
            self.forwards += 1 - (len(swapped) / len(self.blocks) if self.blocks else 0)


def block_index(path: str, blocks: Sequence[str]) -> int:
    """Index of the block containing site ``path``; 0 for a site outside every block (it may run
    anywhere in the forward, so a change there re-runs everything)."""
    for i, b in enumerate(blocks):
        if path == b or path.startswith(b + "."):
            return i
    return 0


# ---------------------------------------------------------------------------------------------
# The calibration loss


def kl_loss(fp_logits: Tensor) -> Callable[[Tensor], float]:
    """L(q) = KL(softmax(fp) ‖ softmax(q)), mean over images."""
    log_p = F.log_softmax(fp_logits.float(), dim=-1)

    def loss(q_logits: Tensor) -> float:
        log_q = F.log_softmax(q_logits.float(), dim=-1)
        return float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
    return loss


def relative_mse_loss(fp_out: Any) -> Callable[[Any], float]:
    """L(q) = ‖q - fp‖² / ‖fp‖² over the flattened outputs (targets without logits)."""
    ref = flatten_output(fp_out).float()
    norm = float(ref.pow(2).sum().clamp_min(1e-12))

    def loss(q_out: Any) -> float:
        return float((flatten_output(q_out).float() - ref).pow(2).sum()) / norm
    return loss


# ---------------------------------------------------------------------------------------------
# Greedy allocation


class AllocationError(ValueError):
    """The budget cannot be met with the candidates (e.g. too many sites fixed at high bits)."""


@dataclass
class Allocation:
    bits: dict[Unit, int]
    averages: tuple[float | None, float | None]
    loss_start: float
    loss_end: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    trials: int = 0


@dataclass
class _Ledger:
    """Running Σ count·bits and Σ count per kind (fixed sites included)."""

    num: dict[str, float]
    den: dict[str, float]

    def average(self, kind: str) -> float | None:
        return self.num[kind] / self.den[kind] if self.den[kind] else None

    def within(self, kind: str, budget: float) -> bool:
        avg = self.average(kind)
        return avg is None or avg <= budget + _TOL


def _lower(bits: int, candidates: Sequence[int]) -> int | None:
    below = [c for c in candidates if c < bits]
    return max(below) if below else None


def greedy_allocate(
    units: Sequence[Unit],
    budget: tuple[float, float],
    candidates: Iterable[int],
    set_bits: Callable[[Unit, int], None],
    loss: Callable[[Unit | None], float],
    fixed: Mapping[str, tuple[float, float]] | None = None,
    mode: str = "lazy",
    progress: Callable[[str], None] = lambda _m: None,
    on_commit: Callable[[Unit, int], None] | None = None,
    commit_loss: Callable[[Unit], float] | None = None,
) -> Allocation:
    """Lower units' bits, cheapest ΔL/Δaverage first, until both averages are within ``budget``.

    ``units`` start at the largest candidate (the caller has set them there). ``set_bits(unit, b)``
    applies a width; ``loss(unit)`` evaluates the current state (``unit``: the one just changed, for
    caching; None: anything may have changed). ``fixed``: kind -> (Σ count·bits, Σ count) of sites the
    allocator may not change (rule overrides), counted in the averages. ``on_commit(unit, b)`` runs
    after a cut is committed (e.g. a scale search for the new width), before the loss is re-measured
    by ``commit_loss(unit)`` (default ``loss(None)``; e.g. refreshing caches from the unit's block on).
    """
    if mode not in GREEDY_MODES:
        raise ValueError(f"greedy mode {mode!r} not in {GREEDY_MODES}")
    cands = sorted(set(int(c) for c in candidates))
    start = cands[-1]
    fixed = fixed or {}
    ledger = _Ledger({k: fixed.get(k, (0.0, 0.0))[0] for k in "wa"},
                     {k: fixed.get(k, (0.0, 0.0))[1] for k in "wa"})
    for u in units:
        ledger.num[u.kind] += u.count * start
        ledger.den[u.kind] += u.count
    budgets = dict(zip("wa", budget, strict=True))
    bits = {u: start for u in units}
    current = loss(None)
    result = Allocation(bits, (None, None), current, current)

    def trial(u: Unit) -> tuple[float, float, int] | None:
        """(cost, loss after the cut, new bits) of lowering u one notch, or None at the bottom."""
        nb = _lower(bits[u], cands)
        if nb is None or not u.count:
            return None
        set_bits(u, nb)
        after = loss(u)
        set_bits(u, bits[u])
        result.trials += 1
        d_avg = u.count * (bits[u] - nb) / ledger.den[u.kind]
        return (after - current) / d_avg, after, nb

    def open_kind(u: Unit) -> bool:
        return not ledger.within(u.kind, budgets[u.kind])

    queue: list[tuple[float, int, Unit]] = []
    order = {u: i for i, u in enumerate(units)}
    if mode == "lazy":
        for u in units:
            t = trial(u)
            if t is not None:
                heapq.heappush(queue, (t[0], order[u], u))
    while not (ledger.within("w", budgets["w"]) and ledger.within("a", budgets["a"])):
        chosen = None
        if mode == "exact":
            for u in units:
                if open_kind(u) and (t := trial(u)) is not None and (chosen is None or t[0] < chosen[1][0]):
                    chosen = (u, t)
        else:
            while queue:
                _, _, u = heapq.heappop(queue)
                if not open_kind(u) or (t := trial(u)) is None:
                    continue
                nxt = next((c for c, _, v in sorted(queue) if open_kind(v)), math.inf)
                if t[0] <= nxt + _TOL:
                    chosen = (u, t)
                    break
                heapq.heappush(queue, (t[0], order[u], u))
        if chosen is None:
            raise AllocationError(
                f"mixed precision: averages {ledger.average('w')}/{ledger.average('a')} cannot reach the "
                f"budget {budget[0]:g}/{budget[1]:g} with candidates {cands}: every unit is at its lowest")
        u, (cost, after, nb) = chosen
        set_bits(u, nb)
        if on_commit is not None:
            on_commit(u, nb)
        ledger.num[u.kind] -= u.count * (bits[u] - nb)
        result.steps.append({"unit": f"{u.path}:{u.kind}", "from": bits[u], "to": nb, "cost": cost,
                             "loss": after})
        bits[u] = nb
        current = commit_loss(u) if commit_loss is not None else loss(None)  # the new state's loss
        if mode == "lazy" and (t := trial(u)) is not None:
            heapq.heappush(queue, (t[0], order[u], u))
        progress(f"mp step {len(result.steps)}: {u.path}:{u.kind} {bits[u]} bits, "
                 f"avg w {ledger.average('w') or 0:.2f} a {ledger.average('a') or 0:.2f}")
    result.averages = (ledger.average("w"), ledger.average("a"))
    result.loss_end = current
    return result


__all__ = [
    "SiteCost", "site_costs", "average_bits", "bops", "activation_quantizers", "Unit", "SiteBits",
    "quantizer_states", "load_quantizer_states",
    "DownstreamForward", "block_index", "kl_loss", "relative_mse_loss", "AllocationError", "Allocation",
    "greedy_allocate", "GREEDY_MODES",
]
