# Mask R-CNN with a tiny Swin backbone for the 128x128 mini-coco set (tasks/mm/det.py "mini-mask-rcnn-swin").
# Model structure from mmdet's own Mask R-CNN base config; sizes scaled to the tiny input.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
    './_mini_coco.py',
    './_mini_det_schedule.py',
]
num_classes = 10
strides = [4, 8, 16, 32]  # three Swin stages + one FPN max-pool level
# torchvision's roi_align: same numbers as mmcv's CPU kernel (aligned=True), several times faster on CPU
roi_layer_7 = dict(type='RoIAlign', output_size=7, sampling_ratio=0, use_torchvision=True)
roi_layer_14 = dict(type='RoIAlign', output_size=14, sampling_ratio=0, use_torchvision=True)
model = dict(
    # Tiny Swin (same in all mini models): patch 4 -> 32x32 tokens, windows of 4 tile every stage
    # exactly (32, 16, 8 tokens), stages at strides 4, 8, 16 with 48, 96, 192 channels.
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
        bbox_head=dict(in_channels=64, fc_out_channels=128, num_classes=num_classes),
        mask_roi_extractor=dict(roi_layer=roi_layer_14, out_channels=64, featmap_strides=strides[:3],
                                finest_scale=24),
        mask_head=dict(num_convs=2, in_channels=64, conv_out_channels=64, num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=300, max_per_img=150),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=50),
        rcnn=dict(max_per_img=20)))  # scenes hold at most 5 items
default_hooks = dict(logger=dict(interval=20), visualization=dict(draw=False),
                     checkpoint=dict(interval=-1))
