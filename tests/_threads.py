"""Running a check from several Python threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_at_once(check: Callable[[int], bool], count: int) -> list[int]:
    """Starts ``count`` threads together, thread ``i`` calling ``check(i)``; returns the indices
    whose check failed."""
    failed: list[int] = []
    barrier = threading.Barrier(count)

    def work(index: int) -> None:
        barrier.wait()
        if not check(index):
            failed.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed
