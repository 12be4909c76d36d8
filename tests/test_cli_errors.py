"""User errors give one clear line (exit code 2, no traceback): unknown config fields, missing
config files, PyTorch checkpoints where project weights are expected, unwritable export paths.

The message builders are tested as functions; a subprocess only where the CLI itself is the point.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from vpns_jax import config as config_lib
from vpns_jax import experiment, export, main, weights
from vpns_jax.errors import VpnsError, WeightsError
from vpns_jax.weights import __main__ as weights_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpns_jax.main", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_clear_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a failed run (asserting exit code 2 and no traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-2000:]
    return errors[0]


def test_unknown_field_names_the_nearest_known_names():
    nested = main.unknown_field(["--config.vpns.mask_findng.lr=1"])
    assert nested.startswith("config.vpns has no option 'mask_findng' (from "
                             "--config.vpns.mask_findng.lr); did you mean 'mask_finding'? its options: ")
    assert "at_test, mask_finding, passes," in nested
    top = main.unknown_field(["--workdir=w", "--config.methds=dense"])
    assert "config has no option 'methds'" in top and "did you mean 'methods'?" in top
    deep = main.unknown_field(["--config.vpns.mask_finding.lrr=0.1"])
    assert "config.vpns.mask_finding has no option 'lrr'" in deep and "did you mean 'lr'" in deep
    nothing_near = main.unknown_field(["--config.zzzzzz=1"])
    assert "has no option 'zzzzzz'" in nothing_near and "did you mean" not in nothing_near
    assert main.unknown_field(["--config.vpns.mask_finding.lr=0.1"]) is None  # a real field


def test_missing_config_file_lists_the_shipped_configs(tmp_path):
    shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    for argv in (["--config", "configs/nope.py"], ["--config=configs/nope.py:3"]):
        message = main.missing_config_file(argv)
        assert message.startswith("config file configs/nope.py does not exist; the shipped configs in ")
        assert message.endswith(": " + ", ".join(shipped) + ".")
    real = os.path.join(ROOT, "configs", "quickstart.py")
    assert main.missing_config_file(["--config", real + ":arg", "--config.seed=1"]) is None
    assert main.missing_config_file(["--workdir", str(tmp_path)]) is None  # absl reports that


def test_cli_unknown_field_and_missing_or_broken_config_are_one_line(tmp_path):
    workdir = str(tmp_path / "w")
    line = _one_clear_line(_cli(["--config", "configs/quickstart.py", "--workdir", workdir,
                                 "--config.vpns.mask_findng.lr=1"], tmp_path))
    assert "config.vpns has no option 'mask_findng'" in line and "did you mean 'mask_finding'?" in line
    line = _one_clear_line(_cli(["--config", "configs/nope.py", "--workdir", workdir], tmp_path))
    assert line.startswith("error: config file configs/nope.py does not exist;")
    assert "quickstart.py" in line and not os.path.exists(workdir)
    broken = tmp_path / "broken.py"
    broken.write_text("import ml_collections\n\ndef get_config(:\n    pass\n")
    line = _one_clear_line(_cli(["--config", str(broken), "--workdir", workdir], tmp_path))
    assert line == f"error: config file {broken}, line 3: invalid syntax: 'def get_config(:'"



def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["vpns_jax.main", "stray"])  # checked before any flag is read
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: unexpected arguments: stray (usage: python -m vpns_jax.main --config "
                   "configs/<file>.py[:args] --workdir DIR [--config.x=v]; --help lists the flags)\n")


def test_pytorch_checkpoints_point_to_weights_convert(tmp_path):
    torch = pytest.importorskip("torch")  # the project's test extras install it
    state = {"conv1.weight": torch.zeros(2, 3, 1, 1)}
    zipped, legacy, junk = tmp_path / "r18.pth", tmp_path / "old.pth", tmp_path / "model.bin"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    junk.write_bytes(b"\x00" * 64)
    expected = {zipped: "is a PyTorch checkpoint (torch.save zip archive)",
                legacy: "is a PyTorch checkpoint (legacy pickle format)",
                junk: "is probably a PyTorch checkpoint (by its .bin name)"}
    for path, what in expected.items():
        with pytest.raises(WeightsError) as info:
            weights.load(path, arch_hint="resnet50")
        out = path.with_suffix(".safetensors")
        assert str(info.value) == (
            f"{path} {what}, not a project weights file (.safetensors); convert it once with "
            f"`python -m vpns_jax.weights convert --arch resnet50 --src {path} --out {out}` and "
            f"pass --config.weights={out}.")
    renamed = tmp_path / "r18.safetensors"  # a .pth renamed: its bytes tell
    renamed.write_bytes(zipped.read_bytes())
    with pytest.raises(WeightsError, match=r"r18.safetensors is a PyTorch checkpoint \(torch.save zip"):
        weights.load(renamed)
    from safetensors.numpy import save_file

    for pad in range(256):  # a real safetensors file whose header length's low byte is 0x80
        plain = tmp_path / "plain.safetensors"
        save_file({"conv1.weight": np.zeros(1, np.float32)}, plain, metadata={"p": "x" * pad})
        if plain.read_bytes()[0] == 0x80:
            break
    assert plain.read_bytes()[0] == 0x80
    with pytest.raises(WeightsError, match="not a vpns_jax weights file"):
        weights.load(plain)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(WeightsError, match=r"notes.txt is of an unknown format, .*--arch ARCH"):
        weights.load(other)
    cut = tmp_path / "cut.safetensors"  # a damaged safetensors file keeps its own message
    cut.write_bytes(b"\x10")
    with pytest.raises(WeightsError, match="cut.safetensors: corrupt or truncated"):
        weights.load(cut)
    config = config_lib.default_config()  # the run's path to the weights passes its arch
    config.arch = "vgg16"
    with pytest.raises(WeightsError, match=f"convert --arch vgg16 --src {zipped} --out "):
        experiment._load_pretrained(config, str(zipped))


def test_export_to_an_unwritable_path_is_one_line(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    (workdir / "final" / "vpns_s0.5").mkdir(parents=True)  # found before anything is loaded
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = str(blocker / "model.safetensors")  # its folder would be a file: fails even as root
    with pytest.raises(VpnsError, match=f"cannot write --out {out}: its folder {blocker} cannot be "
                                        "created"):
        export.export_run(str(workdir), "vpns_s0.5", out)
    assert export.main(["--workdir", str(workdir), "--run", "vpns_s0.5", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write --out {out}:") and err.count("\n") == 1
    with pytest.raises(VpnsError, match=f"cannot write --out {tmp_path}: it is a folder"):
        export.export_run(str(workdir), "vpns_s0.5", str(tmp_path))
    from safetensors.numpy import save_file

    gone = str(tmp_path / "gone" / "x.safetensors")  # a write that fails after the checks
    with pytest.raises(VpnsError, match=f"cannot write {gone}: .*No such file or directory"):
        with export._writing(gone):
            save_file({"a": np.zeros(2, np.float32)}, gone)
    # the weights CLI, same --out: its real write (weights.save) fails, one line names the path
    monkeypatch.setattr(weights_main, "export", lambda src, out_path: weights.save(
        out_path, "resnet18", {"params": {}}, options={}))
    assert weights_main.main(["export", "--src", "any.safetensors", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker}: ") and "check the path" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
