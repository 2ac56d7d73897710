"""Block-wise reconstruction on a tiny ViT: inputs from the quantized model, targets from the FP one."""

from __future__ import annotations

import copy

import torch
from tiny import SPEC, tiny_vit

from methods.baselines import minmax_policy
from methods.quant.bits import parse_bits
from methods.quant.policy import apply_policy, calibrate, freeze
from methods.quant.reconstruct import block_parameters, capture, reconstruct_blocks


def forward(model, x):
    return model(x)


def _quantized(model, images):
    q = copy.deepcopy(model)
    apply_policy(q, minmax_policy(), parse_bits("w4a4"))
    calibrate(q, [images], forward=forward)
    freeze(q)
    return q


def test_capture_gives_the_block_input_and_output():
    model = tiny_vit()
    x = torch.randn(SPEC.shape(4), generator=torch.Generator().manual_seed(0))
    out0 = capture(model, model.blocks[0], x, forward, output=True)
    in1 = capture(model, model.blocks[1], x, forward)
    torch.testing.assert_close(in1, out0)  # block 1 reads block 0's output
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        torch.testing.assert_close(out0, model.blocks[0](model.norm_pre(model.patch_drop(tokens))))


def test_reconstruction_lowers_each_blocks_error_and_leaves_fp_alone():
    model = tiny_vit()
    images = torch.randn(SPEC.shape(16), generator=torch.Generator().manual_seed(1))
    q = _quantized(model, images)
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    ln_before = q.blocks[0].norm1.weight.detach().clone()
    one = reconstruct_blocks(model, copy.deepcopy(q), ["blocks.0"], images, forward, iterations=1, lr=1e-3)
    assert one[0]["mse_after"] < one[0]["mse_before"]  # one step already lowers the block's error
    flags = [p.requires_grad for p in q.parameters()]
    hist = reconstruct_blocks(model, q, ["blocks.0", "blocks.1"], images, forward, iterations=30, lr=1e-3)
    for row in hist:
        assert row["mse_after"] < row["mse_before"], row
    # block 1 was fitted on what the reconstructed block 0 feeds it: the whole quantized model's block-1
    # output is exactly where the record says
    with torch.no_grad():
        out_q = capture(q, q.blocks[1], images, forward, output=True)
        out_fp = capture(model, model.blocks[1], images, forward, output=True)
    assert float((out_q - out_fp).pow(2).mean()) == hist[1]["mse_after"]
    assert all(torch.equal(v, fp_state[k]) for k, v in model.state_dict().items())
    assert torch.equal(q.blocks[0].norm1.weight, ln_before)  # LayerNorm affine frozen
    assert len(block_parameters(q.blocks[0])) == 8  # qkv, proj, fc1, fc2: weight + bias each
    assert [p.requires_grad for p in q.parameters()] == flags  # trainable flags restored


def test_a_block_not_run_or_without_a_tensor_output_is_skipped_and_says_so():
    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return ({"a": self.lin(x)},)  # nested: no tensor to fit

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.tail = torch.nn.Linear(4, 4), Pair()

        def forward(self, x):
            return self.tail(self.body(x))

    fp, q = Net(), Net()
    fp.spare, q.spare = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)  # never called by forward
    history = reconstruct_blocks(fp, q, ["body", "tail", "spare"], torch.randn(3, 4), lambda m, x: m(x),
                                 iterations=2)
    assert history[0]["mse_after"] <= history[0]["mse_before"]
    assert history[1] == {"block": "tail", "skipped": "output is a dict, not a tensor"}
    assert history[2] == {"block": "spare", "skipped": "not run by the forward"}
