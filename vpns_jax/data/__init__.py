"""Datasets: registry, preparation (TFDS array_record) and the grain input pipeline (no TensorFlow).

See ``registry`` (which datasets, splits, classes, batch sizes), ``prepare``
(``prepare``/``is_prepared``), ``pipeline`` (``train_loader``, ``eval_loader``, ``num_examples``,
``class_names``) and ``transforms``. Command line: ``python -m vpns_jax.data {list,prepare,show}``.
"""

from vpns_jax.data import pipeline, registry, transforms
from vpns_jax.data.pipeline import class_names, eval_loader, num_examples, train_loader
from vpns_jax.data.preparation import ensure_prepared, is_prepared, prepare

__all__ = [
    "class_names", "ensure_prepared", "eval_loader", "is_prepared", "num_examples", "pipeline",
    "prepare", "registry", "train_loader", "transforms",
]  # fmt: skip
