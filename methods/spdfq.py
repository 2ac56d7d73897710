"""SPDFQ / SARDFQ (Zhong et al., arXiv 2412.16553; ICCV'25): attention-priors image generation, then
block-wise reconstruction PTQ on the RepQ-ViT quantizer stack.

No code was released: ``docs/methods/spdfq.md`` is the reading, and every component's level
(paper / reconstructed / choice) is in the provenance at the end of this file. In the order it runs:

1. Data: the ``spdfq`` data source (:class:`SemanticPriorImages`): 32 images from N(0, 1), Adam, loss
   ``apa_weight·L_APA + L_SL + 0.05·L_TV`` with multi-semantic regions
   (:func:`methods.synth.spdfq_generation.generate_spdfq_images`). Any other source goes through
   the same pipeline with ``data_source=`` (SARDFQ's own table compares data sources this way).
2. Build: per-channel asymmetric weights (MSE-searched), post-LayerNorm inputs (qkv, fc1, patch
   merging) channel-wise, log√2 post-softmax, every other activation per-tensor asymmetric.
3. Calibrate: one forward with quantized weights; then each channel-wise post-LayerNorm quantizer is
   reparameterised into the LayerNorm affine (RepQ-ViT), so the deployed quantizer is per-tensor.
4. Fine-tune: block-wise reconstruction, block by block, inputs from the quantized model
   (:func:`methods.quant.reconstruct.reconstruct_blocks`).

Without class logits (det/seg) generation is APA + TV only and reconstruction covers the backbone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Built, MethodConfig, QuantMethod, RunContext, register_method
from methods.baselines import class_forward
from methods.data import DataSource, register_source
from methods.quant.bits import BitSpec
from methods.quant.policy import Policy, Rule, calibrate, freeze, set_mode
from methods.quant.quantizers import QuantizerSpec, UniformQuantizer
from methods.quant.reconstruct import block_units, flatten_output, reconstruct_blocks
from methods.quant.reparam import (
    FOLD_TOLERANCE,
    max_relative_error,
    norm_linear_pairs,
    reparameterize_post_norm,
)
from methods.quant.target import QuantTarget
from methods.synth.optimize import rescaled_warmup
from methods.synth.priors import scale_jitter_limit, tv_target_scale
from methods.synth.spdfq_generation import generate_spdfq_images

# ---------------------------------------------------------------------------------------------
# SPDFQ's images: the "spdfq" data source

GEN_FIELDS = (
    "num_images", "iterations", "warmup", "lr", "lr_swin", "betas", "eps", "jitter", "jitter_reference_size",
    "apa_weight", "apa_components", "apa_sigma", "msr_max_regions", "sl_logit_range", "tv_weight",
    "tv_target_range", "tv_scale_to_input", "use_apa", "use_msr", "use_sl",
)


@register_source("spdfq")
class SemanticPriorImages(DataSource):
    """Images whose attention follows random GMM priors, with regions of their own classes (SPDFQ)."""

    owner = "spdfq"
    key_fields = GEN_FIELDS
    summary = "SPDFQ/SARDFQ: attention-prior alignment + multi-semantic regions + soft labels + TV"

    def make(self, target: QuantTarget, n: int, config: Any, ctx: RunContext) -> Tensor:
        cfg = config
        spec = target.input_spec
        hooked = target.quant_module
        forward, num_classes = class_forward(target)
        if num_classes is None:
            ctx.note("spdfq: task has no class logits; generation is APA + TV only (no MSR, no soft labels)")
        lo, hi = cfg.tv_target_range
        tv_target = lo + (hi - lo) * float(torch.rand((), generator=ctx.generator(2)))
        if cfg.tv_scale_to_input:
            tv_target *= tv_target_scale(n, spec.in_chans, spec.image_size)
        patch_grid = getattr(getattr(hooked, "patch_embed", None), "grid_size", None)
        result = generate_spdfq_images(
            hooked, forward, spec, batch_size=n, iterations=cfg.iterations, warmup=cfg.warmup,
            lr=cfg.lr_swin if target.family == "swin" else cfg.lr, generator=ctx.generator(0),
            num_classes=num_classes, family=target.family, prefix_tokens=target.prefix_tokens,
            patch_grid=tuple(patch_grid) if patch_grid is not None else None,
            jitter=scale_jitter_limit(cfg.jitter, spec.image_size, cfg.jitter_reference_size),
            betas=cfg.betas, eps=cfg.eps, apa_weight=cfg.apa_weight, components=cfg.apa_components,
            sigma_range=cfg.apa_sigma, msr_max=cfg.msr_max_regions, label_range=cfg.sl_logit_range,
            tv_weight=cfg.tv_weight, tv_target=tv_target, use_apa=cfg.use_apa, use_msr=cfg.use_msr,
            use_sl=cfg.use_sl, progress=ctx.progress,
        )
        ctx.extra["generation"] = {
            "images": n, "tv_target": tv_target, "apa_depths": result.meta["apa_depths"],
            "msr": result.meta["msr"], "soft_labels": result.meta["sl"], "apa": cfg.use_apa,
            "loss_first": result.history[0], "loss_last": result.history[-1],
        }
        return result.images


# ---------------------------------------------------------------------------------------------
# Build: the RepQ-ViT quantizer stack (data)

# RepQ-ViT's init: of the clip ranges at the 99.9 / 99.99 / 99.999th percentiles, the least-MSE one
SPDFQ_WEIGHT = QuantizerSpec(kind="uniform", symmetric=False, per_channel=True, ch_axis=0,
                             range="percentile_mse")
SPDFQ_ACT = QuantizerSpec(kind="uniform", symmetric=False, per_channel=False, range="percentile_mse")
SPDFQ_ACT_CHANNEL = QuantizerSpec(kind="uniform", symmetric=False, per_channel=True, ch_axis=-1,
                                  range="percentile_mse")
SPDFQ_POST_SOFTMAX = QuantizerSpec(kind="log_sqrt2", range="percentile_mse")
IMAGE_BITS = 8  # RepQ-ViT quantizes the patch embedding's input (the image) at 8 bits at every setting
# Linear layers reading a LayerNorm output: timm qkv / fc1 / patch-merging reduction, mmcv FFN's fc1
POST_NORM_LINEARS = ("*qkv", "*fc1", "*reduction", "*ffn.layers.0.0")


def spdfq_policy() -> Policy:
    """Every Conv / Linear (patch embedding, its image input at 8 bits, and head included) and both
    attention matmuls; post-LayerNorm inputs channel-wise until calibrate folds them."""
    return Policy("spdfq-repq", [
        Rule(kind="linear", names=POST_NORM_LINEARS, weight=SPDFQ_WEIGHT, act=SPDFQ_ACT_CHANNEL),
        Rule(kind="linear", weight=SPDFQ_WEIGHT, act=SPDFQ_ACT),
        Rule(kind="conv", names=("patch_embed.proj", "patch_embed.projection"), weight=SPDFQ_WEIGHT,
             act=SPDFQ_ACT, a_bits_override=IMAGE_BITS),
        Rule(kind="conv", weight=SPDFQ_WEIGHT, act=SPDFQ_ACT),
        Rule(kind="matmul", roles=("av",), act=SPDFQ_POST_SOFTMAX, act_b=SPDFQ_ACT),
        Rule(kind="matmul", act=SPDFQ_ACT),
    ])


def fold_sites(module: nn.Module) -> list[tuple[str, str]]:
    """(norm path, layer path) pairs of ``module`` that :func:`reparameterize_post_norm` can fold: the
    exact LayerNorm -> Linear pairs whose layer has a channel-wise input quantizer with bits."""
    sites = []
    for norm, layer in norm_linear_pairs(module):
        aq = getattr(module.get_submodule(layer), "a_quant", None)
        if isinstance(aq, UniformQuantizer) and aq.spec.per_channel and aq.bits is not None:
            sites.append((norm, layer))
    return sites


# ---------------------------------------------------------------------------------------------
# The method


class SPDFQ(QuantMethod):
    """SPDFQ / SARDFQ: attention-prior synthetic images, RepQ-ViT quantizers, block reconstruction."""

    data_free = True
    data_source = "spdfq"
    summary = "SPDFQ/SARDFQ (ICCV'25): attention priors + MSR + soft labels, block-wise reconstruction"

    def target_config(self, target: QuantTarget, ctx: RunContext) -> Any:
        """Targets without class logits (det/seg) may use fewer images and steps (``dense_*``)."""
        cfg = self.config
        if target.logits is not None:
            return cfg
        values = {}
        if cfg.dense_num_images:
            values["num_images"] = cfg.dense_num_images
        if cfg.dense_iterations:  # warm-up scaled with the run length
            values["iterations"] = cfg.dense_iterations
            values["warmup"] = rescaled_warmup(cfg.warmup, cfg.iterations, cfg.dense_iterations)
        ctx.note("spdfq: no class logits; reconstruction covers the backbone's blocks")
        return dataclasses.replace(cfg, **values)

    def policy(self, target: QuantTarget) -> Policy:
        return spdfq_policy()

    def calibrate(self, built: Built, images: Tensor, target: QuantTarget, ctx: RunContext) -> None:
        """One forward with quantized weights (activation ranges see them), then the RepQ-ViT fold of
        every channel-wise post-LayerNorm quantizer; checked: with every quantizer off the folded model
        computes what it did before."""
        qmod = built.qmodule
        device = next(built.model.parameters()).device
        x = images.to(device)
        model = built.model
        calibrate(qmod, [x], forward=lambda _m, b: model(b), weights_quantized=True)
        if not self.config.reparameterize:
            freeze(qmod)
            return
        probe = x[:4]
        set_mode(qmod, "off")
        with torch.no_grad():
            before = flatten_output(qmod(probe))
        folded = {layer: reparameterize_post_norm(qmod.get_submodule(norm), qmod.get_submodule(layer))
                  for norm, layer in fold_sites(qmod)}
        with torch.no_grad():
            after = flatten_output(qmod(probe))
        set_mode(qmod, "quant")
        error = max_relative_error(before, after)
        if error > FOLD_TOLERANCE:
            raise RuntimeError(f"spdfq: the LayerNorm reparameterisation changed the FP model (relative "
                               f"error {error:.2e}): a folded pair does not read the norm directly")
        ctx.extra["reparameterization"] = {"folded": len(folded), "fp_relative_error": error,
                                           "layers": sorted(folded)}
        freeze(qmod)

    def finetune(self, built: Built, images: Tensor, target: QuantTarget, bits: BitSpec,
                 ctx: RunContext) -> None:
        """Block-wise reconstruction of the quant module against the FP one on the same images."""
        cfg = self.config
        if not cfg.reconstruct or cfg.recon_iterations <= 0:
            return
        units = block_units(built.qmodule)
        device = next(built.model.parameters()).device
        with ctx.timer("reconstruction"):
            history = reconstruct_blocks(
                target.quant_module, built.qmodule, units, images.to(device), lambda m, x: m(x),
                iterations=cfg.recon_iterations, lr=cfg.recon_lr, progress=ctx.progress,
            )
        skipped = [u["block"] for u in history if "skipped" in u]
        if skipped:
            ctx.note(f"spdfq: not reconstructed (calibrated only): {', '.join(skipped)}")
        freeze(built.qmodule)
        for p in built.model.parameters():
            p.requires_grad_(False)
        ctx.extra["reconstruction"] = {"iterations": cfg.recon_iterations, "lr": cfg.recon_lr,
                                       "units": history}


# ---------------------------------------------------------------------------------------------
# Config, profiles and provenance (data)


@dataclass
class SPDFQConfig(MethodConfig):
    # Stage A: generation (spec 2.3)
    num_images: int = 32
    iterations: int = 1000
    warmup: int = 100
    lr: float = 0.2
    lr_swin: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    jitter: int = 15  # pixels at jitter_reference_size
    jitter_reference_size: int = 224
    apa_weight: float = 10.0  # alpha_1: the paper tunes it per model in [1, 1e5] (see provenance)
    apa_components: int = 5  # K_APA
    apa_sigma: tuple[float, float] = (1.0, 4.0)  # tokens
    msr_max_regions: int = 4  # K_MSR
    sl_logit_range: tuple[float, float] = (5.0, 10.0)
    tv_weight: float = 0.05
    tv_target_range: tuple[float, float] = (2500.0, 3000.0)  # at B=32, 3x224x224
    tv_scale_to_input: bool = True
    use_apa: bool = True  # the ablation switches (SARDFQ Table: none / APA / MSR / SL / pairs / all)
    use_msr: bool = True
    use_sl: bool = True
    # targets without class logits (det/seg): None = the values above
    dense_num_images: int | None = None
    dense_iterations: int | None = None
    # Stage B (spec 2.2, 2.4)
    reparameterize: bool = True
    reconstruct: bool = True
    recon_iterations: int = 100
    recon_lr: float = 4e-5
    data_source: str | None = None  # None: the "spdfq" source above


SPDFQ_PROFILES = {
    "ci": {"iterations": 100, "warmup": 10, "dense_num_images": 8, "dense_iterations": 20,
           "recon_iterations": 50},
}

SPDFQ_PROVENANCE = {
    "generation loss": "paper: alpha_1 L_APA + L_SL + 0.05 L_TV on 32 images from N(0,1), Adam, 1000 "
    "iterations (spec 2.3)",
    "apa": "paper: MSE between post-softmax class-token attention to the patches (Swin: per-window "
    "query mean laid back on the token grid, shift undone) and a random GMM prior per head and image, "
    "deeper half of the blocks, depth weight l/L",
    "apa prior": "reconstructed: K_APA=5 components, centres uniform on the token grid, sigma ~ U(1,4) "
    "tokens, Dirichlet(1) weights, normalised to sum 1, drawn once per image",
    "apa weight": "choice: alpha_1 = 10 for every model and profile (the paper searches it per model in "
    "[1, 1e5]; its per-model values were not found). Chosen from {10, 100, 1e3, 1e4} at w4a4, seed 0, by "
    "teacher agreement / KL on the real calibration split of the three mini classifiers, no labels, no "
    "evaluation data (scripts/select_profile.py; results/profile_selection/spdfq_ci_w4a4.jsonl: mean "
    "agreement 95.1 / 94.9 / 93.6 / 88.2, KL 0.029 / 0.035 / 0.069 / 0.188)",
    "msr": "reconstructed: paper: 1..K_MSR=4 non-overlapping regions resized to the input, each its own "
    "class; here: each step m ~ U{1..4} distinct quadrants (the same for the batch), bilinear resize, "
    "each forwarded as an image of its own fixed class",
    "soft labels": "reconstructed: paper: softmax(Z), Z zero except U(5,10) at the image's class and "
    "the classes of this step's regions (full image) or the region's own class (region); drawn once",
    "optimiser": "reconstructed: PSAQ-ViT's Adam lr 0.2 (0.25 Swin), betas (0.5, 0.9), warm-up 100 + "
    "cosine, roll jitter 15 px at 224 (rescaled to the input) and flip, clamp to the valid range",
    "tv prior": "reconstructed: PSAQ-ViT's 0.05 |TV - v|, v ~ U(2500, 3000) at B=32 scaled to the input",
    "weights": "reconstructed: the RepQ-ViT / I&S-ViT stack: per-output-channel asymmetric uniform, "
    "range = the least-MSE of the 99.9/99.99/99.999th percentile clips (RepQ-ViT's init, as recalled: its "
    "quantizer.py is not in the stored snapshot); every Linear and Conv (patch embed and head included)",
    "activations": "reconstructed: per-tensor asymmetric uniform, the same percentile search on one "
    "forward of the images with quantized weights; the patch embedding's image input at 8 bits "
    "(RepQ-ViT quant_modules.py QuantConv2d: n_bits=8)",
    "post-softmax": "reconstructed: log-sqrt2 quantizer on the attention operand of attn@v (the "
    "paper's 'log2 quantizer'; RepQ-ViT quant_model.py: matmul2 log_quant), top level by the same "
    "percentile search",
    "reparameterization": "reconstructed: RepQ-ViT: qkv, fc1 and patch-merging inputs channel-wise, then "
    "folded into the LayerNorm affine: s = mean s_c, z = round(mean z_c), exact through the layer; "
    "weights re-initialised after the fold. choice: mmdet/mmseg Swin's qkv stays channel-wise (the "
    "library zero-pads the LayerNorm output to whole windows, so a folded shift is not exact)",
    "reconstruction": "reconstructed: paper: block by block on the images, MSE to the FP block output, "
    "input from the already-reconstructed quantized model, Adam lr 4e-5, cosine, 100 iterations, batch "
    "= all images, Linear/Conv weights and biases learnt (LayerNorm and quantizer steps frozen, as in "
    "zysxmu/IaS-ViT block_recon.py); patch embedding, patch merging and heads as units of their own",
    "det/seg": "choice: no class logits: generation is APA + TV (no MSR, no soft labels; recorded), "
    "APA on the backbone's windows, reconstruction over the backbone's units",
    "data source": "paper: any source through the same pipeline (SARDFQ's table of Gaussian noise, real, "
    "PSAQ-ViT, PSAQ-ViT V2, SMI): field data_source",
    "randomness": "choice: torch generators from the job seed",
    "ci profile": "choice: 100 generation steps (warm-up 10), 8 images x 20 steps on det/seg, 50 "
    "reconstruction steps per unit",
}


register_method("spdfq", config=SPDFQConfig, profiles=SPDFQ_PROFILES, provenance=SPDFQ_PROVENANCE)(SPDFQ)

__all__ = [
    "SPDFQ", "SPDFQConfig", "SemanticPriorImages", "spdfq_policy", "fold_sites",
]
