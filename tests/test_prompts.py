"""Visual prompts: region, identity at init, clamp gradient, counts, padding, torch parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vpns_jax import prompts
from vpns_jax.prompts import PromptSpec


def _images(rng, b, size):
    x = rng.uniform(size=(b, size, size, 3)).astype(np.float32)
    x[:, :3] = 0.0  # exact 0 and 1 pixels, as in real images
    x[:, -3:] = 1.0
    return x


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "border"}, "method"),
        ({"pad_size": 17, "output_size": 32, "input_size": 32}, "pad_size"),
        ({"input_size": 40, "output_size": 32}, "input_size"),
        ({"input_size": 0}, "input_size"),
        ({"pad_size": -1}, "pad_size"),
        ({"method": "fix", "mask_size": 300}, "mask_size"),
        ({"method": "random", "mask_size": 0}, "mask_size"),
    ],
)
def test_spec_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PromptSpec.{field}"):
        PromptSpec(**kwargs)


@pytest.mark.parametrize("pad", [0, 8, 16, 32, 48, 64, 80, 96, 112])
def test_pad_tunable_count(pad):
    spec = PromptSpec(pad_size=pad)
    assert prompts.tunable_count(spec) == 896 * pad - 4 * pad**2
    assert int(prompts.region_mask(spec).sum()) == prompts.tunable_count(spec)
    if pad == 16:
        assert prompts.tunable_count(spec) == 13_312


def test_fix_count_and_region():
    spec = PromptSpec(method="fix", mask_size=115)
    assert prompts.tunable_count(spec) == 13_225
    m = np.asarray(prompts.region_mask(spec))[..., 0]
    assert m[:115, :115].all() and m.sum() == 115 * 115


def test_zero_init_is_identity_and_only_border_gets_gradient():
    spec = PromptSpec(input_size=32, output_size=32, pad_size=4)
    prompt = prompts.init_prompt(spec)
    assert prompt["program"].shape == (32, 32, 3) and not prompt["program"].any()
    x = jnp.asarray(_images(np.random.default_rng(0), 2, 32))
    np.testing.assert_array_equal(prompts.apply_prompt(prompt, x, spec), x)

    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    grad = jax.grad(lambda p: jnp.sum(prompts.apply_prompt(p, x, spec) * w))(prompt)["program"]
    border = np.asarray(prompts.region_mask(spec))[..., 0].astype(bool)
    assert not np.asarray(grad)[~border].any()
    assert np.all(np.asarray(grad)[border] != 0)


def test_clamp_gradient_matches_torch():
    values = np.array([-0.5, -1e-7, 0.0, 0.3, 1.0, 1.0 + 1e-6, 2.0], np.float32)
    ours = jax.vmap(jax.grad(prompts.clamp01))(jnp.asarray(values))
    t = torch.tensor(values, requires_grad=True)
    torch.clamp(t, 0, 1).sum().backward()
    np.testing.assert_array_equal(np.asarray(ours), t.grad.numpy())
    np.testing.assert_array_equal(np.asarray(ours), [0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(prompts.clamp01(jnp.asarray(values)), np.clip(values, 0, 1))


@pytest.mark.parametrize("inp, out", [(28, 32), (27, 32), (32, 32)])
def test_padding_placement(inp, out):
    spec = PromptSpec(input_size=inp, output_size=out, pad_size=0)
    x = jnp.ones((1, inp, inp, 3))
    y = np.asarray(prompts.apply_prompt(prompts.init_prompt(spec), x, spec))[0, ..., 0]
    top, bottom = (out - inp + 1) // 2, (out - inp) // 2
    assert y.shape == (out, out)
    rows = np.nonzero(y.any(axis=1))[0]
    cols = np.nonzero(y.any(axis=0))[0]
    assert rows[0] == top and rows[-1] == out - 1 - bottom
    assert cols[0] == top and cols[-1] == out - 1 - bottom
    assert y.sum() == inp * inp


def test_fix_adds_sigmoid_on_square():
    spec = PromptSpec(method="fix", input_size=16, output_size=16, mask_size=5)
    x = jnp.full((1, 16, 16, 3), 0.25)
    y = np.asarray(prompts.apply_prompt(prompts.init_prompt(spec), x, spec))[0]
    np.testing.assert_allclose(y[:5, :5], 0.75)
    np.testing.assert_allclose(y[5:], 0.25)
    np.testing.assert_allclose(y[:, 5:], 0.25)


def test_random_square_position_distribution():
    spec = PromptSpec(method="random", input_size=12, output_size=12, mask_size=8)
    with pytest.raises(ValueError, match="rng"):
        prompts.apply_prompt(prompts.init_prompt(spec), jnp.zeros((1, 12, 12, 3)), spec)
    keys = jax.random.split(jax.random.key(0), 2000)
    corners = np.asarray(jax.vmap(lambda k: prompts.random_corner(spec, k))(keys))
    # Reference: uniform over {0, ..., out - mask - 1} = {0, 1, 2, 3} per axis (exclusive bound).
    assert set(np.unique(corners)) == {0, 1, 2, 3}
    counts = np.bincount(corners.ravel(), minlength=4)
    assert counts.min() > 800 and counts.max() < 1200

    rng = jax.random.key(3)
    top, left = np.asarray(prompts.random_corner(spec, rng))
    x = jnp.zeros((2, 12, 12, 3))
    y = np.asarray(prompts.apply_prompt(prompts.init_prompt(spec), x, spec, rng))
    expected = np.zeros((12, 12), np.float32)
    expected[top : top + 8, left : left + 8] = 0.5
    np.testing.assert_allclose(y[0, ..., 0], expected)
    np.testing.assert_allclose(y[1], y[0])  # one square per forward, shared by the batch


def test_normalize():
    x = jnp.ones((1, 2, 2, 3)) * 0.5
    y = np.asarray(prompts.normalize(x))[0, 0, 0]
    expected = (0.5 - np.array(prompts.IMAGENET_MEAN)) / prompts.IMAGENET_STD
    np.testing.assert_allclose(y, expected, 1e-6)


class _TorchPadVisualPrompt(torch.nn.Module):
    """Reference PadVisualPrompt restated (NCHW): pad, add program⊙mask, clamp, normalize."""

    def __init__(self, inp, out, pad):
        super().__init__()
        self.l_pad, self.r_pad = (out - inp + 1) // 2, (out - inp) // 2
        self.program = torch.nn.Parameter(torch.zeros(3, out, out))
        mask = torch.zeros(3, out, out)
        if pad > 0:
            mask[:, :pad, :] = 1
            mask[:, -pad:, :] = 1
            mask[:, :, :pad] = 1
            mask[:, :, -pad:] = 1
        self.register_buffer("mask", mask)
        self.mean = torch.tensor(prompts.IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(prompts.IMAGENET_STD).view(1, 3, 1, 1)

    def forward(self, x):
        x = torch.nn.functional.pad(x, (self.l_pad, self.r_pad, self.l_pad, self.r_pad), value=0)
        x = torch.clamp(x + self.program * self.mask, 0, 1)
        return (x - self.mean) / self.std


@pytest.mark.parametrize("inp, out, pad", [(24, 24, 4), (19, 24, 3)])
def test_pad_prompt_matches_torch_reference(inp, out, pad):
    rng = np.random.default_rng(0)
    x = _images(rng, 2, inp)
    program = rng.normal(scale=0.7, size=(out, out, 3)).astype(np.float32)
    program[0, :, :] = 0.0  # zero program over exact 0/1 pixels: values exactly at the bounds
    w = rng.normal(size=(2, out, out, 3)).astype(np.float32)
    spec = PromptSpec(input_size=inp, output_size=out, pad_size=pad)

    def loss(prompt):
        y = prompts.normalize(prompts.apply_prompt(prompt, jnp.asarray(x), spec))
        return jnp.sum(y * w), y

    (_, y), grad = jax.value_and_grad(loss, has_aux=True)({"program": jnp.asarray(program)})

    ref = _TorchPadVisualPrompt(inp, out, pad)
    with torch.no_grad():
        ref.program.copy_(torch.from_numpy(program).permute(2, 0, 1))
    yt = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
    (yt * torch.from_numpy(w).permute(0, 3, 1, 2)).sum().backward()

    np.testing.assert_allclose(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(grad["program"]), ref.program.grad.permute(1, 2, 0).numpy(), atol=1e-5
    )
