r"""Ablation on the offline proxy task (vpns_jax.ablations): pad prompt width.

2, 4, 6 or 8 px of 32 (the paper's 16/32/48/64 of 224); reference §9.7. Paper (input 224, 40...90%):
16: 83.47 ... 80.87, 32: 83.22 ... 80.66, 48: 83.06 ... 80.43, 64: 83.00 ... 80.45.

Argument `pad=` names the variant (default 4); `vpns_jax.ablations.variants('pad_size')` lists
them, and an unknown one is a one-line error naming them. Base: VPNs on the quickstart's proxy task
(a width-0.25 ResNet-18 trained here on Fashion-MNIST, digits at 32 px), 8 + 8 epochs, sparsities
0.5 / 0.9 / 0.99.

Commands (one variant; then every variant over seeds 0, 1, 2, and their mean ± std table):
  python -m vpns_jax.main --config configs/ablations/pad_size.py:pad=8 \
      --workdir workdirs/ablations/pad_size_8
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_pad_size.py \
      --dir workdirs/sweeps/ablation_pad_size
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_pad_size
"""

from vpns_jax import ablations


def get_config(arg=None):
    return ablations.get_config('pad_size', arg)
