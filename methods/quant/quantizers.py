"""Fake quantizers: a pure-data :class:`QuantizerSpec` and the modules built from it.

A quantizer has ``bits`` (``None`` = identity) and a ``mode``:

* ``"off"``: identity.
* ``"calibrate"``: identity output; accumulates statistics (running min/max, a bounded random sample of
  values for percentile/MSE, mean |x| for LSQ's init). Every quantizer is identity in this mode, including
  dynamic ones, so a calibration pass is a full-precision pass (as in PSAQ-ViT V1).
* ``"quant"``: fake-quantize with the current parameters. A static quantizer that was never calibrated
  initialises itself from the first tensor it sees (exact for weights; "first batch" for activations,
  which is also LSQ's init rule). ``range="dynamic"`` recomputes min/max from every tensor.

Weight quantizers get ``is_weight = True`` from their module: they keep a reference to the weight
instead of accumulating statistics, since the weight is the same tensor at every call.

Numeric conventions (scale, zero-point, rounding, clip range, STE) are in :mod:`methods.quant.qfunc`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.quant.qbase import (  # noqa: F401 - re-exported: the public home of the quantizer API
    KINDS,
    LSQ_INITS,
    MODES,
    RANGES,
    FakeQuantizer,
    QuantizerSpec,
    StateKey,
)
from methods.quant.qfunc import (
    EPS,
    affine_consts,
    bshape,
    fake_quant,
    fake_quant_affine,
    fake_quant_divide,
    fake_quant_zeroq,
    int_range,
    log2_fake_quant,
    minmax,
    percentile_range,
)
from methods.quant.twin_quantizers import (  # noqa: F401 - re-exported through make_quantizer
    TWO_SCALE_QUANTIZERS,
    Outlier2SFQuantizer,
    TwinGeluQuantizer,
    TwinSoftmaxQuantizer,
)

__all__ = [
    "KINDS", "LSQ_INITS", "MODES", "RANGES", "FakeQuantizer", "LSQQuantizer", "Log2Quantizer",
    "Outlier2SFQuantizer", "QuantizerSpec", "StateKey", "TwinGeluQuantizer", "TwinSoftmaxQuantizer",
    "UniformQuantizer", "make_quantizer",
]


class UniformQuantizer(FakeQuantizer):
    """Uniform affine fake quantizer (per-tensor / per-channel, symmetric / asymmetric);
    ranges ``minmax``, ``percentile``, ``mse`` (static, calibrated) or ``dynamic``."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self._consts_key: StateKey | None = None  # the state _consts were computed from
        self._consts: tuple = ()

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.spec.symmetric)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        arith = self.spec.arith
        if self.spec.range == "dynamic":
            lo, hi = minmax(x.detach(), self.axis)
            if arith == "zeroq":
                return fake_quant_zeroq(x, lo, hi, self.bits, self.axis)
            s, z = self._uniform_params(lo, hi)
            quant = fake_quant_divide if arith == "divide" else fake_quant
            return quant(x, s, z, qmin, qmax, self.axis)
        if not self.initialized:
            self._init_from(x.detach())
        if arith == "divide":
            return fake_quant_divide(x, self.scale, self.zero_point, qmin, qmax, self.axis)
        if self.axis is not None:
            return fake_quant(x, self.scale, self.zero_point, qmin, qmax, self.axis)
        # per tensor: cache the Python-float constants (saves a tensor->float device sync per call)
        key = self.state_key()
        if self._consts_key != key:
            self._consts = affine_consts(x, self.scale, self.zero_point, qmin, qmax, None)
            self._consts_key = key
        return fake_quant_affine(x, *self._consts)

    @torch.no_grad()
    def _compute_params(self) -> None:
        lo, hi, samples, _ = self._data()
        if self.spec.range == "percentile":
            s = self.spec
            lo, hi = percentile_range(samples, s.percentile, s.symmetric, s.per_channel)
        elif self.spec.range == "mse":
            lo, hi = self._mse_search(lo, hi, samples)
        elif self.spec.range == "percentile_mse":
            s = self.spec
            candidates = [percentile_range(samples, p, s.symmetric, s.per_channel)
                          for p in s.search_percentiles]
            lo, hi = self._best_range(candidates, samples)
        self._params_from_range(lo, hi)

    def _params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        s, z = self._uniform_params(lo, hi)
        self.scale, self.zero_point = s, z  # registered buffers: plain assignment keeps them buffers

    def _range_from_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = self.qrange
        z = self.zero_point.float()
        return (qmin - z) * self.scale, (qmax - z) * self.scale

    def _mse_search(self, lo, hi, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip ratio per tensor / channel minimising ||x - q(x)||² over the calibration sample."""
        ratios = torch.linspace(1.0, self.spec.mse_min_ratio, self.spec.mse_grid).tolist()
        return self._best_range([(lo * r, hi * r) for r in ratios], samples)

    def _best_range(self, candidates, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the candidate (lo, hi) ranges, per tensor / channel the first with the least squared error."""
        qmin, qmax = self.qrange
        axis = 0 if self.spec.per_channel else None
        samples = samples.float()
        best_err = best_lo = best_hi = None
        for clo, chi in candidates:
            s, z = self._uniform_params(clo, chi)
            err = (fake_quant(samples, s, z, qmin, qmax, axis) - samples).pow_(2)
            err = err.sum(dim=1) if axis is not None else err.sum().reshape(1)
            if best_err is None:
                best_err, best_lo, best_hi = err, clo, chi
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo, best_hi = torch.where(better, clo, best_lo), torch.where(better, chi, best_hi)
        return best_lo, best_hi


class Log2Quantizer(FakeQuantizer):
    """Log2 quantizer for post-softmax values in [0, 1]: levels ``{0} ∪ {scale·2^-k, k=0..2^b-1}``;
    with ``kind="log_sqrt2"`` (addition) levels ``scale·2^(-k/2)`` (RepQ-ViT's log√2).

    ``scale`` is the top level: the max (``minmax``), a percentile, an MSE-searched fraction of the max,
    or the max of every tensor (``dynamic``)."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.register_buffer("scale", torch.empty(0))

    def _bscale(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s.to(device=x.device, dtype=x.dtype).view(bshape(x.dim(), self.axis, s.numel()))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.range == "dynamic":
            s = minmax(x.detach(), self.axis)[1].clamp(min=EPS)
        else:
            if not self.initialized:
                self._init_from(x.detach())
            s = self.scale
        return log2_fake_quant(x, self._bscale(x, s), self.bits, self.spec.kind == "log_sqrt2")

    @torch.no_grad()
    def _compute_params(self) -> None:
        lo, hi, samples, _ = self._data()
        if self.spec.range == "percentile":
            hi = percentile_range(samples, self.spec.percentile, False, self.spec.per_channel)[1]
        elif self.spec.range == "mse":
            hi = self._mse_search(hi, samples)
        elif self.spec.range == "percentile_mse":
            pcts = self.spec.search_percentiles
            tops = [percentile_range(samples, p, False, self.spec.per_channel)[1] for p in pcts]
            hi = self._best_scale(tops, samples)
        self.scale = hi.float().clamp(min=EPS)

    def _range_from_params(self):
        return torch.zeros_like(self.scale), self.scale.clone()

    def _params_from_range(self, lo, hi) -> None:
        self.scale = hi  # the scale does not depend on the bit-width

    def _mse_search(self, hi, samples) -> torch.Tensor:
        ratios = torch.linspace(1.0, self.spec.mse_min_ratio, self.spec.mse_grid).tolist()
        return self._best_scale([hi * r for r in ratios], samples)

    def _best_scale(self, candidates, samples) -> torch.Tensor:
        """Of the candidate top levels, per tensor / channel the first with the least squared error."""
        samples = samples.float()
        shape = [-1, 1] if self.spec.per_channel else [1]
        best_err = best = None
        for cand in candidates:
            s = cand.clamp(min=EPS)
            q = log2_fake_quant(samples, s.view(shape), self.bits, self.spec.kind == "log_sqrt2")
            err = (q - samples).pow_(2)
            err = err.sum(dim=1) if self.spec.per_channel else err.sum().reshape(1)
            if best_err is None:
                best_err, best = err, s
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
        return best


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """Value t, gradient multiplied by g (LSQ)."""
    return (t - t * g).detach() + t * g


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return (t.round() - t).detach() + t


def _clamp_ste(r: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Clamp integer-valued r; gradient 1 where qmin <= r <= qmax (inclusive, unlike torch.clamp's
    backward, which is 0 at the bounds), 0 outside."""
    inside = (r >= qmin) & (r <= qmax)
    return torch.where(inside, r, r.detach().clamp(qmin, qmax))


class LSQQuantizer(FakeQuantizer):
    """Uniform quantizer with a learnable step (``scale``) and, when asymmetric, a learnable zero-point.

    ``q(x) = (clamp(round(x/s + round(z)), qmin, qmax) - round(z)) · s`` with round-STE; gradients of
    ``s`` and ``z`` are multiplied by ``g = 1/sqrt(n·qmax)``, ``n`` = elements per tensor (per channel
    when per-channel), ``qmax`` = the positive end of the integer grid (LSQ). Symmetric: signed grid,
    ``z = 0`` fixed. Gradient w.r.t. x: 1 inside the clip range, 0 outside.
    """

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.scale = nn.Parameter(torch.empty(0))
        self.zero_point = nn.Parameter(torch.empty(0), requires_grad=not spec.symmetric)

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.spec.symmetric)

    def grad_factor(self, x: torch.Tensor) -> float:
        n = x.numel() // (x.shape[self.axis] if self.axis is not None else 1)
        return 1.0 / math.sqrt(n * self.qrange[1])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self._init_from(x.detach())
        qmin, qmax = self.qrange
        g = self.grad_factor(x)
        shape = bshape(x.dim(), self.axis, self.scale.numel())
        s = _grad_scale(self.scale, g).view(shape)
        if self.spec.symmetric:
            return _clamp_ste(_round_ste(x / s), qmin, qmax) * s
        z = _round_ste(_grad_scale(self.zero_point, g)).view(shape)
        return (_clamp_ste(_round_ste(x / s + z), qmin, qmax) - z) * s

    @torch.no_grad()
    def _compute_params(self) -> None:
        lo, hi, _, mean_abs = self._data()
        if self.spec.lsq_init == "lsq":
            s = (2.0 * mean_abs / math.sqrt(self.qrange[1])).float().clamp(min=EPS)
            self._set(s, torch.zeros_like(s))
        else:
            self._params_from_range(lo, hi)

    def _params_from_range(self, lo, hi) -> None:
        s, z = self._uniform_params(lo, hi)
        self._set(s, z.float())

    def _set(self, s: torch.Tensor, z: torch.Tensor) -> None:
        # Replace .data so optimisers holding these Parameters keep working; a .data assignment keeps the
        # Parameter objects and their version counters, so record the change for caches explicitly.
        self.scale.data = s.to(self.scale.device)
        self.zero_point.data = z.to(self.zero_point.device)
        self.touch()

    def _range_from_params(self):
        qmin, qmax = self.qrange
        s, z = self.scale.detach(), self.zero_point.detach().round()
        return (qmin - z) * s, (qmax - z) * s


def make_quantizer(spec: QuantizerSpec, bits: int | None) -> FakeQuantizer:
    """The quantizer class for a spec: LSQ for ``range="lsq"``, Log2Quantizer for the log kinds, the
    two-scale kinds of :mod:`methods.quant.twin_quantizers`, else uniform."""
    if spec.kind in TWO_SCALE_QUANTIZERS:
        return TWO_SCALE_QUANTIZERS[spec.kind](spec, bits)
    if spec.range == "lsq":
        return LSQQuantizer(spec, bits)
    if spec.kind in ("log2", "log_sqrt2"):
        return Log2Quantizer(spec, bits)
    return UniformQuantizer(spec, bits)
