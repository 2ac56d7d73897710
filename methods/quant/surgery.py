"""Make the attention maths of timm ViT/DeiT/Swin explicit modules (timm 1.0.x).

``prepare(model)`` swaps, in place, the class of every timm ``Attention``, ViT ``Block``,
``VisionTransformer`` (incl. DeiT's ``VisionTransformerDistilled``), Swin ``WindowAttention`` and
``SwinTransformerBlock`` for a subclass whose ``forward`` is written out with:

* ``attn.matmul1``  MatMul "qk": ViT: raw ``q @ kᵀ`` (scale applied after); Swin: ``(q·scale) @ kᵀ``
  (timm's order).
* ``attn.tap_scores`` pre-softmax logits after scale and relative-position bias, *before* any
  attention / shift mask (as PSAQ-ViT quantizes them: a −100 mask value would otherwise set the range);
  ``attn.tap_probs`` the softmax output.
* ``attn.matmul2``  MatMul "av": ``attn @ v`` with output (B', H, N, d).
* ``block.tap_res1`` / ``block.tap_res2`` on the two residual sums; ``model.tap_pos`` after the
  position-embedding sum (ViT only: Swin has no absolute position embedding).

The fused SDPA path is switched off (``fused_attn = False``). Only the exact timm classes are
converted (a subclass may have its own forward); everything else is untouched. With every
quantizer off the prepared model computes the same function (checked to 1e-5 in the tests).
The prepared classes live at module level, so prepared models can be pickled and deep-copied.
"""

from __future__ import annotations

import torch
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from methods.quant.modules import MatMul, Tap

__all__ = ["prepare", "AttentionRecorder", "attention_modules"]


class PreparedAttention(Attention):
    """timm ``Attention`` with explicit matmuls and taps (same maths as the non-fused path)."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # not in place: the raw product is matmul1's output, which hooks (e.g. a recorder) may hold
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = self.tap_scores(attn)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.tap_probs(attn.softmax(dim=-1))
        x = self.matmul2(self.attn_drop(attn), v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PreparedBlock(Block):
    """timm ViT ``Block`` with taps on both residual sums."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = self.tap_res1(
            x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        )
        return self.tap_res2(x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class _PosTapMixin:
    """Tap the output of ``_pos_embed`` (cls/dist tokens concatenated, position embedding added)."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap_pos(super()._pos_embed(x))


class PreparedVisionTransformer(_PosTapMixin, VisionTransformer):
    pass


class PreparedVisionTransformerDistilled(_PosTapMixin, VisionTransformerDistilled):
    pass


class PreparedWindowAttention(WindowAttention):
    """timm Swin ``WindowAttention`` with explicit matmuls and taps (q pre-scaled as timm does)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = self.tap_scores(attn + self._get_rel_pos_bias())
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.tap_probs(self.softmax(attn))
        x = self.matmul2(self.attn_drop(attn), v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class PreparedSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` (NHWC) with taps on both residual sums."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.tap_res1(x + self.drop_path1(self._attn(self.norm1(x))))
        x = x.reshape(B, -1, C)
        x = self.tap_res2(x + self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)


def _add(module: nn.Module, name: str, factory) -> None:
    if not isinstance(getattr(module, name, None), nn.Module):
        setattr(module, name, factory())


def _prep_attention(m: nn.Module) -> None:
    m.fused_attn = False
    _add(m, "matmul1", lambda: MatMul("qk"))
    _add(m, "matmul2", lambda: MatMul("av"))
    _add(m, "tap_scores", lambda: Tap("scores"))
    _add(m, "tap_probs", lambda: Tap("probs"))


def _prep_block(m: nn.Module) -> None:
    _add(m, "tap_res1", lambda: Tap("res1"))
    _add(m, "tap_res2", lambda: Tap("res2"))


def _prep_vit(m: nn.Module) -> None:
    _add(m, "tap_pos", lambda: Tap("pos"))


# exact timm class -> (prepared class, function adding the new children)
_CONVERSIONS = {
    Attention: (PreparedAttention, _prep_attention),
    Block: (PreparedBlock, _prep_block),
    VisionTransformer: (PreparedVisionTransformer, _prep_vit),
    VisionTransformerDistilled: (PreparedVisionTransformerDistilled, _prep_vit),
    WindowAttention: (PreparedWindowAttention, _prep_attention),
    SwinTransformerBlock: (PreparedSwinBlock, _prep_block),
}
_PREPARED = {prepared: prep for prepared, prep in _CONVERSIONS.values()}


def prepare(module: nn.Module) -> nn.Module:
    """Convert timm attention/blocks in ``module`` in place (idempotent) and return it."""
    for m in module.modules():
        if type(m) in _CONVERSIONS:
            prepared, prep = _CONVERSIONS[type(m)]
            m.__class__ = prepared
            prep(m)
        elif type(m) in _PREPARED:
            _PREPARED[type(m)](m)  # already prepared: make sure the children exist
    return module


def attention_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Prepared attention modules in module order, as (path, module); each has ``num_heads``,
    Swin ones also ``window_size``."""
    kinds = (PreparedAttention, PreparedWindowAttention)
    return [(n, m) for n, m in module.named_modules() if isinstance(m, kinds)]


class AttentionRecorder:
    """Record the outputs (and optionally the inputs) of every MatMul of the given roles.

    ``outputs[role]`` is a list with one slot per MatMul of that role (module order, i.e. one per
    block), holding the latest output with its graph (usable in losses), ``None`` until that block
    ran. ``inputs[role]`` holds the operand tuples when ``keep_inputs``. Hooks are registered on
    construction and removed by ``remove()`` or on leaving the ``with`` block.
    """

    def __init__(
        self, module: nn.Module, roles: tuple[str, ...] = ("av",), keep_inputs: bool = False
    ) -> None:
        self.roles = tuple(roles)
        self.keep_inputs = keep_inputs
        self.names: dict[str, list[str]] = {r: [] for r in self.roles}
        self._handles = []
        for name, m in module.named_modules():
            if isinstance(m, MatMul) and m.role in self.roles:
                idx = len(self.names[m.role])
                self.names[m.role].append(name)
                self._handles.append(m.register_forward_hook(self._hook(m.role, idx)))
        self.outputs: dict[str, list[torch.Tensor | None]] = {}
        self.inputs: dict[str, list[tuple[torch.Tensor, ...] | None]] = {}
        self.clear()

    def _hook(self, role: str, idx: int):
        def hook(_module, args, output):
            self.outputs[role][idx] = output
            if self.keep_inputs:
                self.inputs[role][idx] = tuple(args)

        return hook

    def clear(self) -> None:
        self.outputs = {r: [None] * len(self.names[r]) for r in self.roles}
        self.inputs = {r: [None] * len(self.names[r]) for r in self.roles}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> AttentionRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
