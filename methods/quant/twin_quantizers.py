"""Two-scale fake quantizers of PTQ4ViT / MPTQ-ViT: post-GELU and post-softmax twin uniform, and a
reconstruction of TSPTQ-ViT's outlier-aware two-scaled factors (O-2SF) for LayerNorm inputs.

Provenance (PTQ4ViT = ``hahnyuan/PTQ4ViT`` at the fetched HEAD):

* ``twin_gelu`` follows ``quant_layers/linear.py:601-607`` (``PostGeluPTQSLBatchingQuantLinear.
  quant_input``): ``clamp(round(x/Δpos), 0, 2^(b-1)-1)·Δpos + clamp(round(x/Δneg), -2^(b-1), 0)·Δneg``,
  with division (not a reciprocal), torch's round-half-to-even, then clamp. Its default parameters
  are PTQ4ViT's pre-search values: ``Δpos = max(x) / (2^(b-1) - 0.5)`` (the positive max, not max|x|:
  ``linear.py:597``) and the hand-fixed ``Δneg = 0.16997124254703522 / 2^(b-1)`` (``linear.py:574``).
  The OPT-m exponent ``k`` (``Δneg = Δpos / 2^k``, MPTQ-ViT §3.4, reconstructed) is kept in
  ``ratio_exp`` once a search sets it (empty = PTQ4ViT's fixed Δneg).
* ``twin_softmax`` follows ``quant_layers/matmul.py:595-598`` (``SoSPTQSLBatchingQuantMatMul.
  quant_input_A``), unsigned, ``qmax = 2^(b-1)`` (``matmul.py:590``: PTQ4ViT keeps the sign bit's
  budget): ``high = clamp(round(clamp(x, split, 1)·(qmax-1)), 0, qmax-1) / (qmax-1)`` and
  ``low = clamp(round(clamp(x, 0, split)/Δ), 0, qmax-1)·Δ`` with ``Δ = split/(qmax-1)``; the output is
  ``high + low``. As released, the two terms are summed without masking, so values below the split get
  ``round(split·(qmax-1))/(qmax-1)`` added and values above get ``split`` added; this is reproduced, not
  corrected. Default split 0.01 (``matmul.py:354``, the initial value before PTQ4ViT's search).
* ``outlier_2sf`` is **reconstructed** (TSPTQ-ViT publishes no code): a per-tensor symmetric uniform
  step Δ, and the channels (last axis) whose max |x_c| exceeds ``Δ·(2^(b-1)-1)`` use ``Δ·2^t``, one
  ``t ∈ 1..T`` per tensor (``QuantizerSpec.outlier_max_shift`` = T). [CHOICE] default Δ: the channels
  whose max |x_c| is at most ``OUTLIER_FACTOR`` (4) times the median channel max are "normal", and Δ is
  their largest max |x_c| divided by ``2^(b-1)-1`` (a high quantile of the channel maxima, robust to
  how few channels there are: a fixed 0.99 quantile of 96 or fewer channels lands on an outlier);
  ``t`` is the smallest shift whose range covers the largest channel (T if none does).

All three use the masked straight-through estimator of :mod:`methods.quant.qfunc`: gradient 1 inside
the representable range, 0 outside.
"""

from __future__ import annotations

import torch

from methods.quant.qbase import FakeQuantizer, QuantizerSpec
from methods.quant.qfunc import EPS

GELU_NEG_RANGE = 0.16997124254703522  # PTQ4ViT linear.py:574 (|min GELU|), Δneg = this / 2^(b-1)
SOFTMAX_DEFAULT_SPLIT = 0.01  # PTQ4ViT matmul.py:354
OUTLIER_FACTOR = 4.0  # [CHOICE] of outlier_2sf's default Δ, see the module docstring

__all__ = [
    "GELU_NEG_RANGE", "OUTLIER_FACTOR", "SOFTMAX_DEFAULT_SPLIT", "TWO_SCALE_QUANTIZERS",
    "Outlier2SFQuantizer", "TwinGeluQuantizer", "TwinSoftmaxQuantizer", "outlier_2sf_quant",
    "twin_gelu_quant", "twin_softmax_quant",
]


