"""The microbatch oracle: per-sample gradients by a loop of single samples through plain
autograd, clipped and summed by definition. Every per-sample rule is tested against it."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) squared-error losses, one per sample, for outputs of any shape."""
    return (output - target).square().flatten(1).sum(1)


def oracle_grad_sum(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    clipping: str,
    max_grad_norm: float | list[float] = 1.0,
) -> dict[str, torch.Tensor]:
    """sum_i c_i grad_i per trainable parameter name (float64 model copy for exactness)."""
    reference = copy.deepcopy(model).double()
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    layers: dict[str, list[str]] = {}
    for name, _ in named:
        layers.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    total = {name: torch.zeros_like(p) for name, p in named}
    for i in range(inputs.shape[0]):
        reference.zero_grad()
        x = inputs[i : i + 1]
        x = x.double() if x.is_floating_point() else x
        per_sample_loss(reference(x), targets[i : i + 1].double()).sum().backward()
        grads = {name: p.grad.clone() for name, p in named}
        if clipping in ("flat", "automatic"):
            norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
            if clipping == "flat":
                factor = min(1.0, max_grad_norm / (norm + 1e-6))
            else:
                factor = max_grad_norm / (norm + 0.01)
            factors = {name: factor for name in grads}
        elif clipping == "per_layer":
            thresholds = (
                max_grad_norm
                if isinstance(max_grad_norm, list)
                else [max_grad_norm / math.sqrt(len(layers))] * len(layers)
            )
            factors = {}
            for (_, names), c_l in zip(layers.items(), thresholds):
                norm = math.sqrt(sum(float(grads[n].square().sum()) for n in names))
                for n in names:
                    factors[n] = min(1.0, c_l / (norm + 1e-6))
        else:
            factors = {name: 1.0 for name in grads}
        for name in total:
            total[name] += factors[name] * grads[name]
    return total


def fastdp_grad_sum(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    clipping: str,
    max_grad_norm: float | list[float] = 1.0,
    micro_batch: int | None = None,
) -> dict[str, torch.Tensor]:
    """The same sum through fastdp (noise off): read back from an SGD(lr=1) step."""
    from torch.utils.data import DataLoader, TensorDataset

    import fastdp

    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    batch = inputs.shape[0]
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=max(batch, 1))
    engine = fastdp.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        poisson_sampling=False,
        max_physical_batch_size=micro_batch,
        seed=0,
        loss_reduction="sum",
    )
    for x, y in loader:
        per_sample_loss(model(x), y).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}


def assert_close_sums(got: dict, expected: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        e = expected[name].to(got[name].dtype)
        scale = float(e.abs().max()) + 1e-12
        err = float((got[name] - e).abs().max())
        assert err <= rtol * scale + 1e-7, f"{name}: max error {err:.3g} vs scale {scale:.3g}"
