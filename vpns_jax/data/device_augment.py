"""On-device augmentation: the views of ``transforms`` computed inside the jitted step (issue 13).

For datasets stored at one small fixed size (``registry.DatasetInfo.image_shape``: CIFAR, Tiny
ImageNet, Fashion-MNIST, digits) the host can ship uint8 images at their stored size plus the
train view's crop parameters, and the accelerator makes the views:

- train view: square resize to floor(1.125·S) (PIL bilinear), crop S×S at (top, left), optional
  horizontal flip, ÷ 255;
- prompt and test views: square resize to S×S, ÷ 255;
- grey (1 channel) is repeated to 3 channels.

The resize is PIL's own arithmetic, not an approximation: PIL's bilinear filter is a triangle whose
support grows with the downscale factor (antialiasing), sampled at half-pixel centres; its weights are
rounded to 22-bit fixed point and every pass (horizontal, then vertical) rounds to uint8. Both passes
are matmuls with the fixed-point weights precomputed in numpy (``pil_coefficients``); each weight is
split into an 11-bit high and low part, so every product and partial sum is an integer below 2**24
and float32 matmuls (precision HIGHEST) are exact; the two parts are combined and rounded in int32.
The result equals PIL's resize bit for bit, on any backend. Cropping and flipping select and reverse
rows of the weight matrices per example (one gather), so only the S×S crop is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax.data import registry
from vpns_jax.data.transforms import check_input_size, crop_flip_params, train_resize_size
from vpns_jax.errors import ConfigError, DataError

DeviceView = Literal["train", "prompt", "eval"]
PRECISION_BITS = 22  # PIL's fixed point for 8-bit images: 32 - 8 - 2 (Resample.c)
_SPLIT_BITS = 11  # weight = high · 2**11 + low, both < 2**11
_EXACT = 2**24  # float32 represents every integer below this


@functools.lru_cache(maxsize=64)
def pil_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """int64 ``[out_size, in_size]``: PIL's fixed-point bilinear weights along one axis.

    Output pixel ``o`` = clip((2**21 + Σ_i K[o, i] · x[i]) >> 22, 0, 255), as PIL's
    ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (Pillow 8 to 11): triangle filter of support
    max(in/out, 1), centre (o + 0.5)·in/out, weights normalized per output pixel, then rounded half
    away from zero to 22-bit fixed point.
    """
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise DataError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear filter support 1
    out = np.zeros((out_size, in_size), np.int64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = (np.arange(lo, hi) - center + 0.5) / filterscale
        w = np.maximum(0.0, 1.0 - np.abs(x))
        total = w.sum()
        if total != 0.0:
            w = w / total
        scaled = w * float(1 << PRECISION_BITS)
        out[o, lo:hi] = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    return out


@functools.lru_cache(maxsize=64)
def _split_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) float32 ``[out, in]`` with K = high·2**11 + low; DataError if a matmul of uint8
    pixels with either part could leave float32's exact integers (downscale factor above ~15)."""
    k = pil_coefficients(in_size, out_size)
    high, low = k >> _SPLIT_BITS, k & ((1 << _SPLIT_BITS) - 1)
    for part in (high, low):
        if 255 * int(part.sum(axis=1).max()) >= _EXACT:
            raise DataError(
                f"on-device resize {in_size} -> {out_size} shrinks too much for exact float32 "
                "matmuls; use host augmentation (config.data.augment_on_device=False)")
    return high.astype(np.float32), low.astype(np.float32)


