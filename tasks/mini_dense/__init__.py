"""Offline mini detection/segmentation suite: scene generator, layouts, mm configs, checkpoints."""
