"""Data-aware low-rank reconstruction of one layer: pure numerics in float64.

A layer computes ``y = W x + b`` per output position, ``x`` being one im2col row (Conv) or one
feature vector (Gemm/MatMul), per group. Once earlier layers are pruned, the layer sees ``x_p``
instead of the original ``x_o``; the target stays the *original* output ``W x_o + b``
(asymmetric reconstruction, Zhang et al. 2015, arXiv 1411.4229; He et al. 2017). With the
moments of the calibration data ``G = E[x_p x_p^T]``, ``C = E[x_o x_p^T]`` (centred when the
layer has a bias to take the means) and a positive weight ``d_c`` per output channel (the loss
sensitivity of that output; 1 for plain output error), the best rank-``r`` map minimises

    E | D^(1/2) (W x_o + b - A x_p - b') |^2      over rank(A) <= r and b'.

With ``G = L L^T`` and the unconstrained least-squares map ``A* = W C G^-1``, that error is the
residual of ``A*`` plus ``|D^(1/2) (A* - A) L|_F^2``, so the answer is a generalised SVD:
``D^(1/2) A* L = U S V^T``, keep ``r``, ``A_r = D^(-1/2) U_r S_r V_r^T L^-1``. As a basis/scaling
pair: basis filters ``S_r V_r^T L^-1`` (their outputs are uncorrelated, with variance ``s_i^2``),
scaling ``D^(-1/2) U_r``, bias ``b' = W E[x_o] + b - A_r E[x_p]``. Each dropped ``s_i^2`` is
exactly the (weighted) output error it adds, which makes it a score comparable across layers
when ``D`` measures what the loss feels.

A layer whose output goes straight into an ``Add`` with a branch that pruning also changed (the
last convolution of a residual block, with the shortcut as the branch) is fitted to make up that
branch's error too: the target becomes ``W x_o + b + e`` with ``e = s_o - s_p``, the original
branch minus the pruned one, so that the sum matches the original (He et al. 2017, arXiv
1707.06168, section 3.3). Only the moments ``E[e x_p^T]`` and ``E[e]`` enter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

_THREADS = ThreadpoolController()
RIDGE = 1e-6  # relative to the mean diagonal of G: dead inputs (zero padding, dead ReLUs) make G singular


@dataclass(frozen=True)
class InputMoments:
    """Moments of one layer's input on calibration data, per group, over samples and positions.

    ``gram`` E[x_p x_p^T] and ``cross`` E[x_o x_p^T] are (groups, d, d), ``mean_p`` / ``mean_o``
    (groups, d); ``x_p`` is the input in the model as pruned so far, ``x_o`` in the original.
    For the original model alone, ``x_p = x_o`` (see :meth:`symmetric`). ``branch_cross``
    E[e x_p^T] (groups, out_g, d) and ``branch_mean`` E[e] (groups, out_g): the error ``e`` of
    the branch the layer's output is added to (None: no such error)."""

    gram: np.ndarray
    cross: np.ndarray
    mean_p: np.ndarray
    mean_o: np.ndarray
    rows: int
    branch_cross: np.ndarray | None = None
    branch_mean: np.ndarray | None = None

    @classmethod
    def symmetric(cls, gram: np.ndarray, mean: np.ndarray, rows: int) -> InputMoments:
        return cls(gram, gram, mean, mean, rows)


@dataclass(frozen=True)
class Factors:
    """A layer as a basis/scaling pair: ``basis`` (groups, r, d) filters, ``scaling``
    (groups, out_g, r), ``bias`` (C_out,) or None (no bias input), and the full ``spectrum``
    (groups, R) of squared singular values: the weighted output error each basis carries."""

    basis: np.ndarray
    scaling: np.ndarray
    bias: np.ndarray | None
    spectrum: np.ndarray

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def weight(self) -> np.ndarray:
        """The recomposed map ``A_r`` per group, (groups, out_g, d)."""
        return self.scaling @ self.basis


