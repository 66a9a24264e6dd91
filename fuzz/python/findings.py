"""How the harnesses report findings: as libFuzzer does, or, with ``FUZZ_FINDINGS``, going on.

By default an exception escaping ``TestOneInput`` is atheris's crash: the traceback, the input
saved as ``crash-<sha1>`` (under ``-artifact_prefix``) and the fuzzer stopped. With the
environment variable ``FUZZ_FINDINGS=DIR``, ``keep_going`` records it instead and the fuzzer
goes on for its whole ``-max_total_time``: each distinct finding (its exception type and where
it was raised) is printed once with its traceback, and its smallest input so far is kept as
``DIR/finding-<type>-<place>``, so a run reports every bug it reaches, each with an input
that is small without further minimizing. ``tools/fuzz_python.sh`` fails if ``DIR`` is not
empty at the end. Crashes of the interpreter, hangs (``-timeout``) and running out of memory
stay libFuzzer's to report.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable

Target = Callable[[bytes], None]


def signature(error: BaseException) -> str:
    """``Type at file:line`` of where ``error`` was raised (and where it left fusedae, if that
    was elsewhere): the same bug gives the same signature whatever input reached it."""
    frames = traceback.extract_tb(error.__traceback__)
    places = [frames[-1]] if frames else []
    inside = [frame for frame in frames if f"{os.sep}fusedae{os.sep}" in frame.filename]
    if inside and inside[-1] is not frames[-1]:
        places.append(inside[-1])
    where = ", ".join(f"{os.path.basename(frame.filename)}:{frame.lineno}" for frame in places)
    return f"{type(error).__name__} at {where or '?'}"


def keep_going(target: Target) -> Target:
    """``target``, or, where ``FUZZ_FINDINGS`` names a directory, ``target`` recording what
    escapes it there instead of stopping the fuzzer."""
    if not os.environ.get("FUZZ_FINDINGS"):
        return target
    directory = os.path.abspath(os.environ["FUZZ_FINDINGS"])  # the harness may chdir
    os.makedirs(directory, exist_ok=True)
    smallest: dict[str, int] = {}  # signature -> size of the input kept for it

    def recording(data: bytes) -> None:
        try:
            target(data)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # a native PanicException is a BaseException
            found = signature(error)
            if found in smallest and smallest[found] <= len(data):
                return
            name = "finding-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", found)
            with open(os.path.join(directory, name), "wb") as file:
                file.write(data)
            if found not in smallest:
                print(f"\n=== FINDING: {found} (input: {name}) ===", file=sys.stderr)
                traceback.print_exception(error, file=sys.stderr)
            smallest[found] = len(data)

    return recording
