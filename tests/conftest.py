"""Shared test setup: one CPU thread (the machine is shared) and a seeding fixture."""

from __future__ import annotations

import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def seed() -> int:
    """Seed python and torch RNGs; returns the seed."""
    s = 0
    random.seed(s)
    torch.manual_seed(s)
    return s



@pytest.fixture
def tiny_vit_model():
    """A fresh prepared 2-block ViT (seed 0) on 1x16x16 inputs: tests/tiny.py holds the builders."""
    from tiny import tiny_vit

    return tiny_vit()


@pytest.fixture
def tiny_swin_model():
    """A fresh prepared 2-stage Swin (seed 0) on 1x16x16 inputs."""
    from tiny import tiny_swin

    return tiny_swin()


@pytest.fixture
def run_ctx(tmp_path):
    """A CPU RunContext under tmp_path (seed 0, no cache, no galleries, no real images)."""
    from tiny import make_ctx

    return make_ctx(tmp_path)
