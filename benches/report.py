"""Renders the pytest-benchmark JSON of ``benches/`` (models, training, Parquet) as a report.

    python benches/report.py benches/results.json [--out-dir benches]

Writes ``report.md`` (a summary table, then one table per (model, batch, input, threads) group:
median time, spread, GFLOP/s, % of the FMA peak measured in the same group, and how many times
faster ours is than each peer; then the training steps, ours against plain PyTorch, eager and
compiled; then Parquet encoding, rows/s against reading the file alone) and ``throughput.png``
(GFLOP/s against batch size, one line per peer, one panel per model and thread count; streamed
groups are in the tables only) to ``--out-dir``, and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEAK = "fma-peak"
TRAINING = "training"
PARQUET = "parquet"
PARQUET_LABELS = {
    "pyarrow-read": "pyarrow read",
    "torch-loop": "pyarrow + PyTorch",
    "fusedae-t1": "fusedae 1t",
    "fusedae-t2": "fusedae 2t",
}
RAY = "ray"
RAY_LABELS = {
    "pyarrow-read": "pyarrow reading the file alone",
    "fusedae-encode-t1": "`fusedae encode`, 1 thread",
    "fusedae-encode-t2": "`fusedae encode`, 2 threads",
    "ray-identity": "Ray Data, identity `map_batches`, 2 actors x 1 CPU",
    "ray-fusedae-1x2": "Ray Data + `fusedae.ray.Encoder`, 1 actor x 2 CPUs",
    "ray-fusedae-2x1": "Ray Data + `fusedae.ray.Encoder`, 2 actors x 1 CPU",
    "ray-torch-2x1": "Ray Data + plain PyTorch model, 2 actors x 1 CPU",
    "ray-fusedae-2x1-oversubscribed": "Ray Data + fusedae, 2 actors x 1 CPU, machine's threads",
    "ray-identity-arrow": "Ray Data (pyarrow batches), identity, 2 actors x 1 CPU",
    "ray-fusedae-2x1-arrow": "Ray Data (pyarrow batches) + `fusedae.ray.Encoder`, 2 actors x 1 CPU",
}
TRAINING_PEERS = ("torch-eager", "fusedae-eager", "torch-compile", "fusedae-compile")
TRAINING_LABELS = {
    "torch-eager": "plain eager",
    "fusedae-eager": "accelerated eager",
    "torch-compile": "plain torch.compile",
    "fusedae-compile": "accelerated torch.compile",
}
PEERS = ("fusedae-numpy", "fusedae-torch", "torch-eager", "torch-compile", "onnxruntime")
OURS = ("fusedae-numpy", "fusedae-torch")
LABELS = {
    "fusedae-numpy": "fusedae MLP (numpy)",
    "fusedae-torch": "fusedae module (torch)",
    "torch-eager": "PyTorch eager",
    "torch-compile": "torch.compile",
    "onnxruntime": "ONNX Runtime",
    PEAK: "FMA peak",
}
SHORT = {
    "fusedae-numpy": "MLP",
    "fusedae-torch": "module",
    "torch-eager": "eager",
    "torch-compile": "compile",
    "onnxruntime": "ORT",
}
COLORS = {
    "fusedae-numpy": "tab:red",
    "fusedae-torch": "tab:orange",
    "torch-eager": "tab:blue",
    "torch-compile": "tab:cyan",
    "onnxruntime": "tab:green",
    PEAK: "gray",
}


@dataclass
class Entry:
    peer: str
    median_s: float
    min_s: float
    iqr_s: float
    rounds: int
    flops: int

    @property
    def gflops(self) -> float:
        return self.flops / self.median_s / 1e9


@dataclass
class Group:
    model_key: str
    model: str
    batch: int
    streamed: bool
    threads: int
    peak_gflops: float | None = None
    peak_one_thread: float | None = None
    load_average: float | None = None
    passes: int = 1
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def batch_label(self) -> str:
        return f"{self.batch} streamed" if self.streamed else str(self.batch)

    @property
    def title(self) -> str:
        return f"{self.model} · batch {self.batch_label} · {_threads(self.threads)}"

    def percent_of_peak(self, entry: Entry) -> float | None:
        return 100 * entry.gflops / self.peak_gflops if self.peak_gflops else None


@dataclass
class TrainingGroup:
    """The training steps of one (model, batch, threads): each peer's fastest pass."""

    model: str
    batch: int
    threads: int
    entries: dict[str, Entry] = field(default_factory=dict)
    passes: int = 1


