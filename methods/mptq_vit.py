"""MPTQ-ViT (Tai & Wu, arXiv 2401.14895): SQ-b, OPT-m and Greedy MP on PTQ4ViT's layer-wise search.

No code was released; ``docs/methods/mptq-vit.md`` is the reading and the provenance at the end of
this file gives every component's level. The parts it inherits from PTQ4ViT (the twin-uniform
quantizers and the candidate grid) follow PTQ4ViT's released code (:mod:`methods.quant.scale_search`,
:mod:`methods.quant.twin_quantizers`). In the order it runs:

1. Data: 32 real calibration images (the PTQ4ViT / RepQ-ViT protocol).
2. Build: per-channel symmetric weights; per-tensor symmetric activations; the post-GELU input (fc2)
   two-region (``twin_gelu``); the post-softmax operand of ``attn@v`` twin-uniform (``twin_softmax``);
   with ``fully_quantized`` also the residual stream (the LayerNorm inputs) with O-2SF.
   Mixed-precision specs first get MPTQ-ViT's own Greedy MP (:meth:`MPTQViT.allocate`).
3. Calibrate: SQ-b (per-channel centring and SmoothQuant scaling folded into each LayerNorm and the
   Linear after it; exact, checked), then site by site in module order PTQ4ViT's sequential search:
   the site's input comes from the already-searched quantized model, its target is its own FP output
   on that input; OPT-m searches the post-GELU ratio.
4. Fine-tune: none (PTQ).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Built, MethodConfig, QuantMethod, RunContext, allocate_bits, register_method
from methods.quant.bits import BitSpec
from methods.quant.mixed import SiteBits, Unit, load_quantizer_states, quantizer_states
from methods.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantTap
from methods.quant.policy import Policy, Rule, calibrate, freeze, set_mode
from methods.quant.quantizers import FakeQuantizer, QuantizerSpec
from methods.quant.reconstruct import capture_call, flatten_output
from methods.quant.reparam import FOLD_TOLERANCE, fold_into_layernorm, max_relative_error, norm_linear_pairs
from methods.quant.scale_search import SearchConfig, search_layer, search_tap
from methods.quant.target import QuantTarget
from methods.quant.twin_quantizers import Outlier2SFQuantizer

# ---------------------------------------------------------------------------------------------
# Build: the quantizers (data)

# division, as PTQ4ViT's search quantizes: what was searched is what runs (see scale_search)
MPTQ_WEIGHT = QuantizerSpec(kind="uniform", symmetric=True, per_channel=True, ch_axis=0, arith="divide")
MPTQ_ACT = QuantizerSpec(kind="uniform", symmetric=True, arith="divide")
MPTQ_POST_GELU = QuantizerSpec(kind="twin_gelu")
MPTQ_POST_SOFTMAX = QuantizerSpec(kind="twin_softmax")
MPTQ_RESIDUAL = QuantizerSpec(kind="outlier_2sf")
POST_GELU_LINEARS = ("*fc2", "*ffn.layers.1")  # timm Mlp.fc2, mmcv FFN's second Linear


def mptq_policy(fully_quantized: bool = False) -> Policy:
    """Every Linear / Conv (patch embedding and head included) and both attention matmuls; with
    ``fully_quantized`` also the residual sums and the position-embedding sum (LayerNorm inputs)."""
    rules = [
        Rule(kind="linear", names=POST_GELU_LINEARS, weight=MPTQ_WEIGHT, act=MPTQ_POST_GELU),
        Rule(kind="linear", weight=MPTQ_WEIGHT, act=MPTQ_ACT),
        Rule(kind="conv", weight=MPTQ_WEIGHT, act=MPTQ_ACT),
        Rule(kind="matmul", roles=("av",), act=MPTQ_POST_SOFTMAX, act_b=MPTQ_ACT),
        Rule(kind="matmul", act=MPTQ_ACT),
    ]
    if fully_quantized:
        rules.append(Rule(kind="tap", roles=("res1", "res2", "pos"), act=MPTQ_RESIDUAL))
    return Policy("mptq-vit" + ("-fq" if fully_quantized else ""), rules)


# ---------------------------------------------------------------------------------------------
# Calibrate, part 1: SQ-b


@torch.no_grad()
def channel_ranges(model: nn.Module, layers: list[nn.Module], images: Tensor,
                   forward: Callable[[nn.Module, Tensor], Any]) -> list[tuple[Tensor, Tensor]]:
    """Per-channel (min, max) over the last axis of each layer's input on one forward."""
    seen: dict[int, list[Tensor]] = {}
    handles = []
    for i, layer in enumerate(layers):
        def pre(_m, args, i=i):
            x = args[0].detach().flatten(0, -2)
            lo, hi = x.amin(0), x.amax(0)
            if i in seen:
                lo, hi = torch.minimum(seen[i][0], lo), torch.maximum(seen[i][1], hi)
            seen[i] = [lo, hi]
        handles.append(layer.register_forward_pre_hook(pre))
    try:
        forward(model, images)
    finally:
        for h in handles:
            h.remove()
    return [tuple(seen[i]) for i in range(len(layers))]


