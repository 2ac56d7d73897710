# Cascade Mask R-CNN, Swin-T backbone, as used by the Swin paper (Liu et al., ICCV'21, COCO tables):
# mmdet does not ship it, so it is rebuilt here on mmdet's own Cascade Mask R-CNN base config with the
# settings of the Swin authors' release config (cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_
# 480-800_giou_4conv1f_adamw_3x_coco): 4conv1fc box heads with BN, GIoU loss on decoded boxes,
# class-specific regression. Their checkpoints use the original Swin key names; tasks/mm/openmmlab.py
# converts them on load. Only the evaluation parts matter here (SyncBN becomes BN on CPU).
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py']


def _stage_head(stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=True,
        init_cfg=None),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(bbox_head=[
        _stage_head([0.1, 0.1, 0.2, 0.2]),
        _stage_head([0.05, 0.05, 0.1, 0.1]),
        _stage_head([0.033, 0.033, 0.067, 0.067]),
    ]))
