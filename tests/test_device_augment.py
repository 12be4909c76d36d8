"""On-device augmentation (issue 13 item 5) against PIL and the host transforms.

The device resize is claimed to be PIL's arithmetic exactly (fixed-point weights, uint8 rounding
after each pass), so the tests count differing pixels and require none (the issue's bound is 1 level).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vpns_jax.data import device_augment, transforms
from vpns_jax.errors import ConfigError, DataError


def pil_resize(image: np.ndarray, size: int) -> np.ndarray:
    """PIL itself (not the project's wrapper): uint8 [H, W, C] → [size, size, C]."""
    pil = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return out[:, :, None] if out.ndim == 2 else out


def images(n: int, side: int, channels: int, seed: int) -> np.ndarray:
    """Random uint8 images plus a smooth ramp and the extremes 0 / 255 (rounding at the ends)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)
    ramp = np.linspace(0, 255, side * side).reshape(side, side)
    out[0] = np.round(ramp)[:, :, None].astype(np.uint8)
    out[1, : side // 2] = 255
    out[1, side // 2 :] = 0
    return out


def differing(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(max |a − b| in uint8 levels, fraction of differing values)."""
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return int(d.max()), float((d > 0).mean())


def test_pil_coefficients_hand_computed():
    # 4 → 2 (downscale ×2): support 2, centre 1.0, taps at 0, 1, 2 with triangle (1 − |x−c+.5|/2):
    # 0.75, 0.75, 0.25 normalized → 3/7, 3/7, 1/7 in 22-bit fixed point (round half up).
    k = device_augment.pil_coefficients(4, 2)
    one = 1 << 22
    expected0 = [int(np.floor(3 / 7 * one + 0.5))] * 2 + [int(np.floor(1 / 7 * one + 0.5)), 0]
    assert k[0].tolist() == expected0
    assert k[1].tolist() == expected0[::-1]
    # 2 → 4 (upscale): support 1, centre (o + .5)/2; o = 0 → taps 0 (weight 1) and 1 (weight 0).
    up = device_augment.pil_coefficients(2, 4)
    assert up[0].tolist() == [one, 0] and up[1].tolist() == [3 * one // 4, one // 4]
    # same size: the identity
    assert (device_augment.pil_coefficients(5, 5) == one * np.eye(5, dtype=np.int64)).all()


@pytest.mark.parametrize("side,size,channels", [
    (8, 36, 1), (8, 36, 3), (28, 252, 1), (32, 36, 3), (64, 72, 3), (64, 32, 3), (64, 32, 1),
    (32, 224, 3), (32, 32, 3),
])
def test_device_resize_equals_pil(side, size, channels):
    batch = images(5, side, channels, seed=side + size)
    ref = np.stack([pil_resize(image, size) for image in batch])
    out = np.asarray(jax.jit(device_augment.resize, static_argnums=1)(batch, size))
    assert out.shape == ref.shape
    worst, fraction = differing(out, ref)
    assert worst <= 1  # the bound
    assert fraction == 0.0  # what this implementation claims: PIL's arithmetic, bit for bit


@pytest.mark.parametrize("side,size,channels", [(8, 8, 1), (32, 32, 3), (28, 224, 1), (64, 64, 3)])
def test_train_view_equals_host_transform(side, size, channels):
    n = 24
    batch = images(n, side, channels, seed=size)
    resized = transforms.train_resize_size(size)
    # the host's own draws, one generator per example as the pipeline makes them
    crops = np.array([transforms.crop_flip_params(np.random.default_rng(i), resized, size)
                      for i in range(n)], np.int32)
    crops[0], crops[1] = (0, 0, 0), (resized - size, resized - size, 1)  # both crop bounds
    assert {0, 1} <= set(crops[:, 2])  # both flips occur
    ref = []
    for i, image in enumerate(batch):
        if i < 2:  # the forced bounds: crop the host's resize by hand
            top, left, flip = crops[i]
            big = transforms.resize_square(image, resized)[top:top + size, left:left + size]
            ref.append(transforms.to_float(big[:, ::-1] if flip else big))
        else:
            ref.append(transforms.train_transform(image, size, np.random.default_rng(i)))
    ref = np.stack(ref)
    fn = jax.jit(lambda b: device_augment.apply(b, input_size=size, view="train"))
    out = np.asarray(fn({"image": batch, "crop": crops}))
    assert out.dtype == np.float32 and out.shape == (n, size, size, 3)
    assert np.array_equal(out, ref)  # bit-identical floats (same ÷ 255 multiply)


@pytest.mark.parametrize("view", ["prompt", "eval"])
@pytest.mark.parametrize("side,size,channels", [(8, 32, 1), (32, 32, 3), (64, 48, 3)])
def test_resize_views_equal_host_transform(view, side, size, channels):
    batch = images(4, side, channels, seed=3)
    ref = np.stack([transforms.eval_transform(image, size) for image in batch])
    out = np.asarray(device_augment.apply({"image": jnp.asarray(batch)}, input_size=size, view=view))
    assert np.array_equal(out, ref)


def test_bad_input_is_one_clear_error():
    grey = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(DataError, match="needs batch\\['crop'\\].*on_device=True"):
        device_augment.apply({"image": grey}, input_size=8, view="train")
    with pytest.raises(DataError, match="uint8"):
        device_augment.apply({"image": grey.astype(np.float32)}, input_size=8, view="eval")
    with pytest.raises(DataError, match="view must be"):
        device_augment.apply({"image": grey}, input_size=8, view="test")
    with pytest.raises(DataError, match="stored uint8 \\(8, 8, 1\\)"):
        device_augment.host_example(np.zeros((9, 8), np.uint8), shape=(8, 8, 1), input_size=8,
                                    rng=None)


def test_host_example_draws_like_the_train_transform():
    image = images(2, 28, 1, seed=0)[0]
    shipped = device_augment.host_example(image[:, :, 0], shape=(28, 28, 1), input_size=224,
                                          rng=np.random.default_rng(5))
    assert shipped["image"].dtype == np.uint8 and shipped["image"].shape == (28, 28, 1)
    expected = transforms.crop_flip_params(np.random.default_rng(5), 252, 224)
    assert tuple(shipped["crop"].tolist()) == (expected[0], expected[1], int(expected[2]))
    assert "crop" not in device_augment.host_example(image, shape=(28, 28, 1), input_size=32,
                                                     rng=None)


@pytest.mark.parametrize("name", ["food101", "stanford_cars", "oxford_flowers102",
                                  "oxford_iiit_pet", "dtd", "imagenet2012"])
def test_variable_size_datasets_are_refused(name):
    with pytest.raises(ConfigError, match=f"augment_on_device.*{name}'s sizes vary.*"
                                          "augment_on_device=False"):
        device_augment.stored_shape(name)


def test_fixed_size_datasets_have_their_stored_shape():
    assert device_augment.stored_shape("cifar10") == (32, 32, 3)
    assert device_augment.stored_shape("tiny_imagenet") == (64, 64, 3)
    assert device_augment.stored_shape("fashion_mnist") == (28, 28, 1)
    assert device_augment.stored_shape("digits") == (8, 8, 1)
