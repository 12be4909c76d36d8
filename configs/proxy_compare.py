"""Every pruning method of the paper on the offline proxy task, one workdir, one results table.

Command:
  python -m vpns_jax.main --config configs/proxy_compare.py --workdir workdirs/proxy_compare

Source model: a width-0.25 ResNet-18 trained here on Fashion-MNIST (no ImageNet weights offline), saved
in the format of converted torchvision weights; downstream: scikit-learn's digits at 32 px, FLM 10 -> 10.
Methods: dense, VPNs, HYDRA, Random, OMP, LTH (3 rounds), SNIP, GraSP, SynFlow, BiP, VPNs w. Random/OMP/
LTH and the post-pruning-prompt pilot (OMP, HYDRA). Epochs keep the reference's ratios (§4.3, §5): a
baseline fine-tune of E = 16 epochs (argument `epochs=`) stands for 120, so HYDRA is E/2 + E/2, BiP E/2,
VPNs E/4 + E/4, VPNs w. X E/4, the pilot's prompt training E/2 (shortened). The shared dense fine-tune
runs once for dense, OMP, LTH, VPNs w. OMP/LTH and the pilot; LTH's rounds build on each other.
Learning rates are scaled up from the ImageNet-scale defaults as in configs/quickstart.py, because the
run is about 100x shorter. About 9 minutes on 2 CPU cores; the README shows a measured table.
Argument `fast` (E = 2, one sparsity, one LTH round) for a smoke run.
"""

from vpns_jax.config import parse_arg, proxy_task_config


def get_config(arg=None):
    args = parse_arg(arg, fast=False, epochs=16)
    c = proxy_task_config(args.fast)
    c.methods = ("dense,vpns,hydra,random,omp,lth,snip,grasp,synflow,bip,vpns_with,post_prompt")
    c.sparsities = (0.9,) if args.fast else (0.5, 0.9)
    e = 2 if args.fast else args.epochs  # stands for the reference's 120 epochs
    sgd = dict(lr=0.05)
    c.dense.update(epochs=e, **sgd)
    for name in ("random", "omp", "lth", "snip", "grasp", "synflow"):
        c[name].tuning.update(epochs=e, **sgd)
    c.lth.rounds = 1 if args.fast else 3  # 20%, 36%, 48.8%
    c.hydra.mask_finding.update(epochs=e // 2, optimizer="adam", lr=1e-2)
    c.hydra.tuning.update(epochs=e // 2, **sgd)
    c.vpns.mask_finding.update(epochs=e // 4, lr=1e-2, prompt_lr=1e-2)
    c.vpns.tuning.update(epochs=e // 4, lr=0.05, prompt_lr=0.05)
    c.bip.update(epochs=e // 2)
    c.bip.scores.lr = 1e-2
    c.bip.weights.lr = 0.05
    c.vpns_with.tuning.update(epochs=e // 4, lr=0.05, prompt_lr=0.05)
    c.post_prompt.sources = ("omp", "hydra")
    c.post_prompt.prompt.update(epochs=e // 2, lr=0.05)
    c.log_every_steps = 1000
    return c
