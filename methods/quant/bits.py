"""Bit-width specifications: ``w4a4``-style strings parsed into a per-layer bit map.

A :class:`BitSpec` starts uniform (one weight and one activation bit-width) and is
*resolved* against a prepared model: the result maps every quantized layer (module
path) to its ``(w_bits, a_bits)`` so each result record stores exactly what ran.
Mixed precision (``mpN``) is parsed here; its allocation is done elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

BIT_CANDIDATES = (2, 3, 4, 5, 6, 8)
NAMED_SPECS = ("fp", "w4a4", "w6a6", "w8a8", "w4a8", "w5a5", "w3a3")  # w3a3: SARDFQ and MaskAQ report it
_WA = re.compile(r"^w(\d+)a(\d+)$")
_MP = re.compile(r"^mp(\d+)$")


class BitSpecError(ValueError):
    """A bit-spec string that cannot be parsed; the message lists the valid forms."""


@dataclass(frozen=True)
class BitSpec:
    """Bit-widths for one job.

    ``w_bits``/``a_bits`` are the default widths (``None`` = full precision).
    ``mixed`` is the target average for ``mpN`` specs. ``layers`` maps module
    paths to ``(w_bits, a_bits)`` once resolved.
    """

    name: str
    w_bits: int | None
    a_bits: int | None
    mixed: float | None = None
    layers: dict[str, tuple[int | None, int | None]] = field(default_factory=dict, compare=False)

    @property
    def is_fp(self) -> bool:
        return self.w_bits is None and self.a_bits is None and self.mixed is None

    @property
    def is_mixed(self) -> bool:
        return self.mixed is not None

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
            "mixed": self.mixed,
            "layers": {k: list(v) for k, v in sorted(self.layers.items())},
        }


def parse_bits(text: str) -> BitSpec:
    """Parse ``fp`` or ``wXaY`` (X, Y in BIT_CANDIDATES)."""
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
    if _MP.match(s):
        # The harness's generic mixed-precision allocator is not built yet.
        raise BitSpecError(f"bit spec {text!r}: mixed precision (mpN) is not available yet; use wXaY")
    raise BitSpecError(
        f"unknown bit spec {text!r}; valid: {', '.join(NAMED_SPECS)}, or wXaY with X,Y in "
        f"{list(BIT_CANDIDATES)}"
    )
