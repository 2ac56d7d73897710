"""Baselines: the FP reference, min-max PTQ on real data and on noise, and PSAQ-ViT V1.

PSAQ-ViT V1 (Li et al., ECCV'22, zkkli/PSAQ-ViT) follows
``docs/methods/psaq-vit.md``: its quantizer placement is
the data in :func:`psaq_v1_policy`; its images come from
:func:`methods.synth.pse_generation.generate_pse_images`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from methods.base import QuantMethod, RunContext, register_method
from methods.quant.bits import BitSpec
from methods.quant.policy import Policy, Rule, apply_policy, calibrate, freeze
from methods.quant.quantizers import QuantizerSpec
from methods.quant.target import InputSpec, QuantTarget
from methods.synth.artifacts import cache_key, cached_tensor, save_image_grid
from methods.synth.optimize import Stage
from methods.synth.priors import scale_jitter_limit, tv_target_scale
from methods.synth.pse_generation import generate_pse_images

# ---------------------------------------------------------------------------------------------
# Policies (data)

PTQ_WEIGHT = QuantizerSpec(kind="uniform", symmetric=True, per_channel=True, ch_axis=0, range="minmax")
PTQ_ACT = QuantizerSpec(kind="uniform", symmetric=False, per_channel=False, range="minmax")
# V1 weights: symmetric per output channel, min-max recomputed at every forward, scale max|w|/((2^b-1)/2)
# V1 divides (x / s + zp), as its released quant_utils.py does; x * (1/s) moves .5 ties (see qfunc).
V1_WEIGHT = QuantizerSpec(
    kind="uniform", symmetric=True, per_channel=True, ch_axis=0, range="dynamic", v1_scale=True,
    arith="divide",
)
V1_ACT = QuantizerSpec(kind="uniform", symmetric=False, per_channel=False, range="minmax", arith="divide")


def minmax_policy(name: str = "minmax-ptq") -> Policy:
    """Every Linear/Conv (per-channel symmetric weights, per-tensor asymmetric input) and both
    operands of every MatMul (post-softmax probabilities included)."""
    return Policy(
        name,
        [
            Rule(kind="conv", weight=PTQ_WEIGHT, act=PTQ_ACT),
            Rule(kind="linear", weight=PTQ_WEIGHT, act=PTQ_ACT),
            Rule(kind="matmul", act=PTQ_ACT),
        ],
    )


def psaq_drop_tokens(target: QuantTarget, swin_drop_first_token: bool) -> int:
    """Tokens PSAQ's patch-similarity entropy skips: the prefix tokens; on Swin V1 drops token 0 of
    every window although Swin has no class token (a V1 quirk, kept by default)."""
    if target.family == "swin" and swin_drop_first_token:
        return 1
    return target.prefix_tokens


def psaq_v1_policy() -> Policy:
    """PSAQ-ViT V1 placement (spec Part 1.2) over the surgery's sites.

    conv  : input image (``qact_input``), patch-embed output (``PatchEmbed.QuantAct``).
    linear: input = LN1 out (qkv) / attn@v out (proj) / LN2 out (fc1) / GELU out (fc2) /
            final LN or pooled features (head) / merging LN out (reduction); output = Q,K,V (qkv),
            proj out, fc2 out, logits (head), reduction out. fc1's output (GELU input) stays FP.
    tap   : pre-softmax scores, both residual sums, the pos-embed sum.
    Not quantized: the softmax output ("probs" tap) and the matmul operands themselves (Q, K, V
    already carry the qkv output quantizer, the probabilities are FP in V1).
    """
    return Policy(
        "psaq-vit-v1",
        [
            Rule(kind="conv", weight=V1_WEIGHT, act=V1_ACT, out=V1_ACT),
            Rule(kind="linear", names=("*fc1",), weight=V1_WEIGHT, act=V1_ACT),
            Rule(kind="linear", weight=V1_WEIGHT, act=V1_ACT, out=V1_ACT),
            Rule(kind="tap", roles=("scores", "res1", "res2", "pos"), act=V1_ACT),
        ],
    )


# ---------------------------------------------------------------------------------------------
# Shared steps


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def quantize_copy(
    target: QuantTarget,
    bits: BitSpec,
    ctx: RunContext,
    policy: Policy,
    batches: list[Tensor],
) -> nn.Module:
    """Deep-copy the FP model, apply ``policy`` to the quant module, calibrate on ``batches``.

    Calibration runs the whole copied model on the images (the quant module may be a
    backbone inside it). Reports the resolved bits and the policy to ``ctx``.
    """
    model = copy.deepcopy(target.model).eval()
    qmod = model.get_submodule(target.quant_path) if target.quant_path else model
    resolved = apply_policy(qmod, policy, bits)
    ctx.record_quantization(resolved, policy.to_dict())
    dev = _device(model)
    with ctx.timer("calibration"):
        calibrate(qmod, [b.to(dev) for b in batches], forward=lambda _m, x: model(x))
        freeze(qmod)  # activation ranges are fixed by calibrate; cache the fake-quantized weights
    return model


# ---------------------------------------------------------------------------------------------
# Methods


@register_method("fp")
class FullPrecision(QuantMethod):
    """The task's FP model, unchanged: the reference row of every table."""

    data_free = True
    summary = "full-precision reference (no quantization)"

    @dataclass
    class Config:
        pass

    PROFILES = {"ci": {}}
    provenance = {"model": "choice: the task's FP model returned unchanged (reference)"}

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        ctx.record_quantization(BitSpec("fp", None, None))
        return target.model


