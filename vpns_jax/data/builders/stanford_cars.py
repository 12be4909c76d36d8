"""Stanford Cars (196 classes) from class folders (the Kaggle layout used by the reference, §7).

TFDS's ``cars196`` download links are dead, so the images come from the user's manual directory,
which holds ``train/<class name>/*.jpg`` and ``test/<class name>/*.jpg`` (directly, or under
``car_data/car_data/`` or ``car_data/`` as in Kaggle's "stanford-car-dataset-by-classes-folder").
Both splits must have the same 196 class folders; class index = position of the folder name in
sorted order (torchvision ImageFolder). RGB JPEGs are stored as they are; other modes are converted
to RGB PNG.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from vpns_jax.data.builders.common import (
    IMAGE_SUFFIXES,
    manual_photo_builder_base,
    missing_files_error,
    rgb_image_bytes,
)
from vpns_jax.data.builders.files import FileTree
from vpns_jax.errors import DataError

NUM_CLASSES = 196
SPLITS = ("train", "test")
LAYOUTS = ("", "car_data/car_data", "car_data")
SOURCE = (
    "Get the class-folder layout (train/ and test/ with one folder per class), e.g. Kaggle's "
    "'stanford-car-dataset-by-classes-folder' (car_data/car_data/{train,test}), and point "
    "--manual_dir at "
    "the directory that contains train/ and test/."
)


def find_root(manual_dir: str) -> str:
    """The directory holding ``train/`` and ``test/``, or DataError."""
    for layout in LAYOUTS:
        root = os.path.join(manual_dir, layout) if layout else manual_dir
        if all(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
            return root
    raise missing_files_error(
        "stanford_cars", manual_dir, ["train/<class>/*.jpg", "test/<class>/*.jpg"], SOURCE
    )


def index_folders(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(sorted class names, {'train': [(path, label)], 'test': [...]}); DataError if incomplete."""
    per_split = {}
    for split in SPLITS:
        tree = FileTree(os.path.join(root, split))
        by_class: dict[str, list[str]] = {}
        for path in tree.paths():
            parts = path.split("/")
            if len(parts) == 2 and path.lower().endswith(IMAGE_SUFFIXES):
                by_class.setdefault(parts[0], []).append(path)
        per_split[split] = by_class
    classes = sorted(per_split["train"])
    if len(classes) != NUM_CLASSES:
        raise DataError(
            f"stanford_cars: {root}/train has {len(classes)} class folders with images, expected "
            f"{NUM_CLASSES}. {SOURCE}"
        )
    missing = [f"test/{c}/*.jpg" for c in classes if c not in per_split["test"]]
    extra = sorted(set(per_split["test"]) - set(classes))
    if missing or extra:
        if extra:
            missing += [f"train/{c}/*.jpg" for c in extra]
        raise missing_files_error("stanford_cars", root, missing, SOURCE)
    label_of = {c: i for i, c in enumerate(classes)}
    items = {
        split: [(f"{split}/{path}", label_of[c]) for c in classes for path in per_split[split][c]]
        for split in SPLITS
    }
    return classes, items


class VpnsStanfordCars(manual_photo_builder_base(), skip_registration=True):
    """Stanford Cars read from class folders in the manual directory (see module doc)."""

    name = "vpns_stanford_cars"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Class-folder layout, sorted class names as labels."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = SOURCE
    NUM_CLASSES = NUM_CLASSES

    def check_manual_dir(self) -> None:
        """Raises DataError naming what is missing in the manual directory."""
        index_folders(find_root(self._manual))

    def _split_generators(self, dl_manager):
        del dl_manager
        root = find_root(self._manual)
        classes, items = index_folders(root)
        self.info.features["label"].names = classes
        return {split: self._generate_examples(root, items[split]) for split in SPLITS}

    def _generate_examples(self, root: str, items: list[tuple[str, int]]):
        tree = FileTree(root)
        for path, label in items:
            data = rgb_image_bytes(tree.read(path), os.path.join(root, path))
            yield path, {"image": data, "label": label, "file_name": path.rsplit("/", 1)[-1]}