@torch.no_grad()
def sq_b_fold(module: nn.Module, model: nn.Module, images: Tensor,
              forward: Callable[[nn.Module, Tensor], Any], alpha: float) -> dict[str, Any]:
    """SQ-b on every exact LayerNorm -> Linear pair of ``module``: with c = (max+min)/2 and
    r = (max-min)/2 per channel of the Linear's input, s = r^α / max_i|W_ij|^(1-α), the LayerNorm
    output becomes (x - c)/s and the Linear absorbs W·diag(s), b + W c (exact in floating point)."""
    pairs = norm_linear_pairs(module)
    layers = [module.get_submodule(lp) for _, lp in pairs]
    ranges = channel_ranges(model, layers, images, forward)
    for (norm_path, _), layer, (lo, hi) in zip(pairs, layers, ranges, strict=True):
        c, r = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-5)
        w_max = layer.weight.abs().amax(0).clamp_min(1e-5)
        s = (r.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)
        fold_into_layernorm(module.get_submodule(norm_path), [layer], ratio=s, shift=-c)
    return {"pairs": [lp for _, lp in pairs], "alpha": alpha}


# ---------------------------------------------------------------------------------------------
# Calibrate, part 2: the sequential layer-wise search


def search_sites(module: nn.Module) -> list[str]:
    """Paths of the sites the search visits, in module order (= execution order in timm / mm)."""
    def searchable(m: nn.Module) -> bool:
        if isinstance(m, QuantTap):
            return isinstance(m.quant, Outlier2SFQuantizer) and m.quant.bits is not None
        return isinstance(m, QuantLinear | QuantConv2d | QuantMatMul) and any(
            isinstance(q, FakeQuantizer) and q.bits is not None for q in m.children())
    return [p for p, m in module.named_modules() if p and searchable(m)]


def _site_quantizers(site: nn.Module) -> list[FakeQuantizer]:
    return [q for q in site.children() if isinstance(q, FakeQuantizer)]


@contextlib.contextmanager
def _quantizers_off(site: nn.Module) -> Iterator[None]:
    """The site's own quantizers off (its FP output), every other quantizer as it is."""
    qs = _site_quantizers(site)
    modes = [q.mode for q in qs]
    for q in qs:
        q.mode = "off"
    try:
        yield
    finally:
        for q, m in zip(qs, modes, strict=True):
            q.mode = m