def _threads(count: int) -> str:
    return f"{count} thread{'s' if count != 1 else ''}"


def _entry(bench: dict[str, Any]) -> Entry:
    info, stats = bench["extra_info"], bench["stats"]
    return Entry(
        info["peer"], stats["median"], stats["min"], stats["iqr"], stats["rounds"], info["flops"]
    )


def load_training(path: Path) -> list[TrainingGroup]:
    """``bench_training.py``'s groups, in the order they ran."""
    groups: dict[tuple[str, int, int], TrainingGroup] = {}
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") != TRAINING:
            continue
        key = (info["model"], info["batch"], info["threads"])
        group = groups.setdefault(key, TrainingGroup(*key))
        group.passes = max(group.passes, info.get("pass_index", 0) + 1)
        entry = _entry(bench)
        kept = group.entries.get(entry.peer)
        if kept is None or entry.median_s < kept.median_s:
            group.entries[entry.peer] = entry
    return list(groups.values())


def render_training(groups: list[TrainingGroup]) -> list[str]:
    """The training-step table: median time per step and ours against plain PyTorch."""
    if not groups:
        return []
    out = [
        "",
        "## Training step",
        "",
        "One step of forward, MSE loss, backward and Adam (`benches/bench_training.py`), plain "
        "PyTorch against the model through `fusedae.torch.accelerate`, eager and under "
        "`torch.compile`; median time per step. Speedup = plain median / accelerated median.",
    ]
    passes = max(g.passes for g in groups)
    if passes > 1:
        out[-1] += (
            f" Each peer's fastest of {passes} passes, each over every group in turn (within a "
            "pass the peers of a group run one after another)."
        )
    out.append("")
    header = ["model", "batch", "threads"] + [TRAINING_LABELS[p] for p in TRAINING_PEERS]
    header += ["eager speedup", "compile speedup"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for g in groups:
        cells = [g.model, str(g.batch), str(g.threads)]
        for peer in TRAINING_PEERS:
            entry = g.entries.get(peer)
            cells.append(format_time(entry.median_s) if entry else "-")
        cells.append(_speedup(g.entries.get("fusedae-eager"), g.entries.get("torch-eager")))
        cells.append(_speedup(g.entries.get("fusedae-compile"), g.entries.get("torch-compile")))
        out.append("| " + " | ".join(cells) + " |")
    return out


def runs_by_rows(path: Path, kind: str) -> dict[int, list[dict[str, Any]]]:
    """The benchmarks of ``kind`` in the results JSON, by their input's row count, in the order
    they ran."""
    by_rows: dict[int, list[dict[str, Any]]] = {}
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") == kind:
            by_rows.setdefault(info["rows"], []).append(bench)
    return by_rows


def peer_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {bench["extra_info"]["peer"]: bench["stats"]["median"] for bench in runs}


def render_parquet(path: Path) -> list[str]:
    """The Parquet table (``bench_parquet.py``): rows/s of each peer, and fusedae's share of
    the rows/s of reading the file alone."""
    by_rows = runs_by_rows(path, PARQUET)
    if not by_rows:
        return []
    out = [
        "",
        "## Parquet encode",
        "",
        "Rows of 784 float32 values in a Parquet file (`benches/bench_parquet.py`), encoded to "
        "16 by the seed's encoder, ids kept: pyarrow reading the file alone (the ceiling), the "
        "loop users write today (pyarrow batches through the plain PyTorch model, written back to "
        "Parquet, 2 threads), and `fusedae encode` on 1 and 2 kernel threads (its default leaves "
        "a CPU to the reader thread: 1 on 2 CPUs); median of 5 runs.",
        "",
        "| rows | MB | "
        + " | ".join(PARQUET_LABELS.values())
        + " | fusedae 1t / read | fusedae 2t / read |",
        "|---:|---:|" + "---:|" * (len(PARQUET_LABELS) + 2),
    ]
    for rows, runs in by_rows.items():
        medians = peer_medians(runs)
        size = runs[0]["extra_info"]["bytes"]
        cells = [f"{rows:,}", f"{size / 1e6:.0f}"]
        cells += [
            f"{rows / medians[peer] / 1e3:.0f}k rows/s" if peer in medians else "-"
            for peer in PARQUET_LABELS
        ]
        read = medians.get("pyarrow-read")
        for peer in ("fusedae-t1", "fusedae-t2"):
            ours = medians.get(peer)
            cells.append(f"{100 * read / ours:.0f}%" if read and ours else "-")
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_ray(path: Path) -> list[str]:
    """The Ray Data table (``bench_ray.py``): rows/s of each pipeline, as a share of the same
    pipeline with an identity callable (Ray runs) or of pyarrow reading alone (the others)."""
    by_rows = runs_by_rows(path, RAY)
    if not by_rows:
        return []
    out = [
        "",
        "## Parquet on Ray Data",
        "",
        "The Parquet input of `benches/bench_parquet.py` (784 float32 values a row, ids) through "
        "`read_parquet` -> `map_batches` (batches of 8,192 rows) -> batches received by the "
        "driver, on a local Ray cluster of 3 logical CPUs (the actors' 2 and one for the read "
        "tasks) on this machine's cores (`benches/bench_ray.py`); each run includes starting its "
        "actors; median of 3 runs.",
        "",
        "| rows | pipeline | rows/s | share |",
        "|---:|---|---:|---:|",
    ]
    for rows, runs in by_rows.items():
        medians = peer_medians(runs)
        for peer, label in RAY_LABELS.items():
            if peer not in medians:
                continue
            base = "pyarrow-read"
            if peer.startswith("ray-"):
                base = "ray-identity-arrow" if peer.endswith("-arrow") else "ray-identity"
            share = (
                f"{100 * medians[base] / medians[peer]:.0f}% of {base}"
                if base in medians and peer != base
                else "-"
            )
            out.append(f"| {rows:,} | {label} | {rows / medians[peer] / 1e3:.0f}k | {share} |")
    return out


PRECISION = "precision"
PRECISION_LABELS = {
    "fusedae-fp32": "fusedae fp32",
    "fusedae-bf16": "**fusedae bf16**",
    "fusedae-int8": "**fusedae int8**",
    "torch-fp32": "PyTorch fp32",
    "torch-bf16": "PyTorch bf16 (`.to(torch.bfloat16)`)",
    "torch-int8": "PyTorch int8 (`quantize_dynamic`)",
    "torch-int8-per-channel": "PyTorch int8 (`quantize_dynamic`, per channel)",
    "onnxruntime-fp32": "ONNX Runtime fp32",
    "onnxruntime-int8": "ONNX Runtime int8 (`quantize_dynamic`, per channel)",
}


def render_precision(path: Path) -> list[str]:
    """The lower-precision tables (``bench_precision.py``): per group, each peer's time,
    fp32-equivalent GFLOP/s as a share of the fp32 FMA peak and of its precision's kernel
    instruction peak (bf16, int8; all measured in the group), and its error against float64."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for bench in json.loads(path.read_text())["benchmarks"]:
        if bench.get("extra_info", {}).get("kind") == PRECISION:
            groups.setdefault(bench["group"], []).append(bench)
    if not groups:
        return []
    out = [
        "",
        "## Lower precision",
        "",
        "`benches/bench_precision.py`: median time per call; GFLOP/s counted as fp32 work (2 x in "
        "x out per row, whatever the precision), as a share of the fp32 FMA peak and of the peak "
        "of the instruction of the row's precision (bf16: `vdpbf16ps` where the CPU has "
        "AVX512_BF16; int8: `vpdpbusd` where it has AVX512_VNNI; fp32: the FMA), all probed in "
        "the same group; error: normwise relative error against the float64 reference on the "
        "same weights and inputs.",
    ]
    for name, runs in groups.items():
        info = {bench["extra_info"]["peer"]: bench for bench in runs}
        fma = info.get("fma-peak", {}).get("extra_info", {}).get("peak_gflops")
        peaks = {
            precision: info.get(f"{precision}-peak", {}).get("extra_info", {}).get("peak_gflops")
            for precision in ("bf16", "int8")
        }
        peaks["fp32"] = fma
        out += [
            "",
            f"### {name.removeprefix('precision | ')}",
            "",
            f"Peaks: fp32 FMA {_fmt_gflops(fma)}, bf16 {_fmt_gflops(peaks['bf16'])}, int8 "
            f"{_fmt_gflops(peaks['int8'])} GFLOP/s.",
            "",
            "| peer | time | GFLOP/s | of fp32 peak | of its precision's peak | vs fusedae fp32 "
            "| error |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        ours = info.get("fusedae-fp32")
        for peer, label in PRECISION_LABELS.items():
            if peer not in info:
                continue
            bench = info[peer]
            median, flops = bench["stats"]["median"], bench["extra_info"]["flops"]
            gflops = flops / median / 1e9
            speedup = ours["stats"]["median"] / median if ours else None
            own = peaks[next(p for p in ("int8", "bf16", "fp32") if p in peer)]
            cells = [
                label,
                format_time(median),
                f"{gflops:.0f}",
                f"{100 * gflops / fma:.0f}%" if fma else "-",
                f"{100 * gflops / own:.0f}%" if own else "-",
                f"{speedup:.2f}x" if speedup else "-",
                f"{bench['extra_info'].get('error', float('nan')):.1e}",
            ]
            out.append("| " + " | ".join(cells) + " |")
    return out


def load(path: Path) -> tuple[dict[str, Any], list[Group]]:
    """The JSON's metadata and its forward groups, in the order they ran."""
    data = json.loads(path.read_text())
    groups: dict[tuple[str, int, bool, int], Group] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "peer" not in info or info.get("kind") in (TRAINING, PARQUET, RAY, PRECISION):
            continue  # not one of bench_models.py's
        key = (info["model_key"], info["batch"], info.get("streamed", False), info["threads"])
        group = groups.setdefault(key, Group(key[0], info["model"], *key[1:]))
        group.passes = max(group.passes, info.get("pass_index", 0) + 1)
        if info["peer"] == PEAK:  # the ceiling: the highest any pass probed
            if group.peak_gflops is None or info["peak_gflops"] > group.peak_gflops:
                group.peak_gflops = info["peak_gflops"]
                group.peak_one_thread = info.get("peak_gflops_one_thread")
                group.load_average = info.get("load_average")
            continue
        entry = _entry(bench)
        kept = group.entries.get(info["peer"])
        if kept is None or entry.median_s < kept.median_s:  # each peer's fastest pass
            group.entries[info["peer"]] = entry
    meta = {k: data.get(k) for k in ("machine_info", "commit_info", "datetime", "version")}
    return meta, list(groups.values())


def format_time(seconds: float) -> str:
    unit, scale = next(
        ((u, s) for u, s in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)) if seconds >= s),
        ("ns", 1e-9),
    )
    value = seconds / scale
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _speedup(ours: Entry | None, peer: Entry | None) -> str:
    if ours is None or peer is None:
        return "-"
    return f"{peer.median_s / ours.median_s:.2f}x"


