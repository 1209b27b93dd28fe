"""Canary samples for ``sensitivity_check``, shaped after the user's batch.

Every builder takes (model, loss_fn, inputs, targets, generator) and returns
(variants, note): a list of one-sample (x, y) pairs, empty when the canary does not fit the
inputs (the note says why). Inputs are either floats laid out (B, ..., d) (features last,
positions in between, as fastdp's Linear rule reads them) or integer token ids (B, ...).
"""

from __future__ import annotations

import torch

HUGE_SCALES = (1e4, 1e10, 1e18)
GHOST_INPUT_NORM = 100.0
GHOST_GRAD_NORMS = (1e4, 8192.0, 3e4, 1e5)  # ||v||: float32 Gram entries ~||v||^2 lose delta


def _first(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs[:1].clone(), targets[:1].clone()


def _unit_like(x: torch.Tensor) -> torch.Tensor:
    """x rescaled to root-mean-square 1 (ones when x is zero or not finite)."""
    rms = x.double().square().mean().sqrt()
    if not (torch.isfinite(rms) and rms > 0):
        return torch.ones_like(x)
    return (x.double() / rms).to(x.dtype)


def huge(model, loss_fn, inputs, targets, generator):
    x0, y0 = _first(inputs, targets)
    if inputs.is_floating_point():
        unit = _unit_like(x0)
        return [(unit * s, y0) for s in HUGE_SCALES], ""
    if targets.is_floating_point():
        unit = _unit_like(y0)
        return [(x0, unit * s) for s in HUGE_SCALES], "token ids: huge targets"
    return [], "token ids and integer targets: nothing to scale"


def nan(model, loss_fn, inputs, targets, generator):
    x0, y0 = _first(inputs, targets)
    variants = []
    for value in (float("nan"), float("inf")):
        if inputs.is_floating_point():
            x = x0.clone()
            x.view(-1)[0] = value
            variants.append((x, y0))
        elif targets.is_floating_point():
            y = y0.clone()
            y.view(-1)[0] = value
            variants.append((x0, y))
    note = "" if inputs.is_floating_point() else "token ids: non-finite targets"
    return variants, (note if variants else "token ids and integer targets: no NaN to place")


def zero(model, loss_fn, inputs, targets, generator):
    x0, y0 = _first(inputs, targets)
    return [(torch.zeros_like(x0), y0)], ""


def repeated_tokens(model, loss_fn, inputs, targets, generator):
    x0, y0 = _first(inputs, targets)
    if inputs.is_floating_point():
        return [], "float inputs (no tokens)"
    if x0.dim() < 2 or x0[0].numel() < 2:
        return [], "one token per sample"
    tokens = [int(x0.flatten()[0]), int(inputs.max())]
    return [(torch.full_like(x0, t), y0) for t in dict.fromkeys(tokens)], ""


def ghost_pair(model, loss_fn, inputs, targets, generator):
    """Equal inputs at every position and output gradients v, -v + delta, ... (see module
    docstring of fastdp.audit_sensitivity); a few random (a, v, delta) draws."""
    x0, y0 = _first(inputs, targets)
    floating = inputs.is_floating_point()
    if (floating and x0.dim() < 3) or (not floating and x0.dim() < 2):
        return [], "inputs have no positions axis"
    if not targets.is_floating_point():
        return [], "integer targets: output gradients cannot be crafted"
    variants, reasons = [], set()
    for grad_norm in GHOST_GRAD_NORMS:
        if floating:
            a = torch.randn(x0.shape[-1], generator=generator, dtype=torch.float64)
            a = (a * GHOST_INPUT_NORM / a.norm()).to(x0.dtype)
            x = a.expand_as(x0).clone()
        else:
            x = torch.full_like(x0, int(x0.flatten()[0]))
        with torch.no_grad():
            output = model(x)
        if output.shape != y0.shape:
            reasons.add(f"targets {tuple(y0.shape)} are not shaped like outputs")
            continue
        wanted = _alternating_gradient(output, grad_norm, generator)
        y = _targets_for(loss_fn, output, wanted)
        if y is None:
            reasons.add("the loss is not affine in the target")
            continue
        variants.append((x, y))
    return variants, "; ".join(sorted(reasons))


def _alternating_gradient(output: torch.Tensor, grad_norm: float, generator) -> torch.Tensor:
    """Output gradients v, -v + delta, v, -v + delta, ... over the positions of a (1, ..., p)
    output (a last odd position gets 0); ||v|| = grad_norm, ||delta|| = 1, delta _|_ v.
    A (1, p) output has no positions: the gradient is v alone."""
    p = output.shape[-1]
    v = torch.randn(p, generator=generator, dtype=torch.float64)
    delta = torch.randn(p, generator=generator, dtype=torch.float64)
    delta -= (delta @ v) / (v @ v) * v
    v, delta = v * grad_norm / v.norm(), delta / delta.norm()
    rows = output.reshape(-1, p).shape[0]
    wanted = torch.zeros(rows, p, dtype=torch.float64)
    for t in range(0, rows - 1, 2):
        wanted[t], wanted[t + 1] = v, -v + delta
    if rows == 1:
        wanted[0] = v
    return wanted.reshape(output.shape)


def _targets_for(loss_fn, output: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor | None:
    """Targets y with d loss(output, y) / d output = wanted, assuming the gradient is affine
    in y with a scalar slope (squared error: 2 (o - y); linear loss -<y, o>: -y); checked
    afterwards, None when the loss is not of that kind."""

    def grad_at(y: torch.Tensor) -> torch.Tensor:
        o = output.detach().double().requires_grad_(True)
        loss_fn(o, y.double()).backward()
        return o.grad

    y0 = output.detach().double()
    probe = torch.ones_like(y0)
    g0, g1 = grad_at(y0), grad_at(y0 + probe)
    slope = float(((g1 - g0) * probe).sum() / probe.square().sum())
    if not (slope != 0 and torch.isfinite(g0).all()):
        return None
    y = y0 + (wanted - g0) / slope
    error = (grad_at(y) - wanted).norm() / wanted.norm()
    return y.to(output.dtype) if float(error) < 1e-6 else None


BUILDERS = {
    "huge": huge,
    "ghost_pair": ghost_pair,
    "nan": nan,
    "repeated_tokens": repeated_tokens,
    "zero": zero,
}
