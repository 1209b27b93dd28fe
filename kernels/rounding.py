"""Rounding-error primitives of the certified norms (certified_norm.py): Higham's gamma_n, how
each backend's dot products round, and upper bounds on norms computed in float32.

Every function returns an UPPER bound (or a float64 value whose relative error is stated), so
the quantities built from them stay upper bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64


# Rows per call of the clipped gradient's reduction (whole samples). The calls add into float64
# accumulators, so the chain of adds across calls cannot amplify one sample. Inside one float32
# call a sample can still change how the call's other terms round (moving a partial sum across
# a power of two, or making partial sums large by cancelling its own terms): that cross-sample
# part is not certified (docs/threat_model.md, known limits); smaller calls shrink it at a
# cost in speed (128 rows: +13% on the ResNet-18-GN step, +15-30% on the MLP step,
# bench/rule_cost.py).
GEMM_ROW_CHUNK = 2048


def samples_per_call(n_tokens: int) -> int:
    """Whole samples per call of the clipped gradient's reduction: about GEMM_ROW_CHUNK rows,
    at least one sample. The calls add their results into the float64 buffer one by one."""
    return max(1, GEMM_ROW_CHUNK // max(n_tokens, 1))


def accumulation_depth(n_tokens: int) -> int:
    """Longest chain of roundings one sample's terms pass through in the clipped gradient,
    per unit of its magnitude S = sum_t ||a_t|| ||g_t||: the reduction of one call (any order
    over its samples_per_call * T rows, any backend), then the add of the call's result into
    the buffer (+1, +1 for the scaling). A crafted sample can cancel its rows in float32 (+v,
    tiny rows that round up, -v): see ``accumulation_excess``.

    It depends on the sample's own shape only, never on the batch size: a bound that moved
    with B would let one sample's presence shift every other sample's clip factor.
    """
    return samples_per_call(n_tokens) * n_tokens + 2


ACCUMULATION_SLACK = 2.0**-10  # kappa: the clipping strategies' sensitivity is C (1 + kappa)


def accumulation_excess(
    root: torch.Tensor, magnitude: torch.Tensor, n_tokens: int, u_acc: float
) -> torch.Tensor:
    """What to add to a sample's certified root (norm of what the clipped gradient adds, before
    the reduction's own rounding) for that rounding: gamma_depth * S, where S is the sample's
    magnitude (sum of |terms|) and depth = accumulation_depth(T).

    Where gamma_depth * S <= kappa * root (every honest sample: S / root <= sqrt(T) for
    independent tokens, and gamma_2050 ~ 1.2e-4) nothing is added: the sample then adds at
    most (1 + kappa) C, which the strategies' sensitivity C (1 + kappa) and the noise cover.
    Only a sample whose terms cancel (S >> root, a crafted one) is clipped on root + gamma S.
    """
    excess = magnitude * gamma(accumulation_depth(n_tokens), u_acc)
    return torch.where(excess > ACCUMULATION_SLACK * root, excess, torch.zeros_like(excess))


def gamma(n: float, u: float) -> float:
    """gamma_n = n u / (1 - n u) (Higham's constant), inf once n u >= 1/2 (no bound)."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


@dataclass(frozen=True)
class Arithmetic:
    """How a backend computes a dot product: ``u_acc`` the accumulation unit roundoff, ``u_in``
    the rounding of each operand before it (0: exact), ``eta`` the smallest subnormal."""

    u_acc: float
    u_in: float = 0.0
    eta: float = 2.0**-149

    def dot_gamma(self, n: int) -> float:
        """Relative error bound of a length-n dot product against |x| . |y|."""
        return (1.0 + self.u_in) ** 2 * (1.0 + gamma(n, self.u_acc)) - 1.0


def _tf32(device: torch.device) -> bool:
    return device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)


def torch_arithmetic(dtype: torch.dtype, device: torch.device) -> Arithmetic:
    """torch.bmm on ``dtype`` (float32 or float64) on ``device``."""
    if dtype == torch.float64:
        return Arithmetic(U64, 0.0, 2.0**-1074)
    cuda = device.type == "cuda"
    return Arithmetic(2 * U32 if cuda else U32, 2.0**-11 if _tf32(device) else 0.0)