# ---- pure functions (shared with methods.quant.scale_search, so searched = applied) -------------
def twin_gelu_quant(x: torch.Tensor, dpos: torch.Tensor, dneg: torch.Tensor, bits: int) -> torch.Tensor:
    """PTQ4ViT's post-GELU twin uniform (linear.py:605-607), no gradient handling; ``dpos``/``dneg``
    broadcast against x (a leading candidate axis is allowed)."""
    qmax = 2 ** (bits - 1)
    pos = (x / dpos).round_().clamp_(0, qmax - 1).mul_(dpos)
    neg = (x / dneg).round_().clamp_(-qmax, 0).mul_(dneg)
    return pos + neg  # not in place: either step may carry a leading candidate axis


def twin_softmax_quant(x: torch.Tensor, split: torch.Tensor, bits: int) -> torch.Tensor:
    """PTQ4ViT's post-softmax split quantizer (matmul.py:612-615), no gradient handling. ``split``
    broadcasts against x; the low step is ``split / (2^(b-1) - 1)`` as in matmul.py:612."""
    n = 2 ** (bits - 1) - 1
    low_step = split / n
    high = torch.maximum(x, split).clamp_(max=1.0).mul_(n).round_().clamp_(0, n).div_(n)
    low = torch.minimum(x, split).clamp_(min=0.0).div_(low_step).round_().clamp_(0, n).mul_(low_step)
    return high + low


