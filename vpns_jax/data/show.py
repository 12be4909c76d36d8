"""A PNG grid of augmented training images with class names (``python -m vpns_jax.data show``)."""

from __future__ import annotations

import os

import numpy as np

from vpns_jax.data import pipeline


def sample_grid(
    name: str,
    out_path: str | os.PathLike,
    *,
    input_size: int = 64,
    count: int = 16,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> str:
    """Writes ``count`` train-view images (epoch 0, first batch) as a PNG grid; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = pipeline.num_examples(name, "train", data_dir=data_dir)
    count = max(1, min(count, n))
    loader = pipeline.train_loader(
        name, view="train", input_size=input_size, batch_size=count, seed=seed, data_dir=data_dir
    )
    batch = next(loader.epoch(0))
    names = pipeline.class_names(name, data_dir=data_dir)
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, batch["image"], batch["label"], strict=False):
        ax.imshow(np.clip(image, 0.0, 1.0))
        ax.set_title(f"{label}: {names[label]}"[:28], fontsize=8)
    fig.suptitle(f"{name}: train view, input {input_size}, seed {seed}", fontsize=10)
    fig.tight_layout()
    out_path = os.fspath(out_path)
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path
