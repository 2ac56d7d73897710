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

Forward = Callable[[nn.Module, Tensor], Any]


class _Stop(Exception):
    """Raised by a hook once the wanted block input/output is captured: the rest is not run."""


@torch.no_grad()
def capture(model: nn.Module, block: nn.Module, images: Tensor, forward: Forward,
            output: bool = False) -> Tensor:
    """The first positional input (or the output) of ``block`` when ``forward(model, images)`` runs."""
    seen: list[Tensor] = []

    def pre(_m, args):
        seen.append(args[0].detach())
        raise _Stop

    def post(_m, _args, out):
        seen.append(out.detach())
        raise _Stop

    handle = block.register_forward_hook(post) if output else block.register_forward_pre_hook(pre)
    try:
        forward(model, images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("capture: the block did not run in this forward")
    return seen[0]


def block_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the Linear / Conv layers in ``block`` (the reconstruction's variables)."""
    out = []
    for m in block.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            out += [p for p in (m.weight, m.bias) if p is not None]
    return out


def reconstruct_blocks(fp_model: nn.Module, q_model: nn.Module, names: Sequence[str], images: Tensor,
                       forward: Forward, iterations: int, lr: float = 4e-5,
                       progress: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Reconstruct the blocks ``names`` (module paths, valid in both models) in order; returns per block
    the output MSE before and after. The FP model is never changed."""
    history = []
    for name in names:
        fp_block, q_block = fp_model.get_submodule(name), q_model.get_submodule(name)
        x = capture(q_model, q_block, images, forward)
        target = capture(fp_model, fp_block, images, forward, output=True)
        params = block_parameters(q_block)
        requires = {id(p): p.requires_grad for p in q_block.parameters()}
        for p in q_block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))
        with torch.no_grad():
            first = float((q_block(x) - target).pow(2).mean())
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            loss = (q_block(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            sched.step()
        for p in q_block.parameters():
            p.requires_grad_(requires[id(p)])
        with torch.no_grad():
            last = float((q_block(x) - target).pow(2).mean())
        history.append({"block": name, "mse_before": first, "mse_after": last})
        if progress is not None:
            progress(f"reconstruct {name}: mse {first:.5f} -> {last:.5f}")
    return history


__all__ = ["capture", "block_parameters", "reconstruct_blocks"]
