"""Weight import/export: parity with PyTorch forwards, bit-exact round trips, safety, errors.

Every architecture is checked at full (torchvision) width against the plain-torch models of
benchmarks/torch_reference.py, whose keys/shapes equal torchvision's.
"""
from __future__ import annotations

import copy
import os
import pickle
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import traverse_util

from vpns_jax import models, weights
from vpns_jax.errors import WeightsError
from vpns_jax.weights.__main__ import main as cli
from vpns_jax.weights.keys import describe_layout, flax_path, torch_key
from vpns_jax.weights.pth import read_pth

torch = pytest.importorskip("torch")
from benchmarks.torch_reference import build  # noqa: E402

PARITY_RTOL = 1e-5
# Full torchvision width for resnet18 and vgg16_bn; the others at width 0.25 to keep the suite
# fast on 2 CPU cores. VPNS_FULL_PARITY=1 adds full-width runs of the others.
FULL = os.environ.get("VPNS_FULL_PARITY") == "1"
CASES = [("resnet18", 1.0), ("resnet34", 0.25), ("resnet50", 0.25), ("vgg16", 0.25),
         ("vgg16_bn", 1.0)]
CASES += [("resnet34", 1.0), ("resnet50", 1.0), ("vgg16", 1.0)] if FULL else []
TRAIN_CASES = [("resnet18", 1.0), ("resnet50", 0.25), ("vgg16_bn", 0.25)]
TRAIN_CASES += [("resnet50", 1.0), ("vgg16_bn", 1.0)] if FULL else []
# Bit-exactness does not depend on width: the 528 MB VGG-16-BN is exported only with FULL.
ROUND_TRIP_CASES = [c for c in CASES if c != ("vgg16_bn", 1.0) or FULL] + [("vgg16_bn", 0.25)]


def _randomize(model: Any, seed: int) -> Any:
    """Seeded torch model with non-trivial BN affine params and running stats."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(int(torch.randint(0, 10_000, ())))
    return model


def _small(arch: str, seed: int = 0, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    return _randomize(build(arch, width=1 / 16, **kwargs), seed)


@dataclass
class Converted:
    arch: str
    torch_model: Any
    pth: Path
    out: Path
    variables: dict
    meta: dict


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache: dict[str, Converted] = {}

    def get(arch: str, width: float = 1.0) -> Converted:
        if (arch, width) not in cache:
            d = tmp_path_factory.mktemp(arch)
            torch.manual_seed(1)
            model = _randomize(build(arch, width=width), 1).eval()
            pth, out = d / f"{arch}.pth", d / f"{arch}.safetensors"
            torch.save(model.state_dict(), pth)
            weights.convert(arch, pth, out, width=width, check_forward=False)
            name, variables, meta = weights.load(out)
            assert name == arch and meta["options"]["width"] == width
            cache[arch, width] = Converted(arch, model, pth, out, variables, meta)
        return cache[arch, width]

    return get


def _images(arch: str) -> np.ndarray:
    size = 32 if arch.startswith("vgg") else 64
    return np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _nchw(x: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize(("arch", "width"), CASES)
def test_eval_logits_match_pytorch(converted, arch, width):
    c = converted(arch, width)
    x = _images(arch)
    with torch.no_grad():
        want = c.torch_model.eval()(_nchw(x)).numpy()
    model = models.create(arch, **c.meta["options"])
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda v, x: model.apply(v, x, train=False))(c.variables, x)
    rel = _rel(got, want)
    print(f"\n{arch} width {width} eval max rel error {rel:.2e}")
    assert got.shape == (2, 1000) and rel < PARITY_RTOL


@pytest.mark.parametrize(("arch", "width"), TRAIN_CASES)
def test_train_forward_and_running_stats_match_pytorch(converted, arch, width):
    """Train mode (batch statistics) is ill-conditioned in float32 (few samples per channel deep in
    the net), so both float32 results are compared with a float64 torch run: vpns_jax must be within
    max(1e-5, 2× PyTorch-float32's own error)."""
    c = converted(arch, width)
    x = _images(arch)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        tm = copy.deepcopy(c.torch_model).to(dtype).train()
        for mod in tm.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0  # vpns_jax VGG without a 'dropout' rng is deterministic
        with torch.no_grad():
            runs[dtype] = tm(_nchw(x).to(dtype)).numpy(), tm.state_dict()
    (out32, sd32), (out64, sd64) = runs[torch.float32], runs[torch.float64]
    model = models.create(arch, **c.meta["options"])
    with jax.default_matmul_precision("highest"):
        got, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            c.variables, x)
    stats = traverse_util.flatten_dict(upd["batch_stats"], sep="/")
    keys = {p: torch_key(f"batch_stats/{p}") for p in stats}
    rel, rel_torch = _rel(got, out64), _rel(out32, out64)
    stat_rel = max(_rel(v, sd64[keys[p]].numpy()) for p, v in stats.items())
    stat_rel_torch = max(_rel(sd32[k].numpy(), sd64[k].numpy()) for k in keys.values())
    print(f"\n{arch} width {width} train max rel error vs float64: vpns_jax {rel:.2e} "
          f"(torch f32 {rel_torch:.2e}); running stats {stat_rel:.2e} "
          f"(torch f32 {stat_rel_torch:.2e})")
    assert rel < max(PARITY_RTOL, 2 * rel_torch)
    assert stat_rel < max(PARITY_RTOL, 2 * stat_rel_torch)
    old = traverse_util.flatten_dict(c.variables["batch_stats"], sep="/")
    first = "bn1/var" if "bn1/var" in old else "features_1/var"
    assert not np.allclose(stats[first], old[first])


