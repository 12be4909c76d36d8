r"""Ablation on the offline proxy task (vpns_jax.ablations): prompt type.

The pad prompt (a learned frame of `prompt.pad_size` px added to the image), the fixed prompt
(sigmoid of a learned 21 x 21 square at the top left) or the random prompt (the same square at a
random place on every forward pass, training and test alike); reference §1.2, §9.7. Paper
(ResNet-18, CIFAR-100, sparsity 40...90%): pad 83.47 ... 80.87, fix 82.98 ... 80.55, random 82.93
... 81.07.

Argument `type=` names the variant (default pad); `vpns_jax.ablations.variants('prompt_type')` lists
them, and an unknown one is a one-line error naming them. Base: VPNs on the quickstart's proxy task
(a width-0.25 ResNet-18 trained here on Fashion-MNIST, digits at 32 px), 8 + 8 epochs, sparsities
0.5 / 0.9 / 0.99.

Commands (one variant; then every variant over seeds 0, 1, 2, and their mean ± std table):
  python -m vpns_jax.main --config configs/ablations/prompt_type.py:type=fix \
      --workdir workdirs/ablations/prompt_type_fix
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_prompt_type.py \
      --dir workdirs/sweeps/ablation_prompt_type
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_prompt_type
"""

from vpns_jax import ablations


def get_config(arg=None):
    return ablations.get_config('prompt_type', arg)
