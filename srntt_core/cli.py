"""The ``srntt`` command (also ``python -m srntt_core``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srntt", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print version and build info")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("swap-demo", help="run the swap stage on the bundled sample pair and draw it")
    p.add_argument("-o", "--out", default="out/swap_demo.png", help="output PNG")
    p.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    if args.version or args.command is None:
        from . import build_info

        print(build_info())
        return 0
    if args.command == "swap-demo":
        from .swap_demo import run

        return run(args.out, backend=args.backend)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
