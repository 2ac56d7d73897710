"""The classification task: metrics on known logits, the vendored mini data, the committed mini
checkpoints, and the full (ImageFolder + --weights) path on a tiny on-disk ImageNet stand-in."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config
from torch import nn

from methods.quant.registry import UnknownName
from methods.quant.surgery import attention_modules
from tasks.base import TaskError, get_task
from tasks.cls import FULL_MODELS, MINI_MODELS, ClassificationTask, topk_correct
from tasks.mini.fashion import load_mini

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task() -> ClassificationTask:
    return ClassificationTask()


@pytest.fixture(scope="module")
def vit(task):
    """The handle of the committed mini-vit (plain 28x28 inputs)."""
    return task.load("mini-vit", "mini")


def _max_nearest(x: torch.Tensor, refs: torch.Tensor) -> float:
    """Largest (over x) max-abs difference to the nearest row of refs (0 = every x is in refs)."""
    diff = (x.flatten(1)[:, None] - refs.flatten(1)[None]).abs().amax(dim=2)
    return float(diff.min(dim=1).values.max())


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------- metrics


def test_topk_correct_hand_computed():
    logits = torch.tensor([
        [0.1, 0.9, 0.0, 0.3, 0.2, 0.5, 0.4],  # target 1 ranked 1st
        [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.4],  # target 1 ranked 7th (last)
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 2 ranked 5th
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 1 ranked 6th
    ])
    targets = torch.tensor([1, 1, 2, 1])
    assert topk_correct(logits, targets) == {1: 1, 5: 2}
    # fewer classes than k: top-5 of 3 classes counts everything
    assert topk_correct(torch.eye(3), torch.tensor([0, 1, 0])) == {1: 2, 5: 3}


class RankedLogits(nn.Module):
    """Outputs constructed logits for the mini eval set, in evaluation order: the true class of image
    i gets rank RANKS[i % 4] (0 = highest)."""

    RANKS = (0, 3, 7, 9)

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        rows = []
        for i, y in enumerate(labels):
            order = [c for c in range(10) if c != y]
            order.insert(self.RANKS[i % 4], int(y))
            row = torch.empty(10)
            row[order] = torch.arange(10, 0, -1, dtype=torch.float)  # descending scores
            rows.append(row)
        self.table = torch.stack(rows)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (1, 28, 28)
        out = self.table[self.seen: self.seen + len(x)]
        self.seen += len(x)
        return out


def test_evaluate_on_constructed_logits(task, vit):
    labels = load_mini()["eval"].labels
    model = RankedLogits(labels)
    metrics = task.evaluate(vit, model, "cpu")  # mini-vit's handle: plain 28x28 images
    assert model.seen == 2000
    # ranks 0,3,7,9 in equal shares: top-1 hits 1/4, top-5 hits 2/4
    assert metrics == {"top1": pytest.approx(25.0), "top5": pytest.approx(50.0)}


# ----------------------------------------------------------------------------- mini data


def test_mini_subsets_sizes_and_disjoint(task, vit):
    sub = load_mini()
    ev, cal = sub["eval"], sub["calib"]
    assert ev.images.shape == (2000, 28, 28) and ev.images.dtype == np.uint8
    assert cal.images.shape == (512, 28, 28) and cal.images.dtype == np.uint8
    assert np.bincount(ev.labels, minlength=10).tolist() == [200] * 10
    assert (ev.split, cal.split) == ("t10k", "train")
    assert len(set(ev.source_index)) == 2000 and len(set(cal.source_index)) == 512
    eval_hashes = {hashlib.sha1(im.tobytes()).digest() for im in ev.images}
    assert not any(hashlib.sha1(im.tobytes()).digest() in eval_hashes for im in cal.images)
    info = task.dataset_info(vit)
    assert (info["eval_images"], info["calib_pool"]) == (2000, 512)


def test_mini_calibration_seeded_from_pool(task, vit):
    a = task.calibration(vit, 16, seed=0)
    assert a.shape == (16, 1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, task.calibration(vit, 16, seed=0))
    assert not torch.equal(a, task.calibration(vit, 16, seed=1))
    pool = torch.from_numpy(load_mini()["calib"].images).float().div(255).sub(0.2860).div(0.3530)
    assert _max_nearest(a, pool) < 1e-5  # every image comes from the calibration pool
    with pytest.raises(TaskError):
        task.calibration(vit, 513, seed=0)


def test_models_lists(task):
    assert task.models("mini") == ["mini-vit", "mini-deit", "mini-swin"]
    assert task.models("full") == list(FULL_MODELS) and "swin_tiny_patch4_window7_224" in FULL_MODELS
    assert get_task("cls").primary_metric == "top1"
    with pytest.raises(TaskError):
        task.models("imagenet")


@pytest.mark.parametrize("name", list(MINI_MODELS))
def test_committed_mini_model_reaches_85(task, name):
    handle = task.load(name, "mini")
    target = handle.target
    assert (handle.dataset, handle.data_config["input_size"][0]) == ("mini", 1)
    assert target.family == ("swin" if name == "mini-swin" else "vit")
    size = 32 if name == "mini-swin" else 28
    assert target.input_spec.shape(2) == (2, 1, size, size) and target.num_classes == 10
    assert target.info["weights"].startswith(f"{name}.fashion_mnist@sha256:")
    assert target.info["transform"] == target.input_spec.transform and target.quant_path == ""
    assert not target.model.training
    assert len(attention_modules(target.model)) == 4  # surgery ran: 4 attention blocks in each
    metrics = task.evaluate(handle, target.model, "cpu")
    assert metrics["top1"] >= 85.0 and metrics["top5"] >= metrics["top1"]
    # a deep copy (what methods return) is evaluated with the same handle, to the same numbers
    assert task.evaluate(handle, copy.deepcopy(target.model), "cpu") == metrics
    x = task.calibration(handle, 4, seed=0)  # sized for the handle's model (mini-swin pads to 32x32)
    assert x.shape == target.input_spec.shape(4)
    assert target.logits(target.model, x).shape == (4, 10)


def test_mini_errors(task, tmp_path):
    with pytest.raises(TaskError) as e:
        task.load("mini-vit", "mini", weights=str(tmp_path / "missing.pt"))
    assert "missing.pt" in _one_line_error(e)
    with pytest.raises(TaskError):
        task.load("mini-vit", "full")
    with pytest.raises(TaskError):
        task.load("deit_tiny_patch16_224", "mini")


# ----------------------------------------------------------------------------- full path

WNIDS = ImageNetInfo().label_names()
# A 3-class ImageNet stand-in: folders named by real wnids, so targets must map to 1k indices.
CLASSES = {WNIDS[7]: 2, WNIDS[300]: 3, WNIDS[998]: 1}  # wnid -> number of val images


def _write_images(root, counts, size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    for wnid, n in counts.items():
        (root / wnid).mkdir(parents=True)
        for j in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"img{j}.png")


@pytest.fixture(scope="module")
def imagenet_stub(tmp_path_factory):
    """<root>/{train,val}/<wnid>/*.png and a vit_tiny checkpoint whose head ranks classes by bias:
    WNIDS[7] first, WNIDS[300] second, WNIDS[998] 8th; so every image is predicted WNIDS[7]."""
    root = tmp_path_factory.mktemp("imagenet")
    _write_images(root / "val", CLASSES)
    _write_images(root / "train", {w: 2 for w in CLASSES}, size=(40, 56), seed=1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    state = model.state_dict()
    bias = torch.zeros(1000)
    bias[[7, 300, 5, 6, 8, 9, 10, 998]] = torch.arange(80.0, 0.0, -10.0)
    state["head.weight"] = torch.zeros_like(state["head.weight"])
    state["head.bias"] = bias
    torch.save(state, root / "vit_tiny.pth")
    return root


def test_full_evaluate_through_imagefolder_and_weights(imagenet_stub):
    task = ClassificationTask(data_root=imagenet_stub)
    handle = task.load("vit_tiny_patch16_224", "full", weights=str(imagenet_stub / "vit_tiny.pth"))
    target = handle.target
    assert target.family == "vit" and target.input_spec.image_size == (224, 224)
    assert target.info["weights"].startswith("file:vit_tiny.pth@sha256:")
    assert "Resize(size=248" in target.info["transform"] and "CenterCrop" in target.info["transform"]
    assert torch.equal(target.model.head.bias[[7, 300]], torch.tensor([80.0, 70.0]))  # file was loaded
    metrics = task.evaluate(handle, target.model, "cpu")
    # predictions: WNIDS[7] top-1; top-5 = {7, 300, 5, 6, 8}; WNIDS[998] is 8th.
    assert metrics == {"top1": pytest.approx(100 * 2 / 6), "top5": pytest.approx(100 * 5 / 6)}
    assert task.dataset_info(handle)["eval_images"] == 6

    calib = task.calibration(handle, 3, seed=0)
    assert calib.shape == (3, 3, 224, 224)
    tf = create_transform(**resolve_model_data_config(target.model))
    train = sorted((imagenet_stub / "train").glob("*/*.png"))
    refs = torch.stack([tf(Image.open(p).convert("RGB")) for p in train])
    assert _max_nearest(calib, refs) < 1e-5  # the model's own eval transform of train images


