"""The project's own builders on small files the tests write, plus the real Fashion-MNIST counts."""

import gzip
import io
import os
import struct
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from vpns_jax.data import pipeline, preparation, registry
from vpns_jax.data.builders import digits, fashion_mnist
from vpns_jax.errors import DataError

REAL_FMNIST = fashion_mnist.DEFAULT_MANUAL_DIR


def _jpeg(value: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (6, 5), value if mode == "L" else (value, 255 - value, 7)).save(buffer, "JPEG")
    return buffer.getvalue()


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# --------------------------------------------------------------------------- fashion_mnist


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(12) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 3, 3, 1]),
    }
    for stem, array in arrays.items():
        _write_idx(tmp_path / f"{stem}.gz", array)
    return tmp_path, arrays


def test_fashion_mnist_builder_reads_idx_files(idx_dir, tmp_path_factory):
    manual, arrays = idx_dir
    data_dir = tmp_path_factory.mktemp("tfds")
    preparation.prepare("fashion_mnist", data_dir=data_dir, manual_dir=manual)
    assert preparation.is_prepared("fashion_mnist", data_dir=data_dir)
    assert pipeline.num_examples("fashion_mnist", "train", data_dir=data_dir) == 12
    assert pipeline.num_examples("fashion_mnist", "test", data_dir=data_dir) == 5
    test = pipeline.open_split("fashion_mnist", "test", data_dir=data_dir)
    got = sorted((int(test[i]["label"]), test[i]["image"][:, :, 0].tobytes()) for i in range(5))
    want = sorted(
        (int(lab), img.astype(np.uint8).tobytes())
        for lab, img in zip(arrays["t10k-labels-idx1-ubyte"], arrays["t10k-images-idx3-ubyte"],
                            strict=True)
    )  # fmt: skip
    assert got == want  # stored losslessly
    assert pipeline.class_names("fashion_mnist", data_dir=data_dir)[9] == "Ankle boot"
    # idempotent and fast the second time
    start = time.perf_counter()
    preparation.prepare("fashion_mnist", data_dir=data_dir, manual_dir=manual)
    assert time.perf_counter() - start < 1.0


def test_fashion_mnist_missing_idx_file_is_named(idx_dir, tmp_path):
    manual, _ = idx_dir
    os.remove(manual / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found.*dataset-fashion-mnist"
    ):
        preparation.prepare("fashion_mnist", data_dir=tmp_path / "d", manual_dir=manual)


@pytest.mark.skipif(
    not os.path.isdir(REAL_FMNIST),
    reason=f"Debian's dataset-fashion-mnist is not installed ({REAL_FMNIST} absent)",
)
def test_real_fashion_mnist_counts_from_idx_headers():
    assert fashion_mnist.split_counts(REAL_FMNIST) == {"train": 60_000, "test": 10_000}
    assert registry.get("fashion_mnist").num_classes == len(fashion_mnist.CLASS_NAMES) == 10
    labels = fashion_mnist.read_idx(os.path.join(REAL_FMNIST, "t10k-labels-idx1-ubyte.gz"))
    assert np.bincount(labels).tolist() == [1000] * 10


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL_FMNIST), reason=f"{REAL_FMNIST} absent")
def test_real_fashion_mnist_prepares_with_real_counts(tmp_path):
    preparation.prepare("fashion_mnist", data_dir=tmp_path)
    assert pipeline.num_examples("fashion_mnist", "train", data_dir=tmp_path) == 60_000
    assert pipeline.num_examples("fashion_mnist", "test", data_dir=tmp_path) == 10_000
    assert len(pipeline.class_names("fashion_mnist", data_dir=tmp_path)) == 10


# --------------------------------------------------------------------------- digits split


def test_digits_split_sizes_and_class_balance_are_fixed():
    images, labels = digits.load_digits_uint8()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    split = digits.split_indices(labels)
    assert len(split["train"]) == digits.TRAIN_SIZE == 1438
    assert len(split["test"]) == digits.TEST_SIZE == 359
    assert np.bincount(labels[split["test"]]).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert np.bincount(labels[split["train"]]).tolist() == [
        142, 146, 142, 146, 145, 146, 145, 143, 139, 144,
    ]  # fmt: skip
    assert not set(split["train"]) & set(split["test"])
    np.testing.assert_array_equal(digits.split_indices(labels)["test"], split["test"])


# --------------------------------------------------------------------------- tiny_imagenet

WNIDS = [f"n{i:08d}" for i in range(200)][::-1]  # written unsorted on purpose


