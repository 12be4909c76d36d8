"""``python -m vpns_jax.data {list,prepare,show}``: list, prepare, show splits and samples.

python -m vpns_jax.data list
python -m vpns_jax.data prepare --dataset NAME [--manual_dir DIR] [--data_dir DIR]
python -m vpns_jax.data show --dataset NAME [--data_dir DIR] [--out FILE.png] [--input_size 64]
"""

from __future__ import annotations

import argparse
import sys

from vpns_jax.data import pipeline, registry
from vpns_jax.data.preparation import ensure_prepared, prepare
from vpns_jax.data.show import sample_grid
from vpns_jax.errors import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vpns_jax.data", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the known datasets")
    for command in ("prepare", "show"):
        sub = commands.add_parser(command)
        sub.add_argument("--dataset", required=True, help=", ".join(registry.names()))
        sub.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
        sub.add_argument("--manual_dir", default=None, help="where the source files are")
    show = commands.choices["show"]
    show.add_argument("--out", default=None, help="PNG path (default: <dataset>_samples.png)")
    show.add_argument("--input_size", type=int, default=64)
    show.add_argument("--count", type=int, default=16)
    show.add_argument("--seed", type=int, default=0)
    return parser


def _list() -> None:
    for name in registry.names():
        info = registry.get(name)
        print(
            f"{name:18s} classes {info.num_classes:4d}  batch {info.batch_size:4d}  "
            f"train '{info.train_split}'  test '{info.test_split}'  ({info.source} builder "
            f"{info.builder})"
        )


def _show(args: argparse.Namespace) -> None:
    ensure_prepared(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir)
    info = registry.get(args.dataset)
    for split in ("train", "test"):
        n = pipeline.num_examples(args.dataset, split, data_dir=args.data_dir)
        expr = info.train_split if split == "train" else info.test_split
        print(f"{split:5s} ({expr}): {n} examples")
    names = pipeline.class_names(args.dataset, data_dir=args.data_dir)
    print(f"classes: {len(names)} ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    out = args.out or f"{args.dataset}_samples.png"
    sample_grid(
        args.dataset, out, input_size=args.input_size, count=args.count, seed=args.seed,
        data_dir=args.data_dir,
    )  # fmt: skip
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 with the message on a DataError)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            _list()
        elif args.command == "prepare":
            path = prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir)
            print(f"{args.dataset} prepared in {path}")
        else:
            _show(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
