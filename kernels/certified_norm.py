"""Certified per-sample squared norms: upper bounds, rounding included, of the norm of what
the clipped GEMM adds for each sample.

A clip factor is only as private as the norm it divides by: the value handed to clipping must
be an upper bound, rounding included, of the norm of what the clipped GEMM adds for the
sample. The argument (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 3.1):

(1) A sum of n terms computed in floating point with unit roundoff u, in ANY order (serial,
    pairwise, blocked, split-K, FMA), satisfies |fl(sum x) - sum x| <= gamma_n * sum |x|
    with gamma_n = n u / (1 - n u): each term passes through at most n roundings. A dot
    product of length n (a matmul entry) obeys the same with |x_k y_k| as the terms. The
    bound is order-free, so it holds for the torch and Triton backends alike.
(2) Operands rounded before the dot (tf32, c * g rounded to bf16) multiply each term by at
    most (1 + u_in)^2; Hopper tensor cores may truncate instead of rounding, so on CUDA the
    accumulation unit roundoff is taken as 2^-23 instead of 2^-24.
(3) Underflow adds at most one smallest subnormal eta per product (gradual underflow makes
    additions exact), an absolute term n * eta per entry.
(4) Everything the bound itself needs (row norms nu_t = ||a_t||, ||g_t||, the quadratic forms
    below) is a sum of non-negative terms, whose relative error is at most gamma_n for the
    precision it is computed in; it is inflated by (1 + gamma) so it stays an upper bound.

Ghost (exact N = sum_ts K^A_ts K^G_ts with Grams K^A = A A^T, K^G = G G^T):
  |Khat^A_ts - K^A_ts| <= g_d nu^A_t nu^A_s (g_d = gamma_d with operand rounding), likewise
  for G with g_p, so
  |N - sum Khat^A Khat^G| <= g_d Q_A + g_p Q_G + g_d g_p S^2,
  Q_A = nu^A' |Khat^G| nu^A, Q_G = nu^G' |Khat^A| nu^G, S = sum_t ||a_t|| ||g_t||.
  The row norms nu are read off the Grams' diagonals (no extra pass over A and G) and absorb
  the underflow terms; the products Khat^A Khat^G are rounded once and summed in float64,
  adding (u_w + gamma64_{T^2}) (1 + g_p) Q_G. For honest data |K_ts| is small off the
  diagonal, so Q_A, Q_G ~ N and the relative slack is ~(d + p) u ~ 1e-5 to 3e-4; near
  cancellation (N << S^2) it is large and the sample is flagged. Extra cost: a few T x T
  elementwise passes next to the 2 T^2 (d + p) FLOPs of the Grams.
Direct (Ghat = fl(G^T A)): ||Ghat - G^T A||_F <= || g_T |G|^T |A| ||_F <= g_T S, and
  S <= ||A||_F ||G||_F (Cauchy-Schwarz, one read of each in memory order), so
  ||G^T A||_F <= ||Ghat||_F + g_T S (+ T eta sqrt(d p)). g_T S is ~T^1.5 u of the norm for
  honest tokens, so Ghat is formed from token blocks of b tokens accumulated into one float32
  tile (baddbmm: depth b + T/b), or past T ~ 600 into a float64 tile (``_direct_plan``).
What the clipped GEMM adds (rho): it multiplies c into G's rows in float32 and may round the
  operands again (tf32; bf16/fp16 in the Triton kernel), so it adds c G~^T A~ with
  ||G~^T A~ - G^T A||_F <= rho S; the rules clip with (sqrt(N_up) + rho S)^2
  (``clipped_weight_bound_sq``; bias: ``clipped_bias_bound_sq``, both in clipped_bound.py).
  The GEMM's own reduction (over a call of whole samples) adds rounding.accumulation_excess
  for a sample whose terms cancel; the strategies' (1 + 2^-10) sensitivity covers the rest.

Certified value N_up = computed + bound, always. Samples whose bound exceeds CERTIFY_RTOL of
the computed value are recomputed one level up: Triton -> torch float32 (tight Gram bound)
-> torch float32 direct, where it costs at most twice the ghost (correlated tokens make
sum |K^A K^G| / N ~ 10-100 in real transformers: ghost's float32 bound reaches ~1e-3 there,
direct's stays ~1e-4) -> torch float64, bound ~1e-13 relative (a float64 ghost that still
cancels also runs float64 direct, whose error grows with S, not S^2; the smaller bound wins).
The last level returns its N_up whatever its slack. So a certified value never falls below
the true squared norm, and an honest sample is over-estimated by at most ~2 CERTIFY_RTOL.

Triton path: the kernels return one float32 number per sample and keep no Grams, so the
dispatcher bounds their error from magnitudes alone, for any summation order: with n the
kernel's longest chain (d or p for a Gram entry, then T^2 products summed), ghost error
<= (g_d + g_p + gamma_{T^2+1}) S^2, direct <= gamma_{dp} N + g_T S. S^2 / N ~ T for honest
tokens, so this passes CERTIFY_RTOL only for short sequences; where it cannot pass for any
input the torch path is used directly (``_triton_certified``). An in-kernel magnitude
accumulator (Q_A, Q_G per tile from the row norms, and float64 partials) would give the
Triton kernels the tight bound in the same pass.
"""

