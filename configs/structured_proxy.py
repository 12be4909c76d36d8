"""Structured pruning on the offline proxy task: channel VPNs, Slim and DepGraph at 10-50% channel
sparsity (and dense), one workdir, one results table with accuracy, parameters, FLOPs and the
measured latency speedup of each physically slimmed network.

Command:
  python -m vpns_jax.main --config configs/structured_proxy.py --workdir workdirs/structured_proxy

Task: the quickstart's (configs/proxy_compare.py): a width-0.25 ResNet-18 trained here on Fashion-MNIST
as the source model, then scikit-learn's digits at 32 px, FLM 10 -> 10. The paper's study is Figure 9
(ResNet-18, CIFAR-100, reference §9.5). Channel groups: `vpns_jax.structured` (residual-coupled
convs share one mask; the stem + layer1 group and layer1's first convs are capped at 25%).

Epochs (argument `epochs=`, default 4, stands for the reference's 30 tuning epochs, 7.5x shorter as
proxy_compare's E = 16 for 120): channel VPNs 1 + 1 + 4 for 5 + 5 + 30 (warm-up with the prompt, channel
mask finding, tuning); Slim 2 + 4 for 10 + 30 (sparse training, fine-tuning); DepGraph 2 + 4 for 10 + 30
(dense warm-up, fine-tuning); dense 6. Every method gets the same 6 epochs, as the 40 of the defaults.
Learning rates as proxy_compare: SGD 0.05 for weights, the prompt's 10x the default (channel VPNs:
warm-up / tuning prompt 0.05, mask-finding prompt Adam 1e-2); the channel scores keep the research
script's Adam lr 1, L2 0.1, value clipping 0.25. Slim's lambda = 1e-4 keeps lambda x lr x steps of
the reference setting (1e-5 x 0.01 x 10 epochs x 196 steps on CIFAR-100 ~ 1e-4 x 0.05 x 2 x 22 here).
The speedup column is measured at the end of each run (eval forward of one batch of 64 at 32 px on
this machine): at this tiny width and input it is mostly dispatch overhead, see BENCHMARKS.md for
ResNet-18 at 224 px. Argument `fast` (one sparsity, 1 epoch per stage) for a smoke run.
Measured 2026-12-01, 18:12-18:28 UTC: 16 min wall for the 16 runs on the shared 2-core machine
(load average 5-14), the source model copied from workdirs/proxy_compare (training it adds about
2-4 min); channel VPNs' mask finding compiles once per channel sparsity (its threshold count is
static), the other stages once in all.
"""

from vpns_jax.config import parse_arg, proxy_task_config


def get_config(arg=None):
    args = parse_arg(arg, fast=False, epochs=4)
    c = proxy_task_config(args.fast)
    c.methods = "dense,channel_vpns,slim,depgraph"
    c.sparsities = (0.3,) if args.fast else (0.1, 0.2, 0.3, 0.4, 0.5)
    tune = 1 if args.fast else args.epochs
    short = 1  # the reference's 5-epoch phases
    long = 1 if args.fast else 2  # the reference's 10-epoch phases
    sgd = dict(lr=0.05)
    c.dense.update(epochs=short + short + tune, **sgd)
    c.channel_vpns.warmup.update(epochs=short, prompt_lr=0.05, **sgd)
    c.channel_vpns.mask_finding.update(epochs=short, prompt_lr=1e-2)
    c.channel_vpns.tuning.update(epochs=tune, prompt_lr=0.05, **sgd)
    c.slim.sparse.update(epochs=long, **sgd)
    c.slim.l1 = 1e-4
    c.slim.tuning.update(epochs=tune, **sgd)
    c.depgraph.warmup.update(epochs=long, **sgd)
    c.depgraph.tuning.update(epochs=tune, **sgd)
    c.log_every_steps = 1000
    return c
