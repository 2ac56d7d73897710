"""SPDFQ / SARDFQ image generation: L = apa_weight * L_APA + L_SL + tv_weight * L_TV, with MSR regions.

Paper (arXiv 2412.16553, no code): images from N(0, 1), Adam; APA aligns each head's attention on the
deeper half of the blocks with a random GMM prior (depth weights l/L); MSR forwards 1..K
non-overlapping regions, resized to the input, as images of their own classes; SL replaces one-hot
CE by soft targets. Reconstructed here (docs/methods/spdfq.md): PSAQ-ViT's optimiser settings and
jitter/flip, its target-matching TV prior, the 2x2-quadrant regions with fixed classes per image and
a fresh count m ~ U{1..K} each step (the same m and quadrants for the whole batch), and the full
image's soft target over its own class and the classes of the regions forwarded in that step.
Targets without class logits (det/seg) get APA + TV only; their Swin windows may be padded (mmdet /
mmseg pad the token grid to whole windows), and the maps then cover the padded grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from methods.quant.surgery import AttentionRecorder
from methods.quant.target import InputSpec
from methods.synth.attention_priors import (
    apa_loss,
    cls_attention,
    crop_resized,
    deeper_half,
    quadrant_regions,
    random_gmm_priors,
    soft_cross_entropy,
    window_attention_map,
)
from methods.synth.optimize import OptimResult, Stage, StagedWarmupCosine, frozen_params, optimize_pixels
from methods.synth.priors import jitter_flip, tv_target_loss


@dataclass(frozen=True)
class AttentionSite:
    """How one block's post-softmax attention becomes a token map (see attention_maps)."""

    depth: int  # 1-based
    grid: tuple[int, int]  # token grid of the map
    window: int = 0  # Swin window side (0: ViT, class-token row)
    shift: int = 0


