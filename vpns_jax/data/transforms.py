"""Per-image transforms of the VPNs data pipeline (reference §7), in numpy + PIL.

Every function takes one decoded image (uint8, ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W,
4]``) and returns float32 ``[S, S, 3]`` in [0, 1] (grey repeated to 3 channels, alpha dropped).
Normalization is NOT done here: it happens after the visual prompt.

- train view: square resize to ``train_resize_size(S)`` = floor(1.125·S) (PIL bilinear, aspect ratio
  not kept), random crop S×S, random horizontal flip (p = 0.5);
- prompt and test views: square resize to S×S (PIL bilinear), nothing else.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vpns_jax.errors import DataError


def check_input_size(input_size: int) -> int:
    """Returns ``input_size`` if it is a positive int, else raises DataError."""
    if (
        isinstance(input_size, bool)
        or not isinstance(input_size, int | np.integer)
        or input_size < 1
    ):
        raise DataError(f"input_size must be a positive integer (pixels), got {input_size!r}.")
    return int(input_size)


def train_resize_size(input_size: int) -> int:
    """Side of the square resize before the crop: floor(1.125 · input_size) (224 → 252, 32 → 36)."""
    return (9 * check_input_size(input_size)) // 8


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]``, ``[H, W, 1|3|4]`` → uint8 ``[H, W, 3]`` (grey repeated, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"image shape {image.shape} is not [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[:, :, :3]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, C]`` → uint8 ``[size, size, 3]``, PIL bilinear (torchvision ``Resize``)."""
    pil = Image.fromarray(to_rgb(image))
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(pil)


def crop_flip_params(
    rng: np.random.Generator, resized: int, input_size: int
) -> tuple[int, int, bool]:
    """Draws (top, left, flip) like torchvision RandomCrop + RandomHorizontalFlip, in that order.

    top and left are uniform in [0, resized − input_size] (inclusive); flip is True with probability
    0.5.
    """
    top = int(rng.integers(0, resized - input_size + 1))
    left = int(rng.integers(0, resized - input_size + 1))
    flip = bool(rng.random() < 0.5)
    return top, left, flip


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` → float32 ``[H, W, 3]`` in [0, 1] (÷ 255, like ToTensor)."""
    return image.astype(np.float32) * np.float32(1.0 / 255.0)


def train_transform(image: np.ndarray, input_size: int, rng: np.random.Generator) -> np.ndarray:
    """Train view: resize to floor(1.125·S)², random crop S², random flip → f32 ``[S, S, 3]``."""
    resized = train_resize_size(input_size)
    big = resize_square(image, resized)
    top, left, flip = crop_flip_params(rng, resized, input_size)
    out = big[top : top + input_size, left : left + input_size]
    if flip:
        out = out[:, ::-1]
    return to_float(out)


def eval_transform(image: np.ndarray, input_size: int) -> np.ndarray:
    """Prompt and test views: resize to S×S → f32 ``[S, S, 3]`` in [0, 1]."""
    return to_float(resize_square(image, check_input_size(input_size)))
