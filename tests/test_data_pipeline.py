"""The grain pipeline: views, shapes, determinism, sharding, eval padding, resumption, errors.

Real data: scikit-learn's digits (the project's offline builder, prepared once per module).
Catalogue datasets: through ``tfds.testing.mock_data``.
"""

import importlib.util
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vpns_jax.data import __main__ as cli
from vpns_jax.data import pipeline, preparation, registry
from vpns_jax.errors import DataError

S = 8  # input size: small, so the tests are fast


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    preparation.prepare("digits", data_dir=path)
    return path


def _epoch(data_dir, epoch=0, **kwargs):
    args = dict(view="train", input_size=S, batch_size=64, seed=7, data_dir=data_dir) | kwargs
    return list(pipeline.train_loader("digits", **args).epoch(epoch))


def test_digits_counts_classes_and_idempotent_prepare(data_dir):
    assert pipeline.num_examples("digits", "train", data_dir=data_dir) == 1438
    assert pipeline.num_examples("digits", "test", data_dir=data_dir) == 359
    assert pipeline.class_names("digits", data_dir=data_dir) == [str(d) for d in range(10)]
    assert preparation.is_prepared("digits", data_dir=data_dir)
    preparation.prepare("digits", data_dir=data_dir)  # already prepared: returns at once
    preparation.ensure_prepared("digits", data_dir=data_dir)


