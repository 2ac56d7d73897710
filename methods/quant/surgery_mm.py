"""Make the attention maths of the mmdet / mmseg Swin backbones explicit modules.

mmdet 3.x and mmseg 1.x each ship their own copy of the Swin code (``WindowMSA`` inside
``ShiftWindowMSA`` inside ``SwinBlock``). ``prepare_mm(model)`` swaps, in place, the class of every
such ``WindowMSA`` and ``SwinBlock`` for a subclass whose forward is written out with the same
modules and conventions as :mod:`methods.quant.surgery` (timm):

* ``w_msa.matmul1``  MatMul "qk": ``(q·scale) @ kᵀ`` (q pre-scaled, as mmdet/mmseg and timm do).
* ``w_msa.tap_scores`` pre-softmax logits after the relative-position bias and the shift mask
  (the -100 mask built by ``ShiftWindowMSA`` for shifted windows); ``w_msa.tap_probs`` the softmax.
* ``w_msa.matmul2``  MatMul "av": ``attn @ v``, output (B·nW, H, N, d).
* ``block.tap_res1`` / ``block.tap_res2`` on the two residual sums of every ``SwinBlock``.

Window partition, cyclic shift, padding and the mask itself stay in the untouched ``ShiftWindowMSA``.
Only the exact library classes are converted, and the op order is the library's, so with every
quantizer off the prepared model computes the same numbers. mmdet and mmseg are optional imports:
whichever is installed is handled. :class:`methods.quant.surgery.AttentionRecorder` works on the
result unchanged (it hooks every ``MatMul`` by role).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as cp
from torch import nn

from methods.quant.modules import MatMul, Tap

__all__ = ["prepare_mm", "attention_modules_mm", "is_mm_swin"]


class _WindowMSAForward:
    """Forward of mmdet/mmseg ``WindowMSA`` (identical in both) with explicit matmuls and taps."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        wh, ww = self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(wh * ww, wh * ww, -1).permute(2, 0, 1).contiguous()  # nH, N, N
        attn = attn + bias.unsqueeze(0)
        if mask is not None:  # shifted windows: (nW, N, N) with 0 / -100 entries
            nw = mask.shape[0]
            attn = attn.view(B // nw, nw, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.tap_scores(attn)
        attn = self.tap_probs(self.softmax(attn))
        x = self.matmul2(self.attn_drop(attn), v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class _SwinBlockForward:
    """Forward of mmdet/mmseg ``SwinBlock`` with taps on the two residual sums."""

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        def _inner_forward(x):
            x = self.tap_res1(self.attn(self.norm1(x), hw_shape) + x)
            # mmcv FFN adds its ``identity`` argument: its output is the second residual sum
            return self.tap_res2(self.ffn(self.norm2(x), identity=x))

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=True)
        return _inner_forward(x)


def _add(module: nn.Module, name: str, factory) -> None:
    if not isinstance(getattr(module, name, None), nn.Module):
        setattr(module, name, factory())


def _prep_attention(m: nn.Module) -> None:
    _add(m, "matmul1", lambda: MatMul("qk"))
    _add(m, "matmul2", lambda: MatMul("av"))
    _add(m, "tap_scores", lambda: Tap("scores"))
    _add(m, "tap_probs", lambda: Tap("probs"))


def _prep_block(m: nn.Module) -> None:
    _add(m, "tap_res1", lambda: Tap("res1"))
    _add(m, "tap_res2", lambda: Tap("res2"))


# exact library class -> (prepared class, function adding the new children). The prepared classes
# are module-level names (picklable, deep-copyable).
_CONVERSIONS: dict[type, tuple[type, object]] = {}
_SWIN_BACKBONES: list[type] = []

try:
    from mmdet.models.backbones import swin as _mmdet_swin

    class MMDetWindowMSA(_WindowMSAForward, _mmdet_swin.WindowMSA):
        pass

    class MMDetSwinBlock(_SwinBlockForward, _mmdet_swin.SwinBlock):
        pass

    _CONVERSIONS[_mmdet_swin.WindowMSA] = (MMDetWindowMSA, _prep_attention)
    _CONVERSIONS[_mmdet_swin.SwinBlock] = (MMDetSwinBlock, _prep_block)
    _SWIN_BACKBONES.append(_mmdet_swin.SwinTransformer)
except ImportError:  # mmdet not installed: nothing of it to convert
    pass

try:
    from mmseg.models.backbones import swin as _mmseg_swin

    class MMSegWindowMSA(_WindowMSAForward, _mmseg_swin.WindowMSA):
        pass

    class MMSegSwinBlock(_SwinBlockForward, _mmseg_swin.SwinBlock):
        pass

    _CONVERSIONS[_mmseg_swin.WindowMSA] = (MMSegWindowMSA, _prep_attention)
    _CONVERSIONS[_mmseg_swin.SwinBlock] = (MMSegSwinBlock, _prep_block)
    _SWIN_BACKBONES.append(_mmseg_swin.SwinTransformer)
except ImportError:  # mmseg not installed
    pass

_PREPARED = {prepared: prep for prepared, prep in _CONVERSIONS.values()}
_ATTENTION_KINDS = tuple(p for p, prep in _CONVERSIONS.values() if prep is _prep_attention)


def prepare_mm(module: nn.Module) -> nn.Module:
    """Convert mmdet/mmseg Swin attention and blocks in ``module`` in place (idempotent); returns it."""
    for m in module.modules():
        if type(m) in _CONVERSIONS:
            prepared, prep = _CONVERSIONS[type(m)]
            m.__class__ = prepared
            prep(m)
        elif type(m) in _PREPARED:
            _PREPARED[type(m)](m)  # already prepared: make sure the children exist
    return module


def attention_modules_mm(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Prepared mmdet/mmseg ``WindowMSA`` modules in module order, as (path, module); each has
    ``num_heads`` and ``window_size`` (a (Wh, Ww) tuple)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _ATTENTION_KINDS)]


def is_mm_swin(module: nn.Module) -> bool:
    """True for an mmdet or mmseg ``SwinTransformer`` backbone."""
    return isinstance(module, tuple(_SWIN_BACKBONES))