def test_full_missing_weights_and_data(tmp_path, monkeypatch, imagenet_stub):
    monkeypatch.delenv("VITQ_DATA", raising=False)
    task = ClassificationTask(data_root=tmp_path / "nowhere")
    with pytest.raises(TaskError) as e:
        task.load("deit_tiny_patch16_224", "full", weights=str(tmp_path / "deit.pth"))
    msg = _one_line_error(e)
    assert "deit.pth" in msg and "--weights" in msg
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TaskError) as e:
        task.load("deit_tiny_patch16_224", "full", weights=str(tmp_path / "garbage.pth"))
    assert "garbage.pth" in _one_line_error(e)

    # No hub access and an empty cache: one line naming the file to download and --weights.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(TaskError) as e:
        task.load("deit_tiny_patch16_224", "full")
    msg = _one_line_error(e)
    assert "deit_tiny_patch16_224" in msg and "--weights" in msg and "https://" in msg

    # weights but no data: evaluation and calibration name the missing folder
    handle = task.load("vit_tiny_patch16_224", "full", weights=str(imagenet_stub / "vit_tiny.pth"))
    with pytest.raises(TaskError) as e:
        task.evaluate(handle, handle.target.model, "cpu")
    assert str(tmp_path / "nowhere" / "val") in _one_line_error(e)
    with pytest.raises(TaskError) as e:
        task.calibration(handle, 2, seed=0)
    assert str(tmp_path / "nowhere" / "train") in _one_line_error(e)
    with pytest.raises(TaskError) as e:
        ClassificationTask().evaluate(handle, handle.target.model, "cpu")
    assert "--data-root" in _one_line_error(e)


