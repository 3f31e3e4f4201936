"""`lowbit`'s parser and dispatch: each subcommand module registers its own arguments."""
from __future__ import annotations

import argparse
import sys

from . import compare, eval as eval_cmd, formats, memory, quantize, report

SUBCOMMANDS = (formats, quantize, eval_cmd, compare, memory, report)


def version() -> str:
    """The installed lowbit's version (its package metadata: pyproject.toml's version)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lowbit")
    except PackageNotFoundError:
        return "unknown (lowbit is not installed; pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit", description="Neural-network quantization toolkit.")
    p.add_argument("--version", action="version", version=f"lowbit {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    handlers = {}
    for module in SUBCOMMANDS:
        handlers.update(module.register(sub))
    args = p.parse_args(argv)
    try:
        handlers[args.command](args)
    except ValueError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # saves are atomic: an interrupted run leaves nothing behind
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
