"""Every method on the offline proxy task (digits), sparsities 0.9 and 0.99, seeds 0, 1, 2.

Command (add `--workers 2` for two processes; or run the same command on several machines sharing
the directory):
  python -m vpns_jax.sweep --sweep configs/sweeps/proxy_methods.py --dir workdirs/sweeps/proxy_methods
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/proxy_methods

The base config is configs/proxy_compare.py (its epochs and learning rates: a baseline fine-tune of
16 epochs standing for the reference's 120; LTH 3 rounds, 20% / 36% / 48.8%, whatever the
sparsities). The Fashion-MNIST proxy source model is trained once (seed 7, the config's) and shared
by every cell. Methods that share stages are one cell (one workdir), so the dense fine-tune is
computed once per seed for dense, OMP, LTH and VPNs w. Random/OMP/LTH, and HYDRA's mask finding is
reused by the post-pruning prompt. 8 cells per seed, 24 in all.

Cost (measured 2026-12-01 on the project's 2-core CPU machine, shared with other jobs, compilation
cache warm): the source model 56 s; the largest cell, `dense+omp+lth+vpns_with` (13 rows: dense,
OMP x 2, LTH x 3, VPNs w. Random/OMP x 2, VPNs w. LTH x 3), 5 min 21 s. configs/proxy_compare.py runs
the same methods for one seed in about 9 min; split into 8 cells (each with its own set-up and
tracing, ~15 s, and the dense fine-tune once more for the pilot) a seed is about 11-12 min, so the
whole sweep is about 35-40 min on one worker (two workers on 2 cores gain little: each uses both).
"""

from vpns_jax.sweep import Sweep


def get_sweep():
    return Sweep(
        configs={"proxy": "configs/proxy_compare.py"},
        methods=("dense,omp,lth,vpns_with", "hydra,post_prompt", "vpns", "bip", "random", "snip",
                 "grasp", "synflow"),
        sparsities=(0.9, 0.99),
        seeds=(0, 1, 2),
    )
