"""srntt: reference-based x4 super-resolution (SRNTT) with exact, O(N)-memory texture swapping."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# The bundled sample image that demo, swap-demo and bench run on.
SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "zebra.png"

# command -> (module, add-arguments function, run function, help)
COMMANDS = {
    "sr": ("srntt_core.cli.commands", "add_sr_arguments", "run_sr",
           "x4 Ref-SR of an image with one or more references"),
    "demo": ("srntt_core.cli.commands", "add_demo_arguments", "run_demo",
             "super-resolve the bundled sample with the bundled checkpoint"),
    "eval": ("srntt_core.cli.commands", "add_eval_arguments", "run_eval",
             "the evaluation table (docs/CONTRACT.md §10) on a folder"),
    "train": ("srntt_core.cli.commands", "add_train_arguments", "run_train",
              "train SRNTT with online swapping"),
    "bench": ("srntt_core.cli.bench", "add_arguments", "run", "quick kernel comparison on this machine"),
    "swap-demo": ("srntt_core.cli.swap_demo", "add_arguments", "run_cli",
                  "run and draw the swap stage on the bundled sample pair"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srntt", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print version, build and backend info")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), add)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version or args.command is None:
        from .. import build_info

        print(build_info())
        if args.command is None and not args.version:
            parser.print_help()
        return 0
    module, _, run, _ = COMMANDS[args.command]
    from ..models.distributed import DistributedError

    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except (OSError, ValueError, DistributedError) as e:
        # user errors (bad files, paths, devices, checkpoints, arguments), a failed rank: one line
        print(f"srntt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
