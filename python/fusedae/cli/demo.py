"""``fusedae demo``: the seed's autoencoder trained on handwritten digits, then encoded by
fusedae and by PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import fusedae
from fusedae.cli.common import (
    CommandError,
    positive_int,
    print_table,
    progress_bar,
    time_interleaved,
)
from fusedae.mlp import MLP


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="train the seed's autoencoder on handwritten digits and compare encoders",
        description=(
            "Trains the seed's AE (64 -> 42 -> 2 -> 42 -> 64) on scikit-learn's bundled 8x8 "
            "handwritten digits (1797 images, no download) with PyTorch, on CUDA when present; "
            "saves it; encodes the dataset with the fused kernels and with PyTorch; prints the "
            "timings and the largest difference; and draws the 2-D codes and some "
            "reconstructions. Needs torch, scikit-learn and matplotlib (pip install "
            "'fusedae[demo]')."
        ),
    )
    demo.add_argument(
        "--out-dir",
        type=Path,
        default=Path("demo-out"),
        help="where files go (default: %(default)s)",
    )
    demo.add_argument("--epochs", type=positive_int, default=200, help="default: %(default)s")
    demo.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    demo.add_argument(
        "--device", choices=("cpu", "cuda"), help="training device (default: cuda if available)"
    )
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    try:
        import matplotlib
        import torch
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise CommandError(
            f"the demo needs torch, scikit-learn and matplotlib: pip install 'fusedae[demo]' "
            f"({error})"
        ) from None
    matplotlib.use("Agg")
    from fusedae.torch import AE, save

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16).astype(np.float32)  # (1797, 64), pixels in [0, 1]
    labels = digits.target
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError(
            "--device cuda: this torch sees no CUDA device; leave it out to train on CPU"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model = AE(x.shape[1], 2).to(device)
    data = torch.from_numpy(x).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with progress_bar(
        iterable=range(args.epochs), desc=f"training on {device}", unit="epoch"
    ) as bar:
        for _ in bar:
            total = torch.zeros((), device=device)
            for index in torch.randperm(len(data), device=device).split(64):
                batch = data[index]
                loss = torch.nn.functional.mse_loss(model(batch), batch, reduction="sum")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.detach()
            bar.set_postfix(mse=f"{total.item() / data.numel():.4f}", refresh=False)
    model = model.cpu().eval()

    model_path = out_dir / "digits-ae.safetensors"
    save(model, model_path)
    torch.save(model.state_dict(), out_dir / "digits-ae.pt")
    np.save(out_dir / "digits.npy", x)
    encoder, autoencoder = MLP.load(model_path, "encoder"), MLP.load(model_path)
    plain_encoder = torch.nn.Sequential(*model.encoder)  # PyTorch's own modules, not fused
    plain_autoencoder = torch.nn.Sequential(*model.encoder, *model.decoder)
    tiled = np.tile(x, (100, 1))
    rows, codes, reconstructions = [], encoder(x), autoencoder(x)
    for task, mlp, plain, inputs in [
        ("encode", encoder, plain_encoder, x),
        ("reconstruct", autoencoder, plain_autoencoder, x),
        ("encode", encoder, plain_encoder, tiled),
        ("reconstruct", autoencoder, plain_autoencoder, tiled),
    ]:
        inputs_torch = torch.from_numpy(inputs)

        def run_torch(module: torch.nn.Module = plain, t: torch.Tensor = inputs_torch) -> Any:
            with torch.inference_mode():
                return module(t).numpy()

        def run_fused(mlp: MLP = mlp, a: np.ndarray = inputs) -> np.ndarray:
            return mlp(a)

        seconds = time_interleaved({"fused": run_fused, "torch": run_torch}, rounds=9)
        difference = float(np.abs(run_fused() - run_torch()).max())
        rows.append(
            [
                task,
                str(len(inputs)),
                f"{1e3 * seconds['fused']:.3f}",
                f"{1e3 * seconds['torch']:.3f}",
                f"{seconds['torch'] / seconds['fused']:.1f}x",
                f"{difference:.1e}",
            ]
        )
    print(f"\nCPU timings, {fusedae.get_num_threads()} threads, ISA {encoder.isa} (median):")
    print_table(["task", "rows", "fusedae ms", "PyTorch ms", "speedup", "max |diff|"], rows)
    figures = [
        plot_codes(codes, labels, out_dir / "codes.png"),
        plot_reconstructions(x, reconstructions, labels, out_dir / "reconstructions.png"),
    ]
    print(f"\nwrote {model_path} (and digits-ae.pt, digits.npy), {', '.join(map(str, figures))}")
    print(f"try: fusedae encode {model_path} {out_dir / 'digits.npy'} -o {out_dir / 'codes.npy'}")


def plot_codes(codes: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """Scatter of ``codes`` ``(n, 2)`` coloured by digit ``labels`` ``(n,)``."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 5.6), layout="constrained")
    for digit in range(10):
        chosen = codes[labels == digit]
        axes.scatter(chosen[:, 0], chosen[:, 1], s=6, color=plt.cm.tab10(digit), label=str(digit))
    axes.legend(title="digit", markerscale=3, loc="best", fontsize="small")
    axes.set(title="Digits encoded to 2-D by the fused encoder", xlabel="z[0]", ylabel="z[1]")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_reconstructions(
    x: np.ndarray, reconstructions: np.ndarray, labels: np.ndarray, path: Path
) -> Path:
    """The first image of each digit (``x`` rows of 64 pixels) above its reconstruction."""
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 10, figsize=(10, 2.4), layout="constrained")
    for digit in range(10):
        index = int(np.flatnonzero(labels == digit)[0])
        for row, images in enumerate((x, reconstructions)):
            axes = grid[row, digit]
            axes.imshow(images[index].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes.set(xticks=[], yticks=[])
    grid[0, 0].set_ylabel("original")
    grid[1, 0].set_ylabel("reconstructed")
    figure.suptitle("Digits and their reconstructions through a 2-D code")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
