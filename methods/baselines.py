"""Baselines: the FP reference, min-max PTQ on real data and on noise, and PSAQ-ViT V1.

Each method file reads in the order the template runs (methods.base): data source, build (policy),
calibrate, fine-tune; config, profiles and provenance are data at the end.

PSAQ-ViT V1 (Li et al., ECCV'22, zkkli/PSAQ-ViT) follows ``docs/methods/psaq-vit.md``: its quantizer
placement is the data in :func:`psaq_v1_policy`; its images come from the ``psaq-vit`` data source
(:class:`PSEImages`, on :func:`methods.synth.pse_generation.generate_pse_images`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from methods.base import MethodConfig, QuantMethod, RunContext, register_method
from methods.data import DataSource, register_source
from methods.quant.policy import Policy, Rule
from methods.quant.quantizers import QuantizerSpec
from methods.quant.target import QuantTarget
from methods.synth.optimize import Stage, rescaled_warmup
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
# PSAQ-ViT V1's images: the "psaq-vit" data source


@register_source("psaq-vit")
class PSEImages(DataSource):
    """Images whose patch-similarity entropy is high (V1's generator), configured by PSAQViTConfig."""

    owner = "psaq-vit"
    summary = "PSAQ-ViT V1: patch-similarity entropy + CE + TV prior"

    def count(self, config: Any, target: QuantTarget) -> int:
        return int(config.batch_size)

    def make(self, target: QuantTarget, n: int, config: Any, ctx: RunContext) -> Tensor:
        cfg = config
        spec = target.input_spec
        lims = [scale_jitter_limit(v, spec.image_size, cfg.jitter_reference_size) for v in cfg.jitter_lims]
        stages = [Stage(cfg.iterations, lim, cfg.warmup) for lim in lims]
        hooked = target.quant_module
        forward, num_classes = class_forward(target)
        if num_classes is None:
            ctx.note("psaq-vit: task has no class logits; generation drops the CE term (PSE + TV only)")
        tv_scale = 1.0
        if cfg.tv_scale_to_input:
            tv_scale = tv_target_scale(n, spec.in_chans, spec.image_size)
        result = generate_pse_images(
            hooked, forward, spec, batch_size=n, stages=stages,
            lr=cfg.lr_swin if target.family == "swin" else cfg.lr, generator=ctx.generator(),
            num_classes=num_classes, ce_weight=cfg.ce_weight, tv_weight=cfg.tv_weight,
            tv_target_range=cfg.tv_target_range, tv_scale=tv_scale,
            drop_tokens=psaq_drop_tokens(target, cfg.swin_drop_first_token), bandwidth=cfg.bandwidth,
            grid_points=cfg.grid_points, betas=cfg.betas, eps=cfg.eps, progress=ctx.progress,
        )
        ctx.extra["generation"] = {
            "stages": [dataclasses.asdict(s) for s in stages], "tv_target": result.meta["tv_target"],
            "loss_first": result.history[0], "loss_last": result.history[-1],
        }
        return result.images


def class_forward(target: QuantTarget) -> tuple[Callable[[Tensor], Tensor], int | None]:
    """What a generator forwards: images -> class logits of the whole model, and the class count; for
    targets without logits (det/seg) the quant module itself (its output unused) and None."""
    if target.logits is None:
        return target.quant_module, None
    logits_fn = target.logits
    forward = lambda x: logits_fn(target.model, x)  # noqa: E731
    return forward, target.num_classes or infer_classes(forward, target)


def infer_classes(forward: Callable[[Tensor], Tensor], target: QuantTarget) -> int:
    """Number of classes from one forward of a blank image (targets that do not say)."""
    device = next(target.quant_module.parameters()).device
    with torch.no_grad():
        return int(forward(torch.zeros(target.input_spec.shape(1), device=device)).shape[-1])


# ---------------------------------------------------------------------------------------------
# Methods


class FullPrecision(QuantMethod):
    """The task's FP model, unchanged: the reference row of every table (the template's bits=fp path)."""

    data_free = True
    quantizes = False
    summary = "full-precision reference (no quantization)"


class MinMaxPTQ(QuantMethod):
    """Min-max PTQ calibrated on real images (PSAQ-ViT V1's "Standard" calibration mode)."""

    data_free = False
    data_source = "real"
    summary = "min-max PTQ on real calibration images"

    def policy(self, target: QuantTarget) -> Policy:
        return minmax_policy(self.name)


class NoisePTQ(MinMaxPTQ):
    """Min-max PTQ calibrated on Gaussian noise (PSAQ-ViT V1's noise calibration mode)."""

    data_free = True
    data_source = "noise"
    summary = "min-max PTQ calibrated on N(0,1) noise"


class PSAQViT(QuantMethod):
    """PSAQ-ViT V1: patch-similarity-entropy image generation, then V1 min-max calibration."""

    data_free = True
    data_source = "psaq-vit"
    summary = "PSAQ-ViT V1 (ECCV'22): PSE-driven synthetic calibration images"

    def target_config(self, target: QuantTarget, ctx: RunContext) -> Any:
        """Targets without class logits (det/seg): V1 has no setting for them (see the config)."""
        cfg = self.config
        if target.logits is not None:
            return cfg
        its, warmup = cfg.iterations, cfg.warmup
        if cfg.dense_iterations:  # warm-up scaled with the stage length
            warmup = rescaled_warmup(cfg.warmup, cfg.iterations, cfg.dense_iterations)
            its = cfg.dense_iterations
        return dataclasses.replace(cfg, batch_size=cfg.dense_batch_size or cfg.batch_size, iterations=its,
                                   warmup=warmup)

    def num_images(self, target: QuantTarget) -> int:
        return int(self.config.batch_size)

    def policy(self, target: QuantTarget) -> Policy:
        return psaq_v1_policy()

    # calibrate: the template's one min-max pass over the generated batch, then freeze


# ---------------------------------------------------------------------------------------------
# Config, profiles and provenance (data)


@dataclass
class FullPrecisionConfig:
    pass


@dataclass
class PTQConfig(MethodConfig):
    num_images: int = 32  # V1 test_quant.py: one batch of 32 images
    data_source: str | None = None  # None: the method's own ("real" / "noise")


@dataclass
class PSAQViTConfig(MethodConfig):
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
    data_source: str | None = None  # None: the "psaq-vit" source (PSEImages above)



_PTQ_PROVENANCE = {
    "weights": "choice: per-output-channel symmetric min-max, scale max|w|/(2^(b-1)-1), every Linear/Conv "
    "(patch embed and head included)",
    "activations": "choice: per-tensor asymmetric min-max on every Linear/Conv input and both MatMul "
    "operands (softmax output included); LayerNorm/softmax/GELU in FP",
}

PSAQ_VIT_PROVENANCE = {
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



register_method(
    "fp", config=FullPrecisionConfig, profiles={"ci": {}},
    provenance={"model": "choice: the task's FP model returned unchanged (reference)"},
)(FullPrecision)
register_method(
    "minmax-ptq", config=PTQConfig, profiles={"ci": {}},
    provenance={
        **_PTQ_PROVENANCE,
        "calibration": "code-verified: one forward on 32 real images, then freeze (V1 test_quant.py:92-120, "
        "mode 2); the images come from the task's calibration split",
    },
)(MinMaxPTQ)
register_method(
    "noise-ptq", config=PTQConfig, profiles={"ci": {}},
    provenance={
        **_PTQ_PROVENANCE,
        "calibration": "code-verified: one forward on 32 N(0,1) images in normalised space, then freeze "
        "(V1 test_quant.py:92-120, mode 1)",
    },
)(NoisePTQ)
register_method(
    "psaq-vit", config=PSAQViTConfig,
    profiles={"ci": {"iterations": 60, "warmup": 12, "dense_batch_size": 8, "dense_iterations": 20}},
    provenance=PSAQ_VIT_PROVENANCE,
)(PSAQViT)