class SiteSearch:
    """Captures one site's inputs in the current (partly quantized) model and searches its steps;
    results are remembered per (site, bits of its quantizers), so Greedy MP's trials and undos
    re-run a search only for a bit-width combination not seen before."""

    def __init__(self, qmodule: nn.Module, model: nn.Module, images: Tensor, forward, cfg: SearchConfig,
                 target_logits: Tensor | None) -> None:
        self.qmodule, self.model, self.images, self.forward, self.cfg = qmodule, model, images, forward, cfg
        self.target_logits = target_logits  # FP logits for the hessian metric
        self.inputs: dict[str, tuple] = {}
        self.memo: dict[tuple, list[dict[str, Tensor]]] = {}
        self.searches = 0

    def capture(self, path: str) -> None:
        """The site's FP inputs (its quantizers off) with every other quantizer as it is now."""
        site = self.qmodule.get_submodule(path)
        with _quantizers_off(site):
            args, out = capture_call(self.model, site, self.images, self.forward)
        grad = self._output_grad(site) if self.cfg.metric == "hessian" else None
        self.inputs[path] = (args, out, grad)

    def _output_grad(self, site: nn.Module) -> Tensor:
        """dL/d(site output), L = KL(FP ‖ current model) as PTQ4ViT's hessian calibration."""
        if self.target_logits is None:
            raise ValueError("mptq-vit: search_metric='hessian' needs class logits (classification)")
        saved: list[Tensor] = []
        handle = site.register_forward_hook(lambda _m, _a, out: saved.append(out))
        try:
            with _quantizers_off(site), torch.enable_grad():
                x = self.images.clone().requires_grad_(True)
                pred = self.forward(self.model, x)
                target = F.softmax(self.target_logits, -1)
                loss = F.kl_div(F.log_softmax(pred, -1), target, reduction="batchmean")
                (grad,) = torch.autograd.grad(loss, saved[0])
        finally:
            handle.remove()
        return grad.detach()

    def key(self, path: str) -> tuple:
        return (path, *(q.bits for q in _site_quantizers(self.qmodule.get_submodule(path))))

    def search(self, path: str) -> dict[str, Any] | None:
        """Search (or restore) the steps of ``path`` for its current bits."""
        site = self.qmodule.get_submodule(path)
        qs = _site_quantizers(site)
        key = self.key(path)
        if key in self.memo:
            load_quantizer_states(qs, self.memo[key])
            return None
        args, out, grad = self.inputs[path]
        if isinstance(site, QuantTap):
            info = search_tap(site.quant, args[0], self.cfg)
        else:
            info = search_layer(site, tuple(args[:2] if isinstance(site, QuantMatMul) else args[:1]),
                                out, self.cfg, grad)
        self.searches += 1
        self.memo[key] = quantizer_states(qs)
        return info


class MPTQUnitBits(SiteBits):
    """Greedy MP's way of setting a unit's bits: the new width, then the site's search re-run
    (``trial_search``), or else the searched clip range kept at the new width, and the search re-run
    only when the cut is committed (:meth:`commit`)."""

    def __init__(self, module: nn.Module, searcher: SiteSearch, trial_search: bool = True) -> None:
        super().__init__(module)
        self.searcher, self.trial_search = searcher, trial_search
        self._ranges: dict[tuple, list[dict[str, Tensor]]] = {}

    def __call__(self, unit: Unit, bits: int) -> None:
        if self.trial_search:
            for q in self.quantizers(unit):
                q.bits = bits
            self.searcher.search(unit.path)
            return
        qs = _site_quantizers(self.module.get_submodule(unit.path))
        key = self.searcher.key(unit.path)  # the state before: restored exactly on undo
        if key not in self._ranges:
            self._ranges[key] = quantizer_states(qs)
        for q in self.quantizers(unit):
            q.set_bits(bits, keep_range=True)
        new_key = self.searcher.key(unit.path)
        if new_key in self._ranges:
            load_quantizer_states(qs, self._ranges[new_key])

    def commit(self, unit: Unit, bits: int) -> None:
        if not self.trial_search:
            self._ranges.clear()
            self.searcher.search(unit.path)


# ---------------------------------------------------------------------------------------------
# The method