def row_norms(tensor: torch.Tensor) -> torch.Tensor:
    """(B, T) float64 ||x_t|| of a (B, T, k) tensor (relative error <= gamma64_{k+2})."""
    return torch.linalg.vector_norm(tensor, dim=-1, dtype=torch.float64)


def row_norm_bounds(tensor: torch.Tensor) -> torch.Tensor:
    """(B, T) float64 upper bounds on ||x_t||, from a float32 norm (a quarter of the cost of
    float64 on CPU): sum of k squares, relative error <= gamma32_{k+1}, each square off by at
    most eta32 when it underflows, so ||x|| <= nu32 (1 + gamma32_{k+2}) + sqrt(k eta32) with
    sqrt(k eta32) < 2^-58. A square that overflows makes the bound inf (the sample is then
    redone in float64, where row norms are recomputed)."""
    k = tensor.shape[-1]
    if tensor.dtype == torch.float64:
        return row_norms(tensor) * _inflate(k)
    nu = torch.linalg.vector_norm(tensor, dim=-1, dtype=torch.float32).double()
    return nu.mul_(1.0 + 2 * gamma(k + 2, U32)).add_(2.0**-58)


def _inflate(n_terms: float) -> float:
    """1 + a bound on the relative error of float64 non-negative sums of n_terms terms (4)."""
    return 1.0 + 4.0 * gamma(n_terms + 16, U64)


def frobenius_bounds(tensor: torch.Tensor) -> torch.Tensor:
    """(B,) float64 upper bounds on ||x_i||_F of a (B, T, k) tensor from a float32 norm over
    (T, k) (contiguous or not, it reads memory in order: unfolded convolution inputs are
    transposed views, where per-row norms cost more than the GEMM): as ``row_norm_bounds``."""
    n = tensor.shape[1] * tensor.shape[2]
    if tensor.dtype == torch.float64:
        return torch.linalg.vector_norm(tensor, dim=(1, 2)) * _inflate(n)
    nu = torch.linalg.vector_norm(tensor, dim=(1, 2), dtype=torch.float32).double()
    return nu.mul_(1.0 + 2 * gamma(n + 2, U32)).add_(2.0**-58)


def round_up_f32(values: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never below: fl32(v (1 + 2^-23) + 2^-149) >= v, since rounding to
    nearest moves a normal value by at most 2^-24 of itself and a subnormal one by at most
    2^-150 (and past float32's range gives inf)."""
    return (values * (1.0 + 2.0**-23) + 2.0**-149).float()


def frobenius_rows_bounds(grads: torch.Tensor) -> torch.Tensor:
    """(B,) float64 upper bound on ||X_i||_F of a (B, p, d) float32/float64 tensor: float32
    norms of rows of <= 256 entries (a divisor of d; relative error <= gamma32_258, ~1.5e-5)
    combined in float64; a float64 copy of X can cost several times the GEMM that made it."""
    if grads.dtype == torch.float64:
        return torch.linalg.vector_norm(grads, dim=(1, 2)) * _inflate(grads[0].numel())
    batch, d_out, d_in = grads.shape
    rows = grads
    if d_in > 256 and grads.is_contiguous():
        width = next(w for w in range(256, 0, -1) if d_in % w == 0)
        rows = grads.view(batch, d_out * d_in // width, width)
    width = rows.shape[2]
    nu = torch.linalg.vector_norm(rows, dim=2, dtype=torch.float32).double()
    nu = nu.mul_(1.0 + 2 * gamma(width + 2, U32)).add_(2.0**-58)
    return torch.linalg.vector_norm(nu, dim=1) * _inflate(rows.shape[1])


def diag_norm_bounds(gram: torch.Tensor, rel: float, absolute: float, u_w: float) -> torch.Tensor:
    """(B, T) upper bounds, in the Gram's precision, on the row norms behind a computed Gram
    (B, T, T), plus sqrt(absolute / rel) (see certified_norm._ghost_certified): the diagonal
    is off by <= rel ||x_t||^2 + absolute; 8 roundings here, hence (1 + 8 u_w)."""
    if not rel < 1:
        return torch.full(gram.shape[:2], math.inf, dtype=gram.dtype, device=gram.device)
    diag = gram.diagonal(dim1=1, dim2=2).clone()  # not a view of K
    scale = (1.0 + 8 * u_w) ** 2 / (1.0 - rel)
    return diag.mul_(scale).add_(absolute * scale).sqrt_().add_(math.sqrt(absolute / rel))