def _centred(m: InputMoments, with_bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(G, C, E[e x_p^T]) centred on the means when the bias takes them, else the raw moments."""
    if not with_bias:
        return m.gram, m.cross, m.branch_cross
    gram = m.gram - m.mean_p[:, :, None] * m.mean_p[:, None, :]
    cross = m.cross - m.mean_o[:, :, None] * m.mean_p[:, None, :]
    branch = None if m.branch_cross is None else m.branch_cross - m.branch_mean[:, :, None] * m.mean_p[:, None, :]
    return gram, cross, branch


def _cholesky(gram: np.ndarray) -> np.ndarray:
    """Cholesky factor of ``gram`` plus a small ridge, raised tenfold until it factorises (the
    centred moments of nearly constant inputs can come out slightly indefinite)."""
    d = len(gram)
    sym = (gram + gram.T) / 2
    scale = float(np.trace(sym)) / d if d else 0.0
    jitter = RIDGE * (scale if scale > 0 else 1.0)
    for _ in range(12):
        try:
            return np.linalg.cholesky(sym + jitter * np.eye(d))
        except np.linalg.LinAlgError:
            jitter *= 10
    raise np.linalg.LinAlgError("input moments are not positive semi-definite")


@_THREADS.wrap(limits=1, user_api="blas")  # small factorisations: BLAS threads only contend with Torch's
def fit_layer(weight: np.ndarray, bias: np.ndarray | None, moments: InputMoments, rank: int,
              channel_weight: np.ndarray | None = None) -> Factors:
    """The best rank-``rank`` basis/scaling pair for a layer (see the module docstring).

    ``weight`` is (groups, out_g, d) with ``y = W x``; ``bias`` (C_out,) or None (then no bias is
    fitted and the moments are used uncentred); ``channel_weight`` (C_out,) positive, default 1.
    ``rank`` may not exceed ``min(out_g, d)``; at that rank with ``x_p = x_o`` the layer is
    reproduced exactly (up to the ridge)."""
    w = np.asarray(weight, dtype=np.float64)
    groups, out_g, d = w.shape
    full = min(out_g, d)
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} outside [1, {full}]")
    dw = np.ones(groups * out_g) if channel_weight is None else np.asarray(channel_weight, dtype=np.float64)
    root = np.sqrt(dw).reshape(groups, out_g)
    with_bias = bias is not None
    gram, cross, branch = _centred(moments, with_bias)
    bases, scalings, spectra = [], [], []
    for g in range(groups):
        lower = _cholesky(gram[g])
        # D^(1/2) (W C + E[e x_p^T]) L^-T, as (L^-1 (C^T W^T + E[x_p e^T]) D^(1/2))^T with a triangular solve.
        target = cross[g].T @ w[g].T if branch is None else cross[g].T @ w[g].T + branch[g].T
        m = scipy.linalg.solve_triangular(lower, target * root[g], lower=True).T
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        basis = scipy.linalg.solve_triangular(lower, (vt[:rank].T * s[:rank]), lower=True, trans="T").T  # S V^T L^-1
        bases.append(basis)
        scalings.append(u[:, :rank] / root[g][:, None])
        spectra.append(s**2)
    factors_basis, factors_scaling = np.stack(bases), np.stack(scalings)
    new_bias = None
    if with_bias:
        a = factors_scaling @ factors_basis
        target = np.einsum("god,gd->go", w, moments.mean_o) + (0 if moments.branch_mean is None else moments.branch_mean)
        target = target.reshape(-1) + np.asarray(bias, dtype=np.float64)
        new_bias = target - np.einsum("god,gd->go", a, moments.mean_p).reshape(-1)
    return Factors(factors_basis, factors_scaling, new_bias, np.stack(spectra))


def error_spectrum(weight: np.ndarray, moments: InputMoments, with_bias: bool,
                   channel_weight: np.ndarray | None = None) -> np.ndarray:
    """Squared singular values (groups, R), descending: the weighted output error each basis of
    the data-aware split carries; dropping the tail adds exactly its sum."""
    w = np.asarray(weight, dtype=np.float64)
    full = min(w.shape[1], w.shape[2])
    return fit_layer(w, np.zeros(w.shape[0] * w.shape[1]) if with_bias else None, moments, full, channel_weight).spectrum
