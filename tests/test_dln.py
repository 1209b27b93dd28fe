"""Diagonal linear networks: closed forms against numerics, GD against the Woodworth et al.
characterisation, and determinism of the vectorised simulations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fastdp.theory import dln, dln_sim

RNG = np.random.default_rng(1234)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, RNG.uniform(0.05, 2.0, size=7)])
def test_mirror_map_and_its_inverse_round_trip(alpha):
    beta = np.array([-50.0, -1.0, -1e-3, 0.0, 2e-4, 0.7, 30.0])
    u = dln.mirror_map(beta, alpha)
    np.testing.assert_allclose(dln.inverse_mirror_map(u, alpha), beta, rtol=1e-12, atol=1e-15)
    u2 = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(dln.mirror_map(dln.inverse_mirror_map(u2, alpha), alpha), u2)


@pytest.mark.parametrize("alpha", [0.05, 0.3, RNG.uniform(0.05, 2.0, size=6)])
def test_potential_gradient_is_the_mirror_map(alpha):
    """Central finite differences of phi_alpha against the closed-form gradient."""
    beta = np.array([-2.0, -0.3, 0.0, 1e-3, 0.5, 4.0])
    h = 1e-6
    fd = np.array(
        [
            (dln.potential(beta + h * e, alpha) - dln.potential(beta - h * e, alpha)) / (2 * h)
            for e in np.eye(beta.size)
        ]
    )
    np.testing.assert_allclose(fd, dln.mirror_map(beta, alpha), rtol=1e-6, atol=1e-8)


def test_potential_is_strictly_convex_and_minimal_at_zero():
    alpha = 0.2
    grid = np.linspace(-1, 1, 201)
    values = np.array([dln.potential(np.array([b]), alpha) for b in grid])
    assert np.all(np.diff(values, 2) > 0)
    assert np.argmin(values) == 100


def test_dln_gradient_matches_autograd():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((7, 11)), rng.standard_normal(7)
    wp, wm = rng.uniform(0.1, 1.0, 11), rng.uniform(0.1, 1.0, 11)
    tp = torch.tensor(wp, dtype=torch.float64, requires_grad=True)
    tm = torch.tensor(wm, dtype=torch.float64, requires_grad=True)
    beta = tp**2 - tm**2
    loss = torch.sum((torch.tensor(X) @ beta - torch.tensor(y)) ** 2) / (4 * 7)
    loss.backward()
    gp, gm = dln.grad_w(wp, wm, X, y)
    np.testing.assert_allclose(gp, tp.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(gm, tm.grad.numpy(), rtol=1e-12)
    assert dln.loss(wp**2 - wm**2, X, y) == pytest.approx(loss.item(), rel=1e-14)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 2.0])
def test_mirror_solver_satisfies_kkt_and_beats_feasible_points(alpha):
    """KKT (feasible, grad phi in range(X^T)) certifies the optimum of this convex problem; random
    feasible perturbations along null(X) must not lower phi."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 15))
    y = X @ np.where(rng.random(15) < 0.2, rng.standard_normal(15), 0.0)
    sol = dln.solve_mirror_problem(X, y, alpha)
    np.testing.assert_allclose(X @ sol.beta, y, atol=1e-10)
    u = dln.mirror_map(sol.beta, alpha)
    coef = np.linalg.lstsq(X.T, u, rcond=None)[0]
    np.testing.assert_allclose(X.T @ coef, u, atol=1e-9)
    null = np.linalg.svd(X)[2][6:]
    best = dln.potential(sol.beta, alpha)
    for _ in range(20):
        step = 1e-3 * rng.standard_normal(9) @ null
        assert dln.potential(sol.beta + step, alpha) >= best - 1e-12


def test_mirror_solver_with_shift_solves_the_tilted_problem():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((5, 12))
    y = rng.standard_normal(5)
    shift = 0.1 * rng.standard_normal(12)
    sol = dln.solve_mirror_problem(X, y, 0.3, shift=shift)
    resid = dln.mirror_map(sol.beta, 0.3) - shift
    np.testing.assert_allclose(X.T @ np.linalg.lstsq(X.T, resid, rcond=None)[0], resid, atol=1e-9)
    plain = dln.solve_mirror_problem(X, y, 0.3)
    assert np.max(np.abs(sol.beta - plain.beta)) > 1e-3


def test_small_alpha_limit_is_sparser_than_large_alpha_limit():
    """phi_alpha interpolates l1 (alpha -> 0) and l2 (alpha -> inf): compare the l1 norms."""
    problems = dln_sim.make_sparse_problems([3], n=20, d=50, sparsity=3)
    X, y = problems.X[0], problems.y[0]
    l1 = [np.abs(dln.solve_mirror_problem(X, y, a).beta).sum() for a in (1e-4, 0.1, 10.0)]
    assert l1[0] < l1[1] < l1[2]
    l2 = dln.min_l2_interpolator(X, y)
    large = dln.solve_mirror_problem(X, y, 100.0).beta
    np.testing.assert_allclose(large, l2, atol=1e-4)


