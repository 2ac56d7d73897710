# Cascade Mask R-CNN with a tiny Swin backbone for the 128x128 mini-coco set
# (tasks/mm/det.py "mini-cascade-mask-rcnn-swin"). Structure from mmdet's own Cascade Mask R-CNN base
# config (three bbox stages with IoU 0.5/0.6/0.7, class-agnostic regression, a mask head per stage).
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
    './_mini_coco.py',
    './_mini_det_schedule.py',
]
num_classes = 10
strides = [4, 8, 16, 32]  # three Swin stages + one FPN max-pool level
# torchvision's roi_align: same numbers as mmcv's CPU kernel (aligned=True), several times faster on CPU
roi_layer_7 = dict(type='RoIAlign', output_size=7, sampling_ratio=0, use_torchvision=True)
roi_layer_14 = dict(type='RoIAlign', output_size=14, sampling_ratio=0, use_torchvision=True)


def _stage_head(stds):
    return dict(
        type='Shared2FCBBoxHead',
        in_channels=64,
        fc_out_channels=128,
        roi_feat_size=7,
        num_classes=num_classes,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=True,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        pretrain_img_size=128,
        embed_dims=48,
        patch_size=4,
        window_size=4,
        mlp_ratio=4,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        strides=(4, 2, 2),
        out_indices=(0, 1, 2),
        qkv_bias=True,
        drop_path_rate=0.1,
        use_abs_pos_embed=False,
        convert_weights=False,
        init_cfg=None),
    neck=dict(in_channels=[48, 96, 192], out_channels=64, num_outs=4),
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        anchor_generator=dict(scales=[4], strides=strides)),
    roi_head=dict(
        bbox_roi_extractor=dict(roi_layer=roi_layer_7, out_channels=64, featmap_strides=strides[:3],
                                finest_scale=24),
        bbox_head=[
            _stage_head([0.1, 0.1, 0.2, 0.2]),
            _stage_head([0.05, 0.05, 0.1, 0.1]),
            _stage_head([0.033, 0.033, 0.067, 0.067]),
        ],
        mask_roi_extractor=dict(roi_layer=roi_layer_14, out_channels=64, featmap_strides=strides[:3],
                                finest_scale=24),
        mask_head=dict(num_convs=2, in_channels=64, conv_out_channels=64, num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=300, max_per_img=150),
        rcnn=[
            dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                               match_low_quality=False, ignore_iof_thr=-1),
                 sampler=dict(type='RandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=-1,
                              add_gt_as_proposals=True),
                 mask_size=28, pos_weight=-1, debug=False)
            for iou in (0.5, 0.6, 0.7)
        ]),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=50),
        rcnn=dict(max_per_img=20)))  # scenes hold at most 5 items
default_hooks = dict(logger=dict(interval=20), visualization=dict(draw=False),
                     checkpoint=dict(interval=-1))
