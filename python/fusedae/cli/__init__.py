"""The ``fusedae`` command: ``demo``, ``encode``, ``bench`` and ``info``, one module each.

``info`` and ``encode`` with a ``.safetensors`` model need numpy only; torch, scikit-learn and
matplotlib are imported inside the commands that use them, when they run.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence

import fusedae
from fusedae import _native
from fusedae.cli import bench, demo, encode, info
from fusedae.cli.common import CommandError, Terminated, report, terminating_on_signals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedae",
        description="Fused SIMD CPU kernels for small MLPs and autoencoders.",
    )
    parser.add_argument("--version", action="version", version=f"fusedae {fusedae.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, encode, bench, info):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        check_isa()
        with terminating_on_signals():
            args.run(args)
    except (CommandError, OSError) as error:
        report(f"fusedae {args.command}: error: {error}")
        return 1
    except KeyboardInterrupt:
        report(f"fusedae {args.command}: interrupted")
        return 128 + signal.SIGINT
    except Terminated as stop:
        report(f"fusedae {args.command}: stopped by {signal.Signals(stop.signum).name}")
        return 128 + stop.signum
    return 0


def check_isa() -> None:
    """A ``FUSEDAE_ISA`` this CPU cannot run (or no ISA's name) is the command's error, not a
    traceback from its first kernel call."""
    try:
        _native.selected_isa()
    except (ValueError, RuntimeError) as error:  # (an unknown name; one this CPU cannot run)
        raise CommandError(str(error)) from None
