r"""Ablation sweep: every variant of configs/ablations/passes.py over seeds 0, 1, 2.

One cell per variant and seed; each variant trains its copy of the proxy source model once (the
base config's seed), so every seed of a variant starts from the same model.

Commands:
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_passes.py \
      --dir workdirs/sweeps/ablation_passes
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_passes
"""

from vpns_jax import ablations
from vpns_jax.sweep import Sweep


def get_sweep():
    return Sweep(configs=ablations.sweep_configs('passes'), seeds=(0, 1, 2))
