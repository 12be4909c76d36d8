r"""Ablation on the offline proxy task (vpns_jax.ablations): passes per iteration.

Two (the released code: the prompted non-augmented batch, then the un-prompted augmented batch) or
the prompted pass only (the paper's Eq. 5/6); reference §4.1. The paper reports no number for this
switch.

Argument `passes=` names the variant (default two); `vpns_jax.ablations.variants('passes')` lists
them, and an unknown one is a one-line error naming them. Base: VPNs on the quickstart's proxy task
(a width-0.25 ResNet-18 trained here on Fashion-MNIST, digits at 32 px), 8 + 8 epochs, sparsities
0.5 / 0.9 / 0.99.

Commands (one variant; then every variant over seeds 0, 1, 2, and their mean ± std table):
  python -m vpns_jax.main --config configs/ablations/passes.py:passes=prompted_only \
      --workdir workdirs/ablations/passes_prompted_only
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_passes.py \
      --dir workdirs/sweeps/ablation_passes
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_passes
"""

from vpns_jax import ablations


def get_config(arg=None):
    return ablations.get_config('passes', arg)
