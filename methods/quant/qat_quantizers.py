"""Quantizer variants for quantization-aware fine-tuning that the QuantizerSpec cannot express.

* :class:`FirstBatchLSQQuantizer`: per-tensor LSQ activation quantizer initialised from the first batch
  the way MimiQ's ``QuantAct_lsq`` does (MaskAQ/quant_utils/quant_modules.py:133-229): the integer
  window is signed ``[-2^(b-1), 2^(b-1)-1]`` when ``min(x) < 1e-5`` else unsigned ``[0, 2^b-1]``; step
  ``s0 = 2·mean|x|/sqrt(qmax)``; zero-point ``z0 = 0.1·(min(x) - s0·qmax)``; LSQ gradient scale
  ``g = g_scale/sqrt(numel(x)·qmax)`` fixed from that batch. Forward
  ``(round_ste(clamp(x/s + round_ste(z), qmin, qmax)) - round_ste(z))·s``. In the released code the
  scaled zero-point is overwritten before use (L215-217), so only the step's gradient is scaled;
  ``scale_zero_point_grad`` reproduces that (False) or scales both (True).
* :class:`IdentitySTEUniformQuantizer`: a uniform quantizer whose backward is the plain identity
  (no clip mask), as ZeroQ/MimiQ's ``SymmetricQuantFunction`` (quant_utils.py:207-239). With V1-style
  dynamic symmetric weights the channel maximum rounds past the clamp, and a masked STE would give
  it zero gradient forever; the identity keeps training it.

Both are installed after :func:`methods.quant.policy.apply_policy` with :func:`replace_quantizers`
(the policy records the base spec; the method records the variant).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from methods.quant.qfunc import int_range
from methods.quant.quantizers import FakeQuantizer, LSQQuantizer, QuantizerSpec, UniformQuantizer

__all__ = ["FirstBatchLSQQuantizer", "IdentitySTEUniformQuantizer", "replace_quantizers", "lsq_grad_scale"]

SIGNED_THRESHOLD = 1e-5  # QuantAct_lsq: signed window when min(x) < 1e-5


def lsq_grad_scale(numel: int, qmax: int, g_scale: float = 1.0) -> float:
    """LSQ gradient scale ``g_scale / sqrt(numel · qmax)`` (numel of the whole first batch)."""
    return g_scale / math.sqrt(max(numel, 1) * max(qmax, 1))


class _FirstBatchLSQFn(torch.autograd.Function):
    """``q = (round(clamp(x/s + round(z), qmin, qmax)) - round(z))·s`` with LSQ's straight-through
    gradients, fused (one saved tensor, a handful of passes instead of ~15 autograd nodes):

    * ``dq/dx = m`` with ``m = [qmin <= x/s + round(z) <= qmax]`` (bounds included, as torch.clamp);
    * ``dq/ds = (round(...) - round(z)) - m·x/s``, summed and multiplied by ``g_s``;
    * ``dq/dz = -s·(1 - m)`` (round(z) is straight-through), summed and multiplied by ``g_z``.
    """

    @staticmethod
    def forward(ctx, x, s, z, qmin: int, qmax: int, g_s: float, g_z: float):
        zr = z.detach().round()
        sd = s.detach()
        ctx.save_for_backward(x, sd, zr)
        ctx.consts = (qmin, qmax, g_s, g_z)
        return (torch.clamp(x / sd + zr, qmin, qmax).round_() - zr).mul_(sd)

    @staticmethod
    def backward(ctx, grad):
        x, s, zr = ctx.saved_tensors
        qmin, qmax, g_s, g_z = ctx.consts
        v = x / s
        u = v + zr
        inside = (u >= qmin) & (u <= qmax)
        gx = grad * inside
        gs = gz = None
        if ctx.needs_input_grad[1]:
            ds = u.clamp_(qmin, qmax).round_().sub_(zr).sub_(v.mul_(inside))  # in place: u and v are scratch
            gs = (torch.dot(grad.reshape(-1), ds.reshape(-1)) * g_s).reshape(s.shape)
        if ctx.needs_input_grad[2]:
            gz = ((grad.sum() - gx.sum()) * (-g_z) * s).reshape(zr.shape)  # Σ grad·(1 - m)
        return (gx if ctx.needs_input_grad[0] else None), gs, gz, None, None, None, None


class FirstBatchLSQQuantizer(LSQQuantizer):
    """Per-tensor LSQ (learnable step and zero-point) with MimiQ's first-batch initialisation."""

    def __init__(
        self,
        spec: QuantizerSpec,
        bits: int | None,
        g_scale: float = 1.0,
        scale_zero_point_grad: bool = False,
    ) -> None:
        if spec.per_channel:
            raise ValueError("FirstBatchLSQQuantizer is per-tensor")
        super().__init__(spec, bits)
        self.zero_point.requires_grad_(True)  # learnable whatever the spec's symmetry
        self.g_scale = g_scale
        self.scale_zero_point_grad = scale_zero_point_grad
        self.signed = True
        self.grad_factor_value = 1.0

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed)

    def grad_factor(self, x: torch.Tensor) -> float:
        return self.grad_factor_value  # fixed at init from the first batch (as the released code)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self._init_from(x.detach())
        qmin, qmax = self.qrange
        g = self.grad_factor_value
        return _FirstBatchLSQFn.apply(
            x, self.scale, self.zero_point, qmin, qmax, g, g if self.scale_zero_point_grad else 1.0
        )

    @torch.no_grad()
    def _compute_params(self) -> None:
        lo, _, _, mean_abs = self._data()
        self.signed = bool(lo.min() < SIGNED_THRESHOLD)
        qmax = self.qrange[1]
        s = (2.0 * mean_abs / math.sqrt(qmax)).float().reshape(1)
        z = 0.1 * (lo.float().reshape(1) - s * qmax)
        self.grad_factor_value = lsq_grad_scale(self._count, qmax, self.g_scale)
        self._set(s, z)

    def _range_from_params(self):
        qmin, qmax = self.qrange
        s, z = self.scale.detach(), self.zero_point.detach().round()
        return (qmin - z) * s, (qmax - z) * s

    def extra_repr(self) -> str:
        return super().extra_repr() + f", first-batch-lsq(signed={self.signed}, g_scale={self.g_scale})"


class _IdentitySTE(torch.autograd.Function):
    """``fn(x)`` forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class IdentitySTEUniformQuantizer(UniformQuantizer):
    """Uniform fake quantizer with an unmasked straight-through gradient."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _IdentitySTE.apply(x, super().quantize)
        return super().quantize(x)


def replace_quantizers(
    module: nn.Module, convert: Callable[[str, FakeQuantizer], FakeQuantizer | None]
) -> list[str]:
    """Swap fake quantizers below ``module`` in place: ``convert(path, q)`` returns the replacement, or
    ``None`` to keep ``q``. The weight flag is carried over. Returns the paths replaced."""
    done = []
    for path, q in list(module.named_modules()):
        if not isinstance(q, FakeQuantizer):
            continue
        new = convert(path, q)
        if new is None or new is q:
            continue
        new.is_weight = q.is_weight
        new.mode = q.mode
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        ref = next(iter([*q.parameters(), *q.buffers()]), None)
        setattr(parent, child, new.to(ref.device) if ref is not None else new)
        done.append(path)
    return done
