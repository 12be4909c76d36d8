"""scikit-learn's bundled handwritten digits (1,797 real 8×8 grey images, 10 classes), fully
offline.

Split (fixed, documented): per class c (in label order), the class's indices in dataset order are
permuted with ``numpy.random.default_rng(SPLIT_SEED)`` (one generator, drawn class after class) and
the first round(0.2·n_c) go to ``test``. Class sizes 178/182/177/183/181/182/181/179/174/180 give
test 36/36/35/37/36/36/36/36/35/36 = 359 and train 1,438. Pixel values 0..16 are stored as uint8
round(v·255/16) as a raw ``[8, 8, 1]`` tensor.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from vpns_jax.data.builders.common import uint8_image_feature

SPLIT_SEED = 0
TEST_FRACTION = 0.2
TRAIN_SIZE = 1438
TEST_SIZE = 359
CLASS_NAMES = [str(d) for d in range(10)]


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 ``[1797, 8, 8]`` in 0..255, labels int64 ``[1797]``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified split → {'train': int64[1438], 'test': int64[359]} (sorted; see module doc)."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(TEST_FRACTION * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


class VpnsDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn digits as a TFDS builder; needs no manual directory."""

    name = "vpns_digits"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Stratified 80/20 split, seed 0: train 1,438, test 359; 8x8x1 PNG.",
        "1.1.0": "Images as raw 8x8x1 uint8 tensors; same split.",
    }

    def __init__(self, *, manual_dir: str | None = None, **kwargs):
        del manual_dir  # bundled with scikit-learn
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": uint8_image_feature((8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        images, labels = load_digits_uint8()
        splits = split_indices(labels)
        return {
            name: self._generate_examples(images, labels, indices)
            for name, indices in splits.items()
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i][:, :, None], "label": int(labels[i])}