class MPTQViT(QuantMethod):
    """MPTQ-ViT: SQ-b folding, PTQ4ViT search with OPT-m, Greedy MP for mixed precision."""

    data_free = False
    data_source = "real"
    summary = "MPTQ-ViT (2024): SQ-b + OPT-m on PTQ4ViT's search, Greedy MP mixed precision"

    def target_config(self, target: QuantTarget, ctx: RunContext) -> Any:
        """Targets without class logits (det/seg) may calibrate on fewer images (``dense_num_images``)."""
        cfg = self.config
        if target.logits is not None or not cfg.dense_num_images:
            return cfg
        return dataclasses.replace(cfg, num_images=cfg.dense_num_images)

    def policy(self, target: QuantTarget) -> Policy:
        return mptq_policy(self.config.fully_quantized)

    def search_config(self) -> SearchConfig:
        cfg = self.config
        return SearchConfig(candidates=cfg.search_candidates, rounds=cfg.search_rounds,
                            metric=cfg.search_metric, optm=cfg.optm, optm_max_k=cfg.optm_max_k)

    def calibrate(self, built: Built, images: Tensor, target: QuantTarget, ctx: RunContext) -> None:
        self._calibrate(built, images, target, ctx)

    def _calibrate(self, built: Built, images: Tensor, target: QuantTarget, ctx: RunContext) -> SiteSearch:
        """SQ-b (checked exact), initial min-max ranges, then the sequential search site by site."""
        cfg = self.config
        qmod, model = built.qmodule, built.model
        x = images.to(next(model.parameters()).device)
        forward = target.logits if target.logits is not None else (lambda m, b: m(b))
        set_mode(qmod, "off")
        with torch.no_grad():
            before = flatten_output(forward(model, x[:4]))
        if cfg.sq_b:
            ctx.extra["sq_b"] = sq_b_fold(qmod, model, x, forward, cfg.sq_alpha)
        with torch.no_grad():
            after = flatten_output(forward(model, x[:4]))
        error = max_relative_error(before, after)
        if error > FOLD_TOLERANCE:
            raise RuntimeError(f"mptq-vit: SQ-b changed the FP model (relative error {error:.2e})")
        ctx.extra.setdefault("sq_b", {})["fp_relative_error"] = error
        set_mode(qmod, "quant")
        calibrate(qmod, [x], forward=lambda _m, b: model(b))  # min-max starting points (PTQ4ViT)
        with torch.no_grad():
            fp_logits = target.logits(target.model, x) if target.logits is not None else None
        searcher = SiteSearch(qmod, model, x, forward, self.search_config(), fp_logits)
        sites = search_sites(qmod)
        for i, path in enumerate(sites):  # sequential: upstream sites already searched
            searcher.capture(path)
            searcher.search(path)
            if i % 8 == 0:
                ctx.progress(f"mptq-vit search {i + 1}/{len(sites)}: {path}")
        ctx.extra["search"] = {"sites": len(sites), "searches": searcher.searches,
                               "config": dataclasses.asdict(searcher.cfg)}
        freeze(qmod)
        return searcher

    def allocate(self, target: QuantTarget, bits: BitSpec, images: Tensor, ctx: RunContext) -> BitSpec:
        """Greedy MP (spec 3.5): every unit at the largest candidate on a probe calibrated as above;
        a trial sets a unit's bits and re-runs its site's search (remembered per bit-width), and the
        loss is KL(FP ‖ quantized) on the calibration images. The method then runs at the map
        (SQ-b and a final search at the allocated bits)."""
        start = max(self.mp_candidates())
        probe = self.build(target, BitSpec(f"w{start}a{start}", start, start), ctx)
        searcher = self._calibrate(probe, images, target, ctx)
        x = images.to(next(probe.model.parameters()).device)
        # (frozen weight caches follow the quantizers' state keys: a trial's new bits re-quantize)
        unit_bits = MPTQUnitBits(probe.qmodule, searcher, self.config.mp_trial_search)
        return allocate_bits(self, probe, target, bits, x, unit_bits, ctx, mode=self.config.mp_greedy,
                             allocator="mptq-vit greedy mp", on_commit=unit_bits.commit)


# ---------------------------------------------------------------------------------------------
# Config, profiles and provenance (data)


@dataclass
class MPTQViTConfig(MethodConfig):
    num_images: int = 32  # PTQ4ViT example/test_all.py: calib_size 32
    sq_b: bool = True
    sq_alpha: float = 0.5  # SmoothQuant migration strength
    search_candidates: int = 100  # PTQ4ViT configs/PTQ4ViT.py: eq_n
    search_rounds: int = 3
    search_metric: str = "mse"  # "mse" | "hessian" (PTQ4ViT's own)
    optm: bool = True  # OPT-m on the post-GELU ratio; False: PTQ4ViT's fixed negative step
    optm_max_k: int = 10  # m = 2^k, k = 0..optm_max_k
    fully_quantized: bool = False  # also the residual stream (LayerNorm inputs), O-2SF
    mp_candidates: tuple[int, ...] = (4, 5, 6, 8)
    mp_greedy: str = "exact"  # "exact": every unit re-measured each step (spec); "lazy": see mixed.py
    mp_trial_search: bool = True  # re-run a site's search for every trial (spec); False: on commit only
    dense_num_images: int | None = None  # targets without logits (det/seg); None: num_images
    data_source: str | None = None  # None: real calibration images