from __future__ import annotations

import functools
import math

import torch

from fastdp.kernels.dispatch import use_triton
from fastdp.kernels.per_sample_norm import (
    _CHUNK_ELEMENTS,
    METHODS,
    _check,
    choose_method,
    direct_flops,
    ghost_flops,
)
from fastdp.kernels.rounding import (
    U32,
    U64,
    Arithmetic,
    _inflate,
    _tf32,
    diag_norm_bounds,
    frobenius_bounds,
    frobenius_rows_bounds,
    gamma,
    round_up_f32,
    row_norm_bounds,
    row_norms,
    torch_arithmetic,
)

CERTIFY_RTOL = 2.0**-9  # ~2e-3 of the squared norm (1e-3 of the norm): above it, recompute


def triton_arithmetic(activations: torch.Tensor, grad_outputs: torch.Tensor) -> Arithmetic:
    """The norm kernels: 16-bit inputs enter the dot unrounded (their own type or float32);
    float32 inputs may be rounded to tf32; accumulation in float32, truncating on CUDA."""
    device = activations.device
    fp32_in = torch.float32 in (activations.dtype, grad_outputs.dtype)
    return Arithmetic(2 * U32, 2.0**-11 if fp32_in and _tf32(device) else 0.0)


def _quad(kernel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B,) w' |K| w for K (B, T, T) and w (B, T), in K's precision (overwrites K with |K|)."""
    return kernel.abs_().mul_(weights.unsqueeze(1)).sum(2).mul_(weights).sum(1)


def _ghost_certified(a, g, arith: Arithmetic) -> tuple[torch.Tensor, ...]:
    """(N_hat, bound, S) float64 for one chunk: a, g float32 or float64 (the working type).

    Row norms come from the Grams' diagonals, at no extra read of A and G, and absorb the
    underflow terms (3): with nu_t = sqrt((Khat_tt + d eta) / (1 - g_d)) + c, c^2 = d eta / g_d,
    |Khat_ts - K_ts| <= g_d ||a_t|| ||a_s|| + d eta <= g_d nu_t nu_s for every t, s (and nu is
    inf, so the sample flagged, if g_d >= 1 or Khat overflows). The quadratic forms are sums
    of non-negative terms in the working precision (relative error gamma_{2T+8}, plus at most
    3 T^2 eta from underflow); the products Khat^A Khat^G are rounded once and summed in
    float64, which adds (u_w + gamma64_{T^2}) sum |Khat^A Khat^G| <= ... (1 + g_p) Q_G."""
    n_tokens, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    g_d, g_p = arith.dot_gamma(d_in), arith.dot_gamma(d_out)
    u_w = torch.finfo(a.dtype).eps / 2
    gram_a = torch.bmm(a, a.transpose(1, 2))
    gram_g = torch.bmm(g, g.transpose(1, 2))
    nu_a = diag_norm_bounds(gram_a, g_d, d_in * arith.eta, u_w)
    nu_g = diag_norm_bounds(gram_g, g_p, d_out * arith.eta, u_w)
    n_hat = (gram_a * gram_g).sum((1, 2), dtype=torch.float64)
    s = (nu_a * nu_g).sum(1, dtype=torch.float64)
    c_a = g_d
    c_g = g_p + (u_w + gamma(n_tokens * n_tokens, U64)) * (1.0 + g_p)
    quads = _quad(gram_g, nu_a).mul_(c_a).add_(_quad(gram_a, nu_g), alpha=c_g).double()
    factor = (1.0 + gamma(2 * n_tokens + 8, u_w)) * _inflate(n_tokens * n_tokens + d_in + d_out)
    tiny = 3 * n_tokens**2 * arith.eta * (c_a + c_g)
    bound = quads.add_(s.square(), alpha=g_d * g_p).mul_(factor).add_(tiny)
    return n_hat, bound, s * ((1.0 + 2 * u_w) * _inflate(n_tokens))  # products rounded once


@functools.lru_cache(maxsize=256)
def _direct_plan(n_tokens: int, u_acc: float) -> tuple[int, bool]:
    """(block, float64 accumulator) of the direct method. A length-n dot is off by up to
    gamma_n S, and S is ~sqrt(T) ||G^T A|| for independent tokens, so honest samples stay
    unflagged while 2 gamma_depth sqrt(T) <= CERTIFY_RTOL / 3. GEMMs over blocks of b tokens
    accumulated into one float32 tile (baddbmm) give depth b + T/b: the fewest blocks that
    pass (T <= ~100 needs none). Past T ~ 600 no b does, and the blocks are summed in float64
    (depth b, plus gamma64_{T/b})."""
    n_tokens = max(n_tokens, 1)
    limit = CERTIFY_RTOL / (6 * math.sqrt(n_tokens))
    for n_blocks in range(1, n_tokens + 1):
        block = -(-n_tokens // n_blocks)
        if gamma(block + n_blocks, u_acc) <= limit:
            return block, False
        if block * block < n_tokens:  # depth only grows from here
            break
    block = n_tokens
    while block > 16 and gamma(block + 1, u_acc) > limit:
        block = -(-block // 2)
    return block, True


def _direct_certified(
    a, g, s: torch.Tensor, arith: Arithmetic, block: int, wide: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_hat, bound) float64 for one chunk: G^T A by token blocks of GEMMs accumulated into
    one tile (error gamma_{block + n_blocks} |G|^T |A|), or, ``wide``, into a float64 one.
    ``s``: (B,) upper bounds on
    || |G|^T |A| ||_F, e.g. sum_t ||a_t|| ||g_t|| or ||A||_F ||G||_F (Cauchy-Schwarz)."""
    batch, n_tokens, d_in = a.shape
    d_out = g.shape[2]
    n_blocks = -(-n_tokens // block)
    grads = torch.bmm(g[:, :block].transpose(1, 2), a[:, :block])
    if wide:
        grads = grads.double()
    for start in range(block, n_tokens, block):  # strided slices, no copies
        stop = start + block
        part_g, part_a = g[:, start:stop].transpose(1, 2), a[:, start:stop]
        if wide:
            grads += torch.bmm(part_g, part_a)
        else:
            grads.baddbmm_(part_g, part_a)
    root = frobenius_rows_bounds(grads)
    if wide:  # block GEMMs (depth block), then a float64 sum of n_blocks terms
        rel = arith.dot_gamma(block) + gamma(n_blocks + 1, U64) * (1 + arith.dot_gamma(block))
    else:  # each entry: at most block + n_blocks roundings
        rel = arith.dot_gamma(block + n_blocks)
    err = rel * s + n_tokens * arith.eta * math.sqrt(d_in * d_out)
    n_all = n_tokens + d_in * d_out + d_in + d_out
    n_hat = root.square()
    return n_hat, ((root * _inflate(n_all) + err * _inflate(n_all)).square() - n_hat)


def _torch_certified(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    method: str,
    s: torch.Tensor | None = None,
    work: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified, S), (B,) float64: a certified bound on ||G_i^T A_i||_F^2 (exact) by the
    torch path in ``work`` precision (float64 if an input is), and S >= || |G|^T |A| ||_F
    (ghost: sum_t ||a_t|| ||g_t|| from the Grams; direct: ``s`` as given, None: ||A|| ||G||).
    Samples whose bound exceeds CERTIFY_RTOL of the value are redone in float64; in float64,
    ghost samples that still are (N << S^2) take the smaller of ghost and direct."""
    if torch.float64 in (activations.dtype, grad_outputs.dtype):
        work = torch.float64
    a, g = activations.to(work), grad_outputs.to(work)
    arith = torch_arithmetic(work, a.device)
    batch, n_tokens, d_in = a.shape
    if method == "direct":
        if work == torch.float64:  # few samples: per-token float64 norms, finite and tighter
            nu = row_norms(a) * row_norms(g) * _inflate(max(d_in, g.shape[2]) + 4)
            s64 = nu.sum(1) * _inflate(n_tokens)
            s = s64 if s is None else torch.minimum(s, s64)
        elif s is None:
            s = frobenius_bounds(a) * frobenius_bounds(g) * _inflate(2)
    block, wide = (n_tokens, False)
    if work != torch.float64:
        block, wide = _direct_plan(n_tokens, arith.u_acc)
    per_sample = n_tokens * n_tokens if method == "ghost" else 3 * d_in * g.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // per_sample)
    parts = []
    for i in range(0, batch, chunk):
        if method == "ghost":
            parts.append(_ghost_certified(a[i : i + chunk], g[i : i + chunk], arith))
        else:
            part = _direct_certified(
                a[i : i + chunk], g[i : i + chunk], s[i : i + chunk], arith, block, wide
            )
            parts.append((*part, s[i : i + chunk]))
    if len(parts) == 1:
        n_hat, bound, s = parts[0]
    else:
        n_hat, bound, s = (torch.cat([p[k] for p in parts]) for k in range(3))
    certified = _certified(n_hat, bound)
    passed = bound <= n_hat * CERTIFY_RTOL  # False for NaN: those are flagged too
    if not bool(passed.all()):
        index = (~passed).nonzero().squeeze(1)
        sub_a, sub_g = activations[index], grad_outputs[index]
        if work != torch.float64:
            # ghost's bound grows with sum |K^A K^G| / N, which correlated tokens make ~10-100
            # even without an attack; direct's with S / sqrt(N): redo those in float32 direct
            # where it costs at most twice the ghost (it refines to float64 itself)
            d_out = grad_outputs.shape[2]
            shape = (1, n_tokens, d_in, d_out)
            cheap = direct_flops(*shape) <= 2 * ghost_flops(*shape)
            redo = ("direct", work) if method == "ghost" and cheap else (method, torch.float64)
            certified[index] = _torch_certified(sub_a, sub_g, redo[0], s[index], redo[1])[0]
        elif method == "ghost":
            # float64 Grams cancel too when N << S^2 (ghost error ~ u S^2, direct ~ u T S):
            # both are upper bounds, keep the smaller
            direct = _torch_certified(sub_a, sub_g, "direct", s[index], torch.float64)[0]
            certified[index] = torch.minimum(certified[index], direct)
        certified = certified.nan_to_num(math.inf)
    return certified, s


def _certified(n_hat: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    return n_hat.clamp(min=0).add_(bound).mul_(_inflate(2))


def _refine(n_hat: torch.Tensor, bound: torch.Tensor, redo) -> torch.Tensor:
    """n_hat + bound, with the samples whose bound is above CERTIFY_RTOL of n_hat (or not
    finite) replaced by ``redo(their indices)``, the next, more precise level."""
    certified = _certified(n_hat, bound)
    passed = bound <= n_hat * CERTIFY_RTOL
    if not bool(passed.all()):
        index = (~passed).nonzero().squeeze(1)
        certified[index] = redo(index)
    return certified


def _triton_certified(activations, grad_outputs, method, mags, s) -> torch.Tensor | None:
    """The Triton kernels' value plus an order-free bound from magnitudes only (the kernels
    keep no Grams); flagged samples are redone by the torch path (tight Gram bound, then
    float64). None when that bound cannot meet CERTIFY_RTOL for any input: the torch path is
    used instead of a kernel whose every result would be redone."""
    batch, n_tokens, d_in = activations.shape
    d_out = grad_outputs.shape[2]
    arith = triton_arithmetic(activations, grad_outputs)
    # the kernels' last stage: n_terms products, each rounded once, summed in any order
    n_terms = n_tokens * n_tokens if method == "ghost" else d_in * d_out
    final = gamma(n_terms + 1, arith.u_acc)
    g_d, g_p = arith.dot_gamma(d_in), arith.dot_gamma(d_out)
    if method == "ghost":  # |N_hat - N| <= slack S^2, S^2 >= N
        slack = g_d * (1 + g_p) + g_p * (1 + g_d) + g_d * g_p + final * (1 + g_d) * (1 + g_p)
    else:  # relative slack >= final + 2 gamma_T S / sqrt(N), S >= sqrt(N)
        slack = final + 2 * arith.dot_gamma(n_tokens)
    if not slack <= CERTIFY_RTOL / 2:
        return None
    from fastdp.kernels import per_sample_norm_triton

    n_hat = per_sample_norm_triton.per_sample_norm_sq(activations, grad_outputs, method).double()
    if method == "ghost":
        total = mags[0].sum(1) + mags[1].sum(1)  # underflow (3), generously
        bound = slack * s.square() + 2 * (d_in + d_out) * arith.eta * total.square()
    else:
        root = (n_hat.clamp(min=0) / (1 - final)).sqrt()
        err = arith.dot_gamma(n_tokens) * s + n_tokens * arith.eta * math.sqrt(d_in * d_out)
        bound = (root + err).square() - n_hat
    bound = bound * _inflate(n_tokens * n_tokens + n_tokens + d_in + d_out)

    def redo(index: torch.Tensor) -> torch.Tensor:
        return _torch_certified(activations[index], grad_outputs[index], method, s[index])[0]

    return _refine(n_hat, bound, redo)


def _magnitudes(activations, grad_outputs, method) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(mags, S): ghost needs the row norms (nu_a, nu_g), S = sum_t nu_a nu_g; direct only
    needs S >= || |G|^T |A| ||_F and takes ||A||_F ||G||_F (Cauchy-Schwarz), cheaper to read.
    Float32 bounds; where they overflow, float64 (then S is finite for every finite input)."""
    n_tokens, d_in, d_out = activations.shape[1], activations.shape[2], grad_outputs.shape[2]
    if method == "ghost":
        nu_a, nu_g = row_norm_bounds(activations), row_norm_bounds(grad_outputs)
        s = (nu_a * nu_g).sum(1) * _inflate(n_tokens)
    else:
        s = frobenius_bounds(activations) * frobenius_bounds(grad_outputs) * _inflate(2)
    overflow = ~torch.isfinite(s)
    if bool(overflow.any()):  # squares past float32's range: float64 norms there
        index = overflow.nonzero().squeeze(1)
        a64, g64 = row_norms(activations[index]), row_norms(grad_outputs[index])
        if method == "ghost":
            nu_a[index], nu_g[index] = a64 * _inflate(d_in), g64 * _inflate(d_out)
            s = (nu_a * nu_g).sum(1) * _inflate(n_tokens)
        else:
            s[index] = (a64 * g64).sum(1) * _inflate(n_tokens + d_in + d_out)
    return ((nu_a, nu_g) if method == "ghost" else (s,)), s


