"""Where a fastdp-flat step spends its time per layer rule: ``norm_sq`` and ``accumulate``.

    PYTHONPATH=<checkout> python bench/rule_cost.py [--models gpt,resnet18gn,mlp] [--steps 5]

Runs as a plain script against whichever fastdp ``PYTHONPATH`` selects (it imports only
``fastdp``, ``fastdp.models``, ``fastdp.rules`` and bench/zoo.py by file path), so the same
file times an older checkout, e.g. the commit before certified norms, against the current one:

    git worktree add /tmp/old 248281d
    ln -s ../kernels ../theory ../bench /tmp/old/fastdp/   # the package-dir mapping by hand
    PYTHONPATH=/tmp/old python bench/rule_cost.py

Every rule's ``norm_sq`` and ``accumulate`` are wrapped with a wall-clock timer (one
CPU thread by default); after warm-up, ``--steps`` full DP steps (forward, backward with
clipping, noisy update) are timed. Prints one JSON line per model: step seconds, seconds per
step in ``norm_sq`` and in ``accumulate`` (all rules together and per rule class).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def _zoo():
    path = Path(__file__).resolve().parent / "zoo.py"
    spec = importlib.util.spec_from_file_location("_bench_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str):
    """(model, x, y) at the ``cpu`` preset's sizes of ``fastdp bench`` (seeded)."""
    from fastdp import models

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "gpt":  # GPT-2 / Llama layer shapes of the zoo preset, as nn.Linear
        model = models.GPT(vocab=2048, dim=256, depth=4, heads=4, max_len=256)
        tokens = torch.randint(2048, (16, 129), generator=gen)
        return model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if name == "t5":  # the zoo's T5 (tied, relative bias) at the cpu preset
        model = _zoo().t5(vocab=2048, dim=256, depth=4, heads=4)
        tokens = torch.randint(2048, (16, 129), generator=gen)
        return model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if name == "resnet18gn":
        model = _zoo().ResNet18GN(width=64)
        return model, torch.randn(16, 3, 32, 32, generator=gen), torch.randint(10, (16,))
    if name == "mlp":
        model = models.mlp(in_features=784, hidden=1024, depth=3)
        return model, torch.randn(256, 784, generator=gen), torch.randint(10, (256,))
    raise ValueError(f"unknown model {name!r}")


def loss_of(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if output.dim() == 3:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def measure(name: str, steps: int, warmup: int) -> dict:
    import fastdp
    from fastdp.rules import rule_for

    model, x, y = build(name)
    spent: dict[str, float] = defaultdict(float)
    depth = [0]  # a rule delegating to another (conv -> linear) is timed once, outermost
    targets = set()
    for module in model.modules():
        rule = rule_for(module)
        for method in ("norm_sq", "accumulate") if rule is not None else ():
            owner = next(c for c in type(rule).__mro__ if method in c.__dict__)
            targets.add((owner, method))
    originals = []
    for owner, method in targets:
        original = owner.__dict__[method]

        def timed(self, *args, _f=original, _key=f"{owner.__name__}.{method}", **kwargs):
            depth[0] += 1
            begin = time.perf_counter()
            try:
                return _f(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[_key] += time.perf_counter() - begin

        originals.append((owner, method, original))
        setattr(owner, method, timed)
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, _ = fastdp.PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, clipping="flat", poisson_sampling=False, seed=0,
            )  # fmt: skip

        def step() -> None:
            optimizer.signal_micro_batch(True, x.shape[0])
            loss_of(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        spent.clear()
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    finally:
        for cls, method, original in originals:
            setattr(cls, method, original)
    per_step = {k: v / steps for k, v in sorted(spent.items())}
    return dict(
        model=name,
        fastdp=str(Path(fastdp.__file__).resolve().parent.parent),
        step_s=sorted(times)[len(times) // 2],
        norm_sq_s=sum(v for k, v in per_step.items() if k.endswith(".norm_sq")),
        accumulate_s=sum(v for k, v in per_step.items() if k.endswith(".accumulate")),
        per_rule_s=per_step,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt,resnet18gn,mlp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        print(json.dumps(measure(name, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
