"""Config files load, defaults follow the released code, and every bad field is named in the error."""

import glob
import importlib.util
import os

import pytest

from vpns_jax import config as cfg
from vpns_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, arg=None):
    spec = importlib.util.spec_from_file_location("cfgmod", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def _valid(**changes):
    c = cfg.default_config()
    c.weights = "w.safetensors"
    cfg.apply_overrides(c, changes)
    return c


def test_defaults_are_the_released_code():
    c = cfg.default_config()
    assert (c.input_size, c.prompt.output_size, c.prompt.pad_size, c.prompt.method) == (224, 224, 16, "pad")
    v = c.vpns
    assert (v.mask_finding.optimizer, v.mask_finding.lr, v.mask_finding.weight_decay) == ("adam", 1e-4, 1e-4)
    assert (v.tuning.optimizer, v.tuning.lr, v.tuning.momentum) == ("sgd", 0.01, 0.9)
    assert (v.mask_finding.epochs, v.tuning.epochs) == (30, 30)
    assert v.passes == "two" and v.at_test is False and v.threshold == "global"
    assert (c.hydra.mask_finding.epochs, c.hydra.tuning.epochs) == (60, 60)
    assert (c.hydra.mask_finding.optimizer, c.hydra.mask_finding.lr) == ("sgd", 0.01)
    # Baselines (reference §5.0-5.9): 120 fine-tuning epochs of SGD 0.01; BiP 60 joint epochs.
    for name in ("dense",):
        assert (c[name].epochs, c[name].optimizer, c[name].lr) == (120, "sgd", 0.01)
    for name in ("random", "omp", "lth", "snip", "grasp", "synflow"):
        assert (c[name].tuning.epochs, c[name].tuning.optimizer, c[name].tuning.lr) == (120, "sgd", 0.01)
    assert (c.lth.rate, c.grasp.temperature, c.grasp.mask_mode, c.synflow.iterations) == (
        0.2, 200.0, "ratios", 100)
    assert (c.bip.epochs, c.bip.bilevel_lr, c.bip.scores.optimizer, c.bip.weights.optimizer) == (
        60, 1e-4, "adam", "sgd")
    assert c.vpns_with.at_test is True and c.vpns_with.tuning.epochs == 30


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_file_validates(path):
    c = _load(path, "") if "quickstart" not in path else _load(path)
    if not c.weights and not c.get("proxy", {}).get("dataset"):
        c.weights = "w.safetensors"
    cfg.validate(c)


def test_paper_config_batch_sizes_and_research_overrides():
    assert cfg.paper_config("dtd").batch_size == 64
    assert cfg.paper_config("oxford_flowers102").batch_size == 128
    assert cfg.paper_config("cifar100").batch_size == 256
    research = cfg.paper_config("stanford_cars", "hparams=research,arch=resnet50")
    assert research.arch == "resnet50"
    assert (research.vpns.tuning.optimizer, research.vpns.tuning.lr) == ("adam", 1e-3)
    assert (research.omp.tuning.optimizer, research.snip.tuning.lr) == ("adam", 1e-4)
    assert research.hydra.mask_finding.optimizer == "adam"
    assert cfg.paper_config("oxford_iiit_pet", "hparams=research").lth.tuning.lr == 1e-3
    assert cfg.paper_config("oxford_iiit_pet").lth.tuning.lr == 0.01
    assert cfg.method_list(cfg.paper_config("dtd", "method=vpns+hydra+dense")) == ["dense", "vpns", "hydra"]
    local = cfg.paper_config("cifar10", "runlocal")
    assert local.steps_per_epoch == 2 and local.sparsities == (0.5,)


def test_unknown_config_argument_is_named():
    with pytest.raises(ConfigError, match="Unknown config argument 'bogus'.*allowed: arch"):
        cfg.paper_config("cifar10", "bogus=1")


@pytest.mark.parametrize("changes, field", [
    ({"sparsities": (0.5, 1.0)}, "sparsities"),
    ({"sparsities": (-0.1,)}, "sparsities"),
    ({"sparsities": ()}, "sparsities"),
    ({"methods": "vpns,omp2"}, "methods"),
    ({"prompt.method": "spiral"}, "prompt.method"),
    ({"prompt.pad_size": 200}, "prompt.pad_size"),
    ({"input_size": 0}, "input_size"),
    ({"input_size": 256}, "input_size"),
    ({"label_mapping": "best"}, "label_mapping"),
    ({"vpns.passes": "three"}, "vpns.passes"),
    ({"vpns.tuning.optimizer": "rmsprop"}, "vpns.tuning.optimizer"),
    ({"vpns.mask_finding.lr": -1.0}, "vpns.mask_finding.lr"),
    ({"vpns.tuning.momentum": 1.5}, "vpns.tuning.momentum"),
    ({"methods": "omp", "omp.scope": "row"}, "omp.scope"),
    ({"methods": "grasp", "grasp.mask_mode": "best"}, "grasp.mask_mode"),
    ({"methods": "random", "random.mode": "uniform"}, "random.mode"),
    ({"methods": "bip", "bip.implicit": "exact"}, "bip.implicit"),
    ({"methods": "vpns_with", "vpns_with.sources": ("omp", "snip")}, "vpns_with.sources"),
    ({"methods": "lth", "lth.rate": 1.2}, "lth.rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"weights": ""}, "weights"),
])
def test_bad_field_is_named_with_allowed_values(changes, field):
    with pytest.raises(ConfigError, match=rf"config\.{field} = .* expected"):
        cfg.validate(_valid(**changes))


def test_unknown_arch_and_dataset_list_the_known_ones():
    with pytest.raises(ConfigError, match="config.arch = 'resnet19'.*'resnet18'"):
        cfg.validate(_valid(arch="resnet19"), known_archs=("resnet18", "vgg16"))
    with pytest.raises(ConfigError, match="config.dataset = 'cifar11'.*'cifar10'"):
        cfg.validate(_valid(dataset="cifar11"), known_datasets=("cifar10",))


def test_parse_arg_types():
    args = cfg.parse_arg("n=3,flag,x=0.5,name=a", n=1, flag=False, x=0.1, name="b")
    assert (args.n, args.flag, args.x, args.name) == (3, True, 0.5, "a")
    with pytest.raises(ConfigError, match="needs a value"):
        cfg.parse_arg("n", n=1)
