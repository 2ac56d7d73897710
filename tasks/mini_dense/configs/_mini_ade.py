# mini-ade data: ADE20K layout (0 = 'other', ignored via reduce_zero_label; class k -> k + 1) read
# by MiniADE20KDataset = mmseg's ADE20KDataset with the 10 Fashion-MNIST classes as its METAINFO
# (ADE20KDataset only accepts subsets of its own 150 classes; registered by tasks/mm/openmmlab.py).
# data_root is set by tasks/mm/seg.py (vendored val/calib) or scripts/train_mini_seg.py (train cache).
dataset_type = 'MiniADE20KDataset'
data_root = 'tasks/mini_dense/data/mini-ade/'
crop_size = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=10,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
