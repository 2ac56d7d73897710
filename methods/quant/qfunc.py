"""Pure tensor functions behind the fake quantizers (no modules, no state).

Conventions (all uniform quantizers; ``b`` = bits):

* asymmetric: integers ``[0, 2^b-1]``, ``scale = (max-min)/(2^b-1)``,
  ``zp = clamp(-round(min/scale), 0, 2^b-1)`` (PSAQ-ViT V1). With ``include_zero`` (the default of
  QuantizerSpec) the range is first widened to contain 0 (``min<=0<=max``, as PyTorch observers do);
  this changes nothing for ranges that straddle 0 (all of V1's quantized activations) and avoids the
  literal formula's flaw for positive-only ranges (e.g. softmax outputs), where ``zp`` clamps to 0
  and values above ``max-min`` are clipped. ``include_zero=False`` reproduces the literal formula.
* symmetric: integers ``[-2^(b-1), 2^(b-1)-1]``, ``zp = 0``, ``scale = max|x| / (2^(b-1)-1)``, or with
  ``v1_scale`` ``scale = max|x| / ((2^b-1)/2)`` (PSAQ-ViT V1 / MimiQ weights: the top value lands on
  ``2^(b-1)-0.5`` and rounds to the clamp).
* every scale is clamped to at least float32 eps (V1 does the same), so constant tensors do not divide by 0.
* fake quantization is ``q(x) = (clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale`` with
  round-half-to-even (``torch.round``), i.e. *round then clamp*, the same order as V1 and as
  ``torch.fake_quantize_per_tensor_affine``. Since ``zp`` is an integer this equals
  ``clamp(round(x/scale), qmin-zp, qmax-zp) * scale``, which is what is computed.
* straight-through estimator: ``dq/dx = 1`` where ``qmin <= round(x/scale)+zp <= qmax`` (inside the clip
  range) and exactly ``0`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = torch.finfo(torch.float32).eps


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid."""
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def uniform_params(
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    symmetric: bool,
    v1_scale: bool = False,
    include_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) from a range, elementwise: shapes (1,) or (C,)."""
    lo, hi = lo.float(), hi.float()
    if include_zero:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        m = torch.maximum(-lo, hi)
        denom = (2**bits - 1) / 2 if v1_scale else float(qmax)
        scale = (m / denom).clamp_(min=EPS)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / float(qmax - qmin)).clamp_(min=EPS)
        zp = (-torch.round(lo / scale)).clamp_(qmin, qmax).to(torch.int32)
    return scale, zp


def bshape(ndim: int, axis: int | None, n: int) -> list[int]:
    """Shape that broadcasts a per-channel vector of length n along ``axis`` (None = per-tensor)."""
    shape = [1] * ndim
    if axis is not None:
        shape[axis % ndim] = n
    return shape


# Every uniform fake quantization below is ``dequant(clamp(round(to_grid(x)), lo, hi))``. ``to_grid`` maps x
# onto the integer grid (still real-valued) and returns a new tensor, which rounding, clamping and ``dequant``
# then update in place: one output allocation per call. The arithmetics of ARITHMETIC differ only in
# ``to_grid``, ``dequant`` and the bounds.
ToGrid = Callable[[torch.Tensor], torch.Tensor]
Bound = float | torch.Tensor  # a per-tensor constant, or a tensor broadcasting against x (per channel)


def _fq_nograd(x: torch.Tensor, to_grid: ToGrid, lo: Bound, hi: Bound, dequant: ToGrid) -> torch.Tensor:
    """Fake quantization without autograd (4 passes over memory for the reciprocal arithmetic; ATen's
    fused fake-quant kernel is ~10x slower on CPU)."""
    return dequant(to_grid(x).round_().clamp_(lo, hi))


class _MaskedSTE(torch.autograd.Function):
    """:func:`_fq_nograd` forward; backward passes the gradient where ``lo <= round(to_grid(x)) <= hi``
    and gives exactly 0 elsewhere. Only x is saved and the mask is recomputed in backward, so no
    x-sized mask per quantizer stays alive until backward."""

    @staticmethod
    def forward(ctx, x, to_grid, lo, hi, dequant):
        ctx.save_for_backward(x)
        ctx.to_grid, ctx.lo, ctx.hi = to_grid, lo, hi  # a function, floats or small tensors without grad
        return _fq_nograd(x, to_grid, lo, hi, dequant)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        r = ctx.to_grid(x).round_()
        return grad * ((r >= ctx.lo) & (r <= ctx.hi)), None, None, None, None


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _fake_quant(x: torch.Tensor, to_grid: ToGrid, lo: Bound, hi: Bound, dequant: ToGrid) -> torch.Tensor:
    """With the masked STE when x needs a gradient, else plain."""
    if _needs_grad(x):
        return _MaskedSTE.apply(x, to_grid, lo, hi, dequant)
    return _fq_nograd(x, to_grid, lo, hi, dequant)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Uniform fake quantization with STE; ``scale``/``zero_point`` shaped (1,) or (C,) along ``axis``."""
    return fake_quant_affine(x, *affine_consts(x, scale, zero_point, qmin, qmax, axis))


