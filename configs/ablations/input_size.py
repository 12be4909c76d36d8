r"""Ablation on the offline proxy task (vpns_jax.ablations): input size.

The image is resized to 18, 23, 27 or 32 px and zero-padded to 32 px before the pad prompt (pad 4)
is added (the paper's 128/160/192/224 of 224); the source model is trained at 32 px whatever the
variant (`proxy.input_size`); reference §1.1, §9.7. Paper (pad 16, 40...90%): 128: 80.24 ... 78.48,
160: 81.87 ... 79.80, 192: 82.73 ... 80.57, 224: 83.47 ... 80.87.

Argument `size=` names the variant (default 32); `vpns_jax.ablations.variants('input_size')` lists
them, and an unknown one is a one-line error naming them. Base: VPNs on the quickstart's proxy task
(a width-0.25 ResNet-18 trained here on Fashion-MNIST, digits at 32 px), 8 + 8 epochs, sparsities
0.5 / 0.9 / 0.99.

Commands (one variant; then every variant over seeds 0, 1, 2, and their mean ± std table):
  python -m vpns_jax.main --config configs/ablations/input_size.py:size=23 \
      --workdir workdirs/ablations/input_size_23
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_input_size.py \
      --dir workdirs/sweeps/ablation_input_size
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_input_size
"""

from vpns_jax import ablations


def get_config(arg=None):
    return ablations.get_config('input_size', arg)
