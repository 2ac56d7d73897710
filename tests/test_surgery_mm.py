"""Surgery of the mmdet / mmseg Swin backbones (methods/quant/surgery_mm.py) on tiny random models."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from methods.quant.bits import parse_bits  # noqa: E402
from methods.quant.modules import MatMul, QuantMatMul, QuantTap, Tap  # noqa: E402
from methods.quant.policy import Policy, Rule, apply_policy, quantizers, set_mode  # noqa: E402
from methods.quant.quantizers import QuantizerSpec  # noqa: E402
from methods.quant.surgery import AttentionRecorder  # noqa: E402
from methods.quant.surgery_mm import attention_modules_mm, is_mm_swin, prepare_mm  # noqa: E402
from tasks.mm import openmmlab  # noqa: E402
from tasks.mm.base import CONFIG_DIR  # noqa: E402

torch.set_num_threads(1)
CONFIGS = {
    "mask-rcnn": ("mini_mask-rcnn_swin_fpn.py", "mmdet"),
    "cascade": ("mini_cascade-mask-rcnn_swin_fpn.py", "mmdet"),
    "upernet": ("mini_upernet_swin.py", "mmseg"),
}


def random_model(kind: str, seed: int = 0):
    openmmlab.quiet_logger()
    cfg_file, scope = CONFIGS[kind]
    cfg = openmmlab.load_config(CONFIG_DIR / cfg_file)
    if scope == "mmdet":  # random heads score below mmdet's 0.05: keep every box so masks run too
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    torch.manual_seed(seed)
    model = openmmlab.build_model(cfg, scope)
    model.init_weights()
    with torch.no_grad():  # random relative-position tables (init is zeros) so the bias matters
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0, 0.5)
    return model.eval(), scope


def images(n: int = 2, h: int = 128, w: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def predict(model, scope: str, x: torch.Tensor):
    """Post-processed predictions as plain tensors (boxes, scores, labels, masks / seg logits)."""
    with torch.no_grad():
        if scope == "mmdet":
            out = model.predict(x, openmmlab.default_det_samples(x), rescale=True)
            return [(o.pred_instances.bboxes, o.pred_instances.scores, o.pred_instances.labels,
                     o.pred_instances.masks) for o in out]
        return model(x)  # tensor mode: decode-head logits


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=0), (a.float() - b.float()).abs().max()
    else:
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same(u, v)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_prepared_model_matches_unmodified(kind):
    model, scope = random_model(kind)
    ref = copy.deepcopy(model)
    x = images()
    expected = predict(ref, scope, x)
    if scope == "mmdet":
        assert sum(len(e[0]) for e in expected) > 0  # the comparison covers real detections and masks
    prepare_mm(model)
    assert is_mm_swin(model.backbone)
    assert len(attention_modules_mm(model)) == 6  # depths (2, 2, 2)
    assert_same(predict(model, scope, x), expected)

    # every site of the whole model quantized (linear/conv weights, inputs, outputs, both matmul
    # operands, every tap) but switched off: still the same function
    spec = QuantizerSpec(kind="uniform", range="minmax")
    everything = Policy("all-sites", [Rule(kind=k, weight=spec if k in ("linear", "conv") else None, act=spec,
                                           out=spec if k in ("linear", "conv") else None)
                                      for k in ("linear", "conv", "matmul", "tap")])
    apply_policy(model, everything, parse_bits("w4a4"))
    assert isinstance(model.backbone.stages[1].blocks[1].attn.w_msa.matmul2, QuantMatMul)
    assert isinstance(model.backbone.stages[1].blocks[1].tap_res2, QuantTap)
    assert quantizers(model)
    set_mode(model, "off")
    assert_same(predict(model, scope, x), expected)


def test_prepare_is_idempotent_picklable_and_recordable():
    model, _ = random_model("upernet")
    prepare_mm(model)
    names = [n for n, _ in model.named_modules()]
    prepare_mm(model)
    assert [n for n, _ in model.named_modules()] == names
    clone = pickle.loads(pickle.dumps(model))
    x = images(1)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    attn = model.backbone.stages[0].blocks[1].attn.w_msa
    assert isinstance(attn.matmul1, MatMul) and attn.matmul1.role == "qk"
    assert isinstance(attn.matmul2, MatMul) and attn.matmul2.role == "av"
    assert attn.tap_scores.role == "scores" and attn.tap_probs.role == "probs"
    block = model.backbone.stages[0].blocks[1]
    assert isinstance(block.tap_res1, Tap) and block.tap_res2.role == "res2"


def test_shift_mask_bias_and_padding_reach_the_scores():
    """Shifted windows on a map that needs padding: the -100 mask and the bias are in the scores,
    probabilities are the softmax of the scores, and the av output feeds the projection."""
    model, _ = random_model("mask-rcnn")
    ref = copy.deepcopy(model.backbone)
    bb = prepare_mm(model.backbone)
    x = images(1, 72, 88)  # 18x22 tokens: windows of 4 need padding at every stage
    seen = {}

    def keep(name):
        def hook(_m, _args, out):
            seen[name] = out
        return hook

    w_plain = bb.stages[0].blocks[0].attn.w_msa
    w_shift = bb.stages[0].blocks[1].attn.w_msa
    handles = [w_shift.tap_scores.register_forward_hook(keep("scores")),
               w_shift.tap_probs.register_forward_hook(keep("probs")),
               w_plain.tap_scores.register_forward_hook(keep("plain"))]
    with AttentionRecorder(bb, roles=("qk", "av"), keep_inputs=True) as rec, torch.no_grad():
        out = bb(x)
        assert len(rec.outputs["av"]) == 6 and all(o is not None for o in rec.outputs["av"])
        q_scaled, k_t = rec.inputs["qk"][1]
        av = rec.outputs["av"][1]
    for h in handles:
        h.remove()
    with torch.no_grad():
        expected = ref(x)
    assert_same(list(out), list(expected))
    n = w_shift.window_size[0] * w_shift.window_size[1]
    assert seen["scores"].shape[-2:] == (n, n)
    assert av.shape[-2:] == (n, w_shift.embed_dims // w_shift.num_heads)
    assert seen["scores"].min() < -50  # shift mask present (-100 between different regions)
    assert seen["plain"].min() > -50  # no mask in the unshifted block
    assert torch.allclose(seen["probs"], seen["scores"].softmax(-1), atol=1e-6)
    raw = q_scaled @ k_t
    bias = seen["scores"] - raw  # what follows q·k: relative-position bias (+ mask)
    assert bias.abs().max() > 0
