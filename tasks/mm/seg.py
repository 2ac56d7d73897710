"""Semantic segmentation: mmseg 1.2 UperNet with Swin backbones.

``full``: ADE20K (``ADEChallengeData2016``: ``images/validation`` + ``annotations/validation``) under
``--data-root`` through mmseg's ``ADE20KDataset``; models from mmseg's own UperNet-Swin configs;
weights from ``--weights`` or mmseg's published URL when online.
``mini``: a tiny Swin UperNet on the generated 128x128 ``mini-ade`` set (ADE20K layout and label
convention, 10 Fashion-MNIST classes; tasks/mini_dense), trained by scripts/train_mini_seg.py.
Metrics: mmseg's ``IoUMetric`` -> ``mIoU``, ``aAcc`` (and ``mAcc``), in percent.
"""

from __future__ import annotations

from pathlib import Path

from tasks.base import TaskError, register_task
from tasks.mm.base import DATA_DIR, MMModel, MMTask

_MMSEG_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/swin/"
MINI_MODELS = {"mini-upernet-swin": MMModel("mini_upernet_swin.py", arch="upernet")}
FULL_MODELS = {
    "upernet_swin-t": MMModel(
        "mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
        _MMSEG_URL + "upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K/"
        "upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210531_112542-e380ad3e.pth",
        arch="upernet"),
    "upernet_swin-s": MMModel(
        "mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
        _MMSEG_URL + "upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K/"
        "upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210526_192015-ee2fff1c.pth",
        arch="upernet"),
}
SEG_METRICS = ("mIoU", "aAcc", "mAcc")


@register_task("seg")
class SegmentationTask(MMTask):
    """ADE20K-style semantic segmentation (``mIoU``, ``aAcc`` in percent)."""

    scope = "mmseg"
    primary_metric = "mIoU"
    mini_models = MINI_MODELS
    full_models = FULL_MODELS
    train_script = "scripts/train_mini_seg.py"
    full_input_size = (512, 512)  # the ADE20K crop size of the UperNet-Swin configs

    def _ade_root(self, dataset: str) -> Path:
        if dataset == "mini":
            return DATA_DIR / "mini-ade"
        return self._root(["", "ADEChallengeData2016", "ade/ADEChallengeData2016"], "images/validation",
                          "ADE20K (ADEChallengeData2016)")

    def _eval_dataset_cfg(self, cfg, dataset: str) -> dict:
        ds = cfg.test_dataloader.dataset.to_dict()
        ds["data_root"] = str(self._ade_root(dataset))
        ds["data_prefix"] = dict(img_path="images/validation", seg_map_path="annotations/validation")
        return ds

    def _metric_cfg(self, cfg, dataset: str) -> dict:
        metric = cfg.test_evaluator.to_dict()
        metric["iou_metrics"] = ["mIoU"]
        return metric

    def _metrics(self, raw: dict[str, float]) -> dict[str, float]:
        missing = [k for k in SEG_METRICS if k not in raw]
        if missing:
            raise TaskError(f"IoUMetric returned no {', '.join(missing)}")
        return {k: float(raw[k]) for k in SEG_METRICS}  # already percent

    def _calibration_folder(self, dataset: str) -> Path:
        return self._ade_root(dataset) / "images" / ("calibration" if dataset == "mini" else "training")

    def _dataset_name(self, dataset: str) -> str:
        return "mini-ade" if dataset == "mini" else "ade20k-val"
