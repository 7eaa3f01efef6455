"""The pure numerical core (onnx_basisprune/basis/svd.py) against numpy alone."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_basisprune.basis import svd as svdlib


def _weights(groups: int, out_g: int, fan_in: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((groups, out_g, fan_in))


def _recompose(dec: svdlib.GroupedSVD, keep: np.ndarray) -> np.ndarray:
    """The truncated weight ``U_K S_K V_K^T`` per group, as a recomposed layer computes it."""
    return svdlib.scaling_matrix(dec, keep) @ svdlib.kept_rows(dec, keep)


@pytest.mark.parametrize("shape", [(1, 6, 10), (1, 10, 6), (3, 4, 4), (2, 7, 27), (4, 1, 9), (1, 5, 1)])
def test_grouped_svd_reconstructs_in_float64(shape):
    w = _weights(*shape)
    dec = svdlib.grouped_svd(w)
    r = min(shape[1:])
    assert dec.u.shape == (shape[0], shape[1], r)
    assert dec.s.shape == (shape[0], r)
    assert dec.vt.shape == (shape[0], r, shape[2])
    assert dec.groups == shape[0] and dec.rank == r
    assert dec.u.dtype == dec.s.dtype == dec.vt.dtype == np.float64
    back = np.einsum("gor,gr,grk->gok", dec.u, dec.s, dec.vt)
    assert np.abs(back - w).max() <= 1e-12 * max(1.0, np.abs(w).max())
    # recompose with every basis kept is the same reconstruction
    full = _recompose(dec, svdlib.top_keep(dec.groups, r))
    np.testing.assert_allclose(full, w, rtol=0, atol=1e-12)


def test_grouped_svd_accepts_float32_and_computes_in_float64():
    w = _weights(2, 5, 8).astype(np.float32)
    dec = svdlib.grouped_svd(w)
    assert dec.vt.dtype == np.float64
    back = _recompose(dec, svdlib.top_keep(2, 5))
    np.testing.assert_allclose(back, w.astype(np.float64), rtol=0, atol=1e-12)


def test_basis_rows_are_orthonormal_and_singular_values_sorted():
    w = _weights(3, 6, 20, seed=1)
    dec = svdlib.grouped_svd(w)
    for g in range(3):
        np.testing.assert_allclose(dec.vt[g] @ dec.vt[g].T, np.eye(6), atol=1e-12)
        np.testing.assert_allclose(dec.u[g].T @ dec.u[g], np.eye(6), atol=1e-12)
        assert np.all(np.diff(dec.s[g]) <= 0) and np.all(dec.s[g] >= 0)
        np.testing.assert_allclose(dec.s[g], np.linalg.svd(w[g], compute_uv=False), rtol=1e-12)


def test_signs_are_deterministic():
    w = _weights(2, 5, 12, seed=2)
    dec = svdlib.grouped_svd(w)
    pivot = np.take_along_axis(dec.vt, np.abs(dec.vt).argmax(axis=2)[:, :, None], axis=2)
    assert np.all(pivot > 0), "the largest-magnitude entry of every basis row is positive"
    again = svdlib.grouped_svd(w.copy())
    np.testing.assert_array_equal(again.vt, dec.vt)
    np.testing.assert_array_equal(again.u, dec.u)
    np.testing.assert_array_equal(again.s, dec.s)
    # -W: same bases (the sign convention pins V^T), U flips its sign
    neg = svdlib.grouped_svd(-w)
    np.testing.assert_allclose(neg.vt, dec.vt, atol=1e-12)
    np.testing.assert_allclose(neg.s, dec.s, atol=1e-12)
    np.testing.assert_allclose(neg.u, -dec.u, atol=1e-12)


def test_signs_fixed_even_when_lapack_returns_negative_pivots():
    # A matrix whose plain numpy SVD has at least one basis row with a negative pivot.
    for seed in range(50):
        w = _weights(1, 4, 6, seed=seed)
        _, _, vt = np.linalg.svd(w[0], full_matrices=False)
        if (np.take_along_axis(vt, np.abs(vt).argmax(axis=1)[:, None], axis=1) < 0).any():
            break
    else:  # pragma: no cover
        pytest.skip("no negative pivot found")
    dec = svdlib.grouped_svd(w)
    assert np.all(np.take_along_axis(dec.vt, np.abs(dec.vt).argmax(axis=2)[:, :, None], axis=2) > 0)
    np.testing.assert_allclose(_recompose(dec, svdlib.top_keep(1, 4)), w, atol=1e-12)


def test_energy_rank():
    s = np.array([[3.0, 2.0, 1.0, 0.0]])  # squares 9, 4, 1, 0 of 14
    assert svdlib.energy_rank(s, 9 / 14) == 1
    assert svdlib.energy_rank(s, 9 / 14 + 1e-6) == 2
    assert svdlib.energy_rank(s, 0.5) == 1
    assert svdlib.energy_rank(s, 13 / 14) == 2
    assert svdlib.energy_rank(s, 0.99) == 3
    assert svdlib.energy_rank(s, 1.0) == 3  # the zero singular value adds nothing
    assert svdlib.energy_rank(s, 1e-9) == 1
    # groups: the largest per-group rank
    s2 = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert svdlib.energy_rank(s2, 0.9) == 3
    # an all-zero group needs one basis (never 0) and never more than the bound
    assert svdlib.energy_rank(np.zeros((2, 4)), 0.99) == 1
    assert svdlib.energy_rank(np.ones((1, 4)), 1.0) == 4


def test_energy_rank_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        s = np.sort(rng.random((2, 7)), axis=1)[:, ::-1]
        e = rng.uniform(0.3, 0.999)
        sq = s**2
        expected = max(int(np.argmax(np.cumsum(row) / row.sum() >= e)) + 1 for row in sq)
        assert svdlib.energy_rank(s, e) == expected


def test_top_keep():
    np.testing.assert_array_equal(svdlib.top_keep(2, 3), [[0, 1, 2], [0, 1, 2]])


def test_truncation_with_a_non_trivial_keep_set():
    groups, out_g, c_in_g, k = 2, 6, 3, (3, 2)
    weight = np.random.default_rng(4).standard_normal((groups * out_g, c_in_g, *k))
    mats = svdlib.conv_weight_matrices(weight, groups)
    assert mats.shape == (groups, out_g, c_in_g * 6)
    np.testing.assert_array_equal(mats[1, 2], weight[out_g + 2].ravel())
    dec = svdlib.grouped_svd(mats)
    keep = np.array([[0, 2, 5], [1, 3, 4]])

    basis = svdlib.kept_rows(dec, keep).reshape(-1, c_in_g, *k)
    assert basis.shape == (groups * 3, c_in_g, *k)
    for g in range(groups):
        for j, idx in enumerate(keep[g]):
            np.testing.assert_array_equal(basis[g * 3 + j].ravel(), dec.vt[g, idx])

    scaling = svdlib.scaling_matrix(dec, keep)
    assert scaling.shape == (groups, out_g, 3)
    for g in range(groups):
        np.testing.assert_allclose(scaling[g], dec.u[g][:, keep[g]] * dec.s[g][keep[g]], rtol=0, atol=0)

    truncated = _recompose(dec, keep)
    assert truncated.shape == mats.shape
    for g in range(groups):
        kept = keep[g]
        expected = (dec.u[g][:, kept] * dec.s[g][kept]) @ dec.vt[g][kept]
        np.testing.assert_allclose(truncated[g], expected, atol=1e-12)
        # the error of the truncation is exactly the dropped singular values
        dropped = np.setdiff1d(np.arange(out_g), kept)
        np.testing.assert_allclose(np.linalg.norm(mats[g] - truncated[g]), np.sqrt((dec.s[g][dropped] ** 2).sum()), rtol=1e-10)
    # the pair (basis conv, then 1x1 scaling) is the recomposed matrix
    pair = np.stack([scaling[g] @ basis[g * 3:(g + 1) * 3].reshape(3, -1) for g in range(groups)])
    np.testing.assert_allclose(pair, truncated, atol=1e-12)


def test_top_keep_truncation_is_the_best_low_rank_approximation():
    w = _weights(1, 8, 8, seed=5)
    dec = svdlib.grouped_svd(w)
    for r in range(1, 8):
        err = np.linalg.norm(w[0] - _recompose(dec, svdlib.top_keep(1, r))[0], 2)
        assert err == pytest.approx(dec.s[0, r], rel=1e-10)


def test_least_squares_scaling_with_all_bases_and_identity_moments_is_us():
    dec = svdlib.grouped_svd(_weights(2, 4, 6, seed=6))
    r = dec.rank
    stats = svdlib.BasisStats(second=np.tile(np.eye(r), (2, 1, 1)), mean=np.zeros((2, r)))
    scaling, delta = svdlib.least_squares_scaling(dec, svdlib.top_keep(2, r), stats, with_bias=True, ridge=0.0)
    np.testing.assert_allclose(scaling, svdlib.scaling_matrix(dec, svdlib.top_keep(2, r)), atol=1e-12)
    np.testing.assert_allclose(delta, 0, atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_columns_with_a_branch_error_is_least_squares_on_the_kept_inputs(with_bias):
    """The kept columns are refitted to ``W x_o + e`` (``e``: the error of the branch the output
    is added to), exactly what least squares on the pruned input's kept columns gives."""
    rng = np.random.default_rng(3)
    n, d, out = 4000, 8, 5
    xo = rng.normal(size=(n, d)) + 0.3
    xp = xo + 0.2 * rng.normal(size=(n, d))
    w = rng.normal(size=(out, d))
    e = xp @ rng.normal(size=(d, out)) * 0.3 + 0.1 * rng.normal(size=(n, out)) + 0.4
    keep = np.array([0, 2, 3, 5, 7])
    fitted, delta = svdlib.refit_columns(w, keep, xp.T @ xp / n, xp.mean(axis=0), with_bias, ridge=0.0,
                                         cross=xo.T @ xp / n, mean_o=xo.mean(axis=0),
                                         branch_cross=e.T @ xp / n, branch_mean=e.mean(axis=0))
    design = np.concatenate([xp[:, keep], np.ones((n, 1))], axis=1) if with_bias else xp[:, keep]
    solution, *_ = np.linalg.lstsq(design, xo @ w.T + e, rcond=None)
    np.testing.assert_allclose(fitted, solution[: len(keep)].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(delta, solution[-1] if with_bias else np.zeros(out), rtol=1e-6, atol=1e-8)
