"""Object detection / instance segmentation: mmdet 3.3 Mask R-CNN and Cascade Mask R-CNN with Swin.

``full``: COCO val2017 under ``--data-root`` (``annotations/instances_val2017.json`` + ``val2017/``)
through mmdet's ``CocoDataset``; models from mmdet's own configs (Mask R-CNN Swin-T/S) or from the
configs in tasks/mini_dense/configs (Cascade Mask R-CNN Swin-T/S, the Swin paper's recipe, which
mmdet does not ship); weights from ``--weights`` or mmdet's published URL when online.
``mini``: tiny Swin detectors on the generated 128x128 ``mini-coco`` set (tasks/mini_dense),
checkpoints trained by scripts/train_mini_det.py. Metrics: mmdet's ``CocoMetric`` (bbox and segm
AP), reported in percent (x100) like every metric of the harness.

The prepared detector also accepts ``model(images)`` without data samples (tasks.mm.openmmlab).
"""

from __future__ import annotations

from pathlib import Path

from tasks.base import TaskError, register_task
from tasks.mm.base import DATA_DIR, MMModel, MMTask

METRICS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75")

MINI_MODELS = {
    "mini-mask-rcnn-swin": MMModel("mini_mask-rcnn_swin_fpn.py", arch="mask-rcnn"),
    "mini-cascade-mask-rcnn-swin": MMModel("mini_cascade-mask-rcnn_swin_fpn.py", arch="cascade-mask-rcnn"),
}
_MMDET_URL = "https://download.openmmlab.com/mmdetection/v2.0/swin/"
FULL_MODELS = {
    "mask-rcnn_swin-t": MMModel(
        "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py",
        _MMDET_URL + "mask_rcnn_swin-t-p4-w7_fpn_1x_coco/"
        "mask_rcnn_swin-t-p4-w7_fpn_1x_coco_20210902_120937-9d6b7cfa.pth", arch="mask-rcnn"),
    "mask-rcnn_swin-s": MMModel(
        "mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py",
        _MMDET_URL + "mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco/"
        "mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth", arch="mask-rcnn"),
    # The Swin paper's Cascade Mask R-CNN (4conv1fc heads, GIoU): weights from the Swin authors'
    # release (original Swin key names, converted on load); no URL is wired in.
    "cascade-mask-rcnn_swin-t": MMModel("cascade-mask-rcnn_swin-t-p4-w7_fpn_4conv1f_giou_ms-3x_coco.py",
                                        arch="cascade-mask-rcnn"),
    "cascade-mask-rcnn_swin-s": MMModel("cascade-mask-rcnn_swin-s-p4-w7_fpn_4conv1f_giou_ms-3x_coco.py",
                                        arch="cascade-mask-rcnn"),
}
FULL_INPUT_SIZE = (800, 1344)  # test Resize(1333, 800, keep_ratio) padded to a multiple of 32


@register_task("det")
class DetectionTask(MMTask):
    """COCO-style detection + instance segmentation (``bbox_mAP``, ``segm_mAP`` in percent)."""

    scope = "mmdet"
    primary_metric = "bbox_mAP"
    mini_models = MINI_MODELS
    full_models = FULL_MODELS
    train_script = "scripts/train_mini_det.py"
    full_input_size = FULL_INPUT_SIZE

    def _coco_root(self, dataset: str) -> Path:
        if dataset == "mini":
            return DATA_DIR / "mini-coco"
        return self._root(["", "coco"], "annotations/instances_val2017.json", "COCO val2017")

    def _eval_dataset_cfg(self, cfg, dataset: str) -> dict:
        ds = cfg.test_dataloader.dataset.to_dict()
        ds["data_root"] = str(self._coco_root(dataset))
        ds["ann_file"] = "annotations/instances_val2017.json"
        ds["data_prefix"] = dict(img="val2017/")
        ds["test_mode"] = True
        return ds

    def _metric_cfg(self, cfg, dataset: str) -> dict:
        metric = cfg.test_evaluator.to_dict()
        metric["ann_file"] = str(self._coco_root(dataset) / "annotations" / "instances_val2017.json")
        metric["metric"] = ["bbox", "segm"]
        metric.pop("outfile_prefix", None)
        metric["format_only"] = False
        return metric

    def _metrics(self, raw: dict[str, float]) -> dict[str, float]:
        missing = [k for k in METRICS if k not in raw]
        if missing:
            raise TaskError(f"CocoMetric returned no {', '.join(missing)}")
        return {k: round(100.0 * raw[k], 2) for k in METRICS}

    def _calibration_folder(self, dataset: str) -> Path:
        return self._coco_root(dataset) / ("calib2017" if dataset == "mini" else "train2017")

    def _dataset_name(self, dataset: str) -> str:
        return "mini-coco" if dataset == "mini" else "coco-val2017"