def _assert_same_state(got: OrderedDict, want: OrderedDict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        g = got[k]
        assert g.dtype == v.dtype and g.shape == v.shape, k
        assert torch.equal(g, v), k


@pytest.mark.parametrize(("arch", "width"), ROUND_TRIP_CASES)
def test_export_pth_round_trip_is_bit_exact(converted, arch, width, tmp_path):
    c = converted(arch, width)
    out = tmp_path / "back.pth"
    assert cli(["export", "--src", str(c.out), "--out", str(out)]) == 0
    _assert_same_state(torch.load(out, weights_only=True), c.torch_model.state_dict())
    out.unlink()


def test_export_safetensors_and_safetensors_source(converted, tmp_path):
    from safetensors.numpy import load_file, save_file

    c = converted("resnet18")
    sd = c.torch_model.state_dict()
    out = tmp_path / "back.safetensors"
    weights.export(c.out, out)
    back = load_file(out)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.numpy().dtype and np.array_equal(back[k], v.numpy()), k
    # A timm/HF-style .safetensors source converts to the very same variables.
    src = tmp_path / "model.safetensors"
    save_file({k: v.numpy() for k, v in sd.items()}, src)
    weights.convert("resnet18", src, tmp_path / "p.safetensors", check_forward=False)
    _, variables, meta = weights.load(tmp_path / "p.safetensors")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), variables, c.variables)
    assert meta["source"]["file"] == "model.safetensors" and len(meta["source"]["sha256"]) == 64


def test_key_mapping_is_one_to_one():
    for arch in models.ARCHS:
        sd = build(arch, width=1 / 16).state_dict()
        layout = weights.expected_shapes(arch, {"width": 1 / 16})
        keys = {torch_key(p) for p in layout}
        assert keys == {k for k in sd if not k.endswith("num_batches_tracked")}
        for p in layout:
            assert flax_path(torch_key(p), sd[torch_key(p)].ndim) == p
    assert torch_key("params/layer1_0/downsample_0/kernel") == "layer1.0.downsample.0.weight"
    assert torch_key("batch_stats/features_1/var") == "features.1.running_var"
    assert flax_path("classifier.6.weight", 2) == "params/classifier_6/kernel"


