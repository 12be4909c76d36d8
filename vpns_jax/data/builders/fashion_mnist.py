"""Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist``: 60,000 train + 10,000 test,
28×28 grey).

Manual directory (default ``/usr/share/datasets/fashion-mnist``, override with ``--manual_dir``)
holds the four IDX files, gzip-compressed (``*.gz``, as Debian installs them) or not:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``. Images are stored as raw uint8 ``[28, 28, 1]`` tensors (bytes encoding):
measured here about twice as fast to prepare and three times as fast to read as PNG.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import tensorflow_datasets as tfds

from vpns_jax.data.builders.common import missing_files_error, uint8_image_feature
from vpns_jax.errors import DataError

DEFAULT_MANUAL_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
SOURCE = (
    "Install Debian's package (apt-get install dataset-fashion-mnist) or download the four IDX "
    "files from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into one directory."
)


def find_idx_file(manual_dir: str, stem: str) -> str | None:
    """Path of ``stem`` or ``stem.gz`` in ``manual_dir``, or None."""
    for name in (stem + ".gz", stem):
        path = os.path.join(manual_dir, name)
        if os.path.isfile(path):
            return path
    return None


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx_header(path: str) -> tuple[int, ...]:
    """Shape stored in an IDX file's header (e.g. (60000, 28, 28)); reads only the first bytes."""
    with _open(path) as f:
        magic = f.read(4)
        if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file (magic {magic!r})")
        ndim = magic[3]
        return struct.unpack(f">{ndim}I", f.read(4 * ndim))


def read_idx(path: str) -> np.ndarray:
    """The uint8 array of an IDX file (``.gz`` or plain), shape as in its header."""
    shape = read_idx_header(path)
    with _open(path) as f:
        data = f.read()
    offset = 4 + 4 * len(shape)
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise DataError(
            f"{path} is truncated: {len(data) - offset} bytes of data, header says {expected}"
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def idx_paths(manual_dir: str) -> dict[str, tuple[str, str]]:
    """{'train': (images, labels), 'test': (...)} paths, or DataError naming the missing files."""
    found, missing = {}, []
    for split, stems in FILES.items():
        paths = tuple(find_idx_file(manual_dir, stem) for stem in stems)
        missing += [stem + "[.gz]" for stem, p in zip(stems, paths, strict=True) if p is None]
        found[split] = paths
    if missing:
        raise missing_files_error("fashion_mnist", manual_dir, missing, SOURCE)
    return found


def split_counts(manual_dir: str = DEFAULT_MANUAL_DIR) -> dict[str, int]:
    """{'train': n, 'test': n} from the IDX headers (fast; checks images and labels agree)."""
    counts = {}
    for split, (images, labels) in idx_paths(manual_dir).items():
        n_images, n_labels = read_idx_header(images)[0], read_idx_header(labels)[0]
        if n_images != n_labels:
            raise DataError(f"{images} has {n_images} images but {labels} has {n_labels} labels")
        counts[split] = n_images
    return counts


class VpnsFashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Fashion-MNIST read from local IDX files (see module doc)."""

    name = "vpns_fashion_mnist"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "From IDX files; images as 28x28x1 PNG.",
        "1.1.0": "Images as raw 28x28x1 uint8 tensors (faster); 1.0.0 data is not read.",
    }

    def __init__(self, *, manual_dir: str | None = None, **kwargs):
        self._manual_dir = os.fspath(manual_dir) if manual_dir is not None else DEFAULT_MANUAL_DIR
        super().__init__(**kwargs)

    def check_manual_dir(self) -> None:
        """Raises DataError if an IDX file is missing or images/labels disagree."""
        split_counts(self._manual_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": uint8_image_feature((28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        paths = idx_paths(self._manual_dir)
        return {split: self._generate_examples(*paths[split]) for split in FILES}

    def _generate_examples(self, images_path: str, labels_path: str):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DataError(
                f"{images_path} {images.shape} and {labels_path} {labels.shape} do not match"
            )
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise DataError(f"{labels_path} has label {labels.max()}, expected 0..9")
        for i in range(len(images)):
            yield i, {"image": images[i][:, :, None], "label": int(labels[i])}