def attention_sites(hooked: nn.Module, recorder: AttentionRecorder, family: str,
                    patch_grid: tuple[int, int] | None,
                    probe: Callable[[], object] | None = None) -> list[AttentionSite]:
    """One site per recorded ``attn @ v`` MatMul, in block order: timm ViT/DeiT, timm Swin (static
    ``input_resolution``) and the mmdet/mmseg Swin backbones, whose token grid depends on the input:
    ``probe()`` runs one forward so that each block's ``hw_shape`` is seen (the map then lives on the
    window-padded grid, as the library partitions it)."""
    if family != "swin":
        if patch_grid is None:
            raise ValueError("attention_sites: a ViT needs its patch grid")
        return [AttentionSite(d, patch_grid) for d in range(1, len(recorder.names["av"]) + 1)]
    blocks = [hooked.get_submodule(path.rsplit(".attn.", 1)[0]) for path in recorder.names["av"]]
    seen: dict[int, tuple[int, int]] = {}
    dynamic = [b for b in blocks if not hasattr(b, "input_resolution")]
    if dynamic:
        if probe is None:
            raise ValueError("attention_sites: mmdet/mmseg Swin blocks need a probe forward for their grid")
        def note_grid(block: nn.Module, args: tuple) -> None:  # returns None: the inputs stay as they are
            seen.setdefault(id(block), (int(args[1][0]), int(args[1][1])))

        hooks = [b.register_forward_pre_hook(note_grid) for b in dynamic]
        try:
            with torch.no_grad():
                probe()
        finally:
            for h in hooks:
                h.remove()
    sites = []
    for depth, block in enumerate(blocks, start=1):
        if hasattr(block, "input_resolution"):  # timm
            grid = tuple(int(v) for v in block.input_resolution)
            sites.append(AttentionSite(depth, grid, int(block.window_size[0]), int(block.shift_size[0])))
            continue
        window, shift = int(block.attn.window_size), int(block.attn.shift_size)  # mm ShiftWindowMSA
        h, w = seen[id(block)]
        padded = (-(-h // window) * window, -(-w // window) * window)
        sites.append(AttentionSite(depth, padded, window, shift))
    return sites


def attention_maps(probs: list[Tensor], sites: list[AttentionSite], prefix_tokens: int) -> list[Tensor]:
    """(B, heads, H*W) per site: ViT's class-token row to the patches, Swin's window query-mean."""
    return [window_attention_map(p, s.grid, s.window, s.shift) if s.window
            else cls_attention(p, prefix_tokens) for p, s in zip(probs, sites, strict=True)]


def generate_spdfq_images(
    hooked: nn.Module,
    forward: Callable[[Tensor], Tensor],
    input_spec: InputSpec,
    *,
    batch_size: int,
    iterations: int,
    warmup: int,
    lr: float,
    generator: torch.Generator,
    num_classes: int | None,
    family: str,
    prefix_tokens: int,
    patch_grid: tuple[int, int] | None = None,
    jitter: int = 0,
    betas: tuple[float, float] = (0.5, 0.9),
    eps: float = 1e-8,
    apa_weight: float = 1.0,
    components: int = 5,
    sigma_range: tuple[float, float] = (1.0, 4.0),
    msr_max: int = 4,
    label_range: tuple[float, float] = (5.0, 10.0),
    tv_weight: float = 0.05,
    tv_target: float = 2750.0,
    use_apa: bool = True,
    use_msr: bool = True,
    use_sl: bool = True,
    progress: Callable[[str], None] | None = None,
) -> OptimResult:
    """``batch_size`` normalised images. Draw order from ``generator``: noise, priors, classes, soft-label
    logits, then per step the MSR count and quadrants and the jitter/flip."""
    device = next(hooked.parameters()).device
    init = torch.randn(input_spec.shape(batch_size), generator=generator).to(device)
    with_labels = num_classes is not None
    use_msr, use_sl = use_msr and with_labels, use_sl and with_labels
    with frozen_params(hooked), AttentionRecorder(hooked, roles=("av",), keep_inputs=True) as rec:
        sites = attention_sites(hooked, rec, family, patch_grid, probe=lambda: forward(init[:1]))
        num_blocks = len(sites)
        depths = deeper_half(num_blocks)
        used = [s for s in sites if s.depth in depths]
        heads = _heads(hooked, rec, used)
        priors = [random_gmm_priors((batch_size, h), s.grid, components, generator, sigma_range).to(device)
                  for s, h in zip(used, heads, strict=True)]
        # classes: the image's own, then one per quadrant; soft-label logits drawn once per image
        classes = torch.randint(num_classes or 1, (batch_size, 5), generator=generator).to(device)
        lo, hi = label_range
        z_values = (lo + (hi - lo) * torch.rand((batch_size, 5), generator=generator)).to(device)

        def targets(rows: Tensor, slots: Tensor) -> Tensor:
            """Soft (or, without SL, one-hot-like) targets over the class slots ``slots[i]`` of image
            ``rows[i]``: slot 0 is the image's own class, 1 + q the class of its quadrant q."""
            z = torch.zeros(len(rows), num_classes, device=device)
            picks = torch.arange(len(rows), device=device)
            for col in slots.T:
                z[picks, classes[rows, col]] = z_values[rows, col] if use_sl else 1e4
            return z.softmax(-1)

        rows = torch.arange(batch_size, device=device)

        def loss_fn(x: Tensor, _pixels: Tensor, _info) -> tuple[Tensor, dict[str, float]]:
            rec.clear()
            logits = forward(x)
            total, parts = x.new_zeros(()), {}
            if use_apa and apa_weight:
                probs = [rec.inputs["av"][s.depth - 1][0] for s in used]
                l_apa = apa_loss(attention_maps(probs, used, prefix_tokens), priors,
                                 [s.depth for s in used], num_blocks)
                total, parts["apa"] = total + apa_weight * l_apa, float(l_apa.detach())
            if with_labels:
                slots = [0]  # the full image: its own class, plus this step's regions' classes
                if use_msr:
                    m = int(torch.randint(1, msr_max + 1, (), generator=generator))
                    boxes = quadrant_regions(input_spec.image_size, m, generator)
                    quads = [_quadrant_index(b, input_spec.image_size) for b in boxes]
                    slots += [1 + q for q in quads]
                    regions = torch.cat([crop_resized(x, b, input_spec.image_size) for b in boxes])
                    region_rows = torch.cat([rows] * len(boxes))
                    region_slots = torch.cat([torch.full((batch_size,), 1 + q, device=device) for q in quads])
                    l_msr = soft_cross_entropy(forward(regions), targets(region_rows, region_slots[:, None]))
                    total, parts["msr"] = total + l_msr, float(l_msr.detach())
                full_slots = torch.tensor(slots, device=device).expand(batch_size, -1)
                l_sl = soft_cross_entropy(logits, targets(rows, full_slots))
                total, parts["sl"] = total + l_sl, float(l_sl.detach())
            l_tv = tv_target_loss(x, tv_target)
            total, parts["tv"] = total + tv_weight * l_tv, float(l_tv.detach())
            return total, parts

        stages = [Stage(iterations, jitter, warmup)]
        result = optimize_pixels(
            init, loss_fn, stages,
            optimizer=lambda params: torch.optim.Adam(params, lr=lr, betas=betas, eps=eps),
            scheduler=lambda opt: StagedWarmupCosine(opt, stages),
            augment=(lambda x, stage, _i: jitter_flip(x, stage.jitter, generator)[0]) if jitter else None,
            valid_range=input_spec.valid_range(device),
            progress=progress,
        )
    result.meta = {"classes": classes.cpu(), "apa_depths": depths, "msr": use_msr, "sl": use_sl}
    return result


def _heads(hooked: nn.Module, rec: AttentionRecorder, sites: list[AttentionSite]) -> list[int]:
    """Heads of each site's attention module (the MatMul's parent)."""
    out = []
    for s in sites:
        attn = hooked.get_submodule(rec.names["av"][s.depth - 1].rsplit(".", 1)[0])
        out.append(int(attn.num_heads))
    return out


def _quadrant_index(box: tuple[int, int, int, int], size: tuple[int, int]) -> int:
    top, left, _, _ = box
    return 2 * int(top >= size[0] // 2) + int(left >= size[1] // 2)


__all__ = ["AttentionSite", "attention_sites", "attention_maps", "generate_spdfq_images"]
