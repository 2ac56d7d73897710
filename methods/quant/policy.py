"""Quantization policies (data), applying them to a prepared model, calibration and size accounting.

A :class:`Policy` is an ordered list of :class:`Rule`; for every candidate site (each nn.Linear,
nn.Conv2d, MatMul and Tap below the quantized module, in module order) the first rule of the
site's kind whose ``names`` match, ``exclude`` does not, and ``roles`` contain the site's role wins.
Paths are relative to the module passed to :func:`apply_policy` and matched with ``fnmatchcase``
(``*`` also crosses dots). The policy serialises to a plain dict for the result record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from methods.quant.bits import BitSpec
from methods.quant.modules import MatMul, QuantConv2d, QuantLinear, QuantMatMul, QuantTap, Tap
from methods.quant.quantizers import MODES, FakeQuantizer, QuantizerSpec, make_quantizer

RULE_KINDS = ("linear", "conv", "matmul", "tap")
_SPEC_FIELDS = ("weight", "act", "act_b", "out")


@dataclass
class Rule:
    """Which sites to quantize and how.

    ``weight``: weight quantizer (linear/conv). ``act``: input of linear/conv, both operands of a
    matmul, the value of a tap. ``act_b`` (addition): second matmul operand when it should differ
    from ``act`` (e.g. uniform ``v`` with log2 ``attn`` in ``matmul2``). ``out``: output of
    linear/conv. ``*_bits_override`` force this rule's sites to fixed bit-widths (e.g. an 8-bit head);
    they win over both the default and the per-layer entries of the BitSpec.
    """

    kind: str
    names: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    weight: QuantizerSpec | None = None
    act: QuantizerSpec | None = None
    out: QuantizerSpec | None = None
    a_bits_override: int | None = None
    w_bits_override: int | None = None
    act_b: QuantizerSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"Rule.kind {self.kind!r} not in {RULE_KINDS}")
        if isinstance(self.names, str) or isinstance(self.exclude, str) or isinstance(self.roles, str):
            raise TypeError("Rule.names / exclude / roles are tuples of strings, not a string")
        self.names, self.exclude, self.roles = tuple(self.names), tuple(self.exclude), tuple(self.roles)
        if self.kind in ("matmul", "tap") and (self.weight is not None or self.out is not None):
            raise ValueError(f"a {self.kind} rule takes only act (and act_b for matmuls)")
        if self.kind != "matmul" and self.act_b is not None:
            raise ValueError("act_b applies to matmul rules only")

    def matches(self, kind: str, path: str, role: str | None) -> bool:
        if kind != self.kind or (self.roles and role not in self.roles):
            return False
        if not any(fnmatchcase(path, p) for p in self.names):
            return False
        return not any(fnmatchcase(path, p) for p in self.exclude)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "names": list(self.names),
            "exclude": list(self.exclude),
            "roles": list(self.roles),
            "a_bits_override": self.a_bits_override,
            "w_bits_override": self.w_bits_override,
        }
        for f in _SPEC_FIELDS:
            spec = getattr(self, f)
            d[f] = spec.to_dict() if spec is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        kw = dict(d)
        for f in _SPEC_FIELDS:
            if kw.get(f) is not None:
                kw[f] = QuantizerSpec.from_dict(kw[f])
        for f in ("names", "exclude", "roles"):
            if f in kw:
                kw[f] = tuple(kw[f])
        return cls(**kw)


@dataclass
class Policy:
    name: str
    rules: list[Rule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        return cls(d["name"], [Rule.from_dict(r) for r in d.get("rules", [])])

    def rule_for(self, kind: str, path: str, role: str | None = None) -> Rule | None:
        return next((r for r in self.rules if r.matches(kind, path, role)), None)


def uniform_policy(
    name: str,
    weight: QuantizerSpec | None,
    act: QuantizerSpec | None,
    kinds: tuple[str, ...] = ("linear", "conv", "matmul"),
) -> Policy:
    """One rule per kind: ``weight`` on linear/conv weights, ``act`` on all their inputs and on
    both operands of every matmul (a common W/A baseline)."""
    rules = []
    for k in kinds:
        if k in ("linear", "conv"):
            rules.append(Rule(k, weight=weight, act=act))
        else:
            rules.append(Rule(k, act=act))
    return Policy(name, rules)


def site_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, MatMul):
        return "matmul"
    if isinstance(m, Tap):
        return "tap"
    return None


def _q(spec: QuantizerSpec | None, bits: int | None) -> FakeQuantizer | None:
    return make_quantizer(spec, bits) if spec is not None and bits is not None else None


def apply_policy(module: nn.Module, policy: Policy, bits: BitSpec) -> BitSpec:
    """Swap matching sites of ``module`` (in place) for Quant* modules; return ``bits`` resolved to
    exactly the quantized sites: path -> (w_bits or None, a_bits or None) as they ran."""
    layers: dict[str, tuple[int | None, int | None]] = {}
    if bits.is_fp:
        return bits.with_layers(layers)
    device = next(module.parameters(), torch.empty(0)).device
    for path, m in list(module.named_modules()):
        kind = site_kind(m) if path else None
        rule = policy.rule_for(kind, path, getattr(m, "role", None)) if kind else None
        if rule is None:
            continue
        w_bits, a_bits = bits.bits_for(path)
        w_bits = rule.w_bits_override if rule.w_bits_override is not None else w_bits
        a_bits = rule.a_bits_override if rule.a_bits_override is not None else a_bits
        if kind in ("linear", "conv"):
            wq, aq, oq = _q(rule.weight, w_bits), _q(rule.act, a_bits), _q(rule.out, a_bits)
            if wq is None and aq is None and oq is None:
                continue
            cls = QuantLinear if kind == "linear" else QuantConv2d
            new = cls.from_float(m, wq, aq, oq)
            has_act = aq is not None or oq is not None
            used = (w_bits if wq is not None else None, a_bits if has_act else None)
        elif kind == "matmul":
            aq, bq = _q(rule.act, a_bits), _q(rule.act_b or rule.act, a_bits)
            if aq is None and bq is None:
                continue
            new, used = QuantMatMul.from_float(m, aq, bq), (None, a_bits)
        else:
            q = _q(rule.act, a_bits)
            if q is None:
                continue
            new, used = QuantTap.from_float(m, q), (None, a_bits)
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, child, new.to(device))
        layers[path] = used
    return bits.with_layers(layers)


def named_quantizers(module: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, FakeQuantizer)]


def quantizers(module: nn.Module) -> list[FakeQuantizer]:
    """All fake quantizers below ``module`` (module order); see named_quantizers for paths."""
    return [m for _, m in named_quantizers(module)]


def set_mode(module: nn.Module, mode: str) -> None:
    """Set every quantizer's mode ("off" | "calibrate" | "quant")."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {MODES}")
    for q in quantizers(module):
        q.set_mode(mode)


