"""A deliberately broken fake quantizer, for the regression test.

``--plugin tests/plugins/broken_rounding.py`` makes every uniform fake quantizer round toward zero
instead of to nearest (a plausible bug: ``.trunc_()`` for ``.round_()``). Every uniform arithmetic
(reciprocal, divide, zeroq), with or without the straight-through estimator, computes its forward in
``qfunc._fq_nograd``, so replacing that one function breaks them all. The golden regression must catch it.
"""

from __future__ import annotations

from methods.quant import qfunc


def _truncating(x, to_grid, lo, hi, dequant):
    return dequant(to_grid(x).trunc_().clamp_(lo, hi))


qfunc._fq_nograd = _truncating
