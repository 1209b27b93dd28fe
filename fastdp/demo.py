"""``fastdp demo``: DP-SGD on MNIST-1D next to the same run without privacy.

Trains a small model twice with the same data, model initialisation, batch size and epochs:
once with plain torch SGD, once through ``PrivacyEngine.make_private`` (Poisson sampling,
flat clipping), then prints test accuracy, epsilon at delta = 1e-5 and samples/s of each.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import fastdp
from fastdp.datasets import make_mnist1d
from fastdp.models import Conv1dNet, mlp


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Conv1dNet() if name == "conv" else mlp(hidden=256)


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset) -> float:
    x, y = dataset.tensors
    return float((model(x).argmax(1) == y).float().mean())


def _train(model, optimizer, loader, epochs: int, label: str) -> tuple[float, int]:
    """Train; return (seconds spent in training steps, samples processed)."""
    seconds, samples = 0.0, 0
    with tqdm(total=epochs * len(loader), desc=label, unit="batch", leave=False) as bar:
        for _ in range(epochs):
            for x, y in loader:
                start = time.perf_counter()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                seconds += time.perf_counter() - start
                samples += len(x)
                bar.update()
    return seconds, samples


def run(args: argparse.Namespace) -> dict:
    train, test = make_mnist1d(num_samples=args.samples, seed=args.data_seed)
    results = {}

    model = _model(args.model, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator)
    seconds, samples = _train(model, optimizer, loader, args.epochs, "non-private")
    results["non_private"] = {
        "test_accuracy": accuracy(model, test),
        "samples_per_s": samples / seconds,
    }

    model = _model(args.model, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    engine = fastdp.PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():
        # the demo's fixed seed makes its numbers reproducible; make_private's warning about
        # explicit seeds is for users' releases, not for the library's own demo
        warnings.filterwarnings("ignore", message="an explicit seed", category=UserWarning)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(train, batch_size=args.batch_size),
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.max_grad_norm,
            clipping=args.clipping,
            max_physical_batch_size=args.max_physical_batch_size,
            seed=args.seed,
        )
    seconds, samples = _train(model, optimizer, loader, args.epochs, f"DP-SGD ({args.clipping})")
    results["private"] = {
        "test_accuracy": accuracy(model, test),
        "samples_per_s": samples / seconds,
        "epsilon": engine.get_epsilon(delta=1e-5),
        "delta": 1e-5,
        "logical_steps": optimizer.logical_step,
    }
    results["config"] = vars(args) | {"out": str(args.out) if args.out else None}
    return results


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastdp demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", choices=["mlp", "conv"], default="mlp", help="MLP or 1-D convolutional net")
    add("--epochs", type=int, default=30, help="epochs of both runs")
    add("--batch-size", type=int, default=256, help="logical (expected) batch: q = B / N")
    add(
        "--max-physical-batch-size",
        type=int,
        default=256,
        help="largest micro-batch in memory at once (does not change the result)",
    )
    add("--noise-multiplier", type=float, default=1.0, help="sigma: noise std / clip norm")
    add("--max-grad-norm", type=float, default=1.0, help="clip norm C of each sample's gradient")
    add(
        "--clipping",
        choices=["flat", "per_layer", "automatic"],
        default="flat",
        help="how per-sample gradients are clipped",
    )
    add("--lr", type=float, default=0.2, help="SGD learning rate (momentum 0.9), both runs")
    add("--samples", type=int, default=10000, help="MNIST-1D samples (80%% train)")
    add("--data-seed", type=int, default=42, help="seed of the generated dataset")
    add(
        "--seed",
        type=int,
        default=0,
        help="seed of model init, batches and noise (fixed so the demo is reproducible; "
        "private runs you release use seed=None)",
    )
    add("--quick", action="store_true", help="at most 3 epochs (smoke run)")
    add("--out", type=Path, default=None, help="write results.json into this folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 3)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    results = run(args)
    plain, private = results["non_private"], results["private"]
    print(f"MNIST-1D, {args.model}, {args.epochs} epochs, batch {args.batch_size}")
    print(f"{'':14}{'test acc':>10}{'samples/s':>12}{'epsilon':>10}")
    print(
        f"{'non-private':14}{plain['test_accuracy']:>10.3f}{plain['samples_per_s']:>12.0f}{'-':>10}"
    )
    print(
        f"{'DP-SGD':14}{private['test_accuracy']:>10.3f}{private['samples_per_s']:>12.0f}"
        f"{private['epsilon']:>10.2f}"
    )
    print(
        f"DP-SGD: sigma={args.noise_multiplier}, C={args.max_grad_norm}, delta=1e-5, "
        f"{private['logical_steps']} logical steps; throughput ratio (DP / non-private) "
        f"{private['samples_per_s'] / plain['samples_per_s']:.2f}"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0
