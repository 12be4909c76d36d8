"""Helpers shared by the project's own builders: image bytes, manual-directory checks."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np
from PIL import Image

from vpns_jax.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` → PNG bytes (lossless, fast compression)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def uint8_image_feature(shape: tuple[int, int, int]):
    """A TFDS feature for small fixed-shape uint8 images stored raw (no PNG; no TensorFlow needed).

    Decodes to a numpy uint8 array of ``shape``, like ``tfds.features.Image`` does.
    """
    import tensorflow_datasets as tfds

    return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)


def rgb_image_bytes(data: bytes, what: str) -> bytes:
    """Returns ``data`` unchanged if it is an RGB JPEG/PNG, else the image converted to RGB as PNG
    bytes.

    Keeps the original encoding (no re-compression) for the common case; grey, CMYK or palette files
    (a few exist in Tiny-ImageNet and Stanford Cars) are converted so that every stored image has 3
    channels.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format in ("JPEG", "PNG") and image.mode == "RGB":
                return data
            return png_bytes(np.asarray(image.convert("RGB")))
    except OSError as error:
        raise DataError(f"cannot decode image {what}: {error}") from error


def default_manual_dir(data_dir: str | os.PathLike | None) -> str:
    """TFDS's convention: ``<data_dir>/downloads/manual`` (data_dir defaults to TFDS's data dir)."""
    import tensorflow_datasets as tfds

    root = os.fspath(data_dir) if data_dir is not None else tfds.core.constants.DATA_DIR
    return os.path.join(os.path.expanduser(root), "downloads", "manual")


def missing_files_error(
    dataset: str, manual_dir: str, missing: Iterable[str], source: str
) -> DataError:
    """A DataError naming the missing files, where they were looked for and where they come from."""
    missing = list(missing)
    shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
    return DataError(
        f"{dataset}: the manual directory {manual_dir!r} is missing or incomplete: "
        f"{shown} not found. "
        f"{source} Then run: python -m vpns_jax.data prepare --dataset {dataset} --manual_dir DIR"
    )


def manual_photo_builder_base():
    """Base class of the builders that read photos from a manual directory.

    Subclasses set ``NUM_CLASSES`` and implement ``check_manual_dir``, ``_split_generators`` and
    ``_generate_examples``; the features are an RGB image, a class label and the source file name.
    (A function, so that TFDS is imported only when a builder is needed.)
    """
    import sys

    import tensorflow_datasets as tfds

    class ManualPhotoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        NUM_CLASSES: int = 0

        def __init__(self, *, manual_dir: str | None = None, **kwargs):
            super().__init__(**kwargs)
            self._manual = (
                os.fspath(manual_dir) if manual_dir else default_manual_dir(self._data_dir_root)
            )

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=sys.modules[type(self).__module__].__doc__,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                        "file_name": tfds.features.Text(),
                    }
                ),
                supervised_keys=("image", "label"),
            )

    return ManualPhotoBuilder
