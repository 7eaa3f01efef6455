"""Pure numerical core: the basis split of a weight, and the kept bases and their scaling.

A layer's weight is viewed per group as a matrix ``W_g`` of shape ``(out_g, fan_in)``:
for a Conv that is ``(C_out/g, C_in/g * prod(kernel))``, for a fully connected layer
``(N_out, K)`` with ``y = x @ W.T``. Its SVD ``W_g = U_g diag(S_g) V_g^T`` is computed in
float64 and gives

* the *basis* filters: the rows of ``V_g^T`` (orthonormal), and
* the *scaling* matrix: ``U_g diag(S_g)`` (each basis feature scaled by its singular value,
  times the basis scaling factor, which starts at 1), mapping back to the original outputs.

Signs are made deterministic: the entry of largest magnitude in each basis filter is positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupedSVD:
    """SVD of a (possibly grouped) weight, one factorisation per group, all in float64.

    Shapes: ``u`` (groups, out_g, r), ``s`` (groups, r), ``vt`` (groups, r, fan_in),
    with ``r = min(out_g, fan_in)`` the full rank bound.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    @property
    def groups(self) -> int:
        return self.s.shape[0]

    @property
    def rank(self) -> int:
        return self.s.shape[1]


def grouped_svd(weight_matrices: np.ndarray) -> GroupedSVD:
    """SVD of a stack of per-group matrices ``(groups, out_g, fan_in)`` in float64."""
    w = np.asarray(weight_matrices, dtype=np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    # Deterministic signs: the largest-magnitude entry of every basis filter is positive.
    pivot = np.take_along_axis(vt, np.abs(vt).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    signs = np.where(pivot < 0, -1.0, 1.0)
    return GroupedSVD(u=u * signs[:, None, :], s=s, vt=vt * signs[:, :, None])


def conv_weight_matrices(weight: np.ndarray, groups: int) -> np.ndarray:
    """Conv weight ``(C_out, C_in/g, *k)`` -> per-group matrices ``(g, C_out/g, C_in/g * prod(k))``."""
    c_out = weight.shape[0]
    return weight.reshape(groups, c_out // groups, -1)


def kept_rows(svd: GroupedSVD, keep: np.ndarray) -> np.ndarray:
    """The kept basis filters: rows of ``V^T`` per group, ``(groups, r, fan_in)``.

    ``keep`` is an integer index array ``(groups, r)`` of the bases kept in each group.
    """
    return np.take_along_axis(svd.vt, keep[:, :, None], axis=1)


def scaling_matrix(svd: GroupedSVD, keep: np.ndarray) -> np.ndarray:
    """Kept columns of ``U diag(S)`` per group, ``(groups, out_g, r)``."""
    us = svd.u * svd.s[:, None, :]
    return np.take_along_axis(us, keep[:, None, :], axis=2)


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest rank whose squared singular values cover ``energy`` of the total, over all groups.

    ``s`` is ``(groups, r)``; the same rank is used in every group (a grouped Conv needs it),
    so the answer is the largest of the per-group ranks.
    """
    sq = np.asarray(s, dtype=np.float64) ** 2
    total = sq.sum(axis=1, keepdims=True)
    zero = total[:, 0] == 0
    total[zero] = 1.0
    covered = np.cumsum(sq, axis=1) / total
    covered[zero] = 1.0  # an all-zero group is covered by a single basis
    ranks = (covered < energy - 1e-12).sum(axis=1) + 1
    return int(min(ranks.max(), s.shape[1]))


def top_keep(groups: int, rank: int) -> np.ndarray:
    """Index array keeping the ``rank`` leading bases of every group."""
    return np.tile(np.arange(rank), (groups, 1))


@dataclass(frozen=True)
class BasisStats:
    """Moments of the basis outputs on calibration data, per group: ``second`` E[b b^T]
    (groups, r, r) and ``mean`` E[b] (groups, r), over samples and output positions."""

    second: np.ndarray
    mean: np.ndarray


def least_squares_scaling(
    svd: GroupedSVD, keep: np.ndarray, stats: BasisStats, with_bias: bool, ridge: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Scaling weights for the kept bases that best reproduce the full layer on calibration data.

    Minimises E|U S b - (W_K b_K + d)|^2 over W_K (and the bias change d when ``with_bias``)
    in closed form from the basis-output moments, in float64. Dropped bases are thereby
    replaced by their best linear estimate from the kept ones (at least by their mean).
    Returns (scaling (groups, out_g, r), bias change (groups, out_g)).
    """
    us = svd.u * svd.s[:, None, :]  # (g, out_g, R)
    fits = [refit_columns(us[g], keep[g], stats.second[g], stats.mean[g], with_bias, ridge) for g in range(svd.groups)]
    return np.stack([w for w, _ in fits]), np.stack([d for _, d in fits])


def refit_columns(
    weight: np.ndarray, keep: np.ndarray, second: np.ndarray, mean: np.ndarray, with_bias: bool, ridge: float = 1e-6,
    cross: np.ndarray | None = None, mean_o: np.ndarray | None = None,
    branch_cross: np.ndarray | None = None, branch_mean: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The linear map on the kept inputs that best reproduces ``weight @ x_o`` on calibration data.

    ``weight`` is (out, D), ``keep`` the indices of the D inputs that remain, ``second``
    E[x x^T] (D, D) and ``mean`` E[x] (D,) of the input ``x`` the layer will read. The target is
    the output on the input ``x_o`` paired with it: ``cross`` E[x_o x^T] (D, D) and ``mean_o``
    E[x_o] (default: the same input, ``x_o = x``). ``branch_cross`` E[e x^T] (out, D) and
    ``branch_mean`` E[e] (out,) add the error ``e`` of a branch the output is added to (see
    ``reconstruct``) to the target. Minimises E|W x_o + e - (W_K' x_K + d)|^2 over
    W_K' (out, len(keep)) and, when ``with_bias``, the constant d (out,), in float64 with a
    small ridge (relative to the mean diagonal) for rank-deficient inputs. Returns (W_K', d);
    d is 0 without bias.
    """
    k = np.asarray(keep)
    weight = np.asarray(weight, dtype=np.float64)
    cross = (second if cross is None else cross)[:, k]  # E[x_o x_K^T]  (D, r)
    mean_o = mean if mean_o is None else mean_o
    gram = second[np.ix_(k, k)]  # E[x_K x_K^T]
    if with_bias:
        cross = np.concatenate([cross, mean_o[:, None]], axis=1)
        gram = np.block([[gram, mean[k][:, None]], [mean[k][None, :], np.ones((1, 1))]])
    gram = gram + ridge * (np.trace(gram) / len(gram)) * np.eye(len(gram))
    target = weight @ cross  # E[y_o x_K^T] (out, r[+1])
    if branch_cross is not None:
        target = target + (np.concatenate([branch_cross[:, k], branch_mean[:, None]], axis=1) if with_bias
                           else branch_cross[:, k])
    solution = np.linalg.solve(gram, target.T).T  # (out, r[+1])
    return solution[:, : len(k)], solution[:, len(k)] if with_bias else np.zeros(len(weight))
