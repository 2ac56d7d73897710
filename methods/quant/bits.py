"""Bit-width specifications: ``w4a4``-style strings parsed into a per-layer bit map.

A :class:`BitSpec` starts uniform (one weight and one activation bit-width) and is
*resolved* against a prepared model: the result maps every quantized layer (module
path) to its ``(w_bits, a_bits)`` so each result record stores exactly what ran.
Mixed precision (``mpN``: both averages at most N; ``mpwXaY``: weights at most X, activations at
most Y, e.g. ``mp5`` or ``mpw4.9a6.2``) is parsed here; the allocation (a per-layer map meeting the
budget) is done by :mod:`methods.quant.mixed` before the method builds its model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

BIT_CANDIDATES = (2, 3, 4, 5, 6, 8)
NAMED_SPECS = ("fp", "w4a4", "w6a6", "w8a8", "w4a8", "w5a5", "w3a3")  # w3a3: SARDFQ and MaskAQ report it
_WA = re.compile(r"^w(\d+)a(\d+)$")
_NUM = r"(\d+(?:\.\d+)?)"
_MP = re.compile(rf"^mp{_NUM}$")
_MPWA = re.compile(rf"^mpw{_NUM}a{_NUM}$")


class BitSpecError(ValueError):
    """A bit-spec string that cannot be parsed; the message lists the valid forms."""


@dataclass(frozen=True)
class BitSpec:
    """Bit-widths for one job.

    ``w_bits``/``a_bits`` are the default widths (``None`` = full precision).
    ``mixed`` is the ``(weights, activations)`` budget of an ``mp`` spec: the parameter-weighted
    average weight bits and the element-weighted average activation bits may not exceed it.
    ``layers`` maps module paths to ``(w_bits, a_bits)`` once resolved (for an ``mp`` spec: allocated).
    """

    name: str
    w_bits: int | None
    a_bits: int | None
    mixed: tuple[float, float] | None = None
    layers: dict[str, tuple[int | None, int | None]] = field(default_factory=dict, compare=False)

    @property
    def is_fp(self) -> bool:
        return self.w_bits is None and self.a_bits is None and self.mixed is None

    @property
    def is_mixed(self) -> bool:
        return self.mixed is not None

    @property
    def is_allocated(self) -> bool:
        """A mixed spec whose per-layer map has been allocated (uniform specs: always True)."""
        return not self.is_mixed or bool(self.layers)

    def bits_for(self, layer: str) -> tuple[int | None, int | None]:
        """(w_bits, a_bits) for a module path; falls back to the uniform default."""
        return self.layers.get(layer, (self.w_bits, self.a_bits))

    def resolve(self, layer_names: list[str]) -> BitSpec:
        """Return a copy whose per-layer map covers ``layer_names`` (existing entries win)."""
        layers = {n: self.layers.get(n, (self.w_bits, self.a_bits)) for n in layer_names}
        return replace(self, layers=layers)

    def with_layers(self, layers: dict[str, tuple[int | None, int | None]]) -> BitSpec:
        return replace(self, layers=dict(layers))

    def to_record(self) -> dict:
        return {
            "name": self.name,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "mixed": list(self.mixed) if self.mixed is not None else None,
            "layers": {k: list(v) for k, v in sorted(self.layers.items())},
        }


def parse_bits(text: str) -> BitSpec:
    """Parse ``fp``, ``wXaY`` (X, Y in BIT_CANDIDATES), ``mpN`` or ``mpwXaY`` (budgets between the
    smallest and the largest candidate)."""
    s = text.strip().lower()
    if s == "fp":
        return BitSpec("fp", None, None)
    m = _WA.match(s)
    if m:
        w, a = int(m.group(1)), int(m.group(2))
        bad = [b for b in (w, a) if b not in BIT_CANDIDATES]
        if bad:
            raise BitSpecError(
                f"bit spec {text!r}: bit-width {bad[0]} not supported; use one of {list(BIT_CANDIDATES)}"
            )
        return BitSpec(s, w, a)
    m = _MP.match(s) or _MPWA.match(s)
    if m:
        budget = (float(m.group(1)), float(m.group(m.lastindex)))
        lo, hi = min(BIT_CANDIDATES), max(BIT_CANDIDATES)
        bad = [b for b in budget if not lo <= b <= hi]
        if bad:
            raise BitSpecError(f"bit spec {text!r}: mixed-precision budget {bad[0]:g} outside "
                               f"[{lo}, {hi}] (the candidate bit-widths {list(BIT_CANDIDATES)})")
        return BitSpec(s, None, None, mixed=budget)
    raise BitSpecError(
        f"unknown bit spec {text!r}; valid: {', '.join(NAMED_SPECS)}, wXaY with X,Y in "
        f"{list(BIT_CANDIDATES)}, or mixed precision mpN / mpwXaY (e.g. mp5, mpw4.9a6.2)"
    )
