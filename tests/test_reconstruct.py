"""The data-aware rank-r fit (generalised SVD) against brute force and its exact cases."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_basisprune.basis.reconstruct import InputMoments, fit_layer


def _moments(xp: np.ndarray, xo: np.ndarray) -> InputMoments:
    """Moments of paired samples (groups, n, d)."""
    n = xp.shape[1]
    return InputMoments(
        gram=np.einsum("gni,gnj->gij", xp, xp) / n,
        cross=np.einsum("gni,gnj->gij", xo, xp) / n,
        mean_p=xp.mean(axis=1),
        mean_o=xo.mean(axis=1),
        rows=n,
    )


def _data(groups=2, out_g=6, d=9, n=4000, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    xo = rng.normal(size=(groups, n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d))) + rng.normal(size=(groups, 1, d))
    xp = xo + noise * rng.normal(size=xo.shape)  # the pruned model's inputs: perturbed
    w = rng.normal(size=(groups, out_g, d))
    b = rng.normal(size=groups * out_g)
    return w, b, xo, xp


def _error(w, b, xo, xp, factors, dw) -> float:
    groups, out_g, _ = w.shape
    target = np.einsum("god,gnd->gno", w, xo) + b.reshape(groups, 1, out_g)
    got = np.einsum("god,gnd->gno", factors.weight(), xp)
    if factors.bias is not None:
        got = got + factors.bias.reshape(groups, 1, out_g)
    return float((((target - got) ** 2) * dw.reshape(groups, 1, out_g)).mean(axis=1).sum())


def test_full_rank_reproduces_the_layer_exactly():
    w, b, xo, _ = _data()
    factors = fit_layer(w, b, _moments(xo, xo), rank=6)
    target = np.einsum("god,gnd->gno", w, xo) + b.reshape(2, 1, 6)
    error = _error(w, b, xo, xo, factors, np.ones(12)) / float((target**2).mean(axis=1).sum())
    assert error < 1e-9


def test_full_rank_is_the_least_squares_map_on_pruned_inputs():
    w, b, xo, xp = _data()
    factors = fit_layer(w, b, _moments(xp, xo), rank=6)
    for g in range(w.shape[0]):
        design = np.concatenate([xp[g], np.ones((len(xp[g]), 1))], axis=1)
        target = xo[g] @ w[g].T + b.reshape(w.shape[0], -1)[g]
        solution, *_ = np.linalg.lstsq(design, target, rcond=None)
        np.testing.assert_allclose(factors.weight()[g], solution[:-1].T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(factors.bias.reshape(w.shape[0], -1)[g], solution[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_rank_r_matches_reduced_rank_regression_and_beats_perturbations(rank):
    """Brute force: the weighted reduced-rank regression optimum (projection of the fitted
    outputs onto their top principal directions in the D metric), and no random perturbation of
    the factors does better."""
    w, b, xo, xp = _data(groups=1)
    dw = np.random.default_rng(1).uniform(0.2, 3.0, size=6)
    factors = fit_layer(w, b, _moments(xp, xo), rank, channel_weight=dw)
    # reduced-rank regression: A_r = D^-1/2 P_r D^1/2 A*, P_r onto the top eigenvectors of D^1/2 A* G A*^T D^1/2
    design = np.concatenate([xp[0], np.ones((len(xp[0]), 1))], axis=1)
    target = xo[0] @ w[0].T + b
    full, *_ = np.linalg.lstsq(design, target, rcond=None)
    a_star = full[:-1].T
    xc = xp[0] - xp[0].mean(axis=0)
    cov = xc.T @ xc / len(xc)
    root = np.sqrt(dw)
    m = (root[:, None] * a_star) @ cov @ (root[:, None] * a_star).T
    vals, vecs = np.linalg.eigh(m)
    top = vecs[:, np.argsort(vals)[::-1][:rank]]
    a_r = (top @ top.T @ (root[:, None] * a_star)) / root[:, None]
    np.testing.assert_allclose(factors.weight()[0], a_r, rtol=1e-4, atol=1e-5)
    best = _error(w, b, xo, xp, factors, dw)
    rng = np.random.default_rng(2)
    for _ in range(5):
        bumped = type(factors)(factors.basis + 1e-2 * rng.normal(size=factors.basis.shape),
                               factors.scaling + 1e-2 * rng.normal(size=factors.scaling.shape),
                               factors.bias, factors.spectrum)
        assert _error(w, b, xo, xp, bumped, dw) >= best


def test_dropped_spectrum_is_the_added_error():
    w, b, xo, _ = _data(groups=2)
    moments = _moments(xo, xo)
    full = fit_layer(w, b, moments, rank=6)
    for rank in (1, 3, 5):
        factors = fit_layer(w, b, moments, rank)
        added = _error(w, b, xo, xo, factors, np.ones(12)) - _error(w, b, xo, xo, full, np.ones(12))
        assert added == pytest.approx(factors.spectrum[:, rank:].sum(), rel=1e-5)


def test_basis_outputs_are_uncorrelated_with_variance_s_squared():
    w, b, xo, xp = _data(groups=1)
    factors = fit_layer(w, b, _moments(xp, xo), rank=4)
    out = xp[0] @ factors.basis[0].T
    cov = np.cov(out.T, bias=True)
    np.testing.assert_allclose(cov, np.diag(factors.spectrum[0, :4]), rtol=1e-4, atol=1e-6 * cov.max())


def test_without_bias_fits_raw_moments():
    w, _, xo, xp = _data(groups=1)
    factors = fit_layer(w, None, _moments(xp, xo), rank=6)
    assert factors.bias is None
    solution, *_ = np.linalg.lstsq(xp[0], xo[0] @ w[0].T, rcond=None)
    np.testing.assert_allclose(factors.weight()[0], solution.T, rtol=1e-4, atol=1e-5)


def test_branch_error_is_made_up_by_the_least_squares_fit():
    """A layer added to a branch that pruning changed is fitted to ``W x_o + b + e`` (``e``: the
    branch's original minus pruned value): at full rank that is plain least squares on ``x_p``."""
    w, b, xo, xp = _data(groups=1)
    rng = np.random.default_rng(2)
    e = xp[0] @ rng.normal(size=(9, 6)) * 0.2 + rng.normal(size=(xp.shape[1], 6)) * 0.1 + 0.5  # partly predictable
    m = _moments(xp, xo)
    with_branch = InputMoments(m.gram, m.cross, m.mean_p, m.mean_o, m.rows,
                               branch_cross=(e.T @ xp[0] / len(e))[None], branch_mean=e.mean(axis=0)[None])
    factors = fit_layer(w, b, with_branch, rank=6)
    design = np.concatenate([xp[0], np.ones((len(xp[0]), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, xo[0] @ w[0].T + b + e, rcond=None)
    np.testing.assert_allclose(factors.weight()[0], solution[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(factors.bias, solution[-1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(factors.weight(), fit_layer(w, b, m, rank=6).weight(), atol=1e-3)
