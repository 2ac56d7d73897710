"""MimiQ (Choi et al., AAAI'25): inter-head attention similarity data generation and head-wise
structural attention distillation.

Follows ``docs/methods/mimiq.md`` and MimiQ's released code as copied in
hfutqian/MaskAQ (folder ``MaskAQ/``; MaskAQ's own additions are not implemented):

1. Quantizer (1.2): every Linear, the patch-embedding conv and both attention matmuls; per-channel
   symmetric min-max weights recomputed at every step (identity STE); per-tensor LSQ activations with
   learnable step and zero-point initialised from the first batch
   (:class:`methods.quant.qat_quantizers.FirstBatchLSQQuantizer`); the image input stays FP.
2. Generation (1.3): the ``mimiq`` data source (:class:`InterHeadImages`, on
   :func:`methods.synth.interhead_generation.generate_interhead_images`).
3. Fine-tuning (1.4): logit KD (T = 5) + γ·head-wise structural attention distillation on ``attn@v``,
   SGD-Nesterov, SimCLR-style batch augmentation, LSQ warm-up (no steps in the first epochs). The last
   epoch is returned: no selection on evaluation data.

Without class logits (det/seg) generation drops CE and fine-tuning distils the backbone's stage
features (normalised MSE) instead of logits; the record says so.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Built, MethodConfig, QuantMethod, RunContext, quant_module, register_method
from methods.baselines import infer_classes
from methods.data import DataSource, register_source
from methods.losses import head_structural_distill_loss
from methods.quant.bits import BitSpec
from methods.quant.distill import feature_nmse, kl_logits, student_parameters, student_step
from methods.quant.policy import Policy, Rule, apply_policy, freeze
from methods.quant.qat_quantizers import (
    FirstBatchLSQQuantizer,
    IdentitySTEUniformQuantizer,
    replace_quantizers,
)
from methods.quant.quantizers import FakeQuantizer, LSQQuantizer, QuantizerSpec, UniformQuantizer
from methods.quant.surgery import AttentionRecorder
from methods.quant.target import QuantTarget
from methods.synth.batch_augment import BatchAugment, simclr_batch_augment
from methods.synth.interhead_generation import MIMIQ_TV_REFERENCE, generate_interhead_images
from methods.synth.priors import scale_jitter_limit, tv_target_scale
from methods.synth.pse_generation import frozen_params

# ---------------------------------------------------------------------------------------------
# Policy (data)

# ZeroQ's arithmetic, as released: k = (2^b-1)/(2 max|w|), round(k w), then / k (see qfunc.ARITHMETIC)
MIMIQ_WEIGHT = QuantizerSpec(
    kind="uniform", symmetric=True, per_channel=True, ch_axis=0, range="dynamic", v1_scale=True,
    arith="zeroq",
)
MIMIQ_ACT = QuantizerSpec(kind="uniform", symmetric=False, per_channel=False, range="lsq", lsq_init="lsq")


def first_layer(module: nn.Module) -> tuple[str, str] | None:
    """(kind, path) of the first Conv2d / Linear in module order (MimiQ's ``module_list[0]``)."""
    for path, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            return "conv", path
        if isinstance(m, nn.Linear):
            return "linear", path
    return None


def mimiq_policy(first: tuple[str, str] | None = None) -> Policy:
    """MimiQ placement: weights and inputs of every Conv2d / Linear, both operands of both matmuls;
    the first layer (patch embedding) keeps its input (the image) in FP."""
    rules = []
    if first is not None:
        rules.append(Rule(kind=first[0], names=(first[1],), weight=MIMIQ_WEIGHT))
    rules += [
        Rule(kind="conv", weight=MIMIQ_WEIGHT, act=MIMIQ_ACT),
        Rule(kind="linear", weight=MIMIQ_WEIGHT, act=MIMIQ_ACT),
        Rule(kind="matmul", act=MIMIQ_ACT),
    ]
    return Policy("mimiq", rules)


def install_mimiq_quantizers(
    module: nn.Module,
    g_scale: float = 1.0,
    scale_zero_point_grad: bool = False,
    identity_ste: bool = True,
    g_scale_top_level: float | None = None,
) -> dict[str, int]:
    """Swap the policy's LSQ / dynamic quantizers for MimiQ's variants; returns counts per variant.

    ``g_scale_top_level`` (None = ``g_scale``) goes to the quantizers of layers that are direct children
    of ``module``: the released ``quantize_model`` passes its ``lsq_g_scale`` argument only to those and
    recurses without it, so every nested layer gets the default 1.0 (quant_modules.py, quantize_model).
    """
    counts = {"first_batch_lsq": 0, "identity_ste_weight": 0, "top_level_g_scale": 0}
    top = g_scale if g_scale_top_level is None else g_scale_top_level

    def convert(path: str, q: FakeQuantizer) -> FakeQuantizer | None:
        if isinstance(q, LSQQuantizer) and not isinstance(q, FirstBatchLSQQuantizer):
            counts["first_batch_lsq"] += 1
            layer = path.rpartition(".")[0]  # the Quant module that owns this quantizer
            top_level = bool(layer) and "." not in layer
            counts["top_level_g_scale"] += top_level
            g = top if top_level else g_scale
            return FirstBatchLSQQuantizer(q.spec, q.bits, g, scale_zero_point_grad)
        if identity_ste and type(q) is UniformQuantizer and q.spec.range == "dynamic":
            counts["identity_ste_weight"] += 1
            return IdentitySTEUniformQuantizer(q.spec, q.bits)
        return None

    replace_quantizers(module, convert)
    return counts


# ---------------------------------------------------------------------------------------------
# MimiQ's images: the "mimiq" data source


GEN_FIELDS = (
    "num_images", "gen_batch_size", "gen_iterations", "gen_lr", "gen_betas", "gen_eps",
    "gen_weight_decay", "gen_eta_min", "jitter", "jitter_reference_size", "ih_weight", "ce_weight",
    "tv_weight", "tv_diag_sqrt2", "tv_scale_to_input", "noise_std", "color_mean", "color_std",
)


@register_source("mimiq")
class InterHeadImages(DataSource):
    """Images whose attention heads agree (MimiQ's generator), configured by MimiQConfig."""

    owner = "mimiq"
    key_fields = GEN_FIELDS
    summary = "MimiQ: inter-head attention similarity + CE + TV prior"

    def make(self, target: QuantTarget, n: int, config: Any, ctx: RunContext) -> Tensor:
        cfg = dataclasses.replace(config, num_images=n)
        if target.logits is None:
            ctx.note("mimiq: task has no class logits; generation drops the CE term (L_IH + TV only)")
        spec = target.input_spec
        hooked = target.quant_module
        num_classes = None
        if target.logits is not None:
            logits_fn = target.logits
            forward = lambda x: logits_fn(target.model, x)  # noqa: E731
            num_classes = target.num_classes or infer_classes(forward, target)
        elif target.features is not None:
            features_fn = target.features
            forward = lambda x: features_fn(target.model, x)  # noqa: E731
        else:
            forward = hooked
        jitter = tuple(scale_jitter_limit(j, spec.image_size, cfg.jitter_reference_size) for j in cfg.jitter)
        tv_weight = cfg.tv_weight
        if cfg.tv_scale_to_input:
            tv_weight /= tv_target_scale(
                cfg.gen_batch_size, spec.in_chans, spec.image_size, MIMIQ_TV_REFERENCE
            )
        result = generate_interhead_images(
            hooked, forward, spec,
            num_images=cfg.num_images, batch_size=cfg.gen_batch_size, iterations=cfg.gen_iterations,
            generator=ctx.generator(0), num_classes=num_classes, drop_tokens=target.prefix_tokens,
            jitter=jitter, lr=cfg.gen_lr, betas=cfg.gen_betas, eps=cfg.gen_eps,
            weight_decay=cfg.gen_weight_decay, eta_min=cfg.gen_eta_min, ih_weight=cfg.ih_weight,
            ce_weight=cfg.ce_weight, tv_weight=tv_weight,
            tv_diag_scale=0.5**0.5 if cfg.tv_diag_sqrt2 else 1.0, noise_std=cfg.noise_std,
            color_mean=cfg.color_mean, color_std=cfg.color_std, progress=ctx.progress,
        )
        if result.discarded:
            ctx.note(f"mimiq: {result.discarded} generation batch(es) turned NaN and were discarded")
        ctx.extra["generation"] = {
            "images": int(result.images.shape[0]), "jitter": list(jitter), "tv_weight": tv_weight,
            "discarded_batches": result.discarded,
            "loss_first_batch": result.history[0], "loss_last_batch": result.history[-1],
        }
        return result.images


# ---------------------------------------------------------------------------------------------
# The method


class MimiQ(QuantMethod):
    """MimiQ: inter-head-similar synthetic images, then QAT with head-wise attention distillation."""

    data_free = True
    data_source = "mimiq"
    summary = "MimiQ (AAAI'25): inter-head attention similarity DFQ + head-wise structural distillation"

    def target_config(self, target: QuantTarget, ctx: RunContext) -> Any:
        """``max_total_pixels`` applied to the image count and batch sizes; the model's epoch count."""
        cfg = self.config
        epochs = dict(cfg.epochs_per_model).get(target.model_name, cfg.epochs)
        if epochs != cfg.epochs:
            cfg = dataclasses.replace(cfg, epochs=epochs)
        if cfg.max_total_pixels is None:
            return cfg
        spec = target.input_spec
        per_image = spec.in_chans * spec.image_size[0] * spec.image_size[1]
        n = max(1, min(cfg.num_images, cfg.max_total_pixels // per_image))
        if n == cfg.num_images:
            return cfg
        shape = "x".join(str(v) for v in (spec.in_chans, *spec.image_size))
        ctx.note(f"mimiq: max_total_pixels={cfg.max_total_pixels} caps the synthetic set at {n} images "
                 f"(of {cfg.num_images}) for {shape} inputs")
        return dataclasses.replace(cfg, num_images=n, gen_batch_size=min(cfg.gen_batch_size, n),
                                   batch_size=min(cfg.batch_size, n))

    def build(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> Built:
        """A deep copy of the FP model with MimiQ's quantizers on the quant module (not yet initialised)."""
        cfg = self.config
        student = copy.deepcopy(target.model).eval()
        qmod = quant_module(student, target)
        policy = mimiq_policy(first_layer(qmod))
        resolved = apply_policy(qmod, policy, bits)
        counts = install_mimiq_quantizers(
            qmod, cfg.lsq_g_scale, cfg.lsq_scale_zero_point_grad, cfg.weight_identity_ste,
            g_scale_top_level=cfg.lsq_g_scale_top_level,
        )
        record = policy.to_dict()
        record["variants"] = {
            "act": "FirstBatchLSQQuantizer (MimiQ QuantAct_lsq init; replaces every range='lsq' quantizer)",
            "weight": "IdentitySTEUniformQuantizer (unmasked STE)" if cfg.weight_identity_ste
            else "masked STE",
            "counts": counts,
        }
        return Built(student, qmod, resolved, record)

    def calibrate(self, built: Built, images: Tensor, target: QuantTarget, ctx: RunContext) -> None:
        """Nothing before training: as released, each LSQ step and zero-point initialises from the first
        fine-tuning batch (FirstBatchLSQQuantizer), which :meth:`distill` runs first."""

    def _lr(self, epoch: int) -> float:
        cfg = self.config
        if cfg.lr_policy == "const":
            return cfg.lr
        if cfg.lr_policy == "multi_step":  # utils/lr_policy.py: one decay per step s with epoch + 1 > s
            return cfg.lr * cfg.lr_decay ** sum(1 for s in cfg.lr_steps if epoch + 1 > s)
        raise ValueError(f"lr_policy {cfg.lr_policy!r} not in ('multi_step', 'const')")

    def finetune(self, built: Built, images: Tensor, target: QuantTarget, bits: BitSpec,
                 ctx: RunContext) -> None:
        """Distil the FP teacher into the student on the synthetic images (in place); the last epoch is
        kept. Then freeze: training done, the fake-quantized weights are cached for evaluation."""
        with ctx.timer("finetune"):
            self.distill(target, built.model, images, ctx)
        freeze(built.qmodule)
        for p in built.model.parameters():
            p.requires_grad_(False)

    def distill(self, target: QuantTarget, student: nn.Module, images: Tensor, ctx: RunContext) -> None:
        cfg = self.config
        teacher = target.model.eval()
        device = next(teacher.parameters()).device
        t_mod, s_mod = target.quant_module, quant_module(student, target)
        drop = target.prefix_tokens
        has_logits = target.logits is not None
        if not has_logits:
            if target.features is None:
                raise RuntimeError("mimiq: the task gives neither class logits nor backbone features")
            ctx.note("mimiq: task has no class logits; fine-tuning distils backbone stage features "
                     "(normalised MSE) + head-wise attention (L_HAD) instead of logits")
        out_fn = target.logits if has_logits else target.features
        trained = student if has_logits else s_mod
        for p in trained.parameters():
            p.requires_grad_(True)
        gen = ctx.generator(1)
        aug = BatchAugment()
        n = images.shape[0]
        bs = min(cfg.batch_size, n)
        steps_per_epoch = math.ceil(n / bs)
        epochs = cfg.epochs
        first_step_epoch = max(cfg.warmup_epochs - cfg.lsq_less_unfreeze, 0)
        parts: dict[str, float] = {}
        history: list[dict[str, float]] = []

        rec_t, rec_s = AttentionRecorder(t_mod, roles=("av",)), AttentionRecorder(s_mod, roles=("av",))
        with frozen_params(teacher), rec_t, rec_s:

            def run(model: nn.Module, rec: AttentionRecorder, x: Tensor) -> tuple:
                rec.clear()
                out = out_fn(model, x)
                return (out, [o for o in rec.outputs["av"] if o is not None])

            def discrepancy(s_out: tuple, t_out: tuple) -> Tensor:
                if has_logits:
                    main = cfg.kd_alpha * kl_logits(s_out[0], t_out[0], cfg.temperature)
                else:
                    main = cfg.feature_weight * feature_nmse(s_out[0], t_out[0], reduction="mean")
                had = head_structural_distill_loss(t_out[1], s_out[1], drop)
                parts["main"], parts["had"] = float(main.detach()), float(had.detach())
                return main + cfg.had_weight * had

            def batch(idx: Tensor) -> Tensor:
                x = images[idx].to(device)
                return simclr_batch_augment(x, target.input_spec, gen, aug) if cfg.augment else x

            # Epochs before first_step_epoch take no optimiser step and their gradients are cleared
            # at the next epoch start, so they change nothing but the LSQ init on the very first batch.
            perm = torch.randperm(n, generator=gen)
            with torch.no_grad():
                run(student, rec_s, batch(perm[:bs]))
            rec_s.clear()
            q_params = student_parameters(trained, include_quantizers=True)
            w_ids = {id(p) for p in student_parameters(trained, include_quantizers=False)}
            groups = [
                {"params": [p for p in q_params if id(p) in w_ids], "lr_scale": 1.0},
                {"params": [p for p in q_params if id(p) not in w_ids], "lr_scale": cfg.quantizer_lr_scale},
            ]
            opt = torch.optim.SGD([g for g in groups if g["params"]], lr=self._lr(first_step_epoch),
                                  momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
            for epoch in range(first_step_epoch, epochs):
                lr = self._lr(epoch)
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for i in range(steps_per_epoch):
                    x = batch(perm[i * bs:(i + 1) * bs])
                    loss = student_step(lambda z: run(student, rec_s, z), lambda z: run(teacher, rec_t, z),
                                        discrepancy, x, opt)
                    if not math.isfinite(loss):
                        raise RuntimeError(f"mimiq: non-finite loss at epoch {epoch} step {i}")
                    total += loss
                history.append({"epoch": epoch, "lr": lr, "loss": total / steps_per_epoch, **parts})
                ctx.progress(f"epoch {epoch + 1}/{epochs} loss {total / steps_per_epoch:.4f} "
                             f"(main {parts['main']:.4f}, had {parts['had']:.4f})")
            rec_t.clear()
            rec_s.clear()
        ctx.extra["finetune"] = {
            "epochs": epochs, "first_step_epoch": first_step_epoch, "steps_per_epoch": steps_per_epoch,
            "batch_size": bs, "history": history,
            "teacher_agreement_synthetic": self._agreement(teacher, student, images, target, device),
        }

    @staticmethod
    @torch.no_grad()
    def _agreement(teacher, student, images: Tensor, target: QuantTarget, device) -> float | None:
        """Top-1 agreement of student and teacher on the (un-augmented) synthetic images: a data-free
        diagnostic recorded with the result, never used for selection."""
        if target.logits is None:
            return None
        agree = 0
        for i in range(0, images.shape[0], 256):
            x = images[i:i + 256].to(device)
            agree += int((target.logits(teacher, x).argmax(-1) == target.logits(student, x).argmax(-1)).sum())
        return 100.0 * agree / images.shape[0]


# ---------------------------------------------------------------------------------------------
# Config, profiles and provenance (data)


@dataclass
class MimiQConfig(MethodConfig):
    # generation (spec 1.3)
    num_images: int = 10000
    gen_batch_size: int = 16
    gen_iterations: int = 2000
    gen_lr: float = 0.1
    gen_betas: tuple[float, float] = (0.9, 0.999)
    gen_eps: float = 1e-8
    gen_weight_decay: float = 1e-6
    gen_eta_min: float = 1e-3
    jitter: tuple[int, int] = (8, 16)  # first / second half of the steps, pixels at 224
    jitter_reference_size: int = 224
    ih_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 2.5e-5
    tv_diag_sqrt2: bool = False  # MaskAQ's copy divides the diagonal TV terms by sqrt(2)
    tv_scale_to_input: bool = True  # weight / sqrt(B*C*H*W / (16*3*224*224)): see provenance
    noise_std: float = 0.5
    color_mean: float = 1.0
    color_std: float = 1.0
    # quantizer (spec 1.2)
    lsq_g_scale: float = 1.0  # nested layers: the value the released code gives them (see provenance)
    # layers that are direct children of the model (ViT/DeiT: head, head_dist): main.py's
    # --lsq_g_scale default reaches only these; 1.0 gives every layer the same scale
    lsq_g_scale_top_level: float = 0.01
    lsq_scale_zero_point_grad: bool = False
    weight_identity_ste: bool = True
    # fine-tuning (spec 1.4)
    epochs: int = 100
    # per-model epochs where the paper trains longer (base models: 200); other models get ``epochs``
    epochs_per_model: tuple[tuple[str, int], ...] = (
        ("deit_base_patch16_224", 200), ("vit_base_patch16_224", 200),
    )
    batch_size: int = 16
    lr: float = 1e-3
    lr_policy: str = "multi_step"  # "multi_step" | "const"
    lr_steps: tuple[int, ...] = (50, 100)
    lr_decay: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    quantizer_lr_scale: float = 1.0  # lr multiplier for the LSQ steps / zero-points (1 = released code)
    temperature: float = 5.0
    kd_alpha: float = 1.0
    had_weight: float = 10.0  # gamma
    feature_weight: float = 1.0  # det/seg: stage-feature NMSE replaces the logit KD
    warmup_epochs: int = 5
    lsq_less_unfreeze: int = 3  # optimiser steps from epoch warmup_epochs - lsq_less_unfreeze
    augment: bool = True
    # cap on the synthetic set, in values (images x C x H x W); None = no cap. Keeps a profile's
    # cost bounded across tasks: ci's cap leaves the 28/32-px classifiers alone and gives the 128-px
    # dense models 8 images (the batch sizes follow)
    max_total_pixels: int | None = None
    data_source: str | None = None  # None: the "mimiq" source (the inter-head generator above)



MIMIQ_PROFILES = {
    "ci": {
        "num_images": 128, "gen_batch_size": 32, "gen_iterations": 100,
        # 128 images instead of 10k and 40 steps instead of ~60k: a 10x smaller lr keeps the weights
        # close to the teacher, and the LSQ steps / zero-points (gradients scaled by ~1e-3) get a 100x
        # lr so they can still move (see provenance "ci profile")
        "epochs": 12, "epochs_per_model": (), "batch_size": 32, "lr": 1e-4, "lr_steps": (8,),
        "quantizer_lr_scale": 100.0,
        "max_total_pixels": 128 * 3 * 32 * 32,
    },
}

MIMIQ_PROVENANCE = {
    "placement": "code-verified: every nn.Linear, nn.Conv2d and attention MatMul quantized (weights + "
    "inputs, both matmul operands incl. post-softmax A); LN/softmax/GELU/residuals FP; the first layer's "
    "input (image) FP, head at the model's bits (quant_modules.py:860-889, 932-948)",
    "weight quantizer": "code-verified: per-output-channel symmetric min-max recomputed every forward, "
    "inverse step k=(2^b-1)/clamp(2 max|w|, 1e-8), round(k w) / k in ZeroQ's arithmetic (arith='zeroq'), "
    "identity straight-through gradient (quant_utils.py:119-147, 207-239; "
    "quant_modules.py:318-346)",
    "activation quantizer": "code-verified: per-tensor LSQ, learnable step and zero-point; first batch: "
    "signed window if min<1e-5, step 2 mean|x|/sqrt(qmax), zero-point 0.1 (min - step qmax), gradient "
    "scale 1/sqrt(numel qmax) on the step only (zero-point's scaled copy is overwritten, L214-217); "
    "lsq_g_scale as released: 0.01 (main.py's default) on layers that are direct children of the model "
    "(ViT/DeiT head and head_dist), 1.0 on every nested layer, because quantize_model recurses without "
    "passing it on (quant_modules.py:133-229, quantize_model; fields lsq_g_scale_top_level, lsq_g_scale)",
    "generation loss": "code-verified: L_IH + CE(random labels) + 2.5e-5 TV on the un-augmented "
    "images; L_IH = mean(1-SSIM^2) of global SSIM between min-max normalised pre-softmax logit maps of "
    "every head pair per query, prefix tokens dropped; Swin per window, per-layer mean "
    "(hydra_image_gen_ssim_att_map.py:246-304, 405-428)",
    "grid generalisation": "choice: the 14x14 / 7x7 reshape is dropped; a global SSIM only takes means "
    "over all keys, so any patch grid or window size gives the released values at 224 px",
    "tv form": "choice: DeepInversion TV (no 1/sqrt(2) on diagonals, spec 1.9; flag tv_diag_sqrt2); "
    "weight divided by sqrt(B*C*H*W / (16*3*224*224)) so the per-pixel prior matches the paper "
    "setting (factor 1 there; flag tv_scale_to_input)",
    "generation schedule": "code-verified: x ~ N(0,1) normalised, AdamW(lr 0.1, betas (0.9, 0.999), eps "
    "1e-8, wd 1e-6), cosine to 1e-3 over 2000 steps, clamp to the valid range, NaN batches dropped "
    "(L361-440); batch 16, 10k images (spec 1.3)",
    "generation augmentation": "code-verified: roll by independent offsets in H, W, J=8 then 16 px; "
    "per-sample per-channel offset N(0,1)*0.5*r/iters with the released decay r=(iters-2-t) mod iters; "
    "colour (x-m)/s, m~U(-1,1), s=exp(U(-1,1)) (L371-395, image_gen_aug_utils.py:6-39); J rescaled "
    "by image size/224 (choice)",
    "distillation": "code-verified: T^2 KL(teacher||student) at T=5 (kd_scale 1, ce_scale 0) + 10 * "
    "(1 - mean contrast-structure SSIM) between teacher and student attn@v per head and channel over "
    "tokens, prefix tokens dropped, mean over blocks (trainer.py:27-103, 395-407)",
    "finetune schedule": "reconstructed: SGD momentum 0.9 Nesterov, wd 0, bs 16, both models in eval(), "
    "all student parameters incl. LSQ step/zero-point trained; no optimiser steps before epoch "
    "warmup_epochs-3 = 2 (code-verified, trainer.py:529-540; those epochs change nothing, so only the "
    "LSQ-initialising first batch is run); lr 1e-3 multi-step x0.1 at epoch 50 (MaskAQ README example; "
    "MimiQ's per-model lr is not published, hocon default 1e-6 const); 100 epochs, 200 for base models "
    "(field epochs_per_model)",
    "batch augmentation": "code-verified: one draw per batch: RandomResizedCrop, flip, ColorJitter(0.8, "
    "0.8, 0.8, 0.2) p=0.8 in [0,1] space, grayscale p=0.2, Gaussian blur k=2*floor(int(0.1*size)/2)+1 "
    "sigma~U(0.1,2) (trainer.py:325-356, gaussian_blur.py)",
    "model selection": "choice: the last epoch is returned (the released code keeps the best "
    "ImageNet-val epoch, spec 1.8)",
    "det/seg": "choice: no class logits: generation drops CE; fine-tuning replaces the logit KD by the "
    "normalised MSE of the backbone stage features (methods.quant.distill.feature_nmse) and keeps L_HAD "
    "on the backbone's window attention; only the quantized backbone is trained",
    "randomness": "choice: torch generators from the job seed replace python/numpy random",
    "ci profile": "choice: 128 images x 100 generation steps (batch 32), 12 epochs (10 with steps) at "
    "batch 32, lr 1e-4 multi-step x0.1 at epoch 8, quantizer (LSQ step / zero-point) lr x100; at most "
    "128x3x32x32 synthetic values (8 images on the 128-px dense mini models). lr in {1e-3, 1e-4} x the "
    "quantizer multiplier in {1, 100} chosen at w4a4, seed 0, by teacher agreement / KL on the real "
    "calibration split of the three mini classifiers, no labels and no evaluation data "
    "(scripts/select_profile.py; results/profile_selection/mimiq_ci_w4a4.jsonl: mean agreement 83.6 / "
    "86.7 / 86.6 / 89.7 for (1e-3,1) / (1e-3,100) / (1e-4,1) / (1e-4,100), re-run after the "
    "released-arithmetic and head gradient-scale fixes: same choice)",
}



register_method("mimiq", config=MimiQConfig, profiles=MIMIQ_PROFILES, provenance=MIMIQ_PROVENANCE)(MimiQ)

__all__ = [
    "MimiQ", "MimiQConfig", "InterHeadImages", "mimiq_policy", "first_layer", "install_mimiq_quantizers",
]
