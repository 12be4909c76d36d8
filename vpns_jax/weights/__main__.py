"""CLI: `python -m vpns_jax.weights convert --arch ARCH --src FILE --out PATH` and
`python -m vpns_jax.weights export --src PATH --out FILE.(safetensors|pth)`."""
from __future__ import annotations

import argparse
import sys

from safetensors import SafetensorError

from vpns_jax import models
from vpns_jax.errors import WeightsError
from vpns_jax.weights import convert, export


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on a WeightsError, with its message on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m vpns_jax.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="torchvision .pth / timm .safetensors → project format")
    conv.add_argument("--arch", required=True, choices=models.ARCHS)
    conv.add_argument("--src", required=True, help="torchvision .pth or timm/HF .safetensors")
    conv.add_argument("--out", required=True, help="output .safetensors (project format)")
    conv.add_argument("--num-classes", type=int, default=None, help="default: from the file's head")
    conv.add_argument("--width", type=float, default=1.0)
    conv.add_argument("--small-input", action="store_true")
    conv.add_argument("--no-check", action="store_true", help="skip the forward-pass check")
    exp = sub.add_parser("export", help="project format → torchvision state dict")
    exp.add_argument("--src", required=True, help="project .safetensors")
    exp.add_argument("--out", required=True, help="output .safetensors or .pth")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            meta = convert(args.arch, args.src, args.out, num_classes=args.num_classes,
                           width=args.width, small_input=args.small_input,
                           check_forward=not args.no_check)
            notes = "; ".join(meta.get("notes", [])) or "none"
            src = meta["source"]["file"]
            print(f"wrote {args.out}: {meta['arch']} {meta['options']} from {src} "
                  f"(sha256 {meta['source']['sha256'][:12]}…); key changes: {notes}")
        else:
            state = export(args.src, args.out)
            print(f"wrote {args.out}: {len(state)} torchvision tensors")
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:  # mostly writing --out (unreadable inputs are above)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        name = getattr(e, "filename", None) or args.out
        print(f"error: {name}: {reason}; check the path, and that --out's folder is writable "
              "and has free space", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
