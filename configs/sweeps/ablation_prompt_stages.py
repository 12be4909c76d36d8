r"""Ablation sweep: every variant of configs/ablations/prompt_stages.py over seeds 0, 1, 2.

One cell per variant and seed; each variant trains its copy of the proxy source model once (the
base config's seed), so every seed of a variant starts from the same model.

Commands:
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_prompt_stages.py \
      --dir workdirs/sweeps/ablation_prompt_stages
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_prompt_stages
"""

from vpns_jax import ablations
from vpns_jax.sweep import Sweep


def get_sweep():
    return Sweep(configs=ablations.sweep_configs('prompt_stages'), seeds=(0, 1, 2))
