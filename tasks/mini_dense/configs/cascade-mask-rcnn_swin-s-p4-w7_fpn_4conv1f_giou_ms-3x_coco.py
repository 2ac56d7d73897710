# Cascade Mask R-CNN, Swin-S backbone (Swin paper recipe; see the Swin-T file for the provenance).
_base_ = ['./cascade-mask-rcnn_swin-t-p4-w7_fpn_4conv1f_giou_ms-3x_coco.py']
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
