"""What every command shares: the error ``main`` reports, argparse value types, and timing."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fusedae import _native


class CommandError(Exception):
    """A failure reported on stderr after ``fusedae COMMAND: error:``, with exit status 1."""


class Terminated(BaseException):
    """A termination signal (``terminating_on_signals``) as an exception, which unwinds like
    Ctrl-C (the temporary file removed); ``main`` reports it, exit status 128 + the signal's
    number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# SIGTERM (`kill`, a scheduler's cancel) and SIGHUP (the terminal closed, an SSH session lost),
# where the platform has them.
TERMINATION_SIGNALS = [
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
]


@contextlib.contextmanager
def terminating_on_signals() -> Iterator[None]:
    """Within the block, the termination signals raise ``Terminated`` (once: a second one while
    the first unwinds is ignored, so that the cleanup runs to its end), but those ignored on
    entry (``nohup`` ignores SIGHUP) and off the main thread (where Python runs no handler);
    the handlers before are put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in TERMINATION_SIGNALS}
    caught = [signum for signum, handler in before.items() if handler != signal.SIG_IGN]

    def terminate(signum: int, frame: object) -> None:
        for other in caught:
            signal.signal(other, signal.SIG_IGN)
        raise Terminated(signum)

    try:
        for signum in caught:
            signal.signal(signum, terminate)
        yield
    finally:
        # Held back while the handlers go back (one arriving midway raised from here, leaving
        # the rest ignored), then delivered to the handlers before.
        block = getattr(signal, "pthread_sigmask", None)  # (POSIX)
        if block is not None:
            block(signal.SIG_BLOCK, caught)
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if block is not None:
            block(signal.SIG_UNBLOCK, caught)


# Bytes of a batch's input or output, whichever is wider, when --batch-size is not given.
CHUNK_BYTES = 16 << 20


def rows_per_batch(requested: int | None, in_row_bytes: int, out_row_bytes: int) -> int:
    """``--batch-size`` if given, else the rows of about ``CHUNK_BYTES`` of input or of output,
    whichever rows are wider (a decoder's outputs are: 2 -> 784 values a row)."""
    return requested or max(1, CHUNK_BYTES // max(in_row_bytes, out_row_bytes, 1))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def thread_count(text: str) -> int:
    value = positive_int(text)
    if value > _native.MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {_native.MAX_THREADS}, got {value}")
    return value


def names_list(text: str) -> list[str]:
    """``"id,label"`` -> ``["id", "label"]``."""
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct names separated by commas, got {text!r}"
        )
    return names


def widths_list(text: str) -> list[int]:
    """``"784,42,16"`` -> ``[784, 42, 16]``."""
    try:
        widths = [positive_int(part) for part in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        ) from None
    if len(widths) < 2:
        raise argparse.ArgumentTypeError(f"need at least two widths (in,out), got {text!r}")
    return widths


def time_interleaved(
    functions: Mapping[str, Callable[[], object]], rounds: int, min_seconds: float = 0.02
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds (A B A B ...) of
    enough calls to last about ``min_seconds`` each, so machine noise hits all alike."""
    calls = {}
    for name, function in functions.items():
        function()  # warm up
        start = time.perf_counter()
        function()
        calls[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                function()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(times) for name, times in samples.items()}


class BestEffortStream:
    """Standard error for a progress bar: a write that fails (a full disk under the log, a
    reader gone from the pipe, a closed stderr) ends the bar's output, not the job. Where stderr
    is no terminal (a log file, a batch scheduler's, Ray's), each of the bar's redraws (``\\r``
    then the bar) is a line of its own, not one line of every redraw that a log shows whole."""

    def __init__(self) -> None:
        self.stream: Any = sys.stderr  # None where the process started with stderr closed
        self.lines = not is_terminal(self.stream)

    def write(self, text: str) -> None:
        if self.lines:
            text = self._as_lines(text)
        self._attempt(lambda stream: stream.write(text))

    @staticmethod
    def _as_lines(text: str) -> str:
        """``text``, tqdm's redraws (each begun by ``\\r``, padded with spaces over a longer
        bar, the last one ended by its ``\\n``), as lines ended at once: what else goes to
        stderr meanwhile (a warning) starts a line of its own."""
        bars = (piece.rstrip(" \n") for piece in text.split("\r"))
        return "".join(f"{bar}\n" for bar in bars if bar)

    def flush(self) -> None:
        self._attempt(lambda stream: stream.flush())

    def _attempt(self, action: Callable[[Any], object]) -> None:
        if self.stream is None:
            return
        try:
            action(self.stream)
        except (OSError, ValueError):  # (ValueError: the stream was closed)
            self.stream = None

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the bar's layout
        if name == "stream":  # (not set yet: a copy being made)
            raise AttributeError(name)
        return getattr(self.stream, name)


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # (None, a closed stream, a stand-in)
        return False


# Seconds between a progress bar's redraws where each is a line of a log (a terminal redraws
# in place ten times a second): an hour's job leaves 120 lines.
LOG_REDRAW_SECONDS = 30


def report(message: str) -> None:
    """``message`` on stderr where it can be written: where it cannot, the exit status is all
    that can tell (not a traceback about the failed write)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(message, file=sys.stderr)


def say(message: str) -> None:
    """``message``, the summary of work done (the output is written), on stdout where it can be
    written: a full disk under it or a reader gone from the pipe (``| head``) does not make the
    job a failure. Stdout then goes to the null device, so that Python's flush at exit does not
    fail on what is still buffered either."""
    try:
        print(message, flush=True)
    except UnicodeEncodeError:  # (a path stdout's encoding lacks: PYTHONIOENCODING=ascii)
        say(message.encode("ascii", "backslashreplace").decode("ascii"))
    except (OSError, ValueError):  # (ValueError: stdout was closed)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)


def progress_bar(**options: Any) -> Any:
    """A tqdm progress bar on ``BestEffortStream``, redrawn every ``LOG_REDRAW_SECONDS`` at most
    where stderr is no terminal."""
    from tqdm import tqdm

    stream = BestEffortStream()
    if stream.lines:  # (`maxinterval`: tqdm's monitor thread redraws a bar idle that long)
        options.setdefault("mininterval", LOG_REDRAW_SECONDS)
        options.setdefault("maxinterval", LOG_REDRAW_SECONDS)
    return tqdm(file=stream, **options)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligns the first column, right-aligns the others."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])
        print("  ".join(cells))