def _tiny_files() -> dict[str, bytes]:
    files = {"wnids.txt": "\n".join(WNIDS).encode() + b"\n", "words.txt": b""}
    for i, w in enumerate(WNIDS):
        files[f"train/{w}/images/{w}_0.JPEG"] = _jpeg(i % 256, "L" if i == 5 else "RGB")
        files[f"train/{w}/{w}_boxes.txt"] = b""
    files["train/n00000007/images/n00000007_1.JPEG"] = _jpeg(1)
    val = [("val_0.JPEG", "n00000003"), ("val_1.JPEG", "n00000199"), ("val_2.JPEG", "n00000003")]
    for name, _ in val:
        files[f"val/images/{name}"] = _jpeg(3)
    files["val/val_annotations.txt"] = "".join(f"{n}\t{w}\t0\t0\t5\t4\n" for n, w in val).encode()
    return files


def _write_tree(root, files):
    for rel, data in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _check_tiny(data_dir):
    assert pipeline.num_examples("tiny_imagenet", "train", data_dir=data_dir) == 201
    assert pipeline.num_examples("tiny_imagenet", "test", data_dir=data_dir) == 3
    val = pipeline.open_split("tiny_imagenet", "test", data_dir=data_dir)
    labels = sorted(int(val[i]["label"]) for i in range(3))
    assert labels == [3, 3, 199]  # index of the wnid in sorted order
    train = pipeline.open_split("tiny_imagenet", "train", data_dir=data_dir)
    assert all(train[i]["image"].shape == (5, 6, 3) for i in range(len(train)))  # grey → RGB
    names = pipeline.class_names("tiny_imagenet", data_dir=data_dir)
    assert names == sorted(WNIDS)


def test_tiny_imagenet_from_extracted_folder(tmp_path):
    _write_tree(tmp_path / "manual" / "tiny-imagenet-200", _tiny_files())
    preparation.prepare("tiny_imagenet", data_dir=tmp_path / "d", manual_dir=tmp_path / "manual")
    _check_tiny(tmp_path / "d")


def test_tiny_imagenet_from_official_zip(tmp_path):
    (tmp_path / "manual").mkdir()
    with zipfile.ZipFile(tmp_path / "manual" / "tiny-imagenet-200.zip", "w") as archive:
        for rel, data in _tiny_files().items():
            archive.writestr(f"tiny-imagenet-200/{rel}", data)
    preparation.prepare("tiny_imagenet", data_dir=tmp_path / "d", manual_dir=tmp_path / "manual")
    _check_tiny(tmp_path / "d")


def test_tiny_imagenet_missing_or_incomplete_manual_dir(tmp_path):
    with pytest.raises(DataError, match=r"tiny-imagenet-200\.zip.*cs231n"):
        preparation.prepare("tiny_imagenet", data_dir=tmp_path / "d", manual_dir=tmp_path / "empty")
    files = _tiny_files()
    del files["val/images/val_1.JPEG"]
    _write_tree(tmp_path / "m", files)
    with pytest.raises(DataError, match=r"val/images/val_1\.JPEG not found"):
        preparation.prepare("tiny_imagenet", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")


# --------------------------------------------------------------------------- stanford_cars

CARS = [f"Make {i:03d} Model 2012" for i in range(196)]


def _write_cars(root, *, skip_test_class: str | None = None):
    for split in ("train", "test"):
        for i, car in enumerate(CARS):
            if split == "test" and car == skip_test_class:
                continue
            folder = os.path.join(root, "car_data", "car_data", split, car)
            os.makedirs(folder)
            with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
                f.write(_jpeg(i % 256))


def test_stanford_cars_from_class_folders(tmp_path):
    _write_cars(tmp_path / "m")
    preparation.prepare("stanford_cars", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")
    for split in ("train", "test"):
        assert pipeline.num_examples("stanford_cars", split, data_dir=tmp_path / "d") == 196
    names = pipeline.class_names("stanford_cars", data_dir=tmp_path / "d")
    assert names == CARS and len(names) == registry.get("stanford_cars").num_classes
    test = pipeline.open_split("stanford_cars", "test", data_dir=tmp_path / "d")
    assert sorted(int(test[i]["label"]) for i in range(196)) == list(range(196))


def test_stanford_cars_incomplete_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=r"train/<class>/\*\.jpg.*Kaggle"):
        preparation.prepare("stanford_cars", data_dir=tmp_path / "d", manual_dir=tmp_path / "none")
    _write_cars(tmp_path / "m", skip_test_class=CARS[17])
    with pytest.raises(DataError, match=r"test/Make 017 Model 2012/\*\.jpg not found"):
        preparation.prepare("stanford_cars", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")