@pytest.mark.parametrize("view", ["train", "prompt"])
def test_train_views_shapes_dtypes_range(data_dir, view):
    loader = pipeline.train_loader(
        "digits", view=view, input_size=S, batch_size=64, seed=0, data_dir=data_dir
    )
    assert loader.steps_per_epoch == len(loader) == 1438 // 64 == 22
    batches = list(loader.epoch(0))
    assert len(batches) == 22
    for batch in batches:
        assert batch["image"].shape == (64, S, S, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # grey
    labels = np.concatenate([b["label"] for b in batches])
    assert set(labels.tolist()) == set(range(10))


def test_prompt_view_is_resize_only_and_train_view_matches_its_transform(data_dir):
    records = pipeline.open_split("digits", "train", data_dir=data_dir)
    for view in ("prompt", "train"):
        loader = pipeline.train_loader(
            "digits", view=view, input_size=S, batch_size=64, seed=3, data_dir=data_dir
        )
        keys, positions = loader.plan(1)
        batch = next(loader.epoch(1))
        for i in (0, 5, 63):
            image = records[int(keys[0, i])]["image"]
            if view == "prompt":
                from vpns_jax.data.transforms import eval_transform as f

                expected = f(image, S)
            else:
                expected = pipeline._Transform(S, True, 3, 0, 1)(image, int(positions[0, i]))
            np.testing.assert_array_equal(batch["image"][i], expected)
            assert batch["label"][i] == records[int(keys[0, i])]["label"]


def test_same_seed_same_batches_next_epoch_new_order(data_dir):
    a, b = _epoch(data_dir), _epoch(data_dir)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    loader = pipeline.train_loader("digits", input_size=S, batch_size=64, seed=7, data_dir=data_dir)
    k0, k1 = loader.plan(0)[0], loader.plan(1)[0]
    assert not np.array_equal(k0, k1)
    other_seed = pipeline.train_loader(
        "digits", input_size=S, batch_size=64, seed=8, data_dir=data_dir
    ).plan(0)[0]
    prompt = pipeline.train_loader(
        "digits", view="prompt", input_size=S, batch_size=64, seed=7, data_dir=data_dir
    ).plan(0)[0]
    assert not np.array_equal(k0, other_seed) and not np.array_equal(k0, prompt)
    # iter(loader) runs epochs 0, 1, ... on successive calls
    np.testing.assert_array_equal(next(iter(loader))["label"], a[0]["label"])


def test_two_processes_cover_each_example_at_most_once_and_match_one_process(data_dir):
    """'Exactly once': each example is once in the epoch's permutation; all processes together
    yield its first (N // G)·G entries, each once, and drop the other N mod G (1438 mod 64 = 30)."""
    n, g = 1438, 64
    single = _epoch(data_dir, epoch=2)
    shards = [_epoch(data_dir, epoch=2, shard_index=p, shard_count=2) for p in range(2)]
    plans = [
        pipeline.train_plan(
            n, batch_size=g, seed=7, stream=0, epoch=2, shard_index=p, shard_count=2
        )
        for p in range(2)
    ]
    keys = np.concatenate([plan[0].ravel() for plan in plans])
    assert len(keys) == len(set(keys.tolist())) == (n // g) * g
    full_order = pipeline._rng(7, 0, 2, 0).permutation(n)
    assert set(full_order[(n // g) * g :].tolist()) == set(range(n)) - set(keys.tolist())
    for step, whole in enumerate(single):
        parts = [shard[step] for shard in shards]
        assert parts[0]["image"].shape[0] == 32
        for field in ("image", "label"):  # global batch independent of the process count
            np.testing.assert_array_equal(np.concatenate([p[field] for p in parts]), whole[field])


def test_eval_pads_last_batch_and_counts_every_example_once(data_dir):
    records = pipeline.open_split("digits", "test", data_dir=data_dir)
    labels = np.array([records[i]["label"] for i in range(359)])
    for shard_count in (1, 2, 3, 4):
        seen, label_sum = [], 0
        for p in range(shard_count):
            loader = pipeline.eval_loader(
                "digits", input_size=S, batch_size=48, data_dir=data_dir,
                shard_index=p, shard_count=shard_count,
            )  # fmt: skip
            assert loader.steps == 8  # ceil(359 / 48); 8 · 48 − 359 = 25 padded positions
            keys = loader.plan()
            for step, batch in enumerate(loader):
                assert batch["image"].shape == (48 // shard_count, S, S, 3)
                assert batch["mask"].dtype == bool
                np.testing.assert_array_equal(batch["mask"], keys[step] >= 0)
                assert not batch["image"][~batch["mask"]].any()
                assert not batch["label"][~batch["mask"]].any()
                seen += keys[step][batch["mask"]].tolist()
                label_sum += int(batch["label"][batch["mask"]].sum())
        assert sorted(seen) == list(range(359))
        assert label_sum == labels.sum()
    loader = pipeline.eval_loader("digits", input_size=S, batch_size=64, data_dir=data_dir)
    in_order = [b["label"][b["mask"]] for b in loader]
    np.testing.assert_array_equal(np.concatenate(in_order), labels)
    # the next pass continues the same stream, an abandoned pass restarts it: same batches again
    next(iter(loader))
    again = [b["label"][b["mask"]] for b in loader]
    np.testing.assert_array_equal(np.concatenate(again), labels)


def test_eval_loader_over_train_split_with_augmentation_sees_every_example_once(data_dir):
    def run(**kwargs):
        loaders = [
            pipeline.eval_loader(
                "digits", input_size=S, batch_size=128, split="train", data_dir=data_dir,
                shard_index=p, shard_count=2, **kwargs,
            )
            for p in range(2)
        ]  # fmt: skip
        batches = [list(loader) for loader in loaders]
        keys = np.concatenate([loader.plan()[loader.plan() >= 0] for loader in loaders])
        assert sorted(keys.tolist()) == list(range(1438))
        assert sum(int(b["mask"].sum()) for bs in batches for b in bs) == 1438
        return np.concatenate([b["image"] for b in batches[0]])

    plain, augmented = run(), run(augment_seed=5)
    assert not np.array_equal(plain, augmented)
    np.testing.assert_array_equal(augmented, run(augment_seed=5))


def test_restored_iterator_continues_identically(data_dir):
    loader = pipeline.train_loader("digits", input_size=S, batch_size=64, seed=1, data_dir=data_dir)
    reference = list(loader.epoch(3))
    it = loader.epoch(3)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["epoch"] == 3 and state["step"] == 5
    assert state == loader.state_at(3, 5)
    fresh = pipeline.train_loader("digits", input_size=S, batch_size=64, seed=1, data_dir=data_dir)
    resumed = fresh.restore(state)
    assert len(resumed) == 22 - 5
    rest = list(resumed)
    assert len(rest) == 17
    for x, y in zip(rest, reference[5:], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    other = pipeline.train_loader("digits", input_size=S, batch_size=64, seed=2, data_dir=data_dir)
    with pytest.raises(DataError, match=r"cannot restore.*seed=1 \(this loader: 2\)"):
        other.restore(state)
    smaller = pipeline.train_loader("digits", input_size=S, batch_size=32, seed=1, data_dir=data_dir)
    with pytest.raises(DataError, match=r"batch_size=64 \(this loader: 32\), steps_per_epoch=22 "
                       r"\(this loader: 44\)"):
        smaller.restore(state)
    prompt = pipeline.train_loader("digits", view="prompt", input_size=S, batch_size=64, seed=1,
                                   data_dir=data_dir)
    with pytest.raises(DataError, match=r"view='train' \(this loader: 'prompt'\)"):
        prompt.restore(state)
    with pytest.raises(DataError, match="expected the dict of BatchIterator.get_state"):
        fresh.restore({"epoch": 3})


def test_state_written_by_two_processes_resumes_on_one_and_four(data_dir):
    """The state holds the global position only: a 2-process run's checkpoint resumes on 1 or 4
    processes with exactly the remaining global batches of the epoch."""
    kwargs = dict(input_size=S, batch_size=64, seed=4, data_dir=data_dir)
    whole = list(pipeline.train_loader("digits", **kwargs).epoch(1))
    states = []
    for p in range(2):
        it = pipeline.train_loader("digits", shard_index=p, shard_count=2, **kwargs).epoch(1)
        for _ in range(7):
            next(it)
        states.append(it.get_state())
    assert states[0] == states[1]  # no shard index or count in it
    rest = list(pipeline.train_loader("digits", **kwargs).restore(states[0]))
    assert len(rest) == 22 - 7
    for shard_count in (1, 4):
        parts = [list(pipeline.train_loader("digits", shard_index=p, shard_count=shard_count,
                                            **kwargs).restore(states[1]))
                 for p in range(shard_count)]
        for step, batch in enumerate(whole[7:]):
            for field in ("image", "label"):
                np.testing.assert_array_equal(
                    np.concatenate([part[step][field] for part in parts]), batch[field])
    for x, y in zip(rest, whole[7:], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_global_batches_do_not_depend_on_shards_workers_or_threads(data_dir):
    """Epochs 0 and 1 (4 steps each, so the stream crosses an epoch boundary): the concatenated
    shards of 1, 2 and 4 processes, and 0 or 2 worker processes with 1 or 4 threads, all give the
    same global batches."""
    kwargs = dict(input_size=S, batch_size=64, seed=9, data_dir=data_dir, max_steps_per_epoch=4)

    def run(shard_count=1, **options):
        loaders = [pipeline.train_loader("digits", shard_index=p, shard_count=shard_count,
                                         **kwargs, **options) for p in range(shard_count)]
        try:
            out = []
            for epoch in (0, 1):
                its = [loader.epoch(epoch) for loader in loaders]
                for parts in zip(*its, strict=True):
                    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
            return out
        finally:
            for loader in loaders:
                loader.close()

    reference = run(worker_count=0, num_threads=1, prefetch=1)
    assert len(reference) == 8
    keys0, _ = pipeline.train_plan(1438, batch_size=64, seed=9, stream=0, epoch=0, shard_index=0,
                                   shard_count=1)
    records = pipeline.open_split("digits", "train", data_dir=data_dir)
    np.testing.assert_array_equal(reference[3]["label"],
                                  [records[int(k)]["label"] for k in keys0[3]])
    for setting in (dict(shard_count=2), dict(shard_count=4), dict(num_threads=4, prefetch=8),
                    dict(worker_count=2, num_threads=2)):
        for x, y in zip(run(**setting), reference, strict=True):
            assert x.keys() == y.keys() == {"image", "label"}, setting
            for field in x:
                np.testing.assert_array_equal(x[field], y[field], err_msg=str(setting))


def test_resolve_options_auto_and_warning(monkeypatch, caplog):
    assert pipeline.resolve_options(-1, 0, 0, cores=2) == pipeline.Options(0, 2, 2)
    assert pipeline.resolve_options(-1, 0, 0, cores=4) == pipeline.Options(0, 4, 4)
    assert pipeline.resolve_options(-1, 0, 0, cores=16) == pipeline.Options(8, 1, 2)
    assert pipeline.resolve_options(-1, 0, 0, cores=96) == pipeline.Options(32, 1, 2)
    assert pipeline.resolve_options(0, 0, 0, cores=32) == pipeline.Options(0, 16, 16)
    assert pipeline.resolve_options(3, 2, 5, cores=8) == pipeline.Options(3, 2, 5)
    monkeypatch.setattr(pipeline, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        assert pipeline.resolve_options(6, 0, 0, cores=2) == pipeline.Options(6, 1, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["data worker_count=6 is above the 2 CPU cores this process may use: the "
                        "workers compete for them (set config.data.worker_count=-1 for auto)"]
    for bad, match in (((-2, 0, 0), "worker_count must be an integer >= -1"),
                       ((0, -1, 0), "num_threads must be an integer >= 0"),
                       ((0, 0, 1.5), "prefetch must be an integer >= 0")):
        with pytest.raises(DataError, match=match):
            pipeline.resolve_options(*bad, cores=2)
    # cores: the affinity; shared among a host's processes only when they are not bound
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert pipeline.process_cores() == 4
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert pipeline.process_cores() == 2


def test_config_data_fields_are_validated():
    from vpns_jax import config as config_lib
    from vpns_jax.errors import ConfigError

    for field, value in (("worker_count", -2), ("num_threads", -1), ("prefetch", None),
                         ("num_threads", True)):
        config = config_lib.default_config()
        config.data[field] = value
        with pytest.raises(ConfigError, match=rf"config\.data\.{field} = {value!r} is not allowed"):
            config_lib.validate(config)


@pytest.mark.parametrize(
    "name", [n for n in registry.names() if registry.get(n).source == "catalogue"]
)
def test_catalogue_datasets_through_mock_data(name):
    info = registry.get(name)
    with tfds.testing.mock_data(num_examples=10):
        assert registry.builder(name).info.features["label"].num_classes == info.num_classes
        assert pipeline.num_examples(name, "train") == 10
        loader = pipeline.train_loader(name, input_size=16, batch_size=4, seed=0)
        batches = list(loader.epoch(0))
        assert len(batches) == 2
        evals = list(pipeline.eval_loader(name, input_size=16, batch_size=4))
    for batch in batches + evals:
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert ((0 <= batch["label"]) & (batch["label"] < info.num_classes)).all()
    assert [int(b["mask"].sum()) for b in evals] == [4, 4, 2]


def test_registry_entries_follow_the_reference():
    expected = {
        "cifar10": (10, 256), "cifar100": (100, 256), "food101": (101, 256),
        "oxford_flowers102": (102, 128), "dtd": (47, 64), "oxford_iiit_pet": (37, 64),
        "imagenet2012": (1000, 1024), "tiny_imagenet": (200, 256), "stanford_cars": (196, 128),
        "fashion_mnist": (10, 256), "digits": (10, 64),
    }  # fmt: skip
    assert registry.names() == list(expected)
    for name, (classes, batch) in expected.items():
        info = registry.get(name)
        assert (info.num_classes, info.batch_size) == (classes, batch)
    assert registry.get("dtd").train_split == registry.get("oxford_flowers102").train_split
    assert registry.get("dtd").train_split == "train+validation"


def test_bad_input_gives_clear_errors(data_dir, tmp_path):
    with pytest.raises(
        DataError, match="unknown dataset 'cifar11'; known datasets: cifar10, cifar100"
    ):
        registry.get("cifar11")
    with pytest.raises(DataError, match=r"not prepared.*python -m vpns_jax.data prepare --dataset "
                       r"digits --data_dir"):  # fmt: skip
        pipeline.train_loader("digits", input_size=S, batch_size=8, seed=0, data_dir=tmp_path)
    with pytest.raises(DataError, match="input_size must be a positive integer"):
        pipeline.train_loader("digits", input_size=0, batch_size=8, seed=0, data_dir=data_dir)
    with pytest.raises(DataError, match="multiple of shard_count=3"):
        pipeline.eval_loader(
            "digits", input_size=S, batch_size=64, data_dir=data_dir, shard_count=3
        )
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        pipeline.train_loader("digits", input_size=S, batch_size=8, seed=-1, data_dir=data_dir)
    with pytest.raises(DataError, match="view must be one of"):
        pipeline.train_loader("digits", view="test", input_size=S, batch_size=8, seed=0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        pipeline.train_loader("digits", input_size=S, batch_size=2048, seed=0, data_dir=data_dir)
    with pytest.raises(DataError, match="not prepared.*prepare --dataset cifar100 --data_dir"):
        preparation.ensure_prepared("cifar100", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train\.tar"):
        preparation.prepare("imagenet2012", data_dir=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TF is installed")
def test_catalogue_prepare_without_tensorflow_points_to_the_extra(tmp_path):
    with pytest.raises(DataError, match=r"needs TensorFlow.*pip install -e \.\[prepare\]"):
        preparation.prepare("cifar10", data_dir=tmp_path)


def test_cli_show_and_errors(data_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["show", "--dataset", "digits", "--data_dir", str(data_dir), "--out", str(out)]
    assert cli.main(args + ["--input_size", "16", "--count", "4"]) == 0
    printed = capsys.readouterr().out
    assert "train (train): 1438 examples" in printed and "test  (test): 359 examples" in printed
    assert "classes: 10" in printed and out.stat().st_size > 1000
    assert cli.main(["show", "--dataset", "nope"]) == 2
    assert "known datasets" in capsys.readouterr().err


def test_pipeline_benchmark_runs_at_toy_size(data_dir, capsys, tmp_path):
    """benchmarks/data_pipeline.py end to end (so it cannot rot): both views, with a worker."""
    from benchmarks import data_pipeline as bench

    step = tmp_path / "step.jsonl"
    step.write_text("log line\n" + json.dumps({"images_per_s": {"mask_finding": 50.0, "dense": 9.0},
                                                "size": 8, "batch": 16, "device": "cpu"}) + "\n")
    record = bench.main(["--data_dir", str(data_dir), "--datasets", "digits", "--sizes", "8",
                         "--settings", "0x1,1x1", "--batches", "2", "--batch_size", "16",
                         "--repeats", "1", "--target", "100", "--step_json", str(step)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record
    rows = record["results"]
    assert [(r["view"], r["worker_count"]) for r in rows] == [
        ("prompt", 0), ("prompt", 1), ("train", 0), ("train", 1)]
    assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in rows)
    per_core = 1 / np.mean([1 / max(r["images_per_cpu_s"] for r in rows if r["view"] == v)
                            for v in ("prompt", "train")])  # half the images are each view
    assert record["cores_for_target"]["digits@8"]["cores_for_target"] == round(100 / per_core, 1)
    mask_finding = record["step"]["mask_finding"]
    assert mask_finding["per_view"] == 25.0 and "tuning" not in record["step"]
    stored = record["cores_for_target"]["digits@8"]["images_per_cpu_s"]
    assert mask_finding["cores"] == {"digits@8": round(50.0 / stored, 2)}
