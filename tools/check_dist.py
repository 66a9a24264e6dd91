"""Checks what `make wheel` put in dist/: each wheel's tags and contents, the sdist's contents.

Usage: python tools/check_dist.py DIST ARCH...   (one manylinux2014 abi3 wheel per ARCH)

twine, abi3audit and auditwheel check the formats; this checks what they cannot know: the tag
auditwheel derives from the symbols is the one in the file name, the wheel ships the typing
files and the license, and the sdist holds sources only.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL_MUST_HOLD = ["fusedae/py.typed", "fusedae/_native.pyi", "fusedae/_native.abi3.so"]
SDIST_MUST_HOLD = ["Cargo.toml", "Cargo.lock", "pyproject.toml", "LICENSE", "PKG-INFO"]
# Build outputs and caches (as .gitignore lists them): none may reach the sdist.
SDIST_MUST_NOT_HOLD = re.compile(
    r"(^|/)(target|dist|demo-out|out|\.venv|__pycache__|\.pytest_cache|\.ruff_cache|\.mypy_cache"
    r"|\.hypothesis|\.benchmarks)(/|$)|\.(so|pyd|whl)$|^benches/results\.json$"
)


def require(condition: object, message: str) -> None:
    """An assert that `python -O` keeps."""
    if not condition:
        sys.exit(f"check_dist: {message}")


def check_wheel(wheel: Path, arch: str) -> None:
    tag = f"manylinux_2_17_{arch}"
    require(f"-cp310-abi3-manylinux2014_{arch}.{tag}.whl" in wheel.name, f"{wheel.name}'s tags")
    audit = subprocess.run(
        [Path(sys.executable).parent / "auditwheel", "show", wheel],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    consistent = re.search(r'consistent with the following platform tag:\s*"([^"]+)"', audit)
    require(consistent and consistent.group(1) == tag, f"auditwheel says:\n{audit}")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = wheel.name.split("-cp310")[0] + ".dist-info"
    for name in [*WHEEL_MUST_HOLD, f"{dist_info}/licenses/LICENSE"]:
        require(name in names, f"{wheel.name} lacks {name}")
    print(f"{wheel.name}: {tag}, {wheel.stat().st_size / 1e6:.2f} MB, {len(names)} files")


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        # Members are "fusedae-VERSION/PATH".
        names = [member.name.partition("/")[2] for member in tar.getmembers() if member.isfile()]
        metadata = tar.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/PKG-INFO")
        if metadata is None:
            sys.exit(f"check_dist: {sdist.name} lacks PKG-INFO")
        pkg_info = metadata.read().decode()
    for name in SDIST_MUST_HOLD:
        require(name in names, f"{sdist.name} lacks {name}")
    outputs = [name for name in names if SDIST_MUST_NOT_HOLD.search(name)]
    require(not outputs, f"{sdist.name} holds build outputs: {outputs}")
    require("License-Expression: MIT" in pkg_info, f"{sdist.name}'s PKG-INFO has no license")
    print(f"{sdist.name}: {sdist.stat().st_size / 1e6:.2f} MB, {len(names)} files, no outputs")


def main(dist: Path, arches: list[str]) -> None:
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    require(len(wheels) == len(arches), f"expected one wheel per {arches}, found {wheels}")
    require(len(sdists) == 1, f"expected one sdist, found {sdists}")
    for arch in arches:
        check_wheel(next(wheel for wheel in wheels if wheel.name.endswith(f"_{arch}.whl")), arch)
    check_sdist(sdists[0])


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