def test_full_calibration_needs_train_dir(imagenet_stub, tmp_path):
    (tmp_path / "val").symlink_to(imagenet_stub / "val")
    task = ClassificationTask(data_root=tmp_path)
    handle = task.load("vit_tiny_patch16_224", "full", weights=str(imagenet_stub / "vit_tiny.pth"))
    with pytest.raises(TaskError) as e:
        task.calibration(handle, 2, seed=0)
    assert str(tmp_path / "train") in _one_line_error(e)


# ----------------------------------------------------------------------------- stateless handles


@pytest.mark.parametrize("order", [("mini-vit", "mini-swin"), ("mini-swin", "mini-vit")])
def test_handles_do_not_depend_on_load_order(order):
    """Calibration and evaluation use only the handle: with both models loaded (either order), each gives
    what it gives loaded alone. mini-vit takes 28x28 inputs, mini-swin 32x32 (zero-padded)."""
    alone = {}
    for name in order:
        t = ClassificationTask()
        h = t.load(name, "mini")
        alone[name] = (t.calibration(h, 8, seed=0), t.evaluate(h, h.target.model, "cpu"))
    task = ClassificationTask()
    handles = {name: task.load(name, "mini") for name in order}
    for name in order:  # the first loaded is used after the second was loaded
        h = handles[name]
        x = task.calibration(h, 8, seed=0)
        assert x.shape == h.target.input_spec.shape(8) and torch.equal(x, alone[name][0])
        assert task.evaluate(h, h.target.model, "cpu") == alone[name][1]


def test_registry_suggests_close_names():
    with pytest.raises(UnknownName) as e:
        get_task("clss")
    msg = str(e.value)
    assert "did you mean 'cls'?" in msg and "\n" not in msg


def test_tasks_base_imports_no_task():
    code = "import sys, tasks.base; print(sorted(m for m in sys.modules if m.startswith('tasks')))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "['tasks', 'tasks.base']"


def test_file_sha256_is_the_file_hash(tmp_path):
    from tasks.base import file_sha256

    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()[:12]
    assert file_sha256(str(path), n=64) == hashlib.sha256(b"abc" * 1000).hexdigest()
