r"""Ablation on the offline proxy task (vpns_jax.ablations): Which VPNs stages train the prompt (Fig. A11).

Both (released code), mask finding only (the tuning stage keeps that prompt frozen) or subnetwork
tuning only (mask finding un-prompted); reference §9.7. Paper (40...90%): both 83.47 ... 80.87, mask
finding only 82.67 ... 79.97, tuning only 83.24 ... 80.66.

Argument `stages=` names the variant (default both); `vpns_jax.ablations.variants('prompt_stages')` lists
them, and an unknown one is a one-line error naming them. Base: VPNs on the quickstart's proxy task
(a width-0.25 ResNet-18 trained here on Fashion-MNIST, digits at 32 px), 8 + 8 epochs, sparsities
0.5 / 0.9 / 0.99.

Commands (one variant; then every variant over seeds 0, 1, 2, and their mean ± std table):
  python -m vpns_jax.main --config configs/ablations/prompt_stages.py:stages=tuning \
      --workdir workdirs/ablations/prompt_stages_tuning
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_prompt_stages.py \
      --dir workdirs/sweeps/ablation_prompt_stages
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_prompt_stages
"""

from vpns_jax import ablations


def get_config(arg=None):
    return ablations.get_config('prompt_stages', arg)