def certified_weight_norm_sq(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    method: str | None = None,
    triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified ||G_i^T A_i||_F^2, S_i >= sum_t ||a_t|| ||g_t||), both (B,) float64;
    ``triton``: the backend decision if the caller has it (None: ask dispatch)."""
    _check(activations, grad_outputs)
    batch, n_tokens, d_in = activations.shape
    d_out = grad_outputs.shape[2]
    if n_tokens <= 1 or batch == 0:  # T = 1: N = ||a||^2 ||g||^2 from float64 norms, exact-ish
        s = (row_norms(activations) * row_norms(grad_outputs)).sum(1) * _inflate(d_in + d_out)
        return s.square() * _inflate(2), s
    if method is None:
        method = choose_method(batch, n_tokens, d_in, d_out)
    if method not in METHODS:
        raise ValueError(f"unknown per-sample norm method {method!r}; use one of {METHODS}")
    if use_triton(activations, grad_outputs) if triton is None else triton:
        mags, s = _magnitudes(activations, grad_outputs, method)
        norms = _triton_certified(activations, grad_outputs, method, mags, s)
        if norms is not None:
            return norms, s
    return _torch_certified(activations, grad_outputs, method)


def certified_norm_sq(
    activations: torch.Tensor, grad_outputs: torch.Tensor, method: str | None = None
) -> torch.Tensor:
    """Certified ||G_i^T A_i||_F^2 for every sample i, as float32 of shape (B,) rounded up,
    never below the exact value for the inputs given (the argument is above); ``method`` None
    picks the cheaper of ghost and direct by FLOPs for these shapes."""
    return round_up_f32(certified_weight_norm_sq(activations, grad_outputs, method)[0])
