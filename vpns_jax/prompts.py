"""Visual prompts (VPNs §1): pad / fix / random, as pure functions of a prompt pytree.

Images are float32 NHWC in [0, 1] (not normalized). The prompted image is

    clamp01(zero_pad(x) + region ⊙ f(program)),    f = identity (pad) or sigmoid (fix, random)

and `normalize` (ImageNet mean/std) is applied after it, as a separate step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vpns_jax.errors import ConfigError

METHODS = ("pad", "fix", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """Static description of a visual prompt (hashable, usable as a jit static argument).

    method: 'pad' (raw program on a border frame of width `pad_size`), 'fix' (sigmoid of the
    program on the top-left `mask_size` square) or 'random' (sigmoid of the program on a `mask_size`
    square placed at a fresh random position on every forward). Images of `input_size` are
    zero-padded to `output_size`. pad_size is checked for 'pad' only, mask_size for 'fix'/'random'.
    """

    method: str = "pad"
    input_size: int = 224
    output_size: int = 224
    pad_size: int = 16
    mask_size: int = 115

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"PromptSpec.method={self.method!r}: allowed values are {METHODS}.")
        for name in ("input_size", "output_size", "mask_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"PromptSpec.{name}={value!r}: must be a positive integer.")
        pad = self.pad_size
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
            raise ConfigError(f"PromptSpec.pad_size={self.pad_size!r}: must be an integer >= 0.")
        if self.input_size > self.output_size:
            raise ConfigError(
                f"PromptSpec.input_size={self.input_size}: must be <= output_size "
                f"({self.output_size}); images are zero-padded up to the output size."
            )
        if self.method == "pad" and 2 * self.pad_size > self.output_size:
            raise ConfigError(
                f"PromptSpec.pad_size={self.pad_size}: must be <= output_size/2 "
                f"({self.output_size / 2:g})."
            )
        if self.method != "pad" and self.mask_size > self.output_size:
            raise ConfigError(
                f"PromptSpec.mask_size={self.mask_size}: must be <= output_size "
                f"({self.output_size})."
            )

    @property
    def padding(self) -> tuple[int, int]:
        """(left/top, right/bottom) zero padding in pixels from input_size to output_size."""
        gap = self.output_size - self.input_size
        return (gap + 1) // 2, gap // 2


def init_prompt(spec: PromptSpec) -> dict[str, jax.Array]:
    """Zero-initialised prompt pytree: {'program': f32[out, out, 3]}."""
    return {"program": jnp.zeros((spec.output_size, spec.output_size, 3), jnp.float32)}


def tunable_count(spec: PromptSpec) -> int:
    """Tunable program entries per channel (pad: 4·out·pad − 4·pad²; fix/random: mask²)."""
    if spec.method == "pad":
        return spec.output_size**2 - (spec.output_size - 2 * spec.pad_size) ** 2
    return spec.mask_size**2


def _square_mask(out: int, size: int, top: jax.Array | int, left: jax.Array | int) -> jax.Array:
    """f32[out, out, 1]: 1 on the size×size square whose top-left corner is (top, left)."""
    idx = jnp.arange(out)
    rows = (idx >= top) & (idx < top + size)
    cols = (idx >= left) & (idx < left + size)
    return (rows[:, None] & cols[None, :]).astype(jnp.float32)[..., None]


def random_corner(spec: PromptSpec, rng: jax.Array) -> jax.Array:
    """i32[2] (top, left) of the random prompt's square, each uniform in {0, …, out − mask − 1}.

    The reference draws with an exclusive upper bound out − mask (so the last position is never
    used); when out == mask that range is empty and the corner is 0.
    """
    high = max(spec.output_size - spec.mask_size, 1)
    return jax.random.randint(rng, (2,), 0, high, dtype=jnp.int32)


def region_mask(spec: PromptSpec, rng: jax.Array | None = None) -> jax.Array:
    """f32[out, out, 1] region where the program is added (a constant derived from the spec).

    pad: border frame of width pad_size; fix: top-left mask_size square; random: the square at
    `random_corner(spec, rng)` (rng required).
    """
    out = spec.output_size
    if spec.method == "pad":
        idx = jnp.arange(out)
        edge = (idx < spec.pad_size) | (idx >= out - spec.pad_size)
        return (edge[:, None] | edge[None, :]).astype(jnp.float32)[..., None]
    if spec.method == "fix":
        return _square_mask(out, spec.mask_size, 0, 0)
    if rng is None:
        raise ValueError("region_mask: method 'random' needs an rng (a new square per forward).")
    top, left = random_corner(spec, rng)
    return _square_mask(out, spec.mask_size, top, left)


@jax.custom_jvp
def clamp01(x: jax.Array) -> jax.Array:
    """Clamp to [0, 1] with PyTorch's gradient: 1 on the closed interval [0, 1], 0 outside."""
    return jnp.clip(x, 0.0, 1.0)


@clamp01.defjvp
def _clamp01_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    inside = (x >= 0.0) & (x <= 1.0)
    return clamp01(x), jnp.where(inside, t, jnp.zeros_like(t))


def pad_images(images: jax.Array, spec: PromptSpec) -> jax.Array:
    """Zero-pad f32[B, in, in, C] to f32[B, out, out, C].

    With g = out − in: left/top pad floor((g + 1) / 2), right/bottom pad floor(g / 2).
    """
    if images.ndim != 4 or images.shape[1:3] != (spec.input_size, spec.input_size):
        raise ValueError(
            f"prompt: images must be [B, {spec.input_size}, {spec.input_size}, C] "
            "(NHWC at input_size), "
            f"got shape {tuple(images.shape)}."
        )
    before, after = spec.padding
    if before == 0 and after == 0:
        return images
    return jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)))


def apply_prompt(
    prompt: dict[str, jax.Array],
    images: jax.Array,
    spec: PromptSpec,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Prompted images f32[B, out, out, 3] in [0, 1] from images f32[B, in, in, 3] in [0, 1].

    `rng` is required for method 'random' (one square position per call, shared by the batch).
    Program entries outside the region get zero gradient.
    """
    program = prompt["program"]
    if spec.method != "pad":
        program = jax.nn.sigmoid(program)
    x = pad_images(images, spec)
    return clamp01(x + region_mask(spec, rng) * program)


def normalize(images: jax.Array) -> jax.Array:
    """ImageNet normalization of NHWC images in [0, 1]: (x − mean) / std per channel."""
    mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(IMAGENET_STD, images.dtype)
    return (images - mean) / std
