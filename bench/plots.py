"""Figures written beside a job's record: the per-layer bit-widths of a mixed-precision job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_layer_bits(layers: Mapping[str, Sequence[int | None]], path: Path, title: str) -> Path:
    """A bar chart of every quantized site's weight and activation bits (module order), as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    names = list(layers)
    w = [layers[n][0] or 0 for n in names]
    a = [layers[n][1] or 0 for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names)), 3.6))
    ax.bar([x - 0.2 for x in xs], w, width=0.4, label="weights")
    ax.bar([x + 0.2 for x in xs], a, width=0.4, label="activations")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_yticks(sorted({b for b in w + a if b}))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
