"""The datasets the project knows: builder, reference splits, classes, batch size (§7).

Catalogue datasets are read through TFDS's own builders (prepared once, with TensorFlow, see
``vpns_jax.data.preparation``); the others through the project's builders in
``vpns_jax.data.builders``, which prepare offline without TensorFlow. Split strings are TFDS split
expressions ('train+validation').
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from vpns_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the project needs to know about one dataset.

    Attributes:
      name: the project's dataset name ('cifar10').
      num_classes: number of classes.
      batch_size: the reference's (global) batch size for train, prompt and test loaders.
      train_split / test_split: TFDS split expressions read for training and testing.
      source: 'catalogue' (stock TFDS builder; preparing needs TensorFlow) or 'own' (offline
      builder). manual_files: files the user must place in manual_dir (empty: none needed), with
      where they come from. notes: differences from the reference's data, if any.
      image_shape: (H, W, C) of every stored image when all have that one shape (on-device
      augmentation needs it), None when sizes vary (decoded photos).
    """

    name: str
    num_classes: int
    batch_size: int
    train_split: str
    test_split: str
    source: Literal["catalogue", "own"]
    manual_files: str = ""
    notes: str = ""
    image_shape: tuple[int, int, int] | None = None

    @property
    def builder(self) -> str:
        """TFDS catalogue name ('dtd') or the project's builder name ('vpns_tiny_imagenet')."""
        return self.name if self.source == "catalogue" else f"vpns_{self.name}"

    @property
    def needs_manual_dir(self) -> bool:
        """True when prepare needs user-supplied files (besides a default location)."""
        return bool(self.manual_files)


_IMAGENET_FILES = (
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/download "
    "(registration needed)"
)
_TINY_FILES = (
    "tiny-imagenet-200.zip or its extracted folder tiny-imagenet-200/ "
    "(http://cs231n.stanford.edu/tiny-imagenet-200.zip)"
)
_CARS_FILES = (
    "train/<class>/*.jpg and test/<class>/*.jpg (Kaggle 'stanford-car-dataset-by-classes-folder', "
    "car_data/car_data/)"
)

# fmt: off
_DATASETS = (
    #           name             classes batch  train split        test split    source
    DatasetInfo("cifar10",            10,  256, "train",            "test",       "catalogue",
                image_shape=(32, 32, 3)),
    DatasetInfo("cifar100",          100,  256, "train",            "test",       "catalogue",
                image_shape=(32, 32, 3)),
    DatasetInfo("food101",           101,  256, "train",            "validation", "catalogue",
                notes="TFDS 'validation' (25,250) is the official test split torchvision uses."),
    DatasetInfo("oxford_flowers102", 102,  128, "train+validation", "test",       "catalogue",
                notes="Official 1,020+1,020 / 6,149 split; the reference used CoOp's split "
                      "(4,093+1,633 / 2,463)."),
    DatasetInfo("dtd",                47,   64, "train+validation", "test",       "catalogue",
                notes="TFDS dtd is partition 1 (train1/val1/test1), as torchvision's."),
    DatasetInfo("oxford_iiit_pet",    37,   64, "train",            "test",       "catalogue",
                notes="TFDS 'train' is the official trainval (3,680); test 3,669."),
    DatasetInfo("imagenet2012",     1000, 1024, "train",            "validation", "catalogue",
                manual_files=_IMAGENET_FILES),
    DatasetInfo("tiny_imagenet",     200,  256, "train",            "validation", "own",
                manual_files=_TINY_FILES, image_shape=(64, 64, 3)),
    DatasetInfo("stanford_cars",     196,  128, "train",            "test",       "own",
                manual_files=_CARS_FILES,
                notes="TFDS cars196's download links are dead; the reference used these folders."),
    DatasetInfo("fashion_mnist",      10,  256, "train",            "test",       "own",
                notes="Offline: IDX files of Debian's dataset-fashion-mnist "
                      "(/usr/share/datasets/fashion-mnist).",
                image_shape=(28, 28, 1)),
    DatasetInfo("digits",             10,   64, "train",            "test",       "own",
                notes="Offline: scikit-learn's 1,797 8x8 digits, stratified 80/20 split "
                      "(1,438 / 359), seed 0.",
                image_shape=(8, 8, 1)),
)
# fmt: on


def names() -> list[str]:
    """Names of every known dataset, in registry order."""
    return [d.name for d in _DATASETS]


def get(name: str) -> DatasetInfo:
    """The DatasetInfo of ``name``; DataError listing the known names if unknown."""
    for info in _DATASETS:
        if info.name == name:
            return info
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}.")


def builder(name: str, *, data_dir: str | os.PathLike | None = None, manual_dir: str | None = None):
    """A ``tfds.core.DatasetBuilder`` for ``name`` writing/reading array_record under ``data_dir``.

    data_dir: TFDS data directory (default: TFDS's, ``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``). manual_dir: where the project's builders read their source files
      (ignored by catalogue builders; pass it to ``prepare`` instead).
    """
    import tensorflow_datasets as tfds

    info = get(name)
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else None
    if info.source == "catalogue":
        return tfds.builder(info.builder, data_dir=data_dir, file_format="array_record")
    cls = _own_builder_class(info.builder)
    manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir is not None else None
    return cls(data_dir=data_dir, manual_dir=manual_dir, file_format="array_record")


def _own_builder_class(builder_name: str):
    from vpns_jax.data.builders import digits, fashion_mnist, stanford_cars, tiny_imagenet

    classes = {
        cls.name: cls
        for cls in (
            digits.VpnsDigits,
            fashion_mnist.VpnsFashionMnist,
            stanford_cars.VpnsStanfordCars,
            tiny_imagenet.VpnsTinyImagenet,
        )
    }
    return classes[builder_name]