@torch.no_grad()
def calibrate(
    module: nn.Module,
    batches: Iterable[torch.Tensor],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    weights_quantized: bool = False,
) -> None:
    """Calibrate every quantizer (with bits) below ``module`` from one pass over ``batches``.

    ``forward(module, batch)`` runs the model (like ``QuantTarget.logits``), default ``module(batch)``.
    Calibration mode is identity, so by default the pass is full precision (PSAQ-ViT V1);
    ``weights_quantized=True`` initialises weight quantizers first and keeps them quantizing, so
    activation ranges see quantized weights. Quantizers that were "off" stay off (but calibrated).
    """
    qs = [q for q in quantizers(module) if q.bits is not None]
    was_off = {id(q) for q in qs if q.mode == "off"}
    for q in qs:
        if weights_quantized and q.is_weight:
            q.mode = "quant"  # lazy init from the weight on first use
        else:
            q.start_calibration()
    run = forward if forward is not None else lambda m, b: m(b)
    for batch in batches:
        run(module, batch)
    for q in qs:
        if q.mode == "calibrate":
            q.finish_calibration()
        if id(q) in was_off:
            q.mode = "off"


def freeze(module: nn.Module) -> None:
    """Cache fake-quantized weights of every QuantLinear / QuantConv2d (see modules.py)."""
    for m in module.modules():
        if isinstance(m, QuantLinear | QuantConv2d):
            m.freeze()


def unfreeze(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, QuantLinear | QuantConv2d):
            m.unfreeze()


def model_size_bits(module: nn.Module, bits: BitSpec) -> int:
    """Model size in bits: weights of quantized layers at their w_bits, every other parameter and
    persistent buffer (the state_dict, each tensor counted once) at 32 bits. Quantizer parameters
    (scales, zero-points, LSQ steps) are not counted, as in the papers' size columns; derived
    non-persistent buffers (e.g. Swin's relative index and shift mask) are not counted either.
    A layer's w_bits come from ``bits.layers`` (paths relative to ``module``), else from its quantizer.
    """
    wbits: dict[int, int] = {}
    skip: set[int] = set()
    for path, m in module.named_modules():
        if isinstance(m, FakeQuantizer):
            skip.update(id(t) for t in list(m.parameters()) + list(m.buffers()))
        if isinstance(m, QuantLinear | QuantConv2d):
            if path in bits.layers:
                wb = bits.layers[path][0]
            else:
                wq = m.w_quant
                wb = wq.bits if isinstance(wq, FakeQuantizer) and wq.mode != "off" else None
            if wb is not None:
                wbits[id(m.weight)] = wb
    total, seen = 0, set()
    for t in module.state_dict(keep_vars=True).values():
        if id(t) in seen or id(t) in skip:
            continue
        seen.add(id(t))
        total += t.numel() * wbits.get(id(t), 32)
    return total