def affine_consts(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> tuple[Bound, Bound, Bound, Bound]:
    """(1/scale, scale, qmin-zp, qmax-zp): Python floats per tensor, broadcastable tensors per channel."""
    if axis is None:
        s = float(scale)
        zp = int(zero_point)
        inv, lo, hi = 1.0 / s, float(qmin - zp), float(qmax - zp)
    else:
        shape = bshape(x.dim(), axis, scale.numel())
        s = scale.to(device=x.device, dtype=x.dtype).view(shape)
        zpt = zero_point.to(device=x.device, dtype=x.dtype).view(shape)
        inv, lo, hi = 1.0 / s, qmin - zpt, qmax - zpt
    return inv, s, lo, hi


def fake_quant_affine(x: torch.Tensor, inv: Bound, s: Bound, lo: Bound, hi: Bound) -> torch.Tensor:
    """``clamp(round(x·inv), lo, hi)·s`` with the masked STE when x needs a gradient."""

    def dequant(q: torch.Tensor) -> torch.Tensor:
        return q.mul_(s)

    if _needs_grad(x):
        return _MaskedSTE.apply(x, lambda v: v * inv, lo, hi, dequant)

    def to_grid(v: torch.Tensor) -> torch.Tensor:
        # Without autograd the output is a fresh contiguous tensor whatever view x is (e.g. the transposed
        # k of q @ kᵀ), so the next matmul reads a dense operand. Kept on purpose: an operand's layout can
        # change the low bits of a matmul, and the golden results were made with this one.
        return torch.mul(v, inv, out=torch.empty(v.shape, dtype=v.dtype, device=v.device))

    return _fq_nograd(x, to_grid, lo, hi, dequant)


# How x reaches the integer grid. The three agree in exact arithmetic; in float32 they differ where
# x/scale lands on a .5 tie (a symmetric channel's extreme value does: it maps to 2^(b-1) - 0.5), so a
# mode that claims to follow released code must use that code's arithmetic.
ARITHMETIC = ("reciprocal", "divide", "zeroq")


def _broadcast(x: torch.Tensor, t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``t`` (shape (1,) or (C,)) as a float tensor broadcasting against x; never a 0-dim scalar,
    so that ``x / t`` is a true elementwise division as in the released code."""
    return t.to(device=x.device, dtype=x.dtype).view(bshape(x.dim(), axis, t.numel()))


def fake_quant_divide(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """PSAQ-ViT V1's arithmetic (quant_utils.py, SymmetricQuantFunction / AsymmetricQuantFunction):
    ``(clamp(round(x / s + zp), qmin, qmax) - zp) · s``, with the masked STE."""
    s, zp = _broadcast(x, scale, axis), _broadcast(x, zero_point, axis)
    if bool(zero_point.any()):
        def to_grid(v: torch.Tensor) -> torch.Tensor:
            return v / s + zp

        def dequant(q: torch.Tensor) -> torch.Tensor:
            return q.sub_(zp).mul_(s)
    else:  # zero-point 0 (e.g. symmetric): skip the two passes that add and subtract it
        def to_grid(v: torch.Tensor) -> torch.Tensor:
            return v / s

        def dequant(q: torch.Tensor) -> torch.Tensor:
            return q.mul_(s)

    return _fake_quant(x, to_grid, qmin, qmax, dequant)


ZEROQ_RANGE_EPS = 1e-8  # ZeroQ clamps the symmetric range 2·max|x| at 1e-8 (not the scale at float eps)


def fake_quant_zeroq(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, axis: int | None = None
) -> torch.Tensor:
    """ZeroQ's symmetric arithmetic, used by MimiQ's weights (quant_utils.py,
    symmetric_linear_quantization_params / linear_quantize / linear_dequantize): an inverse step
    ``k = (2^b-1) / clamp(2·max(-lo, hi), 1e-8)``, ``clamp(round(k·x), -2^(b-1), 2^(b-1)-1) / k``,
    with the masked STE."""
    qmin, qmax = int_range(bits, True)
    m = torch.maximum(-lo.float(), hi.float())
    k = _broadcast(x, (2**bits - 1) / torch.clamp(2 * m, min=ZEROQ_RANGE_EPS), axis)

    def to_grid(v: torch.Tensor) -> torch.Tensor:
        return k * v

    def dequant(q: torch.Tensor) -> torch.Tensor:
        return q.div_(k)

    return _fake_quant(x, to_grid, qmin, qmax, dequant)


def channels_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    """View/copy of x as (C, M) with the channel axis first."""
    axis %= x.dim()
    c = x.shape[axis]
    if axis == 0:
        return x.reshape(c, -1)
    if axis == x.dim() - 1:
        return x.reshape(-1, c).t()
    return x.movedim(axis, 0).reshape(c, -1)


def minmax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per tensor (shape (1,)) or per channel along ``axis`` (shape (C,))."""
    if axis is None:
        lo, hi = torch.aminmax(x)
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(channels_first(x, axis), dim=1)


def subsample(x: torch.Tensor, axis: int | None, cap: int, gen: torch.Generator) -> torch.Tensor:
    """At most ``cap`` elements of x drawn uniformly at random (with replacement), as a flat tensor,
    or (C, cap // C) per channel. Random, not strided, so channel structure cannot alias the sample."""
    if axis is None:
        flat = x.reshape(-1)
        if flat.numel() <= cap:
            return flat.clone()
        idx = torch.randint(flat.numel(), (cap,), generator=gen).to(x.device)
        return flat[idx]
    xc = channels_first(x, axis)
    k = max(1, cap // xc.shape[0])
    if xc.shape[1] <= k:
        return xc.clone()
    idx = torch.randint(xc.shape[1], (k,), generator=gen).to(x.device)
    return xc[:, idx]


def percentile_range(
    samples: torch.Tensor, pct: float, symmetric: bool, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip range at the ``pct`` percentile (linear interpolation, as ``torch.quantile``).

    Symmetric: ``hi = quantile(|x|, pct)``, ``lo = -hi``. Asymmetric: ``lo = quantile(x, 1-pct)``,
    ``hi = quantile(x, pct)``. Samples are flat (per tensor) or (C, M) (per channel)."""
    q = pct / 100.0
    dim = 1 if per_channel else None
    s = samples.float()
    if symmetric:
        hi = torch.quantile(s.abs(), q, dim=dim)
        lo = -hi
    else:
        lo = torch.quantile(s, 1.0 - q, dim=dim)
        hi = torch.quantile(s, q, dim=dim)
    return lo.reshape(-1), hi.reshape(-1)


def log2_quant(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = False) -> torch.Tensor:
    """Log2 (or log√2) fake quantization for non-negative inputs (post-softmax), no gradient handling.

    log2: levels ``{0} ∪ {scale·2^-k, k = 0..2^b-1}``, ``k = round(-log2(x/scale))`` (RepQ-ViT's
    convention: the underflow code 0 comes on top of the 2^b exponents). log√2 (``sqrt2``): levels
    ``scale·2^(-k/2)``, ``k = round(-2·log2(x/scale))`` (RepQ-ViT's LogSqrt2Quantizer). ``k < 0``
    clips to ``scale`` (k=0), ``k > 2^b-1`` underflows to 0; ``x <= 0`` maps to 0.
    """
    n = 2**bits - 1
    f = 2.0 if sqrt2 else 1.0
    k = torch.round(-f * torch.log2(x / scale))
    zero = (k > n) | ~(x > 0)
    y = torch.exp2(-k.clamp_(0, n) / f).mul_(scale)
    return y.masked_fill_(zero, 0.0)


def log2_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int, sqrt2: bool = False) -> torch.Tensor:
    """Log fake quantization with STE: gradient 1 where ``0 <= x`` and ``k >= 0`` (not clipped: ``x <=
    2^(1/2)·scale`` for log2, ``2^(1/4)·scale`` for log√2), else 0. Underflow to 0 is rounding."""
    q = log2_quant(x.detach(), scale, bits, sqrt2)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q
    with torch.no_grad():
        f = 2.0 if sqrt2 else 1.0
        inside = (x >= 0) & (torch.round(-f * torch.log2(x / scale)) >= 0)
    return q + (x - x.detach()) * inside