def _small_problem(step_scale: float) -> dln_sim.SparseProblems:
    problems = dln_sim.make_sparse_problems([0], n=6, d=15, sparsity=2)
    return dataclasses.replace(problems, gamma=problems.gamma * step_scale)


def test_gd_converges_to_argmin_phi_alpha():
    """Woodworth et al.: GD from w = alpha interpolates and lands on argmin_{X b = y} phi_alpha.

    Discrete GD shifts the scale by O(gamma^2) per step and breaks the KKT condition at
    O(gamma^3): with the measured scale sqrt(w+ w-) the error is ~4e-5, with the nominal alpha
    it is O(gamma) and halves when gamma halves. The alternatives (min-l2 interpolator,
    alpha/3) are 50-100x farther away.
    """
    alpha = 0.3
    errors = []
    for scale, steps in ((0.1, 6000), (0.05, 12000)):
        problems = _small_problem(scale)
        X, y = problems.X[0], problems.y[0]
        run = dln_sim.simulate(problems, "gd", alpha, steps, log_every=steps)
        beta = run.beta[0, 0]
        assert run.loss[0, 0, -1] < 1e-20
        target = dln.solve_mirror_problem(X, y, alpha).beta
        errors.append(np.max(np.abs(beta - target)))
        a_eff = np.sqrt(np.abs(run.w_plus[0, 0] * run.w_minus[0, 0]))
        assert np.max(np.abs(beta - dln.solve_mirror_problem(X, y, a_eff).beta)) < 2e-4
    assert errors[0] < 3e-3
    assert 1.6 < errors[0] / errors[1] < 2.4  # first order in gamma
    assert np.max(np.abs(beta - dln.min_l2_interpolator(X, y))) > 50 * errors[1]
    assert np.max(np.abs(beta - dln.solve_mirror_problem(X, y, alpha / 3).beta)) > 50 * errors[1]


def test_alpha_inf_formulas():
    X = np.array([[1.0, 2.0], [3.0, 0.0]])
    diag = np.array([5.0, 2.0])  # diag(X^T X) / n
    np.testing.assert_allclose(dln.alpha_inf_sgd(0.1, X, 0.2, 3.0), 0.1 * np.exp(-1.2 * diag))
    np.testing.assert_allclose(
        dln.alpha_inf_sgd(0.1, X, 0.2, 3.0, batch=4), 0.1 * np.exp(-0.3 * diag)
    )
    np.testing.assert_allclose(
        dln.alpha_inf_noisy_sgd(0.1, X, 0.2, 0.5, 3.0),
        0.1 * np.exp(-1.2 * diag) * np.exp(-1.2 * 0.25),
    )


def test_simulation_is_deterministic_and_seeds_do_not_interact():
    both = dln_sim.make_sparse_problems([4, 9], n=10, d=20, sparsity=2)
    alone = dln_sim.make_sparse_problems([9], n=10, d=20, sparsity=2)
    kw = dict(alpha=0.1, steps=700, sigmas=(0.0, 0.3), log_every=100)
    a = dln_sim.simulate(both, "noisy_sgd", **kw)
    b = dln_sim.simulate(both, "noisy_sgd", **kw)
    c = dln_sim.simulate(alone, "noisy_sgd", **kw)
    np.testing.assert_array_equal(a.w_plus, b.w_plus)
    np.testing.assert_array_equal(a.distance, b.distance)
    np.testing.assert_allclose(a.w_plus[1], c.w_plus[0], rtol=1e-12)
    single_sigma = dln_sim.simulate(alone, "noisy_sgd", **{**kw, "sigmas": (0.3,)})
    np.testing.assert_allclose(single_sigma.w_plus[0, 0], c.w_plus[0, 1], rtol=1e-12)
    assert not np.allclose(a.w_plus[0], a.w_plus[1])


def test_sgd_and_minibatch_integrals_and_divergence_flag():
    problems = dln_sim.make_sparse_problems([0, 1], n=10, d=20, sparsity=2)
    run = dln_sim.simulate(problems, "sgd", 0.1, 300, batch=3, log_every=50)
    assert run.batch == 3 and np.all(run.integral_loss > 0) and not run.diverged.any()
    hot = dataclasses.replace(problems, gamma=problems.gamma * 50)
    blown = dln_sim.simulate(hot, "gd", 0.1, 300, log_every=50)
    assert blown.diverged.all() and np.all(blown.diverged_at >= 0)
