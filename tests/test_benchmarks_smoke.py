"""The model-step benchmark runs end to end at a toy size (so it cannot rot)."""
import json

import pytest

from benchmarks import step


def test_step_benchmark_toy_size_with_torch(capsys):
    pytest.importorskip("torch")
    record = step.main([
        "--arch", "resnet18", "--size", "16", "--batch", "2", "--width", "0.0625",
        "--num-classes", "4", "--warmup", "0", "--repeats", "1", "--compare-torch",
    ])  # compile dominates: the persistent cache (conftest) makes reruns fast
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(record))
    assert set(record["images_per_s"]) == set(step.STEPS)
    assert all(v > 0 for v in record["images_per_s"].values())
    assert set(record["jax_over_torch"]) >= {"mask_finding", "tuning"}
    assert record["num_scores"] > 0 and record["threshold_ms"] > 0
    for key in ("cpu_s", "minor_faults", "torch_cpu_s", "torch_minor_faults"):
        assert set(record[key]) >= {"mask_finding", "tuning"}, key
        assert all(v >= 0 for v in record[key].values()), key


def test_step_benchmark_rejects_unknown_step():
    with pytest.raises(SystemExit):
        step.parse_args(["--steps", "dense,nope"])