def outlier_2sf_quant(x: torch.Tensor, step: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric uniform with a per-channel (last axis) step ``step·2^shift_c`` (reconstructed O-2SF);
    ``step`` broadcasts against x, ``shift`` has one entry per channel."""
    qmax = 2 ** (bits - 1)
    s = step * torch.exp2(shift.to(x.dtype))
    return (x / s).round_().clamp_(-qmax, qmax - 1).mul_(s)


def _ste(x: torch.Tensor, q: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Value q; gradient 1 where ``inside``, 0 elsewhere (the masked STE of qfunc)."""
    return q + (x - x.detach()) * inside


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _one(v: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32).reshape(1).clone()


class _TwoScale(FakeQuantizer):
    """Common bookkeeping: per-tensor only; ``set_bits`` recomputes the default from the kept
    statistics unless a search set the parameters, which are then rescaled (``_rescale``) so that the
    searched choice survives a bit change (MPTQ-ViT §3.5 re-runs the search after a change anyway)."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.searched = False

    def set_bits(self, bits: int | None, keep_range: bool = False) -> None:
        if bits is not None and bits < 2:
            raise ValueError(f"bits must be >= 2 or None, got {bits}")
        old = self.bits
        keep = keep_range or self.searched or not self.has_stats  # searched, or loaded without statistics
        if keep and old is not None and bits is not None and self.initialized:
            self.bits = bits
            self._rescale(old, bits)
        else:
            self.searched = False
            super().set_bits(bits)

    def _compute_params(self) -> None:
        self.searched = False
        self._default_params()

    def _default_params(self) -> None:
        raise NotImplementedError

    def _rescale(self, old: int, new: int) -> None:
        raise NotImplementedError

    def _range_from_params(self):
        return None  # set_bits without statistics keeps the parameters (see _params_from_range)

    def _params_from_range(self, lo, hi) -> None:
        pass


class TwinGeluQuantizer(_TwoScale):
    """Post-GELU twin uniform (kind ``"twin_gelu"``): buffers ``scale`` (Δpos), ``neg_scale`` (Δneg),
    ``ratio_exp`` (OPT-m's k, shape (1,) int64, or empty when Δneg is PTQ4ViT's fixed value)."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("neg_scale", torch.empty(0))
        self.register_buffer("ratio_exp", torch.empty(0, dtype=torch.int64))

    @staticmethod
    def fixed_neg_scale(bits: int) -> float:
        """PTQ4ViT's hand-fixed negative step (linear.py:574)."""
        return GELU_NEG_RANGE / 2 ** (bits - 1)

    def set_params(self, pos: torch.Tensor | float, k: int | None = None,
                   neg: torch.Tensor | float | None = None) -> None:
        """Set Δpos and either OPT-m's k (``Δneg = Δpos / 2^k``), an explicit Δneg, or neither
        (PTQ4ViT's fixed Δneg); marks the parameters as searched."""
        self.scale = _one(pos).clamp_(min=EPS)
        if k is not None:
            self.ratio_exp = torch.tensor([int(k)], dtype=torch.int64)
            self.neg_scale = self.scale / 2.0 ** int(k)
        else:
            self.ratio_exp = torch.empty(0, dtype=torch.int64)
            self.neg_scale = _one(self.fixed_neg_scale(self.bits) if neg is None else neg)
        self.searched = True
        self.touch()

    @property
    def k(self) -> int | None:
        return int(self.ratio_exp) if self.ratio_exp.numel() else None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self._init_from(x.detach())
        dpos = self.scale.to(device=x.device, dtype=x.dtype)
        dneg = self.neg_scale.to(device=x.device, dtype=x.dtype)
        q = twin_gelu_quant(x.detach(), dpos, dneg, self.bits)
        if not _needs_grad(x):
            return q
        qmax = 2 ** (self.bits - 1)
        with torch.no_grad():
            inside = ((x / dpos).round() <= qmax - 1) & ((x / dneg).round() >= -qmax)
        return _ste(x, q, inside)

    @torch.no_grad()
    def _default_params(self) -> None:
        hi = self._data()[1]
        self.scale = (hi.float().max().reshape(1) / (2 ** (self.bits - 1) - 0.5)).clamp_(min=EPS)
        self.neg_scale = _one(self.fixed_neg_scale(self.bits))
        self.ratio_exp = torch.empty(0, dtype=torch.int64)

    def _rescale(self, old: int, new: int) -> None:
        """Keep Δpos's multiple of ``max/(2^(b-1)-0.5)`` (PTQ4ViT's candidate parameterisation) and k."""
        self.scale = self.scale * ((2 ** (old - 1) - 0.5) / (2 ** (new - 1) - 0.5))
        k = self.k
        self.neg_scale = self.scale / 2.0**k if k is not None else _one(self.fixed_neg_scale(new))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", k={self.k}" if self.k is not None else "")