def test_describe_layout_names_each_architecture():
    want = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
            "vgg16": "vgg16 (", "vgg16_bn": "vgg16_bn"}
    for arch, text in want.items():
        shapes = {k: tuple(v.shape) for k, v in build(arch, width=0.25).state_dict().items()}
        assert describe_layout(shapes).startswith(text)
    shapes = {k: tuple(v.shape) for k, v in
              build("resnet18", 10, 0.25, small_input=True).state_dict().items()}
    assert describe_layout(shapes) == "resnet18 (small_input=True, width≈0.25, num_classes=10)"


class _Payload:
    """Unpickling this calls os.system / eval to create a marker file."""

    def __init__(self, marker: Path, use_eval: bool = False):
        self.marker, self.use_eval = marker, use_eval

    def __reduce__(self):
        if self.use_eval:
            return (eval, (f"open({str(self.marker)!r}, 'w')",))
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["zip_system", "zip_eval", "plain_pickle"])
def test_unsafe_pickle_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"conv1.weight": _Payload(marker)}))
    else:
        payload = _Payload(marker, use_eval=kind == "zip_eval")
        torch.save({"conv1.weight": torch.zeros(2), "x": payload}, path)
    with pytest.raises(WeightsError, match="asks to run code .*refused for security"):
        weights.convert("resnet18", path, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    # The payload is real: a plain unpickler would have run it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()


def test_wrong_architecture_names_what_the_file_looks_like(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_small("resnet18").state_dict(), path)
    with pytest.raises(WeightsError) as e:
        weights.convert("resnet50", path, tmp_path / "o.safetensors", width=1 / 16)
    msg = str(e.value)
    assert "missing keys (" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches (" in msg and "looks like: resnet18 (width≈0.0625" in msg
    path = tmp_path / "vgg.pth"
    torch.save(_small("vgg16").state_dict(), path)
    with pytest.raises(WeightsError, match=r"looks like: vgg16 \(width") as e:
        weights.convert("vgg16_bn", path, tmp_path / "o.safetensors", width=1 / 16)
    with pytest.raises(WeightsError, match=r"shape mismatches \(\d+\): features.0.weight"):
        weights.convert("vgg16", path, tmp_path / "o.safetensors", width=1 / 8)


def test_truncated_and_missing_files(tmp_path, capsys):
    path = tmp_path / "r18.pth"
    torch.save(_small("resnet18").state_dict(), path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated.pth: corrupt or truncated"):
        weights.read_state_dict(bad)
    legacy = tmp_path / "legacy.pth"
    torch.save(_small("resnet18").state_dict(), legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        weights.read_state_dict(legacy)
    st = tmp_path / "cut.safetensors"
    weights.save(st, "resnet18", weights.convert_state_dict(
        _state(_small("resnet18")), "resnet18", {"width": 1 / 16})[0],
        options={"width": 1 / 16}, source=None)
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cut.safetensors: corrupt or truncated"):
        weights.load(st)
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=r"nope.pth does not exist.*load_state_dict_from_url"):
        weights.convert("resnet18", missing, tmp_path / "o.safetensors")
    assert cli(["convert", "--arch", "resnet18", "--src", str(missing), "--out", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _state(model: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_nested_prefixed_legacy_and_timm_layouts_give_the_same_variables(tmp_path):
    model = _small("vgg16_bn")
    sd = model.state_dict()
    want, _ = weights.convert_state_dict(_state(model), "vgg16_bn", {"width": 1 / 16})
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "state_dict": OrderedDict(("module." + k, v) for k, v in sd.items())},
               nested)
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    timm = {k: v.numpy() for k, v in sd.items()}
    for old, new, shape in (("classifier.0", "pre_logits.fc1", (-1, 32, 7, 7)),
                            ("classifier.3", "pre_logits.fc2", (-1, 256, 1, 1)),
                            ("classifier.6", "head.fc", None)):
        w, b = timm.pop(f"{old}.weight"), timm.pop(f"{old}.bias")
        timm[f"{new}.weight"] = w.reshape(shape) if shape else w
        timm[f"{new}.bias"] = b
    from safetensors.numpy import save_file

    save_file(timm, tmp_path / "timm.safetensors")
    for src in (nested, legacy, tmp_path / "timm.safetensors"):
        state, notes = weights.read_state_dict(src)
        got, _ = weights.convert_state_dict(state, "vgg16_bn", {"width": 1 / 16})
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)


def test_half_precision_source_and_missing_num_batches_tracked_round_trip(tmp_path):
    from safetensors.numpy import load_file, save_file

    sd = {k: (v.astype(np.float16) if v.dtype == np.float32 else v)
          for k, v in _state(_small("resnet18")).items() if not k.endswith("num_batches_tracked")}
    src, out = tmp_path / "h.safetensors", tmp_path / "p.safetensors"
    back = tmp_path / "b.safetensors"
    save_file(sd, src)
    weights.convert("resnet18", src, out, width=1 / 16)
    weights.export(out, back)
    got = load_file(back)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == np.float16 and np.array_equal(got[k], v), k
    # A model saved without torch metadata (e.g. a proxy) exports num_batches_tracked = 0.
    _, variables, _ = weights.load(out)
    source = {"proxy": "test", "train_accuracy": np.float32(0.5), "train_loss": None}
    weights.save(out, "resnet18", variables, options={"width": 1 / 16}, source=source)
    assert weights.load(out)[2]["source"] == {"proxy": "test", "train_accuracy": 0.5,
                                              "train_loss": None}
    state = weights.export(out, back)
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    assert int(state["layer1.0.bn2.num_batches_tracked"]) == 0


def test_cli_convert_and_export_small_input(tmp_path):
    model = _small("resnet18", num_classes=10, small_input=True)
    src = tmp_path / "r.pth"
    torch.save(model.state_dict(), src)
    out, back = tmp_path / "r.safetensors", tmp_path / "back.pth"
    assert cli(["convert", "--arch", "resnet18", "--src", str(src), "--out", str(out),
                "--width", "0.0625", "--small-input", "--no-check"]) == 0
    arch, variables, meta = weights.load(out)
    assert meta["options"] == {"num_classes": 10, "width": 0.0625, "small_input": True}
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    got = models.create(arch, **meta["options"]).apply(variables, x)
    with torch.no_grad():
        want = model.eval()(_nchw(x)).numpy()
    assert _rel(got, want) < PARITY_RTOL
    assert cli(["export", "--src", str(out), "--out", str(back)]) == 0
    _assert_same_state(torch.load(back, weights_only=True), model.state_dict())


def test_load_rejects_non_project_files(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"conv1.weight": np.zeros((1, 3, 3, 3), np.float32)}, path)
    with pytest.raises(WeightsError, match="not a vpns_jax weights file.*convert"):
        weights.load(path)


def test_pth_reader_handles_strided_shared_and_scalar_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = OrderedDict(sliced=base[1:, 2:5], transposed=base.t(), whole=base,
                     half=torch.linspace(0, 1, 5, dtype=torch.float16),
                     count=torch.tensor(123456789012, dtype=torch.int64))
    for zip_format in (True, False):
        path = tmp_path / f"t{zip_format}.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
        got = read_pth(path)
        assert list(got) == list(sd)
        for k, v in sd.items():
            assert got[k].dtype == v.numpy().dtype and np.array_equal(got[k], v.numpy()), k
    torch.save({"w": torch.zeros(2, dtype=torch.bfloat16)}, tmp_path / "bf.pth")
    with pytest.raises(WeightsError, match="BFloat16Storage are not supported"):
        read_pth(tmp_path / "bf.pth")


def test_reading_needs_no_torch_and_pth_export_without_torch_says_what_to_do(tmp_path, monkeypatch):
    model = _small("resnet18")
    src = tmp_path / "r.pth"
    torch.save(model.state_dict(), src)
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError
    out = tmp_path / "r.safetensors"
    weights.convert("resnet18", src, out, width=1 / 16, check_forward=False)
    with pytest.raises(WeightsError, match=r"needs torch .*r\.safetensors"):
        weights.export(out, tmp_path / "r.pth")
    state = weights.export(out, tmp_path / "back.safetensors")
    assert np.array_equal(state["conv1.weight"], model.state_dict()["conv1.weight"].numpy())
