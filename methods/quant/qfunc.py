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

import sys
import threading

import torch

EPS = torch.finfo(torch.float32).eps


def _storage_use_count(t: torch.Tensor) -> int | None:
    try:
        # +1 for the temporary storage object created here
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1
    except AttributeError:  # private API gone: disable reuse rather than guess
        return None


def sole_owner(t: torch.Tensor) -> bool:
    """True when the caller's local variable is the only reference to t (CPython refcount: the caller's
    name, this parameter, getrefcount's argument) and t is the only tensor on its storage (no views or
    saved copies), so an in-place update cannot be observed elsewhere. False when unsure."""
    return sys.getrefcount(t) == 3 and t._base is None and _storage_use_count(t) == 1


class OutputPool:
    """Recycles CPU output buffers of the no-grad fake-quant path.

    Why: a fresh multi-MB CPU allocation is returned to the OS on free and page-faults on every
    reuse; on a DeiT-S forward this alone made fake quantization cost more than the four arithmetic
    passes. A buffer is handed out again only when nothing but the pool references its storage (the
    consumer's tensors and all their views are gone), so a retained output is never overwritten.
    CUDA tensors are not pooled (the caching allocator already does this). At most ``max_buffers``
    buffers and ``max_bytes`` in total are retained (larger tensors are not pooled: with big eval
    batches the arithmetic dwarfs the page faults anyway). ``enabled = False`` turns it off.
    """

    def __init__(self, max_buffers: int = 4, max_bytes: int = 256 * 2**20) -> None:
        self.enabled = True
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self._bufs: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor with x's shape and dtype."""
        n = x.numel()
        nbytes = n * x.element_size()
        if not self.enabled or x.device.type != "cpu" or n < 65536 or 2 * nbytes > self.max_bytes:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
        with self._lock:
            for i, b in enumerate(self._bufs):
                if b.numel() >= n and b.dtype == x.dtype and _storage_use_count(b) == 1:
                    self._bufs.append(self._bufs.pop(i))  # most recently used last
                    return b[:n].view(x.shape)
            with torch.inference_mode(False):  # a normal tensor is writable in and out of inference mode
                b = torch.empty(n, dtype=x.dtype)
            if _storage_use_count(b) is None:
                self.enabled = False
            self._bufs.append(b)
            # forget the least recently used (views still in use keep their memory alive)
            while len(self._bufs) > self.max_buffers or self.pooled_bytes() > self.max_bytes:
                self._bufs.pop(0)
            return b[:n].view(x.shape)

    def pooled_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs)

    def clear(self) -> None:
        with self._lock:
            self._bufs = []


OUTPUT_POOL = OutputPool()


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


class _UniformSTE(torch.autograd.Function):
    """Fake quantization with the masked straight-through gradient (recomputes the mask in backward)."""

    @staticmethod
    def forward(ctx, x, inv, scale, lo, hi):
        ctx.save_for_backward(x)
        ctx.consts = (inv, lo, hi)  # floats or small per-channel tensors without grad
        return _fq_nograd(x, inv, scale, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.saved_tensors[0]
        inv, lo, hi = ctx.consts
        r = torch.round(x * inv)
        mask = (r >= lo) & (r <= hi)
        return grad * mask, None, None, None, None


def _fq_nograd(x, inv, scale, lo, hi, pooled: bool = False):
    # One output buffer, then in place: 4 passes over memory (the fused ATen kernel is ~10x slower on CPU).
    y = torch.mul(x, inv, out=OUTPUT_POOL.empty_like(x)) if pooled else x * inv
    y.round_()
    y.clamp_(lo, hi)
    return y.mul_(scale)


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


def affine_consts(x, scale, zero_point, qmin, qmax, axis):
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


def fake_quant_affine(x: torch.Tensor, inv, s, lo, hi) -> torch.Tensor:
    """``clamp(round(x·inv), lo, hi)·s`` with the masked STE when x needs a gradient."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _UniformSTE.apply(x, inv, s, lo, hi)
    return _fq_nograd(x, inv, s, lo, hi, pooled=True)


# How x reaches the integer grid. The three agree in exact arithmetic; in float32 they differ where
# x/scale lands on a .5 tie (a symmetric channel's extreme value does: it maps to 2^(b-1) - 0.5), so a
# mode that claims to follow released code must use that code's arithmetic.
ARITHMETIC = ("reciprocal", "divide", "zeroq")


class _GridSTE(torch.autograd.Function):
    """``fn(x)`` forward; backward passes the gradient where ``qmin <= grid(x) <= qmax``."""

    @staticmethod
    def forward(ctx, x, fn, grid, qmin, qmax):
        ctx.save_for_backward(x)
        ctx.consts = (grid, qmin, qmax)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.saved_tensors[0]
        grid, qmin, qmax = ctx.consts
        r = grid(x)
        return grad * ((r >= qmin) & (r <= qmax)), None, None, None, None


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
    has_zp = bool(zero_point.any())

    def grid(v: torch.Tensor) -> torch.Tensor:
        y = v / s
        return (y + zp if has_zp else y).round_()

    def fn(v: torch.Tensor) -> torch.Tensor:
        q = grid(v).clamp_(qmin, qmax)
        return (q.sub_(zp) if has_zp else q).mul_(s)

    if torch.is_grad_enabled() and x.requires_grad:
        return _GridSTE.apply(x, fn, grid, qmin, qmax)
    return fn(x)


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

    def grid(v: torch.Tensor) -> torch.Tensor:
        return torch.round(k * v)

    def fn(v: torch.Tensor) -> torch.Tensor:
        return grid(v).clamp_(qmin, qmax).div_(k)

    if torch.is_grad_enabled() and x.requires_grad:
        return _GridSTE.apply(x, fn, grid, qmin, qmax)
    return fn(x)


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