def describe_machine(meta: dict[str, Any]) -> list[str]:
    machine = meta.get("machine_info") or {}
    cpu = machine.get("cpu") or {}
    commit = meta.get("commit_info") or {}
    native = machine.get("fusedae") or {}
    versions = machine.get("versions") or {}
    lines = [
        f"- Machine: {cpu.get('brand_raw', machine.get('processor') or '?')}, "
        f"{cpu.get('count', '?')} logical CPUs, {machine.get('machine', '?')}, "
        f"{machine.get('system', '?')} {machine.get('release', '')}".rstrip(),
        f"- fusedae {native.get('version', '?')}: ISA `{native.get('isa', '?')}` "
        f"(available: {', '.join(native.get('available_isas', [])) or '?'}), "
        f"half registers {'cheaper' if native.get('half_registers') else 'not cheaper'}, "
        f"{native.get('build_profile', '?')} build",
        "- Peers: "
        + ", ".join(f"{name} {version}" for name, version in versions.items() if name != "fusedae")
        + f"; Python {machine.get('python_version', '?')}",
        f"- Date: {meta.get('datetime', '?')}; commit `{str(commit.get('id', '?'))[:10]}`"
        + (" (dirty tree)" if commit.get("dirty") else ""),
    ]
    return lines


def render_header(meta: dict[str, Any]) -> list[str]:
    """The report's title and the machine, build and peers the results come from (a report of
    the other sections alone, the training steps say, carries them too)."""
    return ["# fusedae benchmark report", "", *describe_machine(meta)]


