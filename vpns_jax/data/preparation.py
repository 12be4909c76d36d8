"""Preparing datasets (writing array_record files once) and checking that they are prepared.

The project's builders (fashion_mnist, digits, tiny_imagenet, stanford_cars) prepare offline without
TensorFlow. TFDS's stock catalogue builders download and extract archives with TensorFlow, so
preparing them needs the optional extra ``pip install -e .[prepare]`` (tensorflow-cpu), once;
reading never needs it.
"""

from __future__ import annotations

import importlib.util
import os

from vpns_jax.data import registry
from vpns_jax.errors import DataError


def prepare_command(name: str, *, data_dir=None, manual_dir=None) -> str:
    """The shell command that prepares ``name`` (for error messages)."""
    cmd = f"python -m vpns_jax.data prepare --dataset {name}"
    info = registry.get(name)
    if manual_dir is not None:
        cmd += f" --manual_dir {manual_dir}"
    elif info.needs_manual_dir:
        cmd += " --manual_dir DIR"
    if data_dir is not None:
        cmd += f" --data_dir {data_dir}"
    return cmd


def is_prepared(name: str, *, data_dir: str | os.PathLike | None = None) -> bool:
    """True when ``name`` has been prepared under ``data_dir`` (TFDS's default when None)."""
    return bool(registry.builder(name, data_dir=data_dir).is_prepared())


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> str:
    """Prepares ``name`` as array_record under ``data_dir`` if not already done; returns the data
    path.

    Idempotent: a prepared dataset returns at once. Raises DataError for an unknown dataset, missing
    or incomplete manual files (naming them), or a catalogue dataset when TensorFlow is not
    installed.
    """
    info = registry.get(name)
    manual_dir = os.fspath(manual_dir) if manual_dir is not None else None
    builder = registry.builder(name, data_dir=data_dir, manual_dir=manual_dir)
    if builder.is_prepared():
        return os.fspath(builder.data_dir)
    if info.source == "own":
        if hasattr(builder, "check_manual_dir"):
            builder.check_manual_dir()
        builder.download_and_prepare()
        return os.fspath(builder.data_dir)
    _prepare_catalogue(info, builder, data_dir, manual_dir)
    return os.fspath(builder.data_dir)


def _prepare_catalogue(
    info: registry.DatasetInfo, builder, data_dir, manual_dir: str | None
) -> None:
    import tensorflow_datasets as tfds

    if info.needs_manual_dir:
        if manual_dir is None or not os.path.isdir(manual_dir):
            raise DataError(
                f"{info.name}: needs a manual directory with {info.manual_files}; got "
                f"{manual_dir!r}. Then run: {prepare_command(info.name, data_dir=data_dir)}"
            )
    if importlib.util.find_spec("tensorflow") is None:
        raise DataError(
            f"{info.name}: preparing it uses TFDS's stock builder '{info.builder}', which needs "
            "TensorFlow to download and extract the archives (reading the prepared array_record "
            "files does not). Install the optional extra once: pip install -e .[prepare] "
            "(tensorflow-cpu), then run: "
            f"{prepare_command(info.name, data_dir=data_dir, manual_dir=manual_dir)}"
        )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)


def ensure_prepared(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> None:
    """Prepares the project's own datasets on first use; DataError naming the command for others."""
    if registry.get(name).source == "own":
        prepare(name, data_dir=data_dir, manual_dir=manual_dir)
    elif not is_prepared(name, data_dir=data_dir):
        raise not_prepared_error(name, data_dir)


def not_prepared_error(name: str, data_dir=None) -> DataError:
    """The DataError for a dataset that is not prepared under ``data_dir``."""
    where = os.fspath(data_dir) if data_dir is not None else "TFDS's default data_dir"
    return DataError(
        f"dataset {name!r} is not prepared in {where}; prepare it first: "
        f"{prepare_command(name, data_dir=data_dir)}"
    )
