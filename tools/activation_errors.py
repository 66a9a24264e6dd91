"""Measures each post-op's largest error in units in the last place against the exact value
(mpmath), through the native kernels of every ISA this CPU runs, beside PyTorch's own error in
the same dtype. The numbers in docs/activations.md come from it:

    .venv/bin/python tools/activation_errors.py [points]

Inputs: a dense grid over [-20, 20] (float32) or [-40, 40] (float64), plus the same number of
values spread geometrically out to the largest finite one, both signs. An error is counted in
ulps of the exact value rounded to the dtype; where the exact value is below 1e-30 only the
1e-30 absolute bound applies, and such points are left out of the ulp count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fusedae import _native
from test_activations import OPS, exact, run, torch_op


def inputs(dtype: type[np.floating], points: int) -> np.ndarray:
    limit = 20.0 if dtype == np.float32 else 40.0
    dense = np.linspace(-limit, limit, points)
    spread = np.geomspace(1e-30, float(np.finfo(dtype).max), points // 2)
    return np.concatenate([dense, spread, -spread]).astype(dtype)


def ulps(got: np.ndarray, want: np.ndarray, dtype: type[np.floating]) -> float:
    scale = np.abs(want) >= 1e-30
    unit = np.spacing(np.abs(want[scale]).astype(dtype)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return float(np.nanmax(np.abs(got[scale].astype(np.float64) - want[scale]) / unit))


def main() -> None:
    points = int(sys.argv[1]) if len(sys.argv) > 1 else 4001
    print("| op | dtype | " + " | ".join(_native.available_isas()) + " | torch (same dtype) |")
    print("|---|---|" + "---|" * (len(_native.available_isas()) + 1))
    for op in OPS:
        name, params = op[0], tuple(op[1:])
        for dtype in (np.float32, np.float64):
            x = inputs(dtype, points)
            want = np.array([float(exact(name, params, float(v), dtype)) for v in x])
            cells = []
            for isa in _native.available_isas():
                got = np.concatenate([run(op, x, width, isa) for width in (1, 32)], axis=1)
                cells.append(max(ulps(got[:, c], want, dtype) for c in range(got.shape[1])))
            theirs = ulps(torch_op(name, params, x), want, dtype)
            row = " | ".join(f"{c:.3g}" for c in cells)
            label = "-".join(map(str, op))
            print(f"| {label} | {dtype.__name__} | {row} | {theirs:.3g} |", flush=True)


if __name__ == "__main__":
    main()
