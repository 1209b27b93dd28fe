"""sensitivity_check: does one sample move fastdp's clipped sum by more than C?

Deterministic, no noise. The clipped sum is read back through the public API exactly as a
user runs it: a copy of the model made private with noise_multiplier=0, fixed batches, one
logical batch holding the whole batch, SGD(lr=1) so that the parameter change is minus the
clipped sum. The sum is formed with and without each canary appended to the user's batch,
and a canary's contribution is the norm of the difference, in units of the clip norm C.
DP-SGD's sensitivity is C, so any contribution above C (1 + tolerance) is a leak.

Canaries are built from the user's batch (shapes, dtypes, float inputs or token ids):
- ``huge``: the first input scaled by 1e4, 1e10, 1e18 (norms far above C, overflow);
  with token ids, the targets are scaled instead (when they are floats).
- ``ghost_pair``: equal inputs a at every position (||a|| = 100; with token ids, one token
  repeated) and targets chosen so that the output gradients alternate v, -v + delta with
  ||v|| in [8192, 1e5], ||delta|| = 1 and delta orthogonal to v: the true per-sample norm is
  about 100 * (T / 2), but float32 Gram entries lose delta, so a ghost norm
  sum_{t,s} (a_t . a_s)(g_t . g_s) cancels to 0 and the sample enters unclipped. The targets
  come from an affine fit of the loss's output gradient in the target (exact for squared
  error and for linear losses); other losses skip this canary.
- ``nan``: a NaN, then an Inf, in the first input (targets with token ids): must be dropped.
- ``repeated_tokens``: token ids only, one token at every position.
- ``zero``: an all-zero input.
Each canary has a few variants; the report keeps the worst. Users can add their own:
``canaries={"mine": (x, y)}`` with leading dimension 1.

The same step is compared with a float64 single-sample oracle (a loop over the samples
through plain autograd on a float64 copy, each gradient clipped to C as the mode says,
then summed): the maximum relative difference per parameter is reported, and must stay
below ``oracle_rtol``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CANARIES = ("huge", "ghost_pair", "nan", "repeated_tokens", "zero")


class SensitivityError(AssertionError):
    """Raised by ``sensitivity_check(..., strict=True)`` when a check fails."""

    def __init__(self, report: SensitivityReport) -> None:
        super().__init__(f"fastdp sensitivity check failed:\n{report.table()}")
        self.report = report


@dataclass
class CanaryResult:
    name: str
    contribution: float | None  # ||clipped sum with - without|| / C, worst variant
    oracle_contribution: float | None  # the float64 oracle's clipped contribution / C
    raw_norm: float | None  # the canary's unclipped per-sample gradient norm / C (float64)
    variants: int
    status: str  # ok | FAIL | error | skipped
    note: str = ""


@dataclass
class SensitivityReport:
    ok: bool
    clipping: str
    max_grad_norm: float
    tolerance: float
    batch_size: int
    oracle_max_rel_diff: float
    oracle_rtol: float
    canaries: list[CanaryResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"sensitivity check ({self.clipping} clipping, C = {self.max_grad_norm:g}, batch "
            f"{self.batch_size}): {'OK' if self.ok else 'FAILED'}",
            f"  clipped sum vs float64 oracle: max relative difference "
            f"{self.oracle_max_rel_diff:.2e} (limit {self.oracle_rtol:g})",
            f"  {'canary':<16}{'contribution/C':>15}{'oracle/C':>10}{'raw/C':>10}  status",
        ]
        for c in self.canaries:
            lines.append(
                f"  {c.name:<16}{_fmt(c.contribution):>15}{_fmt(c.oracle_contribution):>10}"
                f"{_fmt(c.raw_norm):>10}  {c.status}{'  (' + c.note + ')' if c.note else ''}"
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def sensitivity_check(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    max_grad_norm: float | Sequence[float] = 1.0,
    clipping: str = "flat",
    canaries: Sequence[str] | Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_reduction: str = "sum",
    tolerance: float = 1e-3,
    oracle_rtol: float = 1e-3,
    strict: bool = False,
    seed: int = 0,
) -> SensitivityReport:
    """Check that no canary moves fastdp's clipped sum by more than C on this model and loss.

    ``model``: the user's model before make_private (it is copied, never modified).
    ``loss_fn(output, target)``: the batch loss, summed over samples (``loss_reduction=
    "sum"``) or averaged (``"mean"``, as given to make_private). ``batch``: (inputs,
    targets) with the batch first. ``canaries``: names from CANARIES (default all that fit
    the inputs) and/or a mapping name -> (x, y) of one-sample canaries of one's own.
    Fails (``ok=False``; raises SensitivityError when ``strict``) if a canary contributes
    more than (1 + tolerance) C, if a run errors only when a canary is present, or if the
    clipped sum differs from the float64 oracle by more than ``oracle_rtol``.
    """
    inputs, targets = batch
    device = next(model.parameters()).device
    inputs, targets = inputs.to(device), targets.to(device)
    bound = _total_clip_norm(max_grad_norm)
    run = dict(
        loss_fn=loss_fn,
        clipping=clipping,
        max_grad_norm=max_grad_norm,
        loss_reduction=loss_reduction,
    )
    base = _clipped_sum(model, inputs, targets, **run)
    reference = copy.deepcopy(model).double()
    oracle = _oracle(reference, loss_fn, inputs, targets, clipping, max_grad_norm)
    rel_diff = _max_rel_diff(base, oracle.clipped_sum)

    built = _build_canaries(model, loss_fn, inputs, targets, canaries, seed)
    results = []
    for name, (variants, note) in built.items():
        if not variants:
            results.append(CanaryResult(name, None, None, None, 0, "skipped", note))
            continue
        worst, worst_oracle, worst_raw, error = 0.0, 0.0, 0.0, None
        for x_c, y_c in variants:
            x_c, y_c = x_c.to(device), y_c.to(device)
            single = _oracle(reference, loss_fn, x_c, y_c, clipping, max_grad_norm)
            worst_oracle = max(worst_oracle, _norm(single.clipped_sum) / bound)
            worst_raw = _nanmax(worst_raw, single.raw_norms[0] / bound)
            try:
                with_canary = _clipped_sum(
                    model, torch.cat([inputs, x_c]), torch.cat([targets, y_c]), **run
                )
            except Exception as err:  # a run that fails only with the canary reveals it
                error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                continue
            diff = {k: with_canary[k] - base[k] for k in base}
            worst = _nanmax(worst, _norm(diff) / bound)
        status = "ok"
        if error is not None:
            status, note = "error", "; ".join(filter(None, [note, error]))
        elif not worst <= 1.0 + tolerance:
            status = "FAIL"
        results.append(
            CanaryResult(name, worst, worst_oracle, worst_raw, len(variants), status, note)
        )
    ok = rel_diff <= oracle_rtol and all(r.status in ("ok", "skipped") for r in results)
    report = SensitivityReport(
        ok=ok,
        clipping=clipping,
        max_grad_norm=bound,
        tolerance=tolerance,
        batch_size=len(inputs),
        oracle_max_rel_diff=rel_diff,
        oracle_rtol=oracle_rtol,
        canaries=results,
    )
    if strict and not ok:
        raise SensitivityError(report)
    return report


# ---- fastdp's clipped sum through the public API ------------------------------------------
def _clipped_sum(model, inputs, targets, *, loss_fn, clipping, max_grad_norm, loss_reduction):
    """{parameter name: float64 clipped sum} of one noiseless logical batch of all samples."""
    import fastdp

    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().double() for n, p in params.items()}
    dataset = TensorDataset(inputs, targets)
    engine = fastdp.PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poisson_sampling=False; NaN samples dropped
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(params.values(), lr=1.0),
            data_loader=DataLoader(dataset, batch_size=len(dataset), shuffle=False),
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            poisson_sampling=False,
            loss_reduction=loss_reduction,
        )
        for x, y in loader:  # one step() per micro-batch the private loader yields
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    # mean reduction divides the noisy sum by the (fixed) logical batch size
    scale = len(dataset) if loss_reduction == "mean" else 1.0
    return {n: (before[n] - p.detach().double()) * scale for n, p in params.items()}


# ---- the float64 single-sample oracle -----------------------------------------------------
@dataclass
class _OracleSum:
    clipped_sum: dict[str, torch.Tensor]
    raw_norms: list[float]


def _oracle(reference, loss_fn, inputs, targets, clipping, max_grad_norm) -> _OracleSum:
    """sum_i c_i grad_i in float64 (``reference`` is a float64 copy of the model), one
    sample at a time through plain autograd; samples with a non-finite gradient are
    dropped, as fastdp does."""
    from fastdp.clipping import AUTOMATIC_GAMMA

    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    layer_of = {n: n.rsplit(".", 1)[0] if "." in n else "" for n, _ in named}
    layers = list(dict.fromkeys(layer_of.values()))
    if isinstance(max_grad_norm, (int, float)):
        thresholds = dict.fromkeys(layers, float(max_grad_norm) / math.sqrt(len(layers)))
    else:
        thresholds = dict(zip(layers, (float(c) for c in max_grad_norm)))
    total = {n: torch.zeros_like(p) for n, p in named}
    raw_norms = []
    for i in range(len(inputs)):
        reference.zero_grad(set_to_none=True)
        x = inputs[i : i + 1]
        x = x.double() if x.is_floating_point() else x
        y = targets[i : i + 1]
        y = y.double() if y.is_floating_point() else y
        loss_fn(reference(x), y).backward()
        grads = {
            n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in named
        }
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
        raw_norms.append(norm)
        if not math.isfinite(norm):
            continue
        if clipping == "flat":
            factors = dict.fromkeys(grads, min(1.0, float(max_grad_norm) / (norm + 1e-6)))
        elif clipping == "automatic":
            factors = dict.fromkeys(grads, float(max_grad_norm) / (norm + AUTOMATIC_GAMMA))
        elif clipping == "per_layer":
            layer_norm = {layer: 0.0 for layer in layers}
            for n, g in grads.items():
                layer_norm[layer_of[n]] += float(g.square().sum())
            factors = {
                n: min(1.0, thresholds[layer_of[n]] / (math.sqrt(layer_norm[layer_of[n]]) + 1e-6))
                for n in grads
            }
        else:
            factors = dict.fromkeys(grads, 1.0)
        for n in total:
            total[n] += factors[n] * grads[n]
    return _OracleSum(total, raw_norms)


def _total_clip_norm(max_grad_norm: float | Sequence[float]) -> float:
    """The sensitivity C of the summed gradient (per_layer: sqrt of the sum of squares)."""
    if isinstance(max_grad_norm, (int, float)):
        return float(max_grad_norm)
    return math.sqrt(sum(float(c) ** 2 for c in max_grad_norm))


def _norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def _nanmax(a: float, b: float) -> float:
    """max that lets NaN through (a NaN contribution is a failure, not a zero)."""
    return b if math.isnan(b) or b > a else a


def _max_rel_diff(got: dict, expected: dict) -> float:
    worst = 0.0
    for n, e in expected.items():
        scale = float(e.abs().max()) if e.numel() else 0.0
        err = float((got[n] - e).abs().max()) if e.numel() else 0.0
        worst = max(worst, err / (scale + 1e-12))
    return worst


# ---- canaries -----------------------------------------------------------------------------
Variants = list[tuple[torch.Tensor, torch.Tensor]]


def _build_canaries(model, loss_fn, inputs, targets, wanted, seed) -> dict:
    """name -> (variants, note); a canary that does not fit the inputs has no variants."""
    from fastdp.audit_canaries import BUILDERS

    if wanted is None:
        wanted = CANARIES
    own = dict(wanted) if isinstance(wanted, Mapping) else {}
    names = [] if isinstance(wanted, Mapping) else list(wanted)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown canaries {unknown}; use names from {CANARIES} or a mapping")
    if len(inputs) == 0:
        raise ValueError("sensitivity_check needs a non-empty batch to derive canary shapes")
    generator = torch.Generator().manual_seed(seed)
    built = {n: BUILDERS[n](model, loss_fn, inputs, targets, generator) for n in names}
    for name, (x_c, y_c) in own.items():
        built[name] = ([(x_c, y_c)], "user canary")
    return built