_PTQ_PROVENANCE = {
    "weights": "choice: per-output-channel symmetric min-max, scale max|w|/(2^(b-1)-1), every Linear/Conv "
    "(patch embed and head included)",
    "activations": "choice: per-tensor asymmetric min-max on every Linear/Conv input and both MatMul "
    "operands (softmax output included); LayerNorm/softmax/GELU in FP",
}


@register_method("minmax-ptq")
class MinMaxPTQ(QuantMethod):
    """Min-max PTQ calibrated on real images (PSAQ-ViT V1's "Standard" calibration mode)."""

    data_free = False
    summary = "min-max PTQ on real calibration images"

    @dataclass
    class Config:
        num_images: int = 32  # V1 test_quant.py: one batch of 32 real images

    PROFILES = {"ci": {}}
    provenance = {
        **_PTQ_PROVENANCE,
        "calibration": "code-verified: one forward on 32 real images, then freeze (V1 test_quant.py:92-120, "
        "mode 2); the images come from the task's calibration split",
    }

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        if ctx.calibration is None:
            raise RuntimeError("minmax-ptq needs real calibration images but the run context has none")
        images = ctx.calibration(self.config.num_images)
        return quantize_copy(target, bits, ctx, minmax_policy(self.name), [images])


@register_method("noise-ptq")
class NoisePTQ(QuantMethod):
    """Min-max PTQ calibrated on Gaussian noise (PSAQ-ViT V1's noise calibration mode)."""

    data_free = True
    summary = "min-max PTQ calibrated on N(0,1) noise"

    @dataclass
    class Config:
        num_images: int = 32

    PROFILES = {"ci": {}}
    provenance = {
        **_PTQ_PROVENANCE,
        "calibration": "code-verified: one forward on 32 N(0,1) images in normalised space, then freeze "
        "(V1 test_quant.py:92-120, mode 1)",
    }

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        with ctx.timer("generation"):
            noise = torch.randn(target.input_spec.shape(self.config.num_images), generator=ctx.generator())
        ctx.record_images("calibration", noise)
        return quantize_copy(target, bits, ctx, minmax_policy(self.name), [noise])


