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
