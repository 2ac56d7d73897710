"""Surgery on timm ViT / DeiT / Swin: same function as the unmodified model, explicit matmuls and taps."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch

from methods.quant.bits import parse_bits
from methods.quant.modules import QuantMatMul, Tap
from methods.quant.policy import apply_policy, calibrate, set_mode, uniform_policy
from methods.quant.quantizers import QuantizerSpec
from methods.quant.surgery import (
    AttentionRecorder,
    PreparedAttention,
    PreparedSwinBlock,
    PreparedWindowAttention,
    attention_modules,
    prepare,
)

SMALL_SWIN = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4))
CASES = [
    # (timm name, kwargs, image size, batch)
    ("deit_tiny_patch16_224", {}, 224, 2),
    ("vit_small_patch16_224", {}, 224, 1),
    ("swin_tiny_patch4_window7_224", {}, 224, 1),
    ("swin_tiny_patch4_window7_224", SMALL_SWIN, 64, 2),  # shifted windows with the mask, 2 stages
    ("swin_tiny_patch4_window7_224", dict(SMALL_SWIN, img_size=56), 56, 2),  # 14x14 grid: padded windows
    ("deit_tiny_distilled_patch16_224", dict(img_size=64), 64, 2),
]


def _model(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize("name, kwargs, size, batch", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_prepared_matches_fp(name, kwargs, size, batch):
    fp = _model(name, kwargs)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp(x)
        model = prepare(copy.deepcopy(fp))
        out = model(x)
        assert (out - ref).abs().max().item() < 1e-5
        # quantizers present but off: still the same function
        policy = uniform_policy("w8a8", QuantizerSpec(symmetric=True, per_channel=True), QuantizerSpec())
        apply_policy(model, policy, parse_bits("w8a8"))
        set_mode(model, "off")
        assert (model(x) - ref).abs().max().item() < 1e-5

    attns = attention_modules(model)
    assert len(attns) == sum(1 for m in fp.modules() if type(m).__name__ in ("Attention", "WindowAttention"))
    for _, attn in attns:
        assert not attn.fused_attn and attn.num_heads > 0
        assert attn.matmul1.role == "qk" and attn.matmul2.role == "av"
        assert attn.tap_scores.role == "scores" and attn.tap_probs.role == "probs"
    if "swin" in name:
        assert all(hasattr(a, "window_size") for _, a in attns)
        assert not hasattr(model, "tap_pos")
    else:
        assert model.tap_pos.role == "pos"
        assert all(b.tap_res1.role == "res1" and b.tap_res2.role == "res2" for b in model.blocks)


def test_prepare_is_idempotent_and_picklable():
    model = prepare(_model("swin_tiny_patch4_window7_224", SMALL_SWIN))
    names = [n for n, _ in model.named_modules()]
    assert prepare(model) is model
    assert [n for n, _ in model.named_modules()] == names
    x = torch.randn(1, 3, 64, 64)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_vit_attention_internals_and_recorder():
    model = prepare(_model("deit_tiny_patch16_224", dict(img_size=32, patch_size=8)))
    x = torch.randn(2, 3, 32, 32)
    probs, scores = [], []
    attn0 = model.blocks[0].attn
    attn0.tap_probs.register_forward_hook(lambda m, a, o: probs.append(o))
    attn0.tap_scores.register_forward_hook(lambda m, a, o: scores.append(o))
    with AttentionRecorder(model, roles=("qk", "av"), keep_inputs=True) as rec:
        out = model(x)
    assert len(rec.outputs["av"]) == 12 and len(rec.outputs["qk"]) == 12
    qk, av = rec.outputs["qk"][0], rec.outputs["av"][0]
    assert av.shape == (2, 3, 17, 64) and qk.shape == (2, 3, 17, 17)  # (B, H, N, d) and (B, H, N, N)
    q, kt = rec.inputs["qk"][0]
    assert torch.allclose(qk, q @ kt)  # raw product: the scale comes after
    assert torch.allclose(scores[0], qk * attn0.scale)
    assert torch.allclose(probs[0], scores[0].softmax(-1))
    a, v = rec.inputs["av"][0]
    assert a is probs[0] and torch.allclose(av, a @ v)
    # the recorded outputs keep their graph (usable in losses)
    av.pow(2).mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert out.shape == (2, 1000)
    # hooks removed on exit; clear() empties the slots
    rec.clear()
    model(x)
    assert rec.outputs["av"] == [None] * 12


def test_swin_scores_include_bias_but_not_shift_mask():
    # PSAQ-ViT quantizes score + relative-position bias; the -100 shift mask is added afterwards.
    model = prepare(_model("swin_tiny_patch4_window7_224", SMALL_SWIN))
    blocks = [m for m in model.modules() if isinstance(m, PreparedSwinBlock)]
    shifted = [b for b in blocks if any(b.shift_size)]
    assert shifted and all(b.attn_mask is not None for b in shifted)
    seen: dict[int, torch.Tensor] = {}
    for i, b in enumerate(blocks):
        b.attn.tap_scores.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
    x = torch.randn(2, 3, 64, 64)
    with AttentionRecorder(model, roles=("qk",)) as rec, torch.no_grad():
        model(x)
    for i, b in enumerate(blocks):
        attn = b.attn
        assert isinstance(attn, PreparedWindowAttention)
        expected = rec.outputs["qk"][i] + attn._get_rel_pos_bias()  # q pre-scaled inside matmul1
        assert torch.allclose(seen[i], expected)
    assert not any((s < -50).any() for s in seen.values())


def test_residual_taps_are_the_block_sums():
    model = prepare(_model("swin_tiny_patch4_window7_224", SMALL_SWIN))
    blk = next(m for m in model.modules() if isinstance(m, PreparedSwinBlock))
    got = {}
    blk.tap_res2.register_forward_hook(lambda m, a, o: got.__setitem__("res2", o))
    blk.register_forward_hook(lambda m, a, o: got.__setitem__("out", o))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert torch.equal(got["res2"].reshape(got["out"].shape), got["out"])


def test_quantized_matmuls_are_still_recorded():
    model = prepare(_model("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)))
    apply_policy(model, uniform_policy("a8", None, QuantizerSpec(), kinds=("matmul",)), parse_bits("w8a8"))
    x = torch.randn(2, 3, 32, 32)
    calibrate(model, [x])
    with AttentionRecorder(model) as rec, torch.no_grad():
        model(x)
    assert isinstance(model.blocks[0].attn.matmul2, QuantMatMul)
    assert len(rec.outputs["av"]) == 2 and all(o is not None for o in rec.outputs["av"])
    assert isinstance(model.blocks[0].attn.tap_probs, Tap)
    assert isinstance(model.blocks[0].attn, PreparedAttention)


def test_prepared_gradients_match_fp():
    fp = _model("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    model = prepare(copy.deepcopy(fp))
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for m in (fp, model):
        xi = x.clone().requires_grad_()
        m(xi).pow(2).sum().backward()
        grads.append((xi.grad, m.blocks[0].attn.qkv.weight.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)