class TwinSoftmaxQuantizer(_TwoScale):
    """Post-softmax split quantizer (kind ``"twin_softmax"``): buffers ``split`` and ``scale`` (the low
    region's step ``split / (2^(b-1) - 1)``)."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.register_buffer("split", torch.empty(0))
        self.register_buffer("scale", torch.empty(0))

    def set_params(self, split: torch.Tensor | float) -> None:
        self.split = _one(split)
        self.scale = self.split / (2 ** (self.bits - 1) - 1)
        self.searched = True
        self.touch()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self._init_from(x.detach())
        q = twin_softmax_quant(x.detach(), self.split.to(device=x.device, dtype=x.dtype), self.bits)
        if not _needs_grad(x):
            return q
        return _ste(x, q, (x >= 0) & (x <= 1))

    def _init_from(self, x: torch.Tensor) -> None:
        self._default_params()  # the default does not depend on the data

    @property
    def has_stats(self) -> bool:  # so that calibrate / set_bits reach _compute_params
        return True

    def _default_params(self) -> None:
        self.split = _one(SOFTMAX_DEFAULT_SPLIT)
        self.scale = self.split / (2 ** (self.bits - 1) - 1)

    def _rescale(self, old: int, new: int) -> None:
        self.scale = self.split / (2 ** (new - 1) - 1)


class Outlier2SFQuantizer(_TwoScale):
    """Outlier-aware two-scaled symmetric quantizer (kind ``"outlier_2sf"``, reconstructed): buffers
    ``scale`` (Δ, shape (1,)) and ``channel_shift`` (int32 per channel of the last axis: 0 or t)."""

    def __init__(self, spec: QuantizerSpec, bits: int | None) -> None:
        super().__init__(spec, bits)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("channel_shift", torch.empty(0, dtype=torch.int32))

    @property
    def shift(self) -> int:
        """The tensor's t (0 when no channel is an outlier)."""
        return int(self.channel_shift.max()) if self.channel_shift.numel() else 0

    def observe(self, x: torch.Tensor) -> None:
        """Per-channel (last axis) max |x|, kept as ``_hi`` (``_lo = -_hi``)."""
        if self.is_weight:
            self._last = x
            return
        m = x.abs().reshape(-1, x.shape[-1]).amax(0)
        self._hi = m if self._hi is None else torch.maximum(self._hi, m)
        self._lo = -self._hi

    def channel_max(self) -> torch.Tensor:
        if self._last is not None:
            return self._last.abs().reshape(-1, self._last.shape[-1]).amax(0)
        return self._hi

    @staticmethod
    def layout(cmax: torch.Tensor, step: torch.Tensor, t: int, bits: int) -> torch.Tensor:
        """channel_shift for step Δ and shift t: t where max |x_c| > Δ·(2^(b-1)-1), else 0."""
        outlier = cmax > step * (2 ** (bits - 1) - 1)
        return torch.where(outlier, t, 0).to(torch.int32)

    def set_params(self, step: torch.Tensor | float, t: int, cmax: torch.Tensor) -> None:
        self.scale = _one(step).clamp_(min=EPS)
        self.channel_shift = self.layout(cmax, self.scale, t, self.bits)
        self.searched = True
        self.touch()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self._init_from(x.detach())
        if x.shape[-1] != self.channel_shift.numel():
            raise ValueError(f"outlier_2sf was set up for {self.channel_shift.numel()} channels, got "
                             f"{x.shape[-1]}")
        step = self.scale.to(device=x.device, dtype=x.dtype)
        shift = self.channel_shift.to(x.device)
        q = outlier_2sf_quant(x.detach(), step, shift, self.bits)
        if not _needs_grad(x):
            return q
        qmax = 2 ** (self.bits - 1)
        with torch.no_grad():
            r = (x / (step * torch.exp2(shift.to(x.dtype)))).round()
            inside = (r >= -qmax) & (r <= qmax - 1)
        return _ste(x, q, inside)

    @torch.no_grad()
    def _default_params(self) -> None:
        cmax = self.channel_max().float()
        qmax = 2 ** (self.bits - 1) - 1
        normal = cmax[cmax <= OUTLIER_FACTOR * cmax.median()]
        step = (normal.max() / qmax).reshape(1).clamp_(min=EPS)
        self.scale = step
        self.channel_shift = self.layout(cmax, step, self.cover_shift(cmax, step), self.bits)

    def cover_shift(self, cmax: torch.Tensor, step: torch.Tensor) -> int:
        """Smallest t in 1..T with max_c max|x_c| <= Δ·2^t·(2^(b-1)-1); T if none covers."""
        top, qmax = float(cmax.max()), 2 ** (self.bits - 1) - 1
        T = self.spec.outlier_max_shift
        return next((t for t in range(1, T + 1) if top <= float(step) * 2**t * qmax), T)

    def _rescale(self, old: int, new: int) -> None:
        """Keep the clip range ``Δ·(2^(b-1)-1)`` and the shifts."""
        self.scale = self.scale * ((2 ** (old - 1) - 1) / (2 ** (new - 1) - 1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", t={self.shift}"


TWO_SCALE_QUANTIZERS: dict[str, type[FakeQuantizer]] = {
    "twin_gelu": TwinGeluQuantizer,
    "twin_softmax": TwinSoftmaxQuantizer,
    "outlier_2sf": Outlier2SFQuantizer,
}
