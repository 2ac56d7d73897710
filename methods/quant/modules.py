"""Explicit attention matmuls, taps, and the quantized layer modules.

``MatMul`` and ``Tap`` are what :mod:`methods.quant.surgery` inserts into timm models so that
``q@kᵀ``, ``attn@v`` and intermediate values (scores, probabilities, residual sums) are modules that
can be hooked and swapped. ``QuantLinear``/``QuantConv2d``/``QuantMatMul``/``QuantTap`` are built with
``from_float`` and share the original module's Parameters (no copy).

Frozen weights: ``freeze()`` on a QuantLinear/QuantConv2d caches the fake-quantized weight; the cache
is used whenever no gradient to the weight is needed and is recomputed automatically when the weight
(in-place update, optimiser step, new Parameter or new ``.data``, ``.to()``) or the weight quantizer
(another quantizer, bits, mode, spec, parameters: see :class:`methods.quant.qbase.StateKey`) changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.quant.quantizers import FakeQuantizer, StateKey


def _as_child(q: nn.Module | None) -> nn.Module:
    return nn.Identity() if q is None else q


def _clone_into(cls: type, module: nn.Module) -> nn.Module:
    """A new instance of ``cls`` with module's attributes; Parameters/buffers/children are shared,
    the containers (dicts/sets of the nn.Module bookkeeping) are copied."""
    new = cls.__new__(cls)
    for k, v in module.__dict__.items():
        new.__dict__[k] = type(v)(v) if isinstance(v, dict | set) else v
    return new


class MatMul(nn.Module):
    """``forward(a, b) = a @ b``; ``role`` is "qk" (scores) or "av" (attention output)."""

    def __init__(self, role: str = "qk") -> None:
        super().__init__()
        self.role = role

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    def extra_repr(self) -> str:
        return f"role={self.role!r}"


class Tap(nn.Module):
    """Identity marking a value of interest ("scores", "probs", "res1", "res2", "pos")."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"role={self.role!r}"


class _WeightQuantMixin:
    """Weight fake quantization with an optional frozen cache (for QuantLinear / QuantConv2d)."""

    weight: nn.Parameter
    w_quant: nn.Module

    def _init_quant(self, w_quant, a_quant, out_quant) -> None:
        self.w_quant = _as_child(w_quant)
        self.a_quant = _as_child(a_quant)
        self.out_quant = _as_child(out_quant)
        if isinstance(self.w_quant, FakeQuantizer):
            self.w_quant.is_weight = True
        self.frozen = False
        self._drop_cache()

    def _drop_cache(self) -> None:
        self._w_cache: torch.Tensor | None = None
        # What the cache was computed from: the weight (a detached alias: it shares the storage, and
        # holding it keeps that storage's address from being reused), the weight's version counter then,
        # and the weight quantizer's state key.
        self._w_src: torch.Tensor | None = None
        self._w_src_version = -1
        self._w_qkey: StateKey | None = None

    def _quantizer_key(self) -> StateKey | None:
        wq = self.w_quant
        return wq.state_key() if isinstance(wq, FakeQuantizer) else None

    def _cache_is_current(self) -> bool:
        w, src = self.weight, self._w_src
        if self._w_cache is None or src is None:
            return False
        same_values = (  # same storage, read the same way, not updated in place since
            w.data_ptr() == src.data_ptr() and w.device == src.device and w.dtype == src.dtype
            and w.shape == src.shape and w.stride() == src.stride() and w._version == self._w_src_version
        )
        return same_values and self._quantizer_key() == self._w_qkey

    def quant_weight(self) -> torch.Tensor:
        """The (fake-)quantized weight used by forward."""
        wq = self.w_quant
        if not self.frozen or (torch.is_grad_enabled() and self.weight.requires_grad):
            return wq(self.weight)
        if isinstance(wq, FakeQuantizer) and wq.mode == "calibrate":
            return wq(self.weight)  # must observe; never cache a calibration pass
        return self._cached_weight()

    def _cached_weight(self) -> torch.Tensor:
        if not self._cache_is_current():
            with torch.no_grad():
                self._w_cache = self.w_quant(self.weight).detach()
            self._w_src = self.weight.detach()
            self._w_src_version = self.weight._version
            self._w_qkey = self._quantizer_key()  # after the call: a lazy init inside w_quant changes it
        return self._w_cache

    def freeze(self) -> None:
        """Quantize the weight once and reuse it (when no weight gradient is needed)."""
        self.frozen = True
        self._drop_cache()
        wq = self.w_quant
        if not (isinstance(wq, FakeQuantizer) and wq.mode == "calibrate"):
            self._cached_weight()

    def unfreeze(self) -> None:
        self.frozen = False
        self._drop_cache()


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """nn.Linear with ``w_quant`` (weight), ``a_quant`` (input) and ``out_quant`` (output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_quant(F.linear(self.a_quant(x), self.quant_weight(), self.bias))

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        w_quant: FakeQuantizer | None = None,
        a_quant: FakeQuantizer | None = None,
        out_quant: FakeQuantizer | None = None,
    ) -> QuantLinear:
        new = _clone_into(cls, module)
        new._init_quant(w_quant, a_quant, out_quant)
        return new


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """nn.Conv2d with ``w_quant`` (per output channel = axis 0), ``a_quant`` and ``out_quant``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_quant(self._conv_forward(self.a_quant(x), self.quant_weight(), self.bias))

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        w_quant: FakeQuantizer | None = None,
        a_quant: FakeQuantizer | None = None,
        out_quant: FakeQuantizer | None = None,
    ) -> QuantConv2d:
        new = _clone_into(cls, module)
        new._init_quant(w_quant, a_quant, out_quant)
        return new


class QuantMatMul(MatMul):
    """``a_quant(a) @ b_quant(b)``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quant(a) @ self.b_quant(b)

    @classmethod
    def from_float(
        cls, module: MatMul, a_quant: FakeQuantizer | None = None, b_quant: FakeQuantizer | None = None
    ) -> QuantMatMul:
        new = _clone_into(cls, module)
        new.a_quant = _as_child(a_quant)
        new.b_quant = _as_child(b_quant)
        return new


class QuantTap(Tap):
    """``quant(x)``: fake-quantizes the tapped value (e.g. residual sums for PSAQ)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x)

    @classmethod
    def from_float(cls, module: Tap, quant: FakeQuantizer | None = None) -> QuantTap:
        new = _clone_into(cls, module)
        new.quant = _as_child(quant)
        return new
