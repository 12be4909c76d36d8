"""VPNs on cifar100 with the paper's settings.

Reference batch size, 30 + 30 epochs, input 224, pad prompt 16. Command (weights converted once with
`python -m vpns_jax.weights convert`):
  python -m vpns_jax.main --config configs/cifar100.py:arch=resnet18 \
      --workdir workdirs/cifar100_resnet18 --config.weights=resnet18.safetensors
Arguments: arch=resnet18|resnet34|resnet50|vgg16|vgg16_bn; method=NAME of vpns_jax.methods (several
joined with '+', e.g. dense+random+omp+lth+snip+grasp+synflow+hydra+bip+vpns for Fig. 4; LTH runs 10
rounds, 20%...89.26%); hparams=released|research; runlocal (a few steps, to check a set-up).
"""

from vpns_jax.config import paper_config


def get_config(arg=None):
    return paper_config("cifar100", arg)
