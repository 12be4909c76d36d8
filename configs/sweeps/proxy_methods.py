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
reused by the post-pruning prompt. 8 cells per seed, 24 in all. The cost measured for one cell and
the estimate for the whole sweep are in the docstring's last paragraph.

Cost (2-core CPU machine, 2026-12-01, compilation cache warm): the `random` cell (2 runs) took
RANDOM_CELL_S s; the proxy_compare config (35 runs at two sparsities, one seed) takes about 9 min,
so the sweep takes about 3 x 9 = 27 min plus about 1 min for the source model, on one worker.
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