def render_markdown(meta: dict[str, Any], groups: list[Group]) -> str:
    threads = sorted({g.threads for g in groups})
    out = render_header(meta)
    out += [
        f"- Threads per group: {', '.join(map(str, threads))}, pinned for every peer "
        "(fusedae, torch, torch.compile's generated code, ONNX Runtime intra-op; inter-op 1)",
        "- fp32, all peers run the same weights on the same inputs; FLOPs = 2 x batch x "
        "sum(in x out). Times are medians over rounds; IQR is the interquartile range of "
        "the rounds as a % of the median (a noisy number has a large IQR); min is the "
        "fastest round.",
        "- % of peak: against the FMA peak probed in the same group (`threads` register-only "
        "FMA loops at once, the best of 5 probes). Speedup = peer median / ours median "
        "(> 1: ours is faster).",
        "- Batch N: every call runs on the same N rows, which stay in cache between calls. "
        "N streamed: each call runs on the next N rows of 256 MB of input (8x the last-level "
        "cache), so they come from memory, as when a large dataset is encoded.",
    ]
    passes = max(g.passes for g in groups)
    if passes > 1:
        out.append(
            f"- Passes: {passes} over every group, minutes apart; each peer (ours included) "
            "shows its pass with the lower median, the peak its highest probe (a neighbour on "
            "the host only ever slows a timing down)."
        )
    out += [
        "",
        "## Summary",
        "",
        "Median time per call and % of the group's FMA peak.",
        "",
    ]
    header = ["model", "batch", "threads", "peak GFLOP/s"] + [LABELS[p] for p in PEERS]
    header += ["MLP vs ORT", "MLP vs eager", "module vs eager"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for g in groups:
        cells = [g.model, g.batch_label, str(g.threads), _fmt_gflops(g.peak_gflops)]
        for peer in PEERS:
            entry = g.entries.get(peer)
            cells.append(
                "-"
                if entry is None
                else f"{format_time(entry.median_s)} ({_pct(g.percent_of_peak(entry))})"
            )
        numpy_mlp, module = g.entries.get("fusedae-numpy"), g.entries.get("fusedae-torch")
        cells += [
            _speedup(numpy_mlp, g.entries.get("onnxruntime")),
            _speedup(numpy_mlp, g.entries.get("torch-eager")),
            _speedup(module, g.entries.get("torch-eager")),
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## Groups", ""]
    for g in groups:
        out += [f"### {g.title}", ""]
        peak = f"FMA peak {_fmt_gflops(g.peak_gflops)} GFLOP/s with {_threads(g.threads)}"
        if g.peak_one_thread:
            peak += f" (one thread alone: {_fmt_gflops(g.peak_one_thread)})"
        if g.load_average is not None:
            peak += f"; 1-minute load average {g.load_average:.2f} when the group began"
        out += [peak + ".", ""]
        head = ["peer", "median", "IQR", "min", "rounds", "GFLOP/s", "% of peak"]
        head += [f"{SHORT[o]} speedup" for o in OURS]
        out += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for peer in PEERS:
            entry = g.entries.get(peer)
            if entry is None:
                out.append(f"| {LABELS[peer]} | not run (skipped or failed) |" + " |" * 7)
                continue
            cells = [
                LABELS[peer],
                format_time(entry.median_s),
                f"{100 * entry.iqr_s / entry.median_s:.0f}%",
                format_time(entry.min_s),
                str(entry.rounds),
                f"{entry.gflops:.1f}",
                _pct(g.percent_of_peak(entry)),
            ]
            cells += [_speedup(g.entries.get(o), entry) for o in OURS]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _fmt_gflops(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_chart(meta: dict[str, Any], groups: list[Group], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in groups if not g.streamed]

    models = list(dict.fromkeys((g.model_key, g.model) for g in groups))
    threads = sorted({g.threads for g in groups})
    fig, axes = plt.subplots(
        len(models),
        len(threads),
        figsize=(5.2 * len(threads), 3.4 * len(models)),
        squeeze=False,
        sharex=True,
    )
    batches = sorted({g.batch for g in groups})
    for row, (model_key, label) in enumerate(models):
        for col, count in enumerate(threads):
            ax = axes[row][col]
            panel = sorted(
                (g for g in groups if g.model_key == model_key and g.threads == count),
                key=lambda g: g.batch,
            )
            peaks = [(g.batch, g.peak_gflops) for g in panel if g.peak_gflops]
            if peaks:
                xs, ys = zip(*peaks, strict=True)
                ax.plot(xs, ys, "--", color=COLORS[PEAK], label=LABELS[PEAK])
            for peer in PEERS:
                points = [(g.batch, g.entries[peer].gflops) for g in panel if peer in g.entries]
                if points:
                    xs, ys = zip(*points, strict=True)
                    style = "-o" if peer in OURS else "-s"
                    ax.plot(xs, ys, style, color=COLORS[peer], label=LABELS[peer], ms=4, lw=1.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{label}, {_threads(count)}", fontsize=10)
            if col == 0:
                ax.set_ylabel("GFLOP/s")
            if row == len(models) - 1:
                ax.set_xlabel("batch size (rows)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.972),
        ncol=len(labels),
        fontsize=9,
        frameon=False,
    )
    machine = meta.get("machine_info") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw", "?")
    isa = (machine.get("fusedae") or {}).get("isa", "?")
    date = str(meta.get("datetime", "?"))[:16].replace("T", " ")
    fig.suptitle(f"fp32 forward throughput: {cpu}, ISA {isa}, {date} UTC", y=0.995, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where report.md and throughput.png go (default: benches/)",
    )
    args = parser.parse_args(argv)
    meta, groups = load(args.results)
    sections = [
        *render_training(load_training(args.results)),
        *render_parquet(args.results),
        *render_ray(args.results),
        *render_precision(args.results),
    ]
    if not groups and not sections:
        parser.error(f"{args.results} holds no fusedae benchmark results (was it a timed run?)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    head = render_markdown(meta, groups) if groups else "\n".join(render_header(meta))
    markdown = "\n".join([head, *sections]).strip()
    (args.out_dir / "report.md").write_text(markdown + "\n")
    written = [args.out_dir / "report.md"]
    if groups:
        render_chart(meta, groups, args.out_dir / "throughput.png")
        written.append(args.out_dir / "throughput.png")
    print(markdown)
    print(f"\nwrote {' and '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
