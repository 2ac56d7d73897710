"""Caching and saving of generated image batches.

Generated batches are cached under the run's cache dir, keyed by a hash of
(method, model, config, seed), so every bit-width of one (method, model, seed)
reuses one generation. A de-normalised PNG grid goes to the artifacts dir for
the leaderboard gallery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def cache_key(method: str, model: str, config: Any, seed: int, **extra: Any) -> str:
    """Stable short hash of (method, model, config, seed, extra)."""
    payload = {"method": method, "model": model, "config": _jsonable(config), "seed": seed}
    payload.update(_jsonable(extra))
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values (CPU, contiguous): equal iff bit-identical."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_tensor(path: Path, make: Callable[[], Tensor]) -> tuple[Tensor, bool]:
    """Load ``path`` if it exists, else ``make()`` and save it atomically. Returns (tensor, was_cached)."""
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True), True
    tensor = make().detach().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(tensor, tmp)
    os.replace(tmp, path)
    return tensor, False


def save_image_grid(images: Tensor, path: Path, nrow: int = 8) -> Path:
    """Save (B, C, H, W) images in [0, 1] (already de-normalised) as one PNG grid."""
    from torchvision.utils import save_image  # local import: only needed when saving

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().cpu().clamp(0, 1), str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path
