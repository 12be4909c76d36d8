"""The offline benchmark that separates methods (issue 15 item 8; EXPERIMENTS.md is generated from it).

Every method on the offline proxy task at high sparsity, 0.99 / 0.995 / 0.999, seeds 0, 1, 2:
  python -m vpns_jax.sweep --sweep configs/sweeps/benchmark.py --dir workdirs/sweeps/benchmark
  python -m vpns_jax.experiments_md --dir workdirs/sweeps/benchmark   # writes EXPERIMENTS.md + figure

Setting (a proxy, not the paper's): the base config is configs/proxy_compare.py with a baseline
fine-tune of E = 8 epochs (`epochs=8`; the other methods keep the reference's ratios to it: HYDRA
E/2 + E/2, BiP E/2, VPNs E/4 + E/4, VPNs w. X E/4, the pilot prompt E/2) and its learning rates
unchanged (set before this benchmark, the same for every method's stage type, not tuned on the test
set). At sparsity 0.9 every method but Random stays within about two points of dense on digits (the
proxy_compare table in the README), so the benchmark looks where the pruners must choose: about 1 in
100, 200 and 1,000 weights kept. LTH: 3 rounds at rate 0.9 (sparsities 0.9, 0.99, 0.999 = 1 − 0.1^r;
0.995 is not on its series), so it costs as much as one run per sparsity of the others.
"""

from vpns_jax.sweep import Sweep


def get_sweep():
    return Sweep(
        configs={"proxy": "configs/proxy_compare.py:epochs=8"},
        methods=("dense,omp,lth,vpns_with", "hydra,post_prompt", "vpns", "bip", "random", "snip",
                 "grasp", "synflow"),
        sparsities=(0.99, 0.995, 0.999),
        seeds=(0, 1, 2),
        overrides={"lth.rounds": 3, "lth.rate": 0.9},
    )