@register_method("psaq-vit")
class PSAQViT(QuantMethod):
    """PSAQ-ViT V1: patch-similarity-entropy image generation, then V1 min-max calibration."""

    data_free = True
    summary = "PSAQ-ViT V1 (ECCV'22): PSE-driven synthetic calibration images"

    @dataclass
    class Config:
        batch_size: int = 32
        iterations: int = 500  # per stage
        warmup: int = 100  # per stage
        jitter_lims: tuple[int, ...] = (15, 30)  # one per stage, in pixels at jitter_reference_size
        jitter_reference_size: int = 224
        lr: float = 0.2
        lr_swin: float = 0.25
        betas: tuple[float, float] = (0.5, 0.9)
        eps: float = 1e-8
        bandwidth: float = 0.01
        grid_points: int = 10
        ce_weight: float = 1.0
        tv_weight: float = 0.05
        tv_target_range: tuple[float, float] = (2500.0, 3000.0)  # at B=32, 3x224x224
        tv_scale_to_input: bool = True  # rescale v to this batch / image size (see provenance)
        swin_drop_first_token: bool = True  # V1 quirk: drop token 0 of every window
        # Tasks without class logits (det/seg): V1 has no setting for them. Their inputs are larger
        # and the backbone costs more per image, so the CPU profile may generate fewer, shorter.
        dense_batch_size: int | None = None  # None = batch_size
        dense_iterations: int | None = None  # per stage; None = iterations (warm-up scaled with it)
        use_cache: bool = True
        save_grid: bool = True

    PROFILES = {"ci": {"iterations": 60, "warmup": 12, "dense_batch_size": 8, "dense_iterations": 20}}
    provenance = {
        "weight quantizer": "code-verified: per-output-channel symmetric min-max recomputed every forward, "
        "scale max|w|/((2^b-1)/2), round(w / s) computed by division as released (not w * (1/s), which "
        "moves the .5 tie at a channel's extreme), every Linear and the patch-embed Conv, no 8-bit exception "
        "(quant_utils.py:31-51 and SymmetricQuantFunction, quant_modules.py:58-62)",
        "activation quantizer": "code-verified: per-tensor asymmetric min-max, running min/max over one "
        "batch, then frozen; round(x / s + zp) by division (quant_utils.py:54-71 and "
        "AsymmetricQuantFunction)",
        "activation placement": "reconstructed: V1's positions mapped onto surgery sites (image, patch-embed "
        "out, pos-embed sum, qkv in/out, pre-softmax scores, proj in/out, residual sums, fc1 in, fc2 in/out, "
        "head in/out, patch-merging in/out); softmax output FP. Not expressible: separate cls-concat and "
        "pos-embed quantizers, Swin's post-patch-norm, pre-bias score and rel-pos-table quantizers; the "
        "head input is quantized after pooling instead of the whole final-LN output",
        "pse": "code-verified: head mean of every block's attn@v, drop token 0, cosine similarities, "
        "Gaussian KDE h=0.01 on a 10-point grid global over the batch and detached, trapezoid entropy "
        "with +1e-4 (generate_data.py:94-132, utils/kde.py)",
        "swin token drop": "code-verified: token 0 of every window dropped (V1 quirk; flag "
        "swin_drop_first_token); ViT/DeiT drop the model's prefix tokens (1 = CLS in V1; 2 if distilled)",
        "ce": "code-verified: CE to uniform random labels, weight 1.0; dropped (and noted) without logits",
        "tv prior": "code-verified: 0.05*|TV - v|, TV = sum of Frobenius norms of 4 neighbour differences of "
        "the jittered batch, v ~ U(2500, 3000) at B=32 (generate_data.py:135-143)",
        "tv target scaling": "choice: v * sqrt(B*C*H*W / (32*3*224*224)): keeps V1's RMS neighbour "
        "difference for other batch sizes, image sizes and channel counts (factor 1 at the paper setting)",
        "augmentation": "code-verified: roll H and W by one offset in [-lim, lim], horizontal flip p=0.5",
        "jitter scaling": "choice: lim 15/30 px at 224 rescaled by min(H, W)/224, rounded, >= 1",
        "optimiser": "code-verified: Adam on pixels, lr 0.2 (0.25 Swin), betas (0.5, 0.9), eps 1e-8, "
        "2 stages x 500 its, warm-up 100 + cosine per stage, Adam state kept, clamp to valid range",
        "init": "code-verified: B=32 images from N(0, 1) in normalised space",
        "calibration": "code-verified: one forward on the 32 generated images, then freeze",
        "randomness": "choice: a torch generator from the job seed replaces python's random",
        "det/seg generation": "choice: same losses without CE (no class logits), images at the task's input "
        "size from the backbone's attention; dense_batch_size / dense_iterations (paper profile: V1's "
        "32 images x 500 its; ci: 8 x 20) because V1 defines no dense setting",
    }

    # -- generation ----------------------------------------------------------------------------

    def _drop_tokens(self, target: QuantTarget) -> int:
        return psaq_drop_tokens(target, self.config.swin_drop_first_token)

    def generate(self, target: QuantTarget, ctx: RunContext) -> Tensor:
        """The generated batch (normalised, on CPU), from the cache when available."""
        cfg = self.config
        if target.logits is None:
            ctx.note("psaq-vit: task has no class logits; generation drops the CE term (PSE + TV only)")
        key_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("use_cache", "save_grid")}
        # the weights tag (checkpoint hash) is part of the key: retrained weights must not hit old images
        key = cache_key(self.name, target.model_name, key_cfg, ctx.seed, weights=target.info.get("weights"))
        path = Path(ctx.cache_dir) / f"{self.name}-{target.model_name}-{key}.pt"
        if cfg.use_cache:
            images, hit = cached_tensor(path, lambda: self._run_generation(target, ctx))
            if hit:
                ctx.note(f"psaq-vit: synthetic images loaded from cache {path.name}")
            return images
        return self._run_generation(target, ctx).cpu()

    def _run_generation(self, target: QuantTarget, ctx: RunContext) -> Tensor:
        cfg = self.config
        spec = target.input_spec
        lims = [scale_jitter_limit(v, spec.image_size, cfg.jitter_reference_size) for v in cfg.jitter_lims]
        batch_size, iterations, warmup = cfg.batch_size, cfg.iterations, cfg.warmup
        if target.logits is None:  # det/seg (see Config)
            batch_size = cfg.dense_batch_size or cfg.batch_size
            if cfg.dense_iterations:
                warmup = max(1, round(cfg.warmup * cfg.dense_iterations / cfg.iterations))
                iterations = cfg.dense_iterations
        stages = [Stage(iterations, lim, warmup) for lim in lims]
        hooked = target.quant_module
        forward: Callable[[Tensor], Tensor]
        num_classes = None
        if target.logits is not None:
            logits_fn = target.logits
            forward = lambda x: logits_fn(target.model, x)  # noqa: E731
            num_classes = target.num_classes or self._infer_classes(forward, spec, _device(hooked))
        else:
            forward = hooked  # output unused: no CE term (noted in generate)
        tv_scale = 1.0
        if cfg.tv_scale_to_input:
            tv_scale = tv_target_scale(batch_size, spec.in_chans, spec.image_size)
        result = generate_pse_images(
            hooked,
            forward,
            spec,
            batch_size=batch_size,
            stages=stages,
            lr=cfg.lr_swin if target.family == "swin" else cfg.lr,
            generator=ctx.generator(),
            num_classes=num_classes,
            ce_weight=cfg.ce_weight,
            tv_weight=cfg.tv_weight,
            tv_target_range=cfg.tv_target_range,
            tv_scale=tv_scale,
            drop_tokens=self._drop_tokens(target),
            bandwidth=cfg.bandwidth,
            grid_points=cfg.grid_points,
            betas=cfg.betas,
            eps=cfg.eps,
            progress=ctx.progress,
        )
        first, last = result.history[0], result.history[-1]
        ctx.extra["generation"] = {
            "stages": [dataclasses.asdict(s) for s in stages],
            "tv_target": result.meta["tv_target"],
            "loss_first": first,
            "loss_last": last,
        }
        return result.images

    @staticmethod
    def _infer_classes(forward: Callable[[Tensor], Tensor], spec: InputSpec, device: torch.device) -> int:
        with torch.no_grad():
            return int(forward(torch.zeros(spec.shape(1), device=device)).shape[-1])

    # -- quantize ------------------------------------------------------------------------------

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        policy = psaq_v1_policy()
        if bits.is_fp:
            ctx.note("psaq-vit: bits=fp, nothing to quantize; generation skipped")
            return quantize_copy(target, bits, ctx, policy, [])
        with ctx.timer("generation"):
            images = self.generate(target, ctx)
        ctx.record_images("calibration", images)
        if self.config.save_grid:
            grid = save_image_grid(
                target.input_spec.denormalize(images), Path(ctx.artifacts_dir) / f"{self.name}_images.png"
            )
            ctx.extra["synthetic_images"] = str(grid)
        return quantize_copy(target, bits, ctx, policy, [images])