def _round_pass(high_sum: jax.Array, low_sum: jax.Array) -> jax.Array:
    """Exact integer sums of the two weight parts → PIL's rounded uint8 value (as float32)."""
    total = (high_sum.astype(jnp.int32) << _SPLIT_BITS) + low_sum.astype(jnp.int32)
    value = (total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS
    return jnp.clip(value, 0, 255).astype(jnp.float32)


def _resample(x: jax.Array, weights: tuple[jax.Array, jax.Array], spec: str) -> jax.Array:
    hi, lo = (jnp.einsum(spec, w, x, precision=jax.lax.Precision.HIGHEST) for w in weights)
    return _round_pass(hi, lo)


def _rows(weights: tuple[np.ndarray, np.ndarray], index: jax.Array) -> tuple[jax.Array, ...]:
    """Per-example rows of both weight parts: ``index`` i32[B, S] → two f32[B, S, in]."""
    return tuple(jnp.take(jnp.asarray(w), index, axis=0) for w in weights)


def resize(images: jax.Array, size: int) -> jax.Array:
    """uint8 (or integer-valued) ``[B, H, W, C]`` → float32 ``[B, size, size, C]`` integer values
    0..255: PIL's bilinear square resize (horizontal pass, uint8 rounding, vertical pass, rounding)."""
    x = images.astype(jnp.float32)
    h, w = x.shape[1], x.shape[2]
    x = _resample(x, _split_weights(w, size), "sw,bhwc->bhsc")
    return _resample(x, _split_weights(h, size), "th,bhsc->btsc")


def crop_resize(images: jax.Array, crop: jax.Array, resized: int, size: int) -> jax.Array:
    """uint8 ``[B, H, W, C]``, crop i32 ``[B, 3]`` = (top, left, flip) → float32 ``[B, size,
    size, C]`` integer values: resize to ``resized``², crop ``size``² at (top, left), flip
    horizontally where flip != 0 (only the crop is computed)."""
    x = images.astype(jnp.float32)
    h, w = x.shape[1], x.shape[2]
    crop = jnp.asarray(crop, jnp.int32)
    top, left, flip = crop[:, 0:1], crop[:, 1:2], crop[:, 2:3] != 0
    offsets = jnp.arange(size, dtype=jnp.int32)[None, :]
    cols = left + jnp.where(flip, size - 1 - offsets, offsets)  # output column j ← resized column
    x = _resample(x, _rows(_split_weights(w, resized), cols), "bsw,bhwc->bhsc")
    return _resample(x, _rows(_split_weights(h, resized), top + offsets), "bth,bhsc->btsc")


def apply(batch: Mapping[str, jax.Array], *, input_size: int, view: DeviceView) -> jax.Array:
    """A host batch of stored-size uint8 images → float32 ``[B, S, S, 3]`` in [0, 1] (S =
    ``input_size``), equal to ``transforms.train_transform`` (view 'train', with ``batch['crop']`` =
    i32[B, 3] (top, left, flip) drawn by ``transforms.crop_flip_params``) or
    ``transforms.eval_transform`` (views 'prompt' and 'eval'). ``batch['image']``: uint8
    ``[B, H, W, C]``, C = 1 (grey, repeated to 3 channels) or 3. Pure jnp; shapes static.
    """
    size = check_input_size(input_size)
    images = batch["image"]
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"on-device augmentation takes uint8 [B, H, W, 1|3] images, got {images.dtype} "
            f"{tuple(images.shape)}")
    if view == "train":
        if "crop" not in batch:
            raise DataError("the train view on device needs batch['crop'] (top, left, flip); make "
                            "the loader with on_device=True")
        out = crop_resize(images, batch["crop"], train_resize_size(size), size)
    elif view in ("prompt", "eval"):
        out = resize(images, size)
    else:
        raise DataError(f"view must be 'train', 'prompt' or 'eval', got {view!r}")
    out = out * np.float32(1.0 / 255.0)  # transforms.to_float's ÷ 255, the same float32 multiply
    if out.shape[-1] == 1:
        out = jnp.broadcast_to(out, (*out.shape[:-1], 3))
    return out


def stored_shape(name: str) -> tuple[int, int, int]:
    """(H, W, C) every image of dataset ``name`` is stored at; ConfigError when its sizes vary
    (decoded photos: food101, stanford_cars, flowers, pets, dtd, imagenet2012), which on-device
    augmentation cannot take."""
    shape = registry.get(name).image_shape
    if shape is None:
        fixed = ", ".join(d for d in registry.names() if registry.get(d).image_shape)
        raise ConfigError(
            f"config.data.augment_on_device = True needs images stored at one fixed size, but "
            f"{name}'s sizes vary; set --config.data.augment_on_device=False (on-device "
            f"augmentation supports {fixed}).")
    return shape


def host_example(image: np.ndarray, *, shape: tuple[int, int, int], input_size: int,
                 rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """What the host ships for one example with on-device augmentation: ``{'image': uint8 shape}``
    as stored, plus for the train view (``rng`` given) ``'crop'``: int32[3] (top, left, flip) drawn
    by ``transforms.crop_flip_params`` with the same draws ``transforms.train_transform`` makes.
    DataError if the image is not uint8 of the dataset's stored ``shape`` ([H, W] counts as C=1)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.shape != tuple(shape):
        raise DataError(
            f"on-device augmentation: an image is {image.dtype} {image.shape}, not the dataset's "
            f"stored uint8 {tuple(shape)}; set config.data.augment_on_device=False")
    out = {"image": image}
    if rng is not None:
        size = check_input_size(input_size)
        out["crop"] = np.asarray(crop_flip_params(rng, train_resize_size(size), size), np.int32)
    return out
