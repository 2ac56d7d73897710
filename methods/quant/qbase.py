"""Quantizer base: the pure-data :class:`QuantizerSpec` and :class:`FakeQuantizer` (modes, calibration
statistics, bit changes, state keys for caches). The concrete quantizers are in
:mod:`methods.quant.quantizers`, which re-exports everything here; import from there.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from methods.quant.qfunc import (
    ARITHMETIC,
    channels_first,
    minmax,
    subsample,
    uniform_params,
)

KINDS = ("uniform", "log2", "log_sqrt2", "twin_gelu", "twin_softmax", "outlier_2sf")
# Two-scale kinds (methods.quant.twin_quantizers): per-tensor, their own fixed parameterisation.
TWO_SCALE_KINDS = ("twin_gelu", "twin_softmax", "outlier_2sf")
RANGES = ("minmax", "percentile", "mse", "lsq", "dynamic", "percentile_mse")
MODES = ("off", "calibrate", "quant")
LSQ_INITS = ("minmax", "lsq")
# Revisions are drawn from one process-wide counter, so two quantizers never share one (a cache keyed on
# the quantizer at a site notices when the quantizer itself is swapped, e.g. by replace_quantizers).
_REVISIONS = itertools.count(1)


class StateKey:
    """What a quantizer's output depends on, as seen at one moment; caches of that output compare keys.

    Two keys are equal when the quantizer had the same revision (renewed by :meth:`FakeQuantizer.touch`:
    bits, mode, spec or parameters set) and held the same tensor objects in its buffers and parameters,
    each at the same version counter. So assigning a new tensor (``q.scale = t``) and updating one in
    place (``q.scale.mul_(2)``, an optimiser step) both change the key. The key holds the tensors
    themselves, so they are compared by identity and no id can be reused while a cache keeps the key.
    """

    __slots__ = ("revision", "tensors", "versions")

    def __init__(self, revision: int, tensors: tuple[torch.Tensor, ...]) -> None:
        self.revision = revision
        self.tensors = tensors
        self.versions = tuple(t._version for t in tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StateKey):
            return NotImplemented
        return (
            self.revision == other.revision
            and self.versions == other.versions
            and len(self.tensors) == len(other.tensors)
            and all(a is b for a, b in zip(self.tensors, other.tensors, strict=True))
        )

    __hash__ = None  # mutable tensors inside: not a dict key


@dataclass(frozen=True)
class QuantizerSpec:
    """How to quantize one tensor (pure data; stored in result records through the policy).

    ``ch_axis`` is the channel axis when ``per_channel`` (0 = output channel of a weight, -1 = last
    axis of an activation). ``mse_grid``/``mse_min_ratio``: the MSE search tries clip ratios
    ``r = 1, ..., mse_min_ratio`` (``mse_grid`` evenly spaced values) applied to the min/max range.
    ``lsq_init``: ``"minmax"`` (step and zero-point from the min-max range) or ``"lsq"`` (the LSQ
    paper's ``step = 2·mean|x|/sqrt(qmax)``, zero-point 0). ``calib_samples``: at most this many values
    are kept per quantizer for percentile / MSE calibration (a uniform random sample).
    ``range="percentile_mse"`` (RepQ-ViT's init): of the clip ranges at each of ``search_percentiles``
    (lo at 100 - p, hi at p; symmetric: |x| at p), the one with the least squared error on the sample.
    ``include_zero`` (addition): widen asymmetric ranges to contain 0 first (see qfunc).
    ``arith``: how values reach the integer grid (uniform kind only): ``"reciprocal"`` ``x·(1/s)``
    (fastest; the default), ``"divide"`` ``x/s + zp`` (PSAQ-ViT V1's released code), ``"zeroq"``
    ``x·((2^b-1)/(2·max|x|))`` and back by division (ZeroQ / MimiQ's released symmetric weights; needs
    ``v1_scale`` and ``range='dynamic'``). See :data:`methods.quant.qfunc.ARITHMETIC`.
    Two-scale kinds (:mod:`methods.quant.twin_quantizers`): ``"twin_gelu"`` / ``"twin_softmax"``
    (PTQ4ViT's post-GELU / post-softmax twin uniform) and ``"outlier_2sf"`` (reconstructed O-2SF, outlier
    channels of the last axis at ``Δ·2^t``, ``t <= outlier_max_shift``); they are per-tensor with
    ``range="minmax"`` and take no symmetric / v1_scale flag (their sign handling is fixed).
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
    arith: str = "reciprocal"
    search_percentiles: tuple[float, ...] = (99.9, 99.99, 99.999)
    outlier_max_shift: int = 5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantizerSpec.kind {self.kind!r} not in {KINDS}")
        if self.kind in TWO_SCALE_KINDS and (self.symmetric or self.v1_scale or self.per_channel
                                             or self.range != "minmax"):
            raise ValueError(f"{self.kind} quantizers are per-tensor with range='minmax' and no "
                             "symmetric / v1_scale flag")
        if self.outlier_max_shift < 1:
            raise ValueError(f"outlier_max_shift must be >= 1, got {self.outlier_max_shift}")
        if self.range not in RANGES:
            raise ValueError(f"QuantizerSpec.range {self.range!r} not in {RANGES}")
        if self.kind != "uniform" and (self.symmetric or self.range == "lsq" or self.v1_scale):
            raise ValueError("log2 quantizers are unsigned: no symmetric, v1_scale or lsq range")
        if self.v1_scale and not self.symmetric:
            raise ValueError("v1_scale applies to symmetric quantizers only")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        object.__setattr__(self, "search_percentiles", tuple(float(p) for p in self.search_percentiles))
        if not self.search_percentiles or not all(0.0 < p <= 100.0 for p in self.search_percentiles):
            raise ValueError(f"search_percentiles must be non-empty, each in (0, 100]: "
                             f"{self.search_percentiles}")
        if self.lsq_init not in LSQ_INITS:
            raise ValueError(f"lsq_init {self.lsq_init!r} not in {LSQ_INITS}")
        if self.arith not in ARITHMETIC:
            raise ValueError(f"QuantizerSpec.arith {self.arith!r} not in {ARITHMETIC}")
        if self.arith == "zeroq" and not (self.v1_scale and self.range == "dynamic"):
            raise ValueError("arith='zeroq' is ZeroQ's dynamic symmetric weight quantizer: set v1_scale=True "
                             "and range='dynamic'")
        if self.arith != "reciprocal" and (self.kind != "uniform" or self.range == "lsq"):
            raise ValueError("arith applies to uniform non-LSQ quantizers (LSQ always divides)")
        if self.mse_grid < 1 or not 0.0 < self.mse_min_ratio <= 1.0:
            raise ValueError("mse_grid must be >= 1 and mse_min_ratio in (0, 1]")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["search_percentiles"] = list(self.search_percentiles)  # JSON's form, so a round trip is equal
        return d

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
        self._revision = next(_REVISIONS)
        self.spec = spec
        self.bits = bits
        self.mode = "quant"
        self.is_weight = False
        self._reset_stats()

    # ---- state ---------------------------------------------------------------------------------
    # bits, mode and spec are properties so that setting one, from anywhere, renews the revision that
    # caches of this quantizer's output check (see state_key); the tensors are tracked by StateKey.
    @property
    def bits(self) -> int | None:
        return self._bits

    @bits.setter
    def bits(self, bits: int | None) -> None:
        self._bits = bits
        self.touch()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = mode
        self.touch()

    @property
    def spec(self) -> QuantizerSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: QuantizerSpec) -> None:
        self._spec = spec
        self.touch()

    def touch(self) -> None:
        """Record a state change that the tensors' version counters do not show: called by the setters
        above and by every method that replaces parameters in a way a :class:`StateKey` cannot see
        (``Parameter.data`` assignment, loading a state dict)."""
        self._revision = next(_REVISIONS)

    def state_key(self) -> StateKey:
        """The current state, to compare with a key saved next to a cached output (equal keys: the
        output for a fixed input is the same)."""
        tensors = [*self._buffers.values(), *self._parameters.values()]
        return StateKey(self._revision, tuple(t for t in tensors if t is not None))

    @property
    def axis(self) -> int | None:
        return self.spec.ch_axis if self.spec.per_channel else None

    @property
    def initialized(self) -> bool:
        """True once the step size is set (every quantizer keeps it in ``self.scale``)."""
        return self.scale.numel() > 0

    def _reset_stats(self) -> None:
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._abs_sum: torch.Tensor | None = None
        self._count = 0  # elements (per channel) behind _abs_sum
        self._n_obs = 0  # batches observed (seeds the sampling)
        self._last: torch.Tensor | None = None  # weights: the latest tensor seen

    @property
    def has_stats(self) -> bool:
        return self._last is not None or self._lo is not None

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

    def set_bits(self, bits: int | None, keep_range: bool = False) -> None:
        """Change the bit-width; static parameters are recomputed from the kept statistics, or else
        (or with ``keep_range``, e.g. after a search chose the clip range) re-derived from the current
        clip range."""
        if bits is not None and bits < 2:
            raise ValueError(f"bits must be >= 2 or None, got {bits}")
        old = self.bits
        rng = self._range_from_params() if (old is not None and self.initialized) else None
        self.bits = bits
        if bits is None or self.spec.range == "dynamic":
            return
        if self.has_stats and not (keep_range and rng is not None):
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
        if self.spec.range in ("percentile", "mse", "percentile_mse"):
            gen = torch.Generator().manual_seed(self._n_obs)  # deterministic, nothing to deep-copy
            self._n_obs += 1
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
        self.touch()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


