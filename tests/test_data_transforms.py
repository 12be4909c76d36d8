"""Transforms against an independent computation (PIL resize, then crop/flip by hand in numpy)."""
import numpy as np
import pytest
from PIL import Image

from vpns_jax.data import transforms
from vpns_jax.errors import DataError


def _image(h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("input_size, resized", [(224, 252), (32, 36), (8, 9), (1, 1)])
def test_train_resize_size_is_floor_of_1_125(input_size, resized):
    assert transforms.train_resize_size(input_size) == resized


@pytest.mark.parametrize("shape", [(37, 23, 3), (20, 30, 1), (11, 13, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_transform_matches_pil_resize_then_numpy_crop_flip(shape, seed):
    image = _image(*shape, seed=seed)
    input_size = 16
    out = transforms.train_transform(image, input_size, np.random.default_rng(seed))
    # Independent computation: same draws, PIL resize of the RGB image, numpy crop/flip.
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 18 - 16 + 1), rng.integers(0, 18 - 16 + 1)
    flip = rng.random() < 0.5
    rgb = np.repeat(image, 3, axis=-1) if shape[-1] == 1 else image[:, :, :3]
    big = np.asarray(Image.fromarray(rgb).resize((18, 18), Image.BILINEAR))
    expected = big[top : top + 16, left : left + 16]
    if flip:
        expected = np.flip(expected, axis=1)
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, expected / 255.0, rtol=0, atol=1e-7)


def test_flip_and_crop_both_happen_over_seeds():
    draws = [transforms.crop_flip_params(np.random.default_rng(s), 36, 32) for s in range(200)]
    tops, lefts, flips = zip(*draws, strict=True)
    assert set(tops) == set(range(5)) and set(lefts) == set(range(5))
    assert 60 < sum(flips) < 140


def test_eval_transform_is_plain_bilinear_resize():
    image = _image(50, 40, 3)
    out = transforms.eval_transform(image, 24)
    expected = np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR)) / 255.0
    np.testing.assert_allclose(out, expected, atol=1e-7)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_grey_2d_image_is_repeated_to_three_channels():
    image = _image(8, 8, 1)[:, :, 0]
    out = transforms.eval_transform(image, 8)
    np.testing.assert_allclose(out[..., 0], image / 255.0, atol=1e-7)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_input_size_not_positive_is_a_clear_error(bad):
    with pytest.raises(DataError, match="input_size must be a positive integer"):
        transforms.eval_transform(_image(4, 4, 3), bad)
