"""The microbatch oracle: per-sample gradients by a loop of single samples through plain
autograd, clipped and summed by definition. Every per-sample rule is tested against it."""

from __future__ import annotations

import copy
import math
import warnings

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
    views: int = 1,
) -> dict[str, torch.Tensor]:
    """sum_i c_i grad_i per trainable parameter name (float64 model copy for exactness).

    ``views`` K > 1: ``inputs`` holds K views per sample (rows i*K .. i*K+K-1, B*K rows) and
    ``targets`` one row per sample; grad_i is the mean of the K views' gradients, clipped once.
    """
    reference = copy.deepcopy(model).double()
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    layers: dict[str, list[str]] = {}
    for name, _ in named:
        layers.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    total = {name: torch.zeros_like(p) for name, p in named}
    for i in range(inputs.shape[0] // views):
        reference.zero_grad()
        for k in range(views):  # one view at a time: nothing shared between views
            x = inputs[i * views + k : i * views + k + 1]
            x = x.double() if x.is_floating_point() else x
            loss = per_sample_loss(reference(x), targets[i : i + 1].double()).sum()
            (loss / views).backward()
        # a parameter the forward does not use (T5's untied `shared`) has no gradient: zero
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in named}
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
    views: int = 1,
    loss_reduction: str = "sum",
) -> dict[str, torch.Tensor]:
    """The same sum through fastdp (noise off): read back from an SGD(lr=1) step.

    ``views`` K > 1: inputs as for ``oracle_grad_sum``; the private loader draws the B
    samples (as indices) and its ``augment`` swaps each sample's K repeated rows for the
    given views. ``loss_reduction="mean"`` trains on the mean loss and rescales the update by
    the batch size, so the result is the same sum.
    """
    from torch.utils.data import DataLoader, TensorDataset

    import fastdp

    model = copy.deepcopy(model)
    # keyed by the names before make_private: swapped modules (nn.MultiheadAttention) rename
    # parameters but keep the objects
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = torch.optim.SGD(list(named.values()), lr=1.0)
    batch = inputs.shape[0] // views
    augment = None
    if views == 1:
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=max(batch, 1))
    else:
        index = torch.arange(batch)
        loader = DataLoader(TensorDataset(index, targets), batch_size=max(batch, 1))

        def augment(rows):  # (index, target), each sample's row repeated K times, grouped
            ids, y = rows
            view = torch.arange(len(ids)) % views
            return inputs[ids * views + view], y

    engine = fastdp.PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # explicit seed, fallback cost notes
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
            loss_reduction=loss_reduction,
            augmentation_multiplicity=views,
            augment=augment,
        )
    optimizer.warn_dropped = True  # tests of NaN dropping read the count from the warning
    for x, y in loader:
        loss = per_sample_loss(model(x), y)
        (loss.mean() if loss_reduction == "mean" else loss.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    rescale = batch if loss_reduction == "mean" else 1
    return {n: (before[n] - p.detach()) * rescale for n, p in named.items()}


def assert_close_sums(got: dict, expected: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        e = expected[name].to(got[name].dtype)
        scale = float(e.abs().max()) + 1e-12
        err = float((got[name] - e).abs().max())
        assert err <= rtol * scale + 1e-7, f"{name}: max error {err:.3g} vs scale {scale:.3g}"
