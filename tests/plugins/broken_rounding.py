"""A deliberately broken fake quantizer, for the regression test.

``--plugin tests/plugins/broken_rounding.py`` makes every uniform fake quantizer round toward zero
instead of to nearest (a plausible bug: ``.trunc()`` for ``.round()``). The golden regression must
catch it.
"""

from __future__ import annotations

import torch

from methods.quant import qfunc

_original = qfunc._fq_nograd


def _truncating(x, inv, scale, lo, hi, pooled: bool = False):
    y = torch.mul(x, inv)
    y.trunc_()
    y.clamp_(lo, hi)
    return y.mul_(scale)


qfunc._fq_nograd = _truncating
