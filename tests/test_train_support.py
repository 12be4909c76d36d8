"""Shared fixtures of the train/methods tests: a tiny BN CNN, in-memory batches, host snapshots.

(No tests here; pytest collects it harmlessly.)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax import prompts

SIZE = 8
NUM_SOURCE = 10
SPEC = prompts.PromptSpec('pad', input_size=SIZE, output_size=SIZE, pad_size=2)
LABEL_MAP = np.array([3, 1, 7], np.int32)  # 3 downstream classes -> source classes


class TinyNet(nn.Module):
    """conv(3x3) -> BN -> relu -> conv(1x1, bias) -> global mean -> dense (3 prunable kernels)."""

    num_classes: int = NUM_SOURCE

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3), use_bias=False, name='conv1')(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn1')(x)
        x = nn.relu(x)
        x = nn.Conv(5, (1, 1), name='conv2')(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name='fc')(x)


def init_variables(seed: int = 0) -> dict:
    """Pretrained-like variables: random params, non-trivial BN affine and running stats."""
    model = TinyNet()
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    variables = jax.tree.map(lambda x: x, dict(variables))
    rng = np.random.default_rng(seed)
    bn = dict(variables['params']['bn1'])
    bn['scale'] = jnp.asarray(1 + 0.1 * rng.standard_normal(6), jnp.float32)
    bn['bias'] = jnp.asarray(0.1 * rng.standard_normal(6), jnp.float32)
    params = dict(variables['params'])
    params['bn1'] = bn
    return {'params': params, 'batch_stats': variables['batch_stats']}


def batch(seed: int, n: int = 6, num_classes: int = 3) -> dict[str, np.ndarray]:
    """{'image': f32[n, 8, 8, 3] in [0, 1], 'label': i32[n]} with exact 0 and 1 pixels included."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(n, SIZE, SIZE, 3)).astype(np.float32)
    image[:, 0, 0] = 0.0
    image[:, -1, -1] = 1.0
    return {'image': image, 'label': rng.integers(0, num_classes, n).astype(np.int32)}


def snapshot(tree):
    """Host copy of a pytree (safe against donation)."""
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def random_prompt(seed: int = 1) -> dict[str, jnp.ndarray]:
    """A non-zero program so the prompted forward differs from the plain one."""
    rng = np.random.default_rng(seed)
    return {'program': jnp.asarray(0.1 * rng.standard_normal((SIZE, SIZE, 3)), jnp.float32)}


def leaves_equal_bits(a, b) -> bool:
    """Bit-identical pytrees (byte comparison, so -0.0 != 0.0 and NaN payloads count)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True))
