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
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from methods.quant.qfunc import (
    EPS,
    affine_consts,
    bshape,
    channels_first,
    fake_quant,
    fake_quant_affine,
    int_range,
    log2_fake_quant,
    minmax,
    percentile_range,
    subsample,
    uniform_params,
)

KINDS = ("uniform", "log2", "log_sqrt2")
RANGES = ("minmax", "percentile", "mse", "lsq", "dynamic")
MODES = ("off", "calibrate", "quant")
LSQ_INITS = ("minmax", "lsq")


@dataclass(frozen=True)
class QuantizerSpec:
    """How to quantize one tensor (pure data; stored in result records through the policy).

    ``ch_axis`` is the channel axis when ``per_channel`` (0 = output channel of a weight, -1 = last
    axis of an activation). ``mse_grid``/``mse_min_ratio``: the MSE search tries clip ratios
    ``r = 1, ..., mse_min_ratio`` (``mse_grid`` evenly spaced values) applied to the min/max range.
    ``lsq_init``: ``"minmax"`` (step and zero-point from the min-max range) or ``"lsq"`` (the LSQ
    paper's ``step = 2·mean|x|/sqrt(qmax)``, zero-point 0). ``calib_samples``: at most this many values
    are kept per quantizer for percentile / MSE calibration (a uniform random sample).
    ``include_zero`` (addition): widen asymmetric ranges to contain 0 first (see qfunc).
    """

    kind: str = "uniform"
    symmetric: bool = False
    per_channel: bool = False
    ch_axis: int = 0
    range: str = "minmax"
    percentile: float = 99.99
    v1_scale: bool = False
    mse_grid: int = 100
    mse_min_ratio: float = 0.01
    lsq_init: str = "minmax"
    calib_samples: int = 262144
    include_zero: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantizerSpec.kind {self.kind!r} not in {KINDS}")
        if self.range not in RANGES:
            raise ValueError(f"QuantizerSpec.range {self.range!r} not in {RANGES}")
        if self.kind != "uniform" and (self.symmetric or self.range == "lsq" or self.v1_scale):
            raise ValueError("log2 quantizers are unsigned: no symmetric, v1_scale or lsq range")
        if self.v1_scale and not self.symmetric:
            raise ValueError("v1_scale applies to symmetric quantizers only")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.lsq_init not in LSQ_INITS:
            raise ValueError(f"lsq_init {self.lsq_init!r} not in {LSQ_INITS}")
        if self.mse_grid < 1 or not 0.0 < self.mse_min_ratio <= 1.0:
            raise ValueError("mse_grid must be >= 1 and mse_min_ratio in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantizerSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantizerSpec fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class FakeQuantizer(nn.Module):
    """Base class: modes, calibration statistics, bit changes. Subclasses implement
    ``quantize(x)``, ``_compute_params()``, ``initialized`` and ``_range_from_params()``."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__()
        if bits is not None and bits < 2:
            raise ValueError(f"bits must be >= 2 or None, got {bits}")
        self.spec = spec
        self.bits = bits
        self.mode = "quant"
        self.is_weight = False
        self._reset_stats()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def axis(self) -> int | None:
        return self.spec.ch_axis if self.spec.per_channel else None

    @property
    def initialized(self) -> bool:
        raise NotImplementedError

    def _reset_stats(self) -> None:
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._abs_sum: torch.Tensor | None = None
        self._count = 0
        self._last: torch.Tensor | None = None  # weights: the latest tensor seen

    @property
    def has_stats(self) -> bool:
        return self._last is not None or self._lo is not None

    def state_key(self) -> tuple:
        """Changes whenever the output for a fixed input may change (used by frozen weight caches)."""
        tensors = list(self._buffers.values()) + list(self._parameters.values())
        return (self.mode, self.bits, tuple((t.data_ptr(), t._version) for t in tensors if t is not None))

    # ---- public API ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None or self.mode == "off":
            return x
        if self.mode == "calibrate":
            self.observe(x.detach())
            return x
        return self.quantize(x)

    def start_calibration(self) -> None:
        self._reset_stats()
        self.mode = "calibrate"

    def finish_calibration(self) -> None:
        if self.bits is not None and self.has_stats and self.spec.range != "dynamic":
            self._compute_params()
        self.mode = "quant"

    def set_bits(self, bits: int | None) -> None:
        """Change the bit-width; static parameters are recomputed from the kept statistics, or else
        re-derived from the current clip range."""
        if bits is not None and bits < 2:
            raise ValueError(f"bits must be >= 2 or None, got {bits}")
        old = self.bits
        rng = self._range_from_params() if (old is not None and self.initialized) else None
        self.bits = bits
        if bits is None or self.spec.range == "dynamic":
            return
        if self.has_stats:
            self._compute_params()
        elif rng is not None:
            self._params_from_range(*rng)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        if mode == "calibrate":
            self.start_calibration()
        elif mode == "quant" and self.mode == "calibrate":
            self.finish_calibration()
        else:
            self.mode = mode

    def enable(self) -> None:
        self.set_mode("quant")

    def disable(self) -> None:
        self.mode = "off"

    def extra_repr(self) -> str:
        s = self.spec
        parts = [s.kind, f"bits={self.bits}"]
        if s.kind == "uniform":
            parts.append("sym" + ("(v1)" if s.v1_scale else "") if s.symmetric else "asym")
        parts.append(f"per-channel(axis={s.ch_axis})" if s.per_channel else "per-tensor")
        parts += [f"range={s.range}", f"mode={self.mode}"]
        return ", ".join(parts)

    # ---- statistics ----------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate calibration statistics of x (already detached)."""
        if self.spec.range == "dynamic":
            return
        if self.is_weight:
            self._last = x
            return
        lo, hi = minmax(x, self.axis)
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.spec.range in ("percentile", "mse"):
            gen = torch.Generator().manual_seed(len(self._samples))  # deterministic, nothing to copy
            self._samples.append(subsample(x, self.axis, self.spec.calib_samples, gen))
            if sum(t.numel() for t in self._samples) > 4 * self.spec.calib_samples:
                self._samples = [self._merged_samples()]
        if self.spec.range == "lsq":
            a = x.abs().sum().reshape(1) if self.axis is None else channels_first(x, self.axis).abs().sum(1)
            self._abs_sum = a if self._abs_sum is None else self._abs_sum + a
            self._count += x.numel() // (1 if self.axis is None else x.shape[self.axis])

    def _merged_samples(self) -> torch.Tensor:
        dim = 0 if self.axis is None else 1
        s = torch.cat(self._samples, dim=dim)
        gen = torch.Generator().manual_seed(12345)
        return subsample(s, None if self.axis is None else 0, self.spec.calib_samples, gen)

    def _data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(lo, hi, samples, mean_abs) for parameter computation. Samples are flat or (C, M)."""
        if self._last is not None:
            w = self._last
            lo, hi = minmax(w, self.axis)
            samples = w.reshape(-1) if self.axis is None else channels_first(w, self.axis)
            a = samples.abs()
            mean_abs = a.mean().reshape(1) if self.axis is None else a.mean(dim=1)
            return lo, hi, samples, mean_abs
        samples = None
        if self._samples:
            if len(self._samples) > 1 or self._samples[0].numel() > self.spec.calib_samples:
                self._samples = [self._merged_samples()]
            samples = self._samples[0]
        mean_abs = self._abs_sum / max(self._count, 1) if self._abs_sum is not None else None
        return self._lo, self._hi, samples, mean_abs

    def _init_from(self, x: torch.Tensor) -> None:
        """Lazy init in "quant" mode without calibration: treat x as the calibration data."""
        self._reset_stats()
        self.observe(x)
        self._compute_params()

    # ---- subclass hooks ------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compute_params(self) -> None:
        raise NotImplementedError

    def _range_from_params(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def _params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    def _uniform_params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        return uniform_params(lo, hi, self.bits, s.symmetric, s.v1_scale, s.include_zero)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Parameters are created lazily (shape known after calibration): adopt the stored shapes.
        for name, t in list(self._buffers.items()) + list(self._parameters.items()):
            key = prefix + name
            if t is not None and key in state_dict and state_dict[key].shape != t.shape:
                new = torch.empty(state_dict[key].shape, dtype=t.dtype, device=t.device)
                if name in self._parameters:
                    t.data = new
                else:
                    self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class UniformQuantizer(FakeQuantizer):
    """Uniform affine fake quantizer (per-tensor / per-channel, symmetric / asymmetric);
    ranges ``minmax``, ``percentile``, ``mse`` (static, calibrated) or ``dynamic``."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self._consts_key: tuple | None = None
        self._consts: tuple = ()

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.spec.symmetric)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        if self.spec.range == "dynamic":
            lo, hi = minmax(x.detach(), self.axis)
            s, z = self._uniform_params(lo, hi)
            return fake_quant(x, s, z, qmin, qmax, self.axis)
        if not self.initialized:
            self._init_from(x.detach())
        if self.axis is not None:
            return fake_quant(x, self.scale, self.zero_point, qmin, qmax, self.axis)
        # per tensor: cache the Python-float constants (saves a tensor->float sync per call)
        key = (self.bits, self.scale.data_ptr(), self.scale._version, self.zero_point._version)
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
        qmin, qmax = self.qrange
        axis = 0 if self.spec.per_channel else None
        samples = samples.float()
        best_err = best_lo = best_hi = None
        for r in torch.linspace(1.0, self.spec.mse_min_ratio, self.spec.mse_grid).tolist():
            clo, chi = lo * r, hi * r
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

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

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
        self.scale = hi.float().clamp(min=EPS)

    def _range_from_params(self):
        return torch.zeros_like(self.scale), self.scale.clone()

    def _params_from_range(self, lo, hi) -> None:
        self.scale = hi  # the scale does not depend on the bit-width

    def _mse_search(self, hi, samples) -> torch.Tensor:
        samples = samples.float()
        shape = [-1, 1] if self.spec.per_channel else [1]
        best_err = best = None
        for r in torch.linspace(1.0, self.spec.mse_min_ratio, self.spec.mse_grid).tolist():
            s = (hi * r).clamp(min=EPS)
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
    def initialized(self) -> bool:
        return self.scale.numel() > 0

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
        # Replace .data so optimisers holding these Parameters keep working.
        self.scale.data = s.to(self.scale.device)
        self.zero_point.data = z.to(self.zero_point.device)

    def _range_from_params(self):
        qmin, qmax = self.qrange
        s, z = self.scale.detach(), self.zero_point.detach().round()
        return (qmin - z) * s, (qmax - z) * s


def make_quantizer(spec: QuantizerSpec, bits: int | None) -> FakeQuantizer:
    """The quantizer class for a spec: LSQ for ``range="lsq"``, Log2Quantizer for the log kinds, else
    uniform."""
    if spec.range == "lsq":
        return LSQQuantizer(spec, bits)
    if spec.kind in ("log2", "log_sqrt2"):
        return Log2Quantizer(spec, bits)
    return UniformQuantizer(spec, bits)
