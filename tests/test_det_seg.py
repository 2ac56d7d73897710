"""Detection / segmentation tasks (tasks/mm/det.py, tasks/mm/seg.py) and the mini-coco / mini-ade data."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from methods.quant.modules import MatMul  # noqa: E402
from methods.quant.surgery_mm import attention_modules_mm  # noqa: E402
from tasks.base import TaskError  # noqa: E402
from tasks.mini import fashion  # noqa: E402
from tasks.mini_dense import build  # noqa: E402
from tasks.mm import base as mm_base  # noqa: E402
from tasks.mm import det as det_mod  # noqa: E402
from tasks.mm import openmmlab  # noqa: E402
from tasks.mm.det import MINI_MODELS as DET_MINI  # noqa: E402
from tasks.mm.det import DetectionTask  # noqa: E402
from tasks.mm.seg import MINI_MODELS as SEG_MINI  # noqa: E402
from tasks.mm.seg import SegmentationTask  # noqa: E402

torch.set_num_threads(1)
COCO = mm_base.DATA_DIR / "mini-coco"
ADE = mm_base.DATA_DIR / "mini-ade"
HAVE_FASHION = (fashion.DEBIAN_ROOT / "t10k-images-idx3-ubyte.gz").is_file()


# --------------------------------------------------------------------------- data


def test_vendored_mini_coco_is_real_coco():
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO as CocoApi

    coco = CocoApi(str(COCO / "annotations" / "instances_val2017.json"))
    assert len(coco.getImgIds()) == build.SIZES["val"]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(fashion.CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 2 * build.SIZES["val"]
    for a in anns[:50]:
        img = coco.loadImgs(a["image_id"])[0]
        assert (COCO / "val2017" / img["file_name"]).is_file()
        m = coco.annToMask(a)
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == m.sum() == mask_utils.area(a["segmentation"]) and a["iscrowd"] == 0
    assert len(list((COCO / "calib2017").glob("*.jpg"))) == build.SIZES["calib"]


def test_vendored_mini_ade_follows_ade20k_convention():
    from PIL import Image

    pngs = sorted((ADE / "annotations" / "validation").glob("ADE_val_*.png"))
    jpgs = sorted((ADE / "images" / "validation").glob("ADE_val_*.jpg"))
    assert len(pngs) == len(jpgs) == build.SIZES["val"]
    values = np.unique(np.concatenate([np.unique(np.asarray(Image.open(p))) for p in pngs[:20]]))
    assert values[0] == 0 and values.max() <= len(fashion.CLASSES)  # 0 = other, classes 1..10
    # read through mmseg's ADE20KDataset code path: 0 -> 255 (ignored), k -> k - 1
    task = SegmentationTask()
    ds = task._eval_dataset(task.config("mini-upernet-swin", "mini"), "mini")
    assert type(ds).__mro__[1].__name__ == "ADE20KDataset" and ds.metainfo["classes"] == fashion.CLASSES
    seg = ds[0]["data_samples"].gt_sem_seg.data
    assert set(seg.unique().tolist()) <= set(range(10)) | {255} and (seg == 255).any()


@pytest.mark.skipif(not HAVE_FASHION, reason="needs the Debian package dataset-fashion-mnist")
def test_generation_is_deterministic_and_matches_vendored(tmp_path):
    info = build.generate("val", tmp_path, n=6)
    assert info["images"] == 6
    ours = json.loads((tmp_path / "mini-coco/annotations/instances_val2017.json").read_text())
    vendored = json.loads((COCO / "annotations/instances_val2017.json").read_text())
    assert ours["annotations"] == [a for a in vendored["annotations"] if a["image_id"] <= 6]
    for p in sorted((tmp_path / "mini-ade/annotations/validation").glob("*.png")):
        assert p.read_bytes() == (ADE / "annotations/validation" / p.name).read_bytes()


def test_val_items_are_disjoint_from_training_items():
    """Scenes draw val items from Fashion-MNIST t10k, train/calib items from its train split."""
    from tasks.mini_dense.scenes import SPLITS

    assert SPLITS["val"][1] == "t10k" and SPLITS["train"][1] == SPLITS["calib"][1] == "train"
    assert len({s for s, _ in SPLITS.values()}) == len(SPLITS)


# --------------------------------------------------------------------------- tasks


@pytest.fixture(scope="module")
def random_ckpts(tmp_path_factory):
    """Random-init fp16 state_dicts of every mini model (tests must not depend on trained weights)."""
    openmmlab.quiet_logger()
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for task in (DetectionTask(), SegmentationTask()):
        for name in task.models("mini"):
            torch.manual_seed(0)
            model = openmmlab.build_model(task.config(name, "mini"), task.scope)
            model.init_weights()
            paths[name] = out / f"{name}.pt"
            torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                       paths[name])
    return paths


@pytest.mark.parametrize("task_cls,name", [(DetectionTask, n) for n in DET_MINI] +
                         [(SegmentationTask, n) for n in SEG_MINI])
def test_load_gives_prepared_backbone_target(task_cls, name, random_ckpts):
    task = task_cls()
    handle = task.load(name, "mini", weights=str(random_ckpts[name]))
    target = handle.target
    assert handle.dataset == "mini" and handle.data_config is task.config(name, "mini")
    assert handle.transform == target.input_spec.transform
    assert target.quant_path == "backbone" and target.logits is None and target.family == "swin"
    assert target.input_spec.image_size == (128, 128) and target.input_spec.in_chans == 3
    assert target.info["weights"].startswith(f"file:{name}.pt@sha256:")
    assert len(attention_modules_mm(target.quant_module)) == 6
    assert sum(isinstance(m, MatMul) for m in target.quant_module.modules()) == 12
    x = task.calibration(handle, 4, seed=0)
    assert x.shape == (4, 3, 128, 128)
    assert torch.equal(x, task.calibration(handle, 4, seed=0))
    assert not torch.equal(x, task.calibration(handle, 4, seed=1))
    with torch.no_grad():
        feats = target.features(target.model, x)
        target.model(x)  # a whole detector/segmentor runs on bare images (calibration forward)
    assert [f.shape[1:] for f in feats] == [(48, 32, 32), (96, 16, 16), (192, 8, 8)]


def test_det_and_seg_evaluate_report_percent_metrics(random_ckpts):
    det = DetectionTask()
    h = det.load("mini-mask-rcnn-swin", "mini", weights=str(random_ckpts["mini-mask-rcnn-swin"]))
    r = det.evaluate(h, h.target.model, "cpu")
    assert set(r) == {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75"}
    assert all(0.0 <= v <= 100.0 for v in r.values())
    seg = SegmentationTask()
    h = seg.load("mini-upernet-swin", "mini", weights=str(random_ckpts["mini-upernet-swin"]))
    r = seg.evaluate(h, h.target.model, "cpu")
    assert set(r) == {"mIoU", "aAcc", "mAcc"} and all(0.0 <= v <= 100.0 for v in r.values())
    assert det.primary_metric == "bbox_mAP" and seg.primary_metric == "mIoU"


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(TaskError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_files_are_one_line_errors(tmp_path, monkeypatch, random_ckpts):
    det, seg = DetectionTask(), SegmentationTask()
    assert "does not exist" in _one_line_error(det.load, "mini-mask-rcnn-swin", "mini",
                                               weights=str(tmp_path / "nope.pt"))
    monkeypatch.setattr(mm_base, "WEIGHTS_DIR", tmp_path)
    assert "train_mini_seg.py" in _one_line_error(seg.load, "mini-upernet-swin", "mini")
    assert "unknown det model" in _one_line_error(det.load, "yolo", "mini")
    assert "--dataset full" in _one_line_error(det.load, "mask-rcnn_swin-t", "mini")
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(3)}, bad)
    assert "does not match" in _one_line_error(det.load, "mini-mask-rcnn-swin", "mini", weights=str(bad))
    assert "COCO val2017" in _one_line_error(DetectionTask(data_root=tmp_path)._coco_root, "full")
    assert "ADE20K" in _one_line_error(SegmentationTask(data_root=tmp_path)._ade_root, "full")
    handle = det.load("mini-mask-rcnn-swin", "mini", weights=str(random_ckpts["mini-mask-rcnn-swin"]))
    assert "calibration pool" in _one_line_error(det.calibration, handle, 10_000, 0)
    assert "unknown quant scope 'heads'" in _one_line_error(DetectionTask, quant_scope="heads")


def test_missing_mm_stack_is_one_line(monkeypatch):
    """Without mmengine the tasks still list their models; loading says what to install."""
    for name in [m for m in sys.modules if m.split(".")[0] == "mmengine"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import mmengine...` fails
    monkeypatch.delitem(sys.modules, "tasks.mm.openmmlab")
    monkeypatch.delattr("tasks.mm.openmmlab")  # so tasks.mm.base imports it afresh
    seg = SegmentationTask()
    assert seg.models("mini") == ["mini-upernet-swin"]
    msg = _one_line_error(seg.load, "mini-upernet-swin", "mini")
    assert "need mmengine" in msg and "(mmengine" in msg and "pip install '.[mm]'" in msg


def test_full_without_weights_offline_is_one_line(monkeypatch):
    entry = det_mod.FULL_MODELS["mask-rcnn_swin-t"]
    monkeypatch.setitem(det_mod.FULL_MODELS, "mask-rcnn_swin-t",
                        mm_base.MMModel(entry.config, "http://127.0.0.1:9/none.pth"))
    assert "--weights" in _one_line_error(DetectionTask().load, "mask-rcnn_swin-t", "full")


@pytest.mark.parametrize("task_cls,name", [(DetectionTask, "mask-rcnn_swin-t"),
                                           (SegmentationTask, "upernet_swin-t")])
def test_real_config_with_local_checkpoint(task_cls, name, tmp_path):
    """A library config (mmdet::/mmseg::) + an mmengine-style checkpoint file (with metadata)."""
    task = task_cls()
    cfg = task.config(name, "full")
    torch.manual_seed(0)
    model = openmmlab.build_model(cfg, task.scope)
    ckpt = tmp_path / "real.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ("a", "b"), "np": np.float64(1.0)},
                "state_dict": {k: v.half() if v.is_floating_point() else v
                               for k, v in model.state_dict().items()}}, ckpt)
    target = task.load(name, "full", weights=str(ckpt)).target
    assert target.quant_path == "backbone" and len(attention_modules_mm(target.quant_module)) == 12
    assert target.input_spec.image_size == task.full_input_size
    key = "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight"
    assert torch.equal(target.model.state_dict()[key], model.state_dict()[key].half().float())


def _to_original_swin(state: dict) -> dict:
    """Inverse of mmdet's swin_converter (test helper): mmdet names -> the Swin authors' names."""
    out = {}
    for k, v in state.items():
        if not k.startswith("backbone."):
            out[k] = v
            continue
        k = k.removeprefix("backbone.")
        if k.startswith("stages."):
            k = k.replace("stages", "layers", 1).replace("attn.w_msa.", "attn.")
            k = k.replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
            if "downsample.reduction." in k:
                o, i = v.shape
                v = v.reshape(o, i // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(o, i)
            elif "downsample.norm." in k:
                v = v.reshape(-1, 4).transpose(0, 1)[[0, 2, 1, 3], :].reshape(-1)
        elif k.startswith("patch_embed.projection"):
            k = k.replace("projection", "proj")
        out["backbone." + k] = v
    return out


def test_original_swin_checkpoints_are_converted(random_ckpts, tmp_path):
    task = DetectionTask()
    ref = task.load("mini-mask-rcnn-swin", "mini", weights=str(random_ckpts["mini-mask-rcnn-swin"])).target
    state = ref.model.state_dict()
    orig = _to_original_swin(state)
    assert any(k.startswith("backbone.layers.0.blocks.0.attn.qkv") for k in orig)
    path = tmp_path / "orig.pth"
    torch.save({"state_dict": orig}, path)
    conv = task.load("mini-mask-rcnn-swin", "mini", weights=str(path)).target
    for k, v in conv.model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.skipif(not (mm_base.WEIGHTS_DIR / "training_log.json").is_file(), reason="no trained weights")
@pytest.mark.parametrize("task_cls,name", [(DetectionTask, n) for n in DET_MINI] +
                         [(SegmentationTask, n) for n in SEG_MINI])
def test_committed_checkpoints_reproduce_their_log(task_cls, name):
    log = json.loads((mm_base.WEIGHTS_DIR / "training_log.json").read_text())
    if name not in log or not (mm_base.WEIGHTS_DIR / f"{name}.pt").is_file():
        pytest.skip(f"{name} not trained yet")
    task = task_cls()
    handle = task.load(name, "mini")
    metrics = task.evaluate(handle, handle.target.model, "cpu")
    for k, v in log[name]["metrics"].items():
        assert metrics[k] == pytest.approx(v, abs=0.11), k


def test_mini_data_is_small_enough():
    size = sum(p.stat().st_size for p in mm_base.DATA_DIR.rglob("*") if p.is_file())
    assert size < 10 * 2**20
    weights = sum(p.stat().st_size for p in mm_base.WEIGHTS_DIR.glob("*.pt"))
    assert weights <= 20 * 2**20


def test_config_backbones_agree():
    """The three mini models share one tiny Swin backbone definition."""
    cfgs = [DetectionTask().config(n, "mini") for n in DET_MINI] + \
        [SegmentationTask().config(n, "mini") for n in SEG_MINI]
    bbs = [{k: v for k, v in c.model.backbone.items() if k != "convert_weights"} for c in cfgs]
    assert all(b == bbs[0] for b in bbs)


def test_train_split_cache_roundtrip(tmp_path):
    if not HAVE_FASHION:
        pytest.skip("needs dataset-fashion-mnist")
    root = build.ensure_train_split(n=3, out=tmp_path / "t")
    assert len(list((root / "mini-coco" / "train2017").glob("*.jpg"))) == 3
    assert len(list((root / "mini-ade" / "annotations" / "training").glob("*.png"))) == 3
    shutil.rmtree(root)


@pytest.mark.parametrize("task_cls,name,scope_", [(DetectionTask, "mini-mask-rcnn-swin", "backbone"),
                                                  (DetectionTask, "mini-cascade-mask-rcnn-swin", "all"),
                                                  (SegmentationTask, "mini-upernet-swin", "all")])
def test_baselines_quantize_dense_models(task_cls, name, scope_, random_ckpts, tmp_path):
    """fp / minmax-ptq / noise-ptq / psaq-vit (tiny generation) on det and seg targets, backbone or
    whole-model scope: calibration runs the whole model on bare images, the result still predicts."""
    import methods.baselines  # noqa: F401  (registers the baselines)
    from methods.base import RunContext, get_method
    from methods.quant.bits import parse_bits
    from methods.quant.modules import QuantConv2d, QuantLinear
    from tasks.mm.openmmlab import default_det_samples

    task = task_cls(quant_scope=scope_)
    handle = task.load(name, "mini", weights=str(random_ckpts[name]))
    target = handle.target
    assert target.quant_path == ("backbone" if scope_ == "backbone" else "")
    x = task.calibration(handle, 2, seed=3)
    for method, overrides in (("fp", {}), ("minmax-ptq", {}), ("noise-ptq", {}),
                              ("psaq-vit", dict(iterations=2, warmup=1, dense_batch_size=2))):
        cls = get_method(method)
        ctx = RunContext(device=torch.device("cpu"), seed=0, profile="ci", cache_dir=tmp_path,
                         artifacts_dir=tmp_path, use_cache=False, galleries=False,
                         real_images=lambda n: task.calibration(handle, n, 0))
        qmodel = cls(cls.make_config("ci", **overrides)).quantize(target, parse_bits("w4a4"), ctx).model
        if method == "fp":
            continue
        heads = [m for n, m in qmodel.named_modules() if not n.startswith("backbone")]
        assert any(isinstance(m, QuantConv2d | QuantLinear) for m in heads) == (scope_ == "all")
        with torch.no_grad():
            if task.scope == "mmdet":
                out = qmodel.predict(x, default_det_samples(x))
                assert len(out) == 2 and "bboxes" in out[0].pred_instances
            else:
                assert qmodel(x).shape == (2, 10, 32, 32)
    assert any("no class logits" in n for n in ctx.notes)  # psaq records its task-independent form