MPTQ_PROFILES = {
    "ci": {"search_candidates": 20, "search_rounds": 1, "optm_max_k": 4, "mp_greedy": "lazy",
           "mp_trial_search": False, "dense_num_images": 8},
}

MPTQ_PROVENANCE = {
    "calibration data": "reconstructed: 32 random calibration images, the PTQ4ViT / RepQ-ViT protocol "
    "(PTQ4ViT example/test_all.py: calib_size 32)",
    "sq-b": "reconstructed: (form high-confidence) per channel of each LayerNorm -> Linear input "
    "(qkv, fc1, patch-merging reduction), c = (max+min)/2, r = (max-min)/2, s = r^0.5 / max|W_:j|^0.5, "
    "folded into the LayerNorm affine and the Linear (exact; checked <= 1e-4 relative on the logits)",
    "sq-b on mm swin": "choice: mmdet/mmseg Swin's norm1 -> w_msa.qkv is not folded (the library "
    "zero-pads the LayerNorm output to whole windows, so a shift is not exact)",
    "weights": "reconstructed: per-output-channel symmetric uniform, every Linear and Conv (patch "
    "embedding and head included, spec 3.6 choice), steps searched per channel on PTQ4ViT's grid",
    "activations": "reconstructed: per-tensor symmetric uniform (post SQ-b), Q/K/V per tensor, searched "
    "on PTQ4ViT's grid",
    "post-gelu quantizer": "code-verified: PTQ4ViT quant_layers/linear.py:557-607, two-region, codes "
    "-2^(b-1)..0 at step Δneg and 0..2^(b-1)-1 at step Δpos",
    "opt-m": "reconstructed: Δneg = Δpos/2^k, k = 0..10 and Δpos searched together on the fc2 output "
    "MSE (PTQ4ViT instead fixes Δneg = 0.16997/2^(b-1))",
    "post-softmax": "code-verified: PTQ4ViT quant_layers/matmul.py:578-623, twin-uniform with the split "
    "searched over 2^-i, i < 20",
    "search grid": "code-verified: PTQ4ViT configs/PTQ4ViT.py:16-48, 100 multipliers in [0.01, 1.2) of "
    "max|t|/(2^(b-1)-0.5), 3 alternating rounds",
    "search order": "reconstructed: sequential as PTQ4ViT's utils/quant_calib.py with sequential=True "
    "(each site's input from the already-searched model, target its own FP output)",
    "search metric": "choice: MSE (PTQ4ViT's hessian-guided metric as search_metric='hessian', the "
    "gradient of KL(FP || current model) at the site's output)",
    "fully quantized": "reconstructed: TSPTQ-ViT's O-2SF, residual sums and the position-embedding sum "
    "(the LayerNorm inputs) per-tensor with outlier channels at step·2^t, t searched; off by default",
    "greedy mp": "reconstructed: weights and activations of each site separate units, candidates "
    "{4,5,6,8}, all start at 8; each step every unit is trial-lowered one notch (its site's search "
    "re-run for the new bits), cost ΔL / Δ(average bits of its kind), L = KL(FP || quantized logits) on "
    "the calibration images (relative output MSE without logits), cheapest committed until both "
    "averages <= the budget; block outputs cached so a trial re-runs only downstream blocks",
    "ci profile": "choice: 20 grid candidates, 1 round, k = 0..4, 8 calibration images on det/seg, lazy "
    "greedy (one re-measurement per step instead of every unit), trials keep the searched clip range at "
    "the new width and the search "
    "re-runs when a cut is committed",
    "det/seg": "choice: without class logits the search targets are unchanged (layer-wise) and Greedy "
    "MP's loss is the relative MSE of the backbone output",
}


register_method("mptq-vit", config=MPTQViTConfig, profiles=MPTQ_PROFILES, provenance=MPTQ_PROVENANCE)(MPTQViT)

__all__ = ["MPTQViT", "MPTQViTConfig", "mptq_policy", "sq_b_fold", "search_sites"]
