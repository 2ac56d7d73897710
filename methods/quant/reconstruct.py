"""Block-wise reconstruction: fit each quantized block's output to its FP counterpart, block by block.

For block l (in the given order): its input is what the *quantized* model feeds it (the already
reconstructed blocks before it included), its target the FP block's output in the FP model on the
same images; minimise the MSE over the block's Linear/Conv weights and biases (LayerNorm affine and
quantizer parameters frozen) with Adam and a cosine schedule. This is the Stage B of SPDFQ/SARDFQ as
the paper describes it (Adam 4e-5, cosine), on I&S-ViT's input convention (reconstructed: no code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from methods.quant.modules import QuantConv2d, QuantLinear

Forward = Callable[[nn.Module, Tensor], Any]


class _Stop(Exception):
    """Raised by a hook once the wanted block input/output is captured: the rest is not run."""


class BlockNotRun(RuntimeError):
    """The block was not called by the forward (e.g. a detection head outside the tensor-mode path)."""


@torch.no_grad()
def capture_call(model: nn.Module, block: nn.Module, images: Tensor, forward: Forward) -> tuple[tuple, Any]:
    """The positional arguments of ``block`` (tensors detached; e.g. mmdet Swin's ``(x, hw_shape)``) and
    its output, when ``forward(model, images)`` runs; the rest of the forward is not run."""
    seen: list[tuple[tuple, Any]] = []

    def post(_m, args, out):
        seen.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), _detach(out)))
        raise _Stop

    handle = block.register_forward_hook(post)
    try:
        forward(model, images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise BlockNotRun("capture: the block did not run in this forward")
    return seen[0]


def capture(model: nn.Module, block: nn.Module, images: Tensor, forward: Forward,
            output: bool = False) -> Tensor:
    """The first positional input (or the main output) of ``block`` when ``forward(model, images)`` runs."""
    args, out = capture_call(model, block, images, forward)
    return main_output(out) if output else args[0]


def main_output(out: Any) -> Tensor:
    """A block's main tensor: the output itself, or the first element of a tuple such as mmdet's
    ``(x, hw_shape)`` from PatchEmbed / PatchMerging."""
    return out[0] if isinstance(out, tuple | list) else out


def flatten_output(out: Any) -> Tensor:
    """A model output (tensor, or nested tuples / lists / dicts of tensors) as one flat tensor."""
    if isinstance(out, Tensor):
        return out.reshape(-1)
    items = out.values() if isinstance(out, dict) else out
    return torch.cat([flatten_output(o) for o in items])


def block_units(module: nn.Module) -> list[str]:
    """The modules treated one after another, in module (= execution) order: the patch embedding,
    every transformer block and patch merging, and any other direct child holding quantized layers
    (the classification heads). Block reconstruction fits them in turn; the mixed-precision
    allocator caches their outputs."""
    def is_unit(m: nn.Module) -> bool:
        name = type(m).__name__
        return name.endswith("Block") or name in ("PatchEmbed", "PatchMerging")

    def has_quant(m: nn.Module) -> bool:
        return any(isinstance(s, QuantLinear | QuantConv2d) for s in m.modules())

    units = [p for p, m in module.named_modules() if p and is_unit(m) and has_quant(m)]
    for name, child in module.named_children():
        covered = any(u == name or u.startswith(name + ".") for u in units)
        if not covered and has_quant(child):
            units.append(name)
    order = {p: i for i, (p, _) in enumerate(module.named_modules())}
    return sorted(units, key=order.__getitem__)


def _detach(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, tuple | list):
        return type(out)(_detach(o) for o in out)
    return out


def block_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the Linear / Conv layers in ``block`` (the reconstruction's variables)."""
    out = []
    for m in block.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            out += [p for p in (m.weight, m.bias) if p is not None]
    return out


def _fit(block: nn.Module, args: tuple, target: Tensor, iterations: int, lr: float) -> tuple[float, float]:
    """Adam + cosine on the block's Linear/Conv weights and biases (everything else frozen meanwhile);
    returns the output MSE before and after."""
    params = block_parameters(block)
    requires = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))

    def error() -> Tensor:
        return (main_output(block(*args)) - target).pow(2).mean()

    with torch.no_grad():
        first = float(error())
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        loss = error()
        loss.backward()
        opt.step()
        sched.step()
    for p in block.parameters():
        p.requires_grad_(requires[id(p)])
    with torch.no_grad():
        last = float(error())
    return first, last


def reconstruct_blocks(fp_model: nn.Module, q_model: nn.Module, names: Sequence[str], images: Tensor,
                       forward: Forward, iterations: int, lr: float = 4e-5,
                       progress: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Reconstruct the blocks ``names`` (module paths, valid in both models) in order; returns per block
    the output MSE before and after (a block the forward does not run, or whose main output is not a
    tensor, is skipped, and says so). The FP model is never changed."""
    history = []
    for name in names:
        fp_block, q_block = fp_model.get_submodule(name), q_model.get_submodule(name)
        try:
            args, _ = capture_call(q_model, q_block, images, forward)
        except BlockNotRun:
            history.append({"block": name, "skipped": "not run by the forward"})
            continue
        target = capture(fp_model, fp_block, images, forward, output=True)
        if not isinstance(target, Tensor):  # e.g. a detection head's nested outputs: no block MSE
            history.append({"block": name, "skipped": f"output is a {type(target).__name__}, not a tensor"})
            continue
        first, last = _fit(q_block, args, target, iterations, lr)
        history.append({"block": name, "mse_before": first, "mse_after": last})
        if progress is not None:
            progress(f"reconstruct {name}: mse {first:.5f} -> {last:.5f}")
    return history


__all__ = [
    "BlockNotRun", "capture", "capture_call", "main_output", "flatten_output", "block_units",
    "block_parameters", "reconstruct_blocks",
]
