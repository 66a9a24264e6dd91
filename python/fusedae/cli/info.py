"""``fusedae info``: version, kernel ISA, threads and build."""

from __future__ import annotations

import argparse
from typing import Any

import fusedae


def add_parser(commands: Any) -> None:
    info = commands.add_parser(
        "info",
        help="version, kernel ISA, threads and build",
        description="Prints fusedae.info(): version, ISA in use, ISAs available, threads, build.",
    )
    info.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    for key, value in fusedae.info().items():
        text = ", ".join(value) if isinstance(value, list) else value
        print(f"{key + ':':16} {text}")
