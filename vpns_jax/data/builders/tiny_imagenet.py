"""Tiny-ImageNet-200 from the official zip or its extracted folder (reference §7).

Manual directory: ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip), or
the extracted folder ``tiny-imagenet-200/``, or a directory that is that folder. Used files:
``wnids.txt`` (200 WordNet ids), ``train/<wnid>/images/*.JPEG`` (500 per class → 100,000) and
``val/images/*.JPEG`` with labels from ``val/val_annotations.txt`` (10,000). Class index = position
of the wnid in sorted order (torchvision ImageFolder's order, as in the reference). Splits:
``train`` and ``validation``. RGB JPEGs are stored as they are; the few grey ones are converted to
RGB PNG.
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

NUM_CLASSES = 200
ZIP_NAME = "tiny-imagenet-200.zip"
FOLDER_NAME = "tiny-imagenet-200"
SOURCE = (
    f"Download {ZIP_NAME} from http://cs231n.stanford.edu/tiny-imagenet-200.zip (zip or extracted)."
)


def find_tree(manual_dir: str) -> FileTree:
    """The Tiny-ImageNet file tree in ``manual_dir`` (folder preferred over zip), or DataError."""
    for folder in (os.path.join(manual_dir, FOLDER_NAME), manual_dir):
        if os.path.isfile(os.path.join(folder, "wnids.txt")):
            return FileTree(folder)
    zip_path = os.path.join(manual_dir, ZIP_NAME)
    if os.path.isfile(zip_path):
        return FileTree.of_zip(zip_path, FOLDER_NAME + "/")
    raise missing_files_error(
        "tiny_imagenet", manual_dir, [ZIP_NAME, f"{FOLDER_NAME}/wnids.txt"], SOURCE
    )


def index_tree(tree: FileTree) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(sorted wnids, {'train'|'validation': [(path, label)]}); DataError if incomplete."""
    paths = tree.paths()
    present = set(paths)
    where = tree.describe()
    missing = [p for p in ("wnids.txt", "val/val_annotations.txt") if p not in present]
    if missing:
        raise missing_files_error("tiny_imagenet", where, missing, SOURCE)
    wnids = sorted({w.strip() for w in tree.read("wnids.txt").decode().split() if w.strip()})
    if len(wnids) != NUM_CLASSES:
        raise DataError(
            f"tiny_imagenet: {where}/wnids.txt lists {len(wnids)} classes, expected {NUM_CLASSES}."
        )
    label_of = {w: i for i, w in enumerate(wnids)}
    train = [
        (p, label_of[p.split("/")[1]])
        for p in paths
        if p.startswith("train/")
        and p.split("/")[2:3] == ["images"]
        and p.lower().endswith(IMAGE_SUFFIXES)
        and p.split("/")[1] in label_of
    ]
    empty = sorted(set(wnids) - {p.split("/")[1] for p, _ in train})
    if empty:
        raise missing_files_error(
            "tiny_imagenet", where, [f"train/{w}/images/*.JPEG" for w in empty], SOURCE
        )
    validation, missing = [], []
    for line in tree.read("val/val_annotations.txt").decode().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        path, wnid = f"val/images/{fields[0]}", fields[1]
        if wnid not in label_of:
            raise DataError(f"tiny_imagenet: val_annotations.txt names {wnid!r}, not in wnids.txt")
        if path not in present:
            missing.append(path)
        validation.append((path, label_of[wnid]))
    if missing:
        raise missing_files_error("tiny_imagenet", where, missing, SOURCE)
    if not validation:
        raise DataError(f"tiny_imagenet: {where}/val/val_annotations.txt lists no images")
    return wnids, {"train": train, "validation": validation}


class VpnsTinyImagenet(manual_photo_builder_base(), skip_registration=True):
    """Tiny-ImageNet-200 read from the manual directory (see module doc)."""

    name = "vpns_tiny_imagenet"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official train and val (val_annotations.txt), sorted-wnid labels."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = SOURCE
    NUM_CLASSES = NUM_CLASSES

    def check_manual_dir(self) -> None:
        """Raises DataError naming what is missing in the manual directory."""
        index_tree(find_tree(self._manual))

    def _split_generators(self, dl_manager):
        del dl_manager
        tree = find_tree(self._manual)
        wnids, splits = index_tree(tree)
        self.info.features["label"].names = wnids
        return {name: self._generate_examples(tree, items) for name, items in splits.items()}

    def _generate_examples(self, tree: FileTree, items: list[tuple[str, int]]):
        for path, label in items:
            data = rgb_image_bytes(tree.read(path), f"{tree.describe()}/{path}")
            yield path, {"image": data, "label": label, "file_name": path.rsplit("/", 1)[-1]}
