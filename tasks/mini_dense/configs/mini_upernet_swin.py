# UperNet with a tiny Swin backbone for the 128x128 mini-ade set (tasks/mm/seg.py "mini-upernet-swin").
# Structure from mmseg's own UperNet-Swin base config; BN instead of SyncBN (CPU, one process).
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/default_runtime.py',
    './_mini_ade.py',
]
num_classes = 10
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(size=(128, 128))
model = dict(
    data_preprocessor=data_preprocessor,
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
        init_cfg=None),
    decode_head=dict(in_channels=[48, 96, 192], in_index=[0, 1, 2], pool_scales=(1, 2, 4), channels=64,
                     num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=96, in_index=1, channels=32, num_classes=num_classes,
                        norm_cfg=norm_cfg))

# CPU schedule (AdamW + linear warm-up + poly decay), overridable by scripts/train_mini_seg.py.
max_iters = 4000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'absolute_pos_embed': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=200, end=max_iters, by_epoch=False),
]
# mmseg keeps its default hooks in the schedule configs, which are not inherited here
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=-1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook', draw=False))
