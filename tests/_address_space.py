"""Running a script under a limit on its address space (RLIMIT_AS): allocation failures."""

from __future__ import annotations

import subprocess
import sys

import pytest

NOT_ENFORCED = "RLIMIT_AS is not enforced"

LIMIT_ADDRESS_SPACE = f'''
import mmap, resource

def limit_address_space(headroom_mb):
    """Limits this process to its size now plus headroom_mb; exits where the limit is not
    enforced (qemu-user takes setrlimit(RLIMIT_AS) and ignores it)."""
    size_kb = [line for line in open("/proc/self/status") if line.startswith("VmSize")]
    size = int(size_kb[0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (headroom_mb << 20), resource.RLIM_INFINITY))
    try:
        mmap.mmap(-1, (headroom_mb + 300) << 20)
    except OSError:
        return
    print("{NOT_ENFORCED}")
    raise SystemExit
'''


def run_limited(script: str) -> subprocess.CompletedProcess[str]:
    """Runs ``script``, which calls ``limit_address_space(headroom_mb)``, in a new Python;
    skips the test where the limit is not enforced."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc, sets RLIMIT_AS")
    done = subprocess.run(
        [sys.executable, "-c", LIMIT_ADDRESS_SPACE + script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.stdout.startswith(NOT_ENFORCED):
        pytest.skip(f"{NOT_ENFORCED} here")
    return done
