"""Genetic-interaction (GI) scores of double perturbations (Norman et al. 2019, as used in GEARS)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import CONTROL, DELIM, GI_KEY, PERT_KEY
from .._prediction import DELTA_LAYER, recorded_skipped
from .._utils import check_overwrite, get_adata, get_matrix, group_means, logger
from ..pp._perturbations import as_perturbation_sets, canonical_name, get_parsed, layer_of

#: the GI scores, in the order of the columns of :func:`gi_scores`
GI_SCORES = ("magnitude", "model_fit", "similarity", "equality_of_contribution", "dominance")

#: default subtype rules ``subtype -> (score, '>' or '<', threshold)``: GEARS Methods, Table 2.
#: The paper's table says epistasis is "equality of contribution > 0.28"; the authors' analysis
#: code uses "< 0.28" (one gene dominates, so the contributions are unequal), which is the default.
DEFAULT_GI_THRESHOLDS: dict[str, tuple[str, str, float]] = {
    "synergy": ("magnitude", ">", 1.15),
    "suppression": ("magnitude", "<", 1.0),
    "neomorphism": ("model_fit", "<", 0.88),
    "redundancy": ("similarity", ">", 0.85),
    "epistasis": ("equality_of_contribution", "<", 0.28),
}

#: columns of the score tables that a subtype may not be named after
_RESERVED = (
    *GI_SCORES,
    "gene_a",
    "gene_b",
    "c_a",
    "c_b",
    "dcor_a",
    "dcor_b",
    "n_unseen",
    "uncertainty_z",
    "uncertain",
)
_EPS = np.finfo(np.float64).eps
#: genes above which the 2-D distance correlation (similarity) uses projections by default
_EXACT_SIMILARITY_MAX_GENES = 500
#: minimum number of random gene blocks from which large subsamples are assembled
_N_BLOCKS = 100
#: largest subsets whose Gram sums are gathered gene by gene (larger ones: sums over gene blocks)
_MAX_GATHER = 32


# ----------------------------------------------------------------------------------------------
# thresholds
# ----------------------------------------------------------------------------------------------
def resolve_gi_thresholds(thresholds: Mapping | None = None) -> dict[str, tuple[str, str, float]]:
    """Subtype rules: the defaults updated by ``thresholds``.

    ``thresholds`` maps a subtype to a number (the threshold of its default rule) or to a
    ``(score, '>' | '<', value)`` tuple (a full rule; new subtypes are allowed).
    """
    rules = dict(DEFAULT_GI_THRESHOLDS)
    for name, rule in (thresholds or {}).items():
        if name in _RESERVED:
            raise ValueError(f"Subtype name {name!r} is a column of the score table; choose another name.")
        if isinstance(rule, (int, float, np.number)) and not isinstance(rule, bool):
            if name not in rules:
                raise ValueError(
                    f"Subtype {name!r} has no default rule; give a full rule (score, '>' or '<', value), "
                    f"e.g. {{{name!r}: ('magnitude', '>', 1.5)}}. Default subtypes: {list(DEFAULT_GI_THRESHOLDS)}."
                )
            rules[name] = (rules[name][0], rules[name][1], float(rule))
            continue
        try:
            score, op, value = rule
        except (TypeError, ValueError):
            raise ValueError(
                f"Threshold of {name!r} must be a number or a (score, '>' or '<', value) tuple, got {rule!r}."
            ) from None
        if op not in (">", "<"):
            raise ValueError(f"Threshold of {name!r}: the comparison must be '>' or '<', got {op!r}.")
        if score not in GI_SCORES:
            raise ValueError(
                f"Threshold of {name!r}: unknown score {score!r}; choose one of {list(GI_SCORES)}."
            )
        rules[name] = (str(score), op, float(value))
    return rules


def _apply_rule(values: np.ndarray, op: str, value: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return values > value if op == ">" else values < value


# ----------------------------------------------------------------------------------------------
# Theil-Sen regression without intercept on two regressors, for many doubles at once
# ----------------------------------------------------------------------------------------------
def _random_subsets(n: int, k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` uniformly random ``k``-subsets of ``range(n)`` (without replacement within a subset)."""
    if k * k > n:  # dense: the first k of a random permutation of each row
        return np.argpartition(rng.random((size, n)), k - 1, axis=1)[:, :k]
    idx = rng.integers(n, size=(size, k))  # sparse: redraw the few subsets (< 50%) with a repeated gene
    while True:
        srt = np.sort(idx, axis=1)
        bad = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if not bad.any():
            return idx
        idx[bad] = rng.integers(n, size=(int(bad.sum()), k))


def _draw_subsets(n: int, k: int, n_subsamples: int, rng: np.random.Generator) -> np.ndarray:
    """Gene subsets for Theil-Sen.

    Every ``k``-subset of the ``n`` genes if there are at most ``n_subsamples`` of them (as
    scikit-learn does), else ``n_subsamples`` random ones. Small subsets (``k <= 32``) are
    ``(S, k)`` gene indices. Larger ones are ``(S, n_blocks)`` boolean membership of the blocks of
    a random partition of the genes into ``n_blocks`` near-equal blocks (drawn next, see
    :func:`theil_sen_no_intercept`), with ``n_blocks = n`` (single genes) for an exhaustive set.
    """
    if math.comb(n, k) <= n_subsamples:
        combos = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)  # at most n_subsamples
        if k <= _MAX_GATHER:
            return combos
        member = np.zeros((len(combos), n), dtype=bool)
        np.put_along_axis(member, combos, True, axis=1)
        return member
    if k <= _MAX_GATHER:
        return _random_subsets(n, k, n_subsamples, rng)
    n_blocks = min(n, max(_N_BLOCKS, math.ceil(20 * n / k)))  # at least 20 blocks per subset
    m = min(n_blocks, max(1, round(k * n_blocks / n)))
    member = np.zeros((n_subsamples, n_blocks), dtype=bool)
    np.put_along_axis(member, _random_subsets(n_blocks, m, n_subsamples, rng), True, axis=1)
    return member


def _solve_2x2(saa, sab, sbb, say, sby) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares solutions from the normal equations; minimum-norm (as LAPACK gelss) if singular."""
    det = saa * sbb - sab * sab
    with np.errstate(invalid="ignore", divide="ignore"):
        ca = (sbb * say - sab * sby) / det
        cb = (saa * sby - sab * say) / det
    tr = saa + sbb
    singular = np.abs(det) <= 1e-10 * tr * tr
    if singular.any():  # rank 1: pinv(G) = G / tr(G)^2; rank 0: 0
        t = tr[singular]
        scale = np.divide(1.0, t * t, out=np.zeros_like(t), where=t > 0)
        ca[singular] = scale * (saa[singular] * say[singular] + sab[singular] * sby[singular])
        cb[singular] = scale * (sab[singular] * say[singular] + sbb[singular] * sby[singular])
    return ca, cb


def _subset_solutions(a, b, y, subsets, blocks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(c_a, c_b)`` of ``y ~ c_a a + c_b b`` on every subset, for every row: ``(P, S)`` each."""
    if subsets.shape[1] == 2 and subsets.dtype != bool:
        i, j = subsets[:, 0], subsets[:, 1]
        ai, aj, bi, bj, yi, yj = a[:, i], a[:, j], b[:, i], b[:, j], y[:, i], y[:, j]
        det = ai * bj - aj * bi
        with np.errstate(invalid="ignore", divide="ignore"):
            ca = (yi * bj - yj * bi) / det
            cb = (ai * yj - aj * yi) / det
        fro = ai * ai + aj * aj + bi * bi + bj * bj
        singular = np.abs(det) <= _EPS * fro
        if singular.any():  # rank <= 1: minimum-norm pinv(X) y = X^T y / ||X||_F^2 (what gelss returns)
            f = fro[singular]
            scale = np.divide(1.0, f, out=np.zeros_like(f), where=f > 0)
            ai, aj, bi, bj, yi, yj = (v[singular] for v in (ai, aj, bi, bj, yi, yj))
            ca[singular] = scale * (ai * yi + aj * yj)
            cb[singular] = scale * (bi * yi + bj * yj)
        return ca, cb
    if subsets.dtype != bool:  # small subsets: gather their genes, a block of subsets at a time
        k = subsets.shape[1]
        step = max(1, int(4e6 // (a.shape[0] * k)))
        gram = np.empty((5, a.shape[0], len(subsets)))
        for s in range(0, len(subsets), step):
            idx = subsets[s : s + step]
            ga, gb, gy = a[:, idx], b[:, idx], y[:, idx]  # (P, step, k)
            for q, (u, v) in enumerate(((ga, ga), (ga, gb), (gb, gb), (ga, gy), (gb, gy))):
                gram[q, :, s : s + step] = np.einsum("psk,psk->ps", u, v)
        return _solve_2x2(*gram)
    # Gram entries of every subset: per-block sums, then the block membership of each subset
    n_blocks = subsets.shape[1]
    onehot = np.zeros((len(blocks), n_blocks))
    onehot[np.arange(len(blocks)), blocks] = 1.0
    prods = np.concatenate([a * a, a * b, b * b, a * y, b * y], axis=0)  # (5P, n)
    gram = (prods @ onehot) @ subsets.T.astype(np.float64)  # (5P, S)
    return _solve_2x2(*np.split(gram, 5, axis=0))


def _subset_solutions_numba(a, b, y, subsets, blocks) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_subset_solutions` by the compiled kernel :func:`_ts_solutions_gather` (2-gene subsets: as there)."""
    n = a.shape[1]
    if subsets.dtype != bool:
        if subsets.shape[1] == 2:  # closed form per subset, minimum-norm by the Frobenius norm as gelss
            return _subset_solutions(a, b, y, subsets, blocks)
        blocks, n_blocks, idx = np.arange(n), n, subsets
    else:  # membership of blocks: their indices, padded with the empty block n_blocks
        n_blocks = subsets.shape[1]
        counts = subsets.sum(axis=1)
        idx = np.full((len(subsets), int(counts.max())), n_blocks, dtype=np.int64)
        rows, cols = np.nonzero(subsets)
        idx[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = cols
    kernel = _numba_kernel("_ts_solutions_gather")
    return kernel(
        a, b, y, np.asarray(blocks, dtype=np.int64), int(n_blocks), np.ascontiguousarray(idx), 1e-10
    )


def _spatial_median(
    ca: np.ndarray, cb: np.ndarray, *, max_iter: int = 300, tol: float = 1e-3
) -> tuple[np.ndarray, int]:
    """Spatial (L1) median of the points ``(ca[p, s], cb[p, s])`` of every row ``p``.

    By the modified Weiszfeld algorithm (Kärkkäinen & Äyrämö 2005) as in scikit-learn's ``TheilSenRegressor``:
    all rows iterate together until each has moved less than ``tol``.

    Returns the ``(P, 2)`` medians and the number of rows that did not converge.
    """
    m = np.stack([ca.mean(axis=1), cb.mean(axis=1)], axis=1)
    active = np.arange(ca.shape[0])
    tol2 = tol * tol
    for _ in range(max_iter):
        if active.size == 0:
            break
        pa, pb, mo = ca[active], cb[active], m[active]
        da, db = pa - mo[:, :1], pb - mo[:, 1:]
        r = np.sqrt(da * da + db * db)
        away = r >= _EPS
        w = np.divide(1.0, r, out=np.zeros_like(r), where=away)
        wsum = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.stack([(pa * w).sum(axis=1), (pb * w).sum(axis=1)], axis=1) / wsum[:, None]
        qn = np.hypot((da * w).sum(axis=1), (db * w).sum(axis=1))
        inside = (~away).any(axis=1)
        ok = qn > _EPS
        gamma = np.where(inside & ok, np.minimum(1.0, 1.0 / np.where(ok, qn, 1.0)), 0.0)
        new = (1.0 - gamma)[:, None] * t + gamma[:, None] * mo
        new = np.where((ok & (wsum > 0))[:, None], new, mo)  # every point at the median: it is the median
        moved = ((new - mo) ** 2).sum(axis=1)
        m[active] = new
        active = active[moved >= tol2]
    return m, int(active.size)


_prange = range  # numba.prange once a kernel is compiled


def _ts_solutions_gather(a, b, y, blocks, n_blocks, idx, det_rel):  # pragma: no cover - run compiled by numba
    """Least-squares ``(c_a, c_b)`` of every subset for every row, from per-block sums (numba kernel).

    Row ``p``: the sums of ``a a``, ``a b``, ``b b``, ``a y``, ``b y`` over each block of genes
    (``blocks[g]`` is the block of gene ``g``; blocks may be single genes), then every subset's Gram
    entries as the sum over its blocks ``idx[s]`` (index ``n_blocks``: padding, an empty block) and
    the closed-form 2x2 solve of :func:`_solve_2x2` (minimum-norm when singular).
    """
    n_rows, n = a.shape
    n_sub, m = idx.shape
    ca = np.empty((n_rows, n_sub))
    cb = np.empty((n_rows, n_sub))
    for p in _prange(n_rows):
        sums = np.zeros((n_blocks + 1, 5))
        for g in range(n):
            q = blocks[g]
            ag = a[p, g]
            bg = b[p, g]
            yg = y[p, g]
            sums[q, 0] += ag * ag
            sums[q, 1] += ag * bg
            sums[q, 2] += bg * bg
            sums[q, 3] += ag * yg
            sums[q, 4] += bg * yg
        for s in range(n_sub):
            saa = 0.0
            sab = 0.0
            sbb = 0.0
            say = 0.0
            sby = 0.0
            for j in range(m):
                q = idx[s, j]
                saa += sums[q, 0]
                sab += sums[q, 1]
                sbb += sums[q, 2]
                say += sums[q, 3]
                sby += sums[q, 4]
            det = saa * sbb - sab * sab
            tr = saa + sbb
            if abs(det) <= det_rel * tr * tr:  # rank 1: pinv(G) = G / tr(G)^2; rank 0: 0
                scale = 1.0 / (tr * tr) if tr > 0 else 0.0
                ca[p, s] = scale * (saa * say + sab * sby)
                cb[p, s] = scale * (sab * say + sbb * sby)
            else:
                ca[p, s] = (sbb * say - sab * sby) / det
                cb[p, s] = (saa * sby - sab * say) / det
    return ca, cb


def _weiszfeld(ca, cb, max_iter, tol, eps):  # pragma: no cover - run compiled by numba
    """:func:`_spatial_median` row by row in one pass per iteration (numba kernel): medians, iterations left."""
    n_rows, n_sub = ca.shape
    med = np.empty((n_rows, 2))
    bad = np.zeros(n_rows, np.int64)
    tol2 = tol * tol
    for p in _prange(n_rows):
        m0 = 0.0
        m1 = 0.0
        for s in range(n_sub):
            m0 += ca[p, s]
            m1 += cb[p, s]
        m0 /= n_sub
        m1 /= n_sub
        moved = tol2
        for _ in range(max_iter):
            wsum = 0.0
            ta = 0.0
            tb = 0.0
            qa = 0.0
            qb = 0.0
            inside = False
            for s in range(n_sub):
                da = ca[p, s] - m0
                db = cb[p, s] - m1
                r = math.sqrt(da * da + db * db)
                if r >= eps:
                    w = 1.0 / r
                    wsum += w
                    ta += ca[p, s] * w
                    tb += cb[p, s] * w
                    qa += da * w
                    qb += db * w
                else:
                    inside = True
            qn = math.hypot(qa, qb)
            n0 = m0
            n1 = m1
            if qn > eps and wsum > 0:  # else every point is at the median: it is the median
                gamma = min(1.0, 1.0 / qn) if inside else 0.0
                n0 = (1.0 - gamma) * (ta / wsum) + gamma * m0
                n1 = (1.0 - gamma) * (tb / wsum) + gamma * m1
            moved = (n0 - m0) ** 2 + (n1 - m1) ** 2
            m0 = n0
            m1 = n1
            if moved < tol2:
                break
        med[p, 0] = m0
        med[p, 1] = m1
        bad[p] = moved >= tol2
    return med, bad


def theil_sen_no_intercept(
    a: np.ndarray,
    b: np.ndarray,
    y: np.ndarray,
    *,
    n_subsamples: int = 10_000,
    subsample_size: int = 1000,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-3,
    subsets: np.ndarray | None = None,
    engine: Literal["numba", "numpy"] = "numba",
) -> np.ndarray:
    """Theil-Sen fit of ``y ~ c_a a + c_b b`` (no intercept) for every row, vectorized.

    The spatial median of the least-squares solutions on ``n_subsamples`` random subsets of
    ``subsample_size`` genes (all subsets when there are no more than ``n_subsamples``), the
    estimator of :class:`sklearn.linear_model.TheilSenRegressor` with ``fit_intercept=False``,
    ``n_subsamples=subsample_size`` and ``max_subpopulation=n_subsamples``. All subsets are solved
    at once (closed-form 2x2 solves) and all rows share the same subsets.

    Subsets of up to 32 genes are drawn uniformly (2-gene subsets are solved exactly, singular
    ones by their minimum-norm solution as LAPACK's ``gelss`` in scikit-learn). Larger random
    subsets are unions of randomly chosen blocks of a random partition of the genes into at least
    100 near-equal blocks, at least 20 blocks per subset (each subset is still a uniformly random
    subset of about ``subsample_size`` genes, but subsets overlap in whole blocks): the Gram sums
    then take two small matrix products, ~100x less work than per-subset sums.

    Parameters
    ----------
    a, b, y
        ``(P, n)`` arrays: regressors and response of ``P`` independent fits over ``n`` genes.
    n_subsamples
        Number of subsets (scikit-learn's ``max_subpopulation``).
    subsample_size
        Genes per subset (scikit-learn's ``n_subsamples``); at least 2, at most ``n``.
    seed
        Seed of the subset draw.
    max_iter, tol
        Of the modified Weiszfeld iterations (scikit-learn's defaults).
    subsets
        Explicit ``(S, k)`` gene indices of the subsets (overrides the draw).
    engine
        ``'numba'``: compiled kernels, parallel over rows (the Gram sums of each subset gathered
        from per-block sums, the 2x2 solves and the Weiszfeld iterations fused, no ``(P, S)``
        temporaries per step); ``'numpy'``: the vectorized reference. Same estimator; they agree
        to float rounding (tested within 1e-9).

    Returns
    -------
    ``(P, 2)`` array of ``(c_a, c_b)``.
    """
    a, b, y = (np.atleast_2d(np.asarray(v, dtype=np.float64)) for v in (a, b, y))
    n = a.shape[1]
    if n < 2:
        raise ValueError(f"Theil-Sen regression on two regressors needs at least 2 genes, got {n}.")
    k = int(subsample_size)
    if k < 2:
        raise ValueError(f"`subsample_size` must be at least 2 (the number of coefficients), got {k}.")
    k = min(k, n)
    rng = np.random.default_rng(seed)
    if subsets is not None:
        subsets = np.asarray(subsets, dtype=np.int64)
        if subsets.shape[1] > _MAX_GATHER:
            member = np.zeros((len(subsets), n), dtype=bool)
            np.put_along_axis(member, subsets, True, axis=1)
            subsets = member
    else:
        subsets = _draw_subsets(n, k, int(n_subsamples), rng)
    blocks = None
    if subsets.dtype == bool:  # membership of genes, or of blocks of a random partition of the genes
        n_blocks = subsets.shape[1]
        blocks = np.arange(n) if n_blocks == n else np.empty(n, dtype=np.int64)
        if n_blocks != n:
            blocks[rng.permutation(n)] = np.arange(n) * n_blocks // n
    if engine == "numpy":
        ca, cb = _subset_solutions(a, b, y, subsets, blocks)
        med, n_bad = _spatial_median(ca, cb, max_iter=max_iter, tol=tol)
    elif engine == "numba":
        ca, cb = _subset_solutions_numba(a, b, y, subsets, blocks)
        med, bad = _numba_kernel("_weiszfeld")(ca, cb, int(max_iter), float(tol), float(_EPS))
        n_bad = int(bad.sum())
    else:
        raise ValueError(f"`engine` must be 'numba' or 'numpy', got {engine!r}.")
    if n_bad:
        logger.warning(
            "Theil-Sen spatial median did not converge in %d iterations for %d fits.", max_iter, n_bad
        )
    return med


# ----------------------------------------------------------------------------------------------
# distance correlation, vectorized over many vectors
# ----------------------------------------------------------------------------------------------
def _dcov_terms(xs, orders, tasks):  # pragma: no cover - run compiled by numba
    """Sums over genes behind distance covariances, for every pair ``p`` of rows ``xs[p]`` (``(V, n)``).

    With ``r^v_i = mean_j |x^v_i - x^v_j|`` (row means of the distance matrix of row ``v``):
    ``mixed[p, t] = sum_ij |x^u_i - x^u_j| |x^w_i - x^w_j|`` for every task ``t = (u, w)``,
    ``gram[p, v, w] = sum_i r^v_i r^w_i``, ``sums[p, v] = sum_i r^v_i`` and ``sq[p, v] = 2 var(x^v)``. ``orders`` holds the
    argsort of every row. A mixed sum runs over the genes in increasing ``x^w`` with a Fenwick
    tree over the ranks of ``x^u``: O(n log n).
    """
    n_pairs, n_rows, n = xs.shape
    n_tasks = tasks.shape[0]
    mixed = np.zeros((n_pairs, n_tasks))
    gram = np.zeros((n_pairs, n_rows, n_rows))
    sums = np.zeros((n_pairs, n_rows))
    sq = np.zeros((n_pairs, n_rows))
    for p in _prange(n_pairs):
        rank = np.empty((n_rows, n), np.int64)
        rmean = np.empty((n_rows, n))
        for v in range(n_rows):
            x = xs[p, v]
            o = orders[p, v]
            total = 0.0
            for k in range(n):
                rank[v, o[k]] = k + 1
                total += x[o[k]]
            mu = total / n
            acc = 0.0
            for k in range(n):
                acc += (x[k] - mu) * (x[k] - mu)
            sq[p, v] = 2.0 * acc / n  # mean_ij (x_i - x_j)^2
            before = 0.0
            for k in range(n):
                xk = x[o[k]]
                rmean[v, o[k]] = ((2 * k - n) * xk + total - 2.0 * before) / n
                before += xk
        for v in range(n_rows):
            for w in range(v, n_rows):
                acc = 0.0
                for i in range(n):
                    acc += rmean[v, i] * rmean[w, i]
                gram[p, v, w] = acc
                gram[p, w, v] = acc
            acc = 0.0
            for i in range(n):
                acc += rmean[v, i]
            sums[p, v] = acc
        tree = np.empty((n + 1, 4))
        for t in range(n_tasks):
            u = tasks[t, 0]
            w = tasks[t, 1]
            x = xs[p, u]
            y = xs[p, w]
            o = orders[p, w]
            tree[:] = 0.0
            cx = 0.0
            cy = 0.0
            cxy = 0.0
            acc = 0.0
            for i in range(n):  # genes in increasing y: |y_i - y_j| = y_i - y_j for earlier genes j
                g = o[i]
                xi = x[g]
                yi = y[g]
                c = 0.0
                sx = 0.0
                sy = 0.0
                sxy = 0.0
                q = rank[u, g] - 1
                while q > 0:  # earlier genes with smaller x
                    c += tree[q, 0]
                    sx += tree[q, 1]
                    sy += tree[q, 2]
                    sxy += tree[q, 3]
                    q -= q & (-q)
                acc += 2.0 * (xi * yi * c - xi * sy - yi * sx + sxy) - (xi * yi * i - xi * cy - yi * cx + cxy)
                q = rank[u, g]
                while q <= n:
                    tree[q, 0] += 1.0
                    tree[q, 1] += xi
                    tree[q, 2] += yi
                    tree[q, 3] += xi * yi
                    q += q & (-q)
                cx += xi
                cy += yi
                cxy += xi * yi
            mixed[p, t] = 2.0 * acc
    return mixed, gram, sums, sq


def _dcov_kernel():
    """:func:`_dcov_terms` compiled by numba (a dependency of dcor), parallel over pairs, cached on disk."""
    return _numba_kernel("_dcov_terms")


def _choose_threading_layer():
    """numba, with its own sleeping thread pool unless the user chose a threading layer."""
    import numba

    # numba's OpenMP layer keeps its threads spinning beside torch's: torch then took ~5x the CPU for
    # the same prediction (measured: 2.2 vs 12.6 CPU s for 1,035 sets). Its own pool ('workqueue') sleeps.
    # Only when nobody chose a layer (NUMBA_THREADING_LAYER unset) and numba has not started one yet.
    if numba.config.THREADING_LAYER == "default" and "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    return numba


def _n_threads(n_jobs: int | None) -> int:
    """Threads of the GI kernels: ``n_jobs``, else torch's (``torch.set_num_threads`` or its default: the cores)."""
    if n_jobs is None:
        torch = sys.modules.get("torch")
        n_jobs = torch.get_num_threads() if torch is not None else (os.cpu_count() or 1)
    elif isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise ValueError(f"`n_jobs` must be a positive number of threads or None (torch's), got {n_jobs!r}.")
    return max(1, min(int(n_jobs), _choose_threading_layer().config.NUMBA_NUM_THREADS))


@contextlib.contextmanager
def _numba_threads(n: int):
    """Run numba's parallel kernels on ``n`` threads inside the block (numba's setting is per thread)."""
    numba = _choose_threading_layer()
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


@functools.cache
def _numba_kernel(name: str):
    """The kernel ``name`` of this module compiled by numba, parallel over rows, cached on disk."""
    numba = _choose_threading_layer()
    global _prange
    _prange = numba.prange
    return numba.njit(parallel=True, nogil=True, cache=True)(globals()[name])


def _dcor_sq(dcov, dvar_x, dvar_y) -> np.ndarray:
    denom = np.sqrt(np.maximum(dvar_x, 0) * np.maximum(dvar_y, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        d2 = np.where(denom > 0, dcov / denom, 0.0)
    return np.sqrt(np.clip(d2, 0.0, 1.0))


def _dcor_exact_2d(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``dcor([a, b], y)`` per row from the full O(n^2) distance matrices."""
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):  # one double at a time: n x n matrices
        dx = np.hypot(a[i][:, None] - a[i][None, :], b[i][:, None] - b[i][None, :])
        dy = np.abs(y[i][:, None] - y[i][None, :])
        for d in (dx, dy):
            r = d.mean(axis=0)
            d -= r[:, None]
            d -= r[None, :]
            d += r.mean()
        out[i] = _dcor_sq((dx * dy).mean(), (dx * dx).mean(), (dy * dy).mean())
    return out


@functools.cache
def _angle_offset(k: int) -> float:
    """Offset (in steps of ``pi / k``) of the quadrature angles that makes it exact on the axes.

    Gene pairs whose difference lies along an axis (only one single changes them; common, as
    most genes respond to one perturbation or none) then get exact distances, and for even ``k``
    the diagonals (both singles change them alike) too.
    """
    from scipy.optimize import brentq

    def err(off):
        return np.pi / (2 * k) * np.abs(np.cos((np.arange(k) + off) * np.pi / k)).sum() - 1.0

    return brentq(err, 0.0, 0.5)


def distance_correlations(
    a: np.ndarray,
    b: np.ndarray,
    y: np.ndarray,
    *,
    n_projections: int | None = 6,
    extra: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Distance correlations of every row: ``dcor(a, y)``, ``dcor(b, y)`` and ``dcor([a, b], y)``.

    Biased (V-statistic) estimates, as :func:`dcor.distance_correlation`. The univariate ones are
    exact, in O(n log n) per row (sorting; a Fenwick-tree form of the algorithm behind dcor's
    ``method='mergesort'``, compiled and batched over rows). The 2-D one (``[a, b]``: the two
    singles as the coordinates of each gene) is exact, in O(n^2) per row, when ``n_projections`` is
    ``None``. Otherwise every 2-D distance is replaced by the quadrature
    ``||v|| ~ pi / (2K) sum_k |<u_k, v>|`` over ``K = n_projections`` equally spaced directions
    ``u_k`` (from ``||v|| = (pi / 2) E_theta |<u_theta, v>|``), rotated so that it is exact on the
    axes (and, for even ``K``, the diagonals). That turns every distance sum into univariate ones of
    the projections ``a cos(theta_k) + b sin(theta_k)``: ``K`` sums against ``y`` and
    ``K (K - 1) / 2`` between projections (the distance variance of ``[a, b]`` has to use the same
    approximate distances: mixing in exact terms is ruined by cancellation). Measured absolute
    error of the distance correlation on 120 zero-inflated GI-like doubles: at most 8e-3 (median
    1e-3) with K = 4, 2e-3 (median 2.4e-4) with K = 6, 8e-4 with K = 8.

    ``extra`` (``(P, n)``) adds ``dcor(extra, y)`` as key ``'extra'``.
    """
    a, b, y = (np.asarray(v, dtype=np.float64) for v in (a, b, y))
    n = a.shape[1]
    rows = [y, a, b] + ([np.asarray(extra, dtype=np.float64)] if extra is not None else [])
    one_d = list(range(1, len(rows)))  # rows scored against y
    proj = []  # (row, weight) of the projections of the 2-D quadrature
    if n_projections is not None:
        k = int(n_projections)
        c = np.pi / (2 * k)
        for theta in (np.arange(k) + _angle_offset(k)) * np.pi / k:
            if np.isclose(theta, 0):
                proj.append(1)
            elif np.isclose(theta, np.pi / 2):
                proj.append(2)
            else:
                rows.append(a * np.cos(theta) + b * np.sin(theta))
                proj.append(len(rows) - 1)
    tasks = [(v, 0) for v in one_d + [v for v in proj if v not in one_d]]
    tasks += list(itertools.combinations(proj, 2))
    xs = np.stack(rows, axis=1)  # (P, V, n)
    # ss: mean_ij (x_i - x_j)^2 = mixed sum of a row with itself / n^2 = 2 var(x)
    mixed, gram, sums, ss = _dcov_kernel()(xs, np.argsort(xs, axis=2), np.array(tasks, dtype=np.int64))
    m = sums / n  # grand means of the distance matrices
    task = {t: i for i, t in enumerate(tasks)}

    def dvar(v):
        return ss[:, v] - 2.0 * gram[:, v, v] / n + m[:, v] ** 2

    def one(v):
        dcov = mixed[:, task[(v, 0)]] / n**2 - 2.0 * gram[:, v, 0] / n + m[:, v] * m[:, 0]
        return _dcor_sq(dcov, dvar(v), dvar(0))

    out = {"a": one(1), "b": one(2)}
    if extra is not None:
        out["extra"] = one(3)
    if n_projections is None:
        out["ab"] = _dcor_exact_2d(a, b, y)
        return out
    # the same sums for the approximate 2-D distances D = c sum_k |dz_k|: row means are c sum_k r^k
    pr = np.array(proj)
    m2 = c * m[:, pr].sum(axis=1)
    g2y = c * gram[:, pr, 0].sum(axis=1)
    g22 = c * c * gram[:, pr][:, :, pr].sum(axis=(1, 2))
    mix_y = c * sum(mixed[:, task[(v, 0)]] for v in proj)
    ss2 = (
        c
        * c
        * (
            ss[:, pr].sum(axis=1)
            + 2.0 * sum(mixed[:, task[t]] for t in itertools.combinations(proj, 2)) / n**2
        )
    )
    dcov = mix_y / n**2 - 2.0 * g2y / n + m2 * m[:, 0]
    out["ab"] = _dcor_sq(dcov, ss2 - 2.0 * g22 / n + m2**2, dvar(0))
    return out


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------
def _score_rows(
    a: np.ndarray,
    b: np.ndarray,
    y: np.ndarray,
    *,
    n_subsamples: int,
    subsample_size: int,
    seed: int,
    n_projections: int | None,
    model_fit: str,
    engine: str = "numba",
) -> dict[str, np.ndarray]:
    """All GI scores for a chunk of doubles (rows)."""
    coef = theil_sen_no_intercept(
        a, b, y, n_subsamples=n_subsamples, subsample_size=subsample_size, seed=seed, engine=engine
    )
    ca, cb = coef[:, 0], coef[:, 1]
    fit = ca[:, None] * a + cb[:, None] * b
    dc = distance_correlations(
        a, b, y, n_projections=n_projections, extra=fit if model_fit == "dcor" else None
    )
    if model_fit == "dcor":
        mf = dc["extra"]
    else:
        fc = fit - fit.mean(axis=1, keepdims=True)
        yc = y - y.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mf = (fc * yc).sum(axis=1) / np.sqrt((fc * fc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        eq = np.minimum(dc["a"], dc["b"]) / np.maximum(dc["a"], dc["b"])
        dominance = np.abs(np.log10(np.abs(ca) / np.abs(cb)))
    return {
        "c_a": ca,
        "c_b": cb,
        "magnitude": np.hypot(ca, cb),
        "model_fit": mf,
        "similarity": dc["ab"],
        "dcor_a": dc["a"],
        "dcor_b": dc["b"],
        "equality_of_contribution": eq,
        "dominance": dominance,
    }


def _score_table(
    delta: np.ndarray,
    rows: Mapping[str, int],
    pairs: Sequence[tuple[str, str]],
    *,
    thresholds,
    n_subsamples: int,
    subsample_size: int,
    seed: int,
    n_projections,
    model_fit: str,
    chunk_size: int | None = None,
    progress_bar: bool = False,
    n_jobs: int | None = None,
    engine: str = "numba",
) -> pd.DataFrame:
    """Score the doubles ``pairs`` (sorted gene pairs); ``rows`` maps ``A``, ``B``, ``A+B`` to rows of ``delta``.

    Chunks of pairs in turn, each scored by numba kernels parallel over its pairs (``n_jobs`` threads,
    see :func:`_n_threads`); ``engine='numpy'``: Theil-Sen by the vectorized reference.
    """
    names = [DELIM.join(p) for p in pairs]
    ia = np.array([rows[a] for a, _ in pairs])
    ib = np.array([rows[b] for _, b in pairs])
    iy = np.array([rows[nm] for nm in names])
    if model_fit not in ("pearson", "dcor"):
        raise ValueError(f"`model_fit` must be 'pearson' or 'dcor', got {model_fit!r}.")
    rules = resolve_gi_thresholds(thresholds)
    n = delta.shape[1]
    if n_projections == "auto":
        n_projections = None if n <= _EXACT_SIMILARITY_MAX_GENES else 6
    elif n_projections is not None and int(n_projections) < 2:
        raise ValueError(
            f"`n_projections` must be at least 2, None (exact) or 'auto', got {n_projections!r}."
        )
    if int(subsample_size) > n:
        logger.info(
            "subsample_size=%d exceeds the %d genes: using all genes in every subset.", subsample_size, n
        )
    if chunk_size is None:  # keep the (chunk x subsets) work arrays around 16 MB each
        chunk_size = int(
            max(8, min(512, 2e6 // max(1, min(n_subsamples, math.comb(n, min(subsample_size, n))))))
        )
    parts = []
    starts = range(0, len(iy), chunk_size)
    from .._progress import track  # imports lightning: not at import time

    starts = track(starts, len(starts), "GI scores", enabled=progress_bar, unit="chunks")
    with _numba_threads(_n_threads(n_jobs)):
        for s in starts:
            sl = slice(s, s + chunk_size)
            a, b, y = (delta[i[sl]].astype(np.float64) for i in (ia, ib, iy))
            parts.append(
                _score_rows(
                    a,
                    b,
                    y,
                    n_subsamples=n_subsamples,
                    subsample_size=subsample_size,
                    seed=seed,
                    n_projections=n_projections,
                    model_fit=model_fit,
                    engine=engine,
                )
            )
    cols = {k: np.concatenate([p[k] for p in parts]) if parts else np.array([]) for k in parts[0]}
    df = pd.DataFrame(
        {"gene_a": [p[0] for p in pairs], "gene_b": [p[1] for p in pairs], **cols}, index=pd.Index(names)
    )
    for subtype, (score, op, value) in rules.items():
        df[subtype] = _apply_rule(df[score].to_numpy(), op, value)
    return df


def _pair_sets(pairs) -> list[tuple[str, str]]:
    sets = as_perturbation_sets(pairs)
    bad = [DELIM.join(s) for s in sets if len(s) != 2]
    if bad:
        raise ValueError(f"GI scores are defined for doubles (two distinct genes); got {bad[:5]}.")
    return sets


def _deltas_of(adata: AnnData) -> tuple[np.ndarray, dict[str, int], str]:
    """Delta matrix and the row of each canonical perturbation name, from parsed data or a prediction."""
    if PERT_KEY in adata.obs:
        col, sets = get_parsed(adata)
        cats = list(col.cat.categories)
        if CONTROL not in cats or not (col == CONTROL).any():
            raise ValueError(
                "No control cells in the data: true deltas are group means minus the control mean."
            )
        x = get_matrix(adata, layer_of(adata))
        means = group_means(x, col.cat.codes.to_numpy(), len(cats))
        delta = means - means[cats.index(CONTROL)][None, :]
        return delta, {c: i for i, c in enumerate(cats) if c != CONTROL}, "data"
    if DELTA_LAYER in adata.layers:
        labels = adata.obs["perturbation"] if "perturbation" in adata.obs else pd.Series(adata.obs_names)
        canon = [canonical_name(str(lab).split(DELIM)) for lab in labels]
        rows = {}
        for i, c in enumerate(canon):
            rows.setdefault(c, i)
        d = adata.layers[DELTA_LAYER]
        delta = np.asarray(d.toarray() if sp.issparse(d) else d, dtype=np.float32)
        return delta, rows, "prediction"
    raise ValueError(
        "`data` is neither parsed perturbation data (run pg.pp.parse_perturbations first) nor a prediction "
        f"AnnData with layers[{DELTA_LAYER!r}] (the output of model.predict / pg.tl.predict)."
    )


def gi_scores(
    data,
    pairs: Sequence | None = None,
    *,
    thresholds: Mapping | None = None,
    n_subsamples: int = 10_000,
    subsample_size: int = 1000,
    n_projections: int | None | Literal["auto"] = "auto",
    model_fit: Literal["pearson", "dcor"] = "pearson",
    gene_subset: Sequence[str] | None = None,
    seed: int = 0,
    key_added: str = GI_KEY,
    overwrite: bool = False,
    modality: str | None = None,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    r"""Genetic-interaction scores of double perturbations (Norman et al. 2019; GEARS Methods).

    For a double ``A+B`` with changes over control ``a``, ``b`` (singles) and ``ab`` (double),
    over genes, fit :math:`ab = c_a a + c_b b` by Theil-Sen regression without intercept (robust;
    see :func:`theil_sen_no_intercept`) and compute

    ``magnitude``
        :math:`\sqrt{c_a^2 + c_b^2}`: > 1 synergy, < 1 suppression.
    ``model_fit``
        Pearson correlation of :math:`c_a a + c_b b` with :math:`ab` (low: neomorphism). This is what
        the authors' code computes (``np.corrcoef``); the paper's text calls every "corr" a distance
        correlation: ``model_fit='dcor'`` gives that.
    ``similarity``
        Distance correlation of the 2-D points :math:`(a_g, b_g)` with :math:`ab_g`,
        :math:`dcor([a, b], ab)` (high: redundancy).
    ``equality_of_contribution``
        :math:`\min(dcor(a, ab), dcor(b, ab)) / \max(\dots)` (low: one gene dominates, epistasis).
    ``dominance``
        :math:`|\log_{10}(|c_a| / |c_b|)|`. The authors' code takes ``log10(c_a / c_b)``, NaN when the
        coefficients have opposite signs; the absolute values keep it defined.

    and one boolean column per subtype from ``thresholds`` (defaults: GEARS Table 2, see below).

    Parameters
    ----------
    data
        Parsed perturbation data (:func:`~pertpy_gnn.pp.parse_perturbations`; true changes = group
        mean minus control mean, on the layer recorded by parsing), a prediction AnnData (rows named
        ``A``, ``B``, ``A+B``, changes in ``layers['delta']``, as returned by ``model.predict``), or a
        MuData with ``modality``.
    pairs
        Doubles to score (``"A+B"`` or ``("A", "B")``). Default: every double whose two singles are
        present. Pairs that need a perturbation the model could not predict (listed in a
        prediction's ``uns['pg_prediction']['skipped']`` by ``predict(..., skip_unknown=True)``, e.g.
        a gene without a GO-graph node) are left out with a warning naming them and the reason; an
        error when none is left.
    thresholds
        Subtype rules, updating the defaults ``synergy: magnitude > 1.15``, ``suppression: magnitude
        < 1.0``, ``neomorphism: model_fit < 0.88``, ``redundancy: similarity > 0.85``,
        ``epistasis: equality_of_contribution < 0.28``. Give a number to move a default threshold or
        ``(score, '>' | '<', value)``. The paper's table reads "epistasis: equality of contribution
        > 0.28"; the authors' code uses ``< 0.28`` (ranking the lowest values for precision@10),
        which matches the definition (one gene masks the other), hence the default; pass
        ``{'epistasis': ('equality_of_contribution', '>', 0.28)}`` for the table's rule.
    n_subsamples
        Theil-Sen: number of random gene subsets (the paper: 10,000).
    subsample_size
        Theil-Sen: genes per subset. The default follows the paper's text (10,000 subsamples of 1,000
        genes; at most all genes). The authors' code runs scikit-learn's ``TheilSenRegressor``
        (``fit_intercept=False, max_subpopulation=1e5``), i.e. 100,000 subsets of 2 genes:
        ``n_subsamples=100_000, subsample_size=2`` (slower; estimates are pulled towards 0 when most
        genes carry only noise, which is why that code scores a subset of well-expressed genes:
        ``gene_subset``).
    n_projections
        Number of projection angles for the 2-D distance correlation (``similarity``); ``None``
        computes it exactly in O(genes^2) per double; ``'auto'``: exact up to 500 genes, else 6 (error
        below 2e-3).
        See :func:`distance_correlations`.
    model_fit
        ``'pearson'`` (authors' code) or ``'dcor'`` (paper's text).
    gene_subset
        Genes (``var_names``) to compute the scores on; default all. Noise in the measured singles
        ``a``, ``b`` biases ``c_a``, ``c_b`` towards 0 (errors in variables) and lowers ``model_fit``:
        with few cells per perturbation, score well-measured genes (the authors' code uses genes
        with a high mean expression).
    seed
        Seed of the Theil-Sen subsets.
    key_added
        Key in ``uns`` of ``data``.
    overwrite
        Replace an existing result under ``key_added``.
    modality
        Modality of a MuData.
    n_jobs
        Threads of the scoring kernels (parallel over doubles); ``None``: as many as torch uses
        (``torch.get_num_threads()``: your ``torch.set_num_threads``, else the number of cores).

    Returns
    -------
    DataFrame, one row per double (index ``A+B``): ``gene_a``, ``gene_b`` (sorted; ``c_a`` belongs to
    ``gene_a``), ``c_a``, ``c_b``, ``magnitude``, ``model_fit``, ``similarity``, ``dcor_a``,
    ``dcor_b``, ``equality_of_contribution``, ``dominance`` and one boolean column per subtype.
    Also stored in ``adata.uns['pg_gi_scores']`` (or ``key_added``) of ``data``.
    """
    adata = get_adata(data, modality)
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    resolve_gi_thresholds(thresholds)  # fail early on bad rules
    delta, rows, kind = _deltas_of(adata)
    if pairs is None:
        sets = [tuple(nm.split(DELIM)) for nm in rows if nm.count(DELIM) == 1]
        sets = [s for s in sets if s[0] in rows and s[1] in rows]
        if not sets:
            raise ValueError(
                f"The {kind} has no double perturbation whose two singles are present; GI scores need "
                "A, B and A+B. Pass `pairs=` or add the singles."
            )
    else:
        sets = _pair_sets(pairs)
        missing = sorted({nm for s in sets for nm in (s[0], s[1], DELIM.join(s)) if nm not in rows})
        lost = recorded_skipped(adata) if kind == "prediction" and missing else {}
        lost = {nm: lost[nm] for nm in missing if nm in lost}
        if lost:  # the model could not predict them (predict(..., skip_unknown=True)): leave those pairs out
            left = [s for s in sets if not any(nm in lost for nm in (s[0], s[1], DELIM.join(s)))]
            dropped = [DELIM.join(s) for s in sets if s not in left]
            reasons = "; ".join(f"{nm}: {r}" for nm, r in list(lost.items())[:10])
            if not left:
                raise ValueError(
                    f"None of the {len(sets)} requested pairs can be scored: the model could not predict "
                    f"perturbations each of them needs ({reasons})."
                )
            logger.warning(
                "%d of the %d requested pairs are left out of the GI scores, the model could not predict "
                "perturbations they need: %s (%s).",
                len(dropped),
                len(sets),
                dropped[:10],
                reasons,
            )
            sets = left
            missing = sorted({nm for s in sets for nm in (s[0], s[1], DELIM.join(s)) if nm not in rows})
        if missing:
            raise ValueError(
                f"{len(missing)} perturbations needed for the requested pairs are not in the {kind}: "
                f"{missing[:10]}. Every pair needs its two singles and the double."
            )
    if gene_subset is not None:
        cols = pd.Index(adata.var_names).get_indexer(list(gene_subset))
        if (cols < 0).any():
            raise ValueError(
                f"{int((cols < 0).sum())} genes of `gene_subset` are not in var_names, e.g. "
                f"{[g for g, c in zip(gene_subset, cols, strict=True) if c < 0][:5]}."
            )
        delta = delta[:, cols]
    need = np.array([rows[nm] for s in sets for nm in (s[0], s[1], DELIM.join(s))])
    if not np.isfinite(delta[need]).all():
        raise ValueError(
            f"The changes over control of the scored perturbations hold NaN or inf values (in the {kind}); "
            "remove those genes (`gene_subset=`) or perturbations."
        )
    df = _score_table(
        delta,
        rows,
        sets,
        thresholds=thresholds,
        n_subsamples=n_subsamples,
        subsample_size=subsample_size,
        seed=seed,
        n_projections=n_projections,
        model_fit=model_fit,
        n_jobs=n_jobs,
    )
    adata.uns[key_added] = df
    logger.info("Scored %d doubles; results in adata.uns[%r].", len(df), key_added)
    return df


# ----------------------------------------------------------------------------------------------
# GI map of all pairs of a gene set, through a predictor
# ----------------------------------------------------------------------------------------------
def _predict_in_batches(model, sets, n_control, batch_size: int, seed: int, progress_bar: bool):
    """Changes over control and obs of ``sets`` from ``model.predict``, ``batch_size`` sets per call."""
    starts = range(0, len(sets), batch_size)
    from .._progress import track  # imports lightning: not at import time

    starts = track(starts, len(starts), "Predicting", enabled=progress_bar, unit="batches")
    deltas, obs, var_names = [], [], None
    for s in starts:
        chunk = sets[s : s + batch_size]
        pred = model.predict(chunk, n_control=n_control, seed=seed)
        d, rows, _ = _deltas_of(pred)
        names = [DELIM.join(c) for c in chunk]
        missing = [nm for nm in names if nm not in rows]
        if missing:
            raise ValueError(f"model.predict returned no row for {missing[:5]}.")
        if var_names is None:
            var_names = pd.Index(pred.var_names)
        elif not pred.var_names.equals(var_names):
            raise ValueError("model.predict returned different genes in different batches.")
        idx = np.array([rows[nm] for nm in names])
        deltas.append(d[idx])
        obs.append(pred.obs.iloc[idx].reset_index(drop=True))
    return np.concatenate(deltas, axis=0), pd.concat(obs, ignore_index=True)


def _predict_sets(model, sets, n_control, batch_size, seed, progress_bar, one_pass):
    """Predicted changes of ``sets`` (rows in order) and their obs: one pass or batch by batch."""
    if one_pass:  # one pass, no AnnData per batch (GEARS without contexts)
        delta, obs = model.predict_deltas(sets, n_control=n_control, seed=seed, batch_size=batch_size)
        names = [DELIM.join(c) for c in sets]
        if list(obs.index) != names:
            raise ValueError("model.predict_deltas returned rows that are not the requested sets.")
        return delta, obs.reset_index(drop=True)
    return _predict_in_batches(model, sets, n_control, batch_size, seed, progress_bar)


def gi_map(
    model,
    genes: Sequence[str],
    *,
    n_control: int | None = 300,
    batch_size: int = 512,
    seed: int = 0,
    uncertainty_threshold: float | None = 0.386,
    uncertainty_quantile: float | None = None,
    drop_uncertain: bool = False,
    thresholds: Mapping | None = None,
    n_subsamples: int = 10_000,
    subsample_size: int = 1000,
    n_projections: int | None | Literal["auto"] = "auto",
    model_fit: Literal["pearson", "dcor"] = "pearson",
    progress_bar: bool = True,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Predict and score every pair of ``genes``: a multi-dimensional GI map (GEARS Fig. 5b).

    All singles and all ``len(genes) * (len(genes) - 1) / 2`` pairs (Norman: 105 genes, 5,460
    pairs) are predicted by ``model.predict`` in batches, and every pair is scored as in
    :func:`gi_scores` from the predicted changes over control.

    Uncertainty filtering (GEARS Extended Data Figs. 7, 8, 10): when the predictions carry
    ``obs['uncertainty_z']`` (the mean predicted log-variance, z-scored against the training
    cells), pairs with a gene not seen perturbed in training and an uncertainty above the
    threshold are flagged (column ``uncertain``) or dropped (``drop_uncertain=True``). The default
    threshold ``uncertainty_z > 0.386`` is the authors' analysis code (mean + 0.386 sd of the
    training uncertainty); ``uncertainty_quantile=0.5`` instead keeps the lower half of those pairs,
    as the paper reports them.

    Scale: a GEARS map of the 5,460 pairs of 105 genes over 5,000 genes (5,565 sets predicted in
    one pass, then scored numba-parallel over pairs) is measured by ``benchmarks/gi_map_scale.py``;
    the effect of each scoring setting on time and scores by ``benchmarks/gi_scoring_knobs.py``.

    Parameters
    ----------
    model
        A predictor (GEARS or a baseline): ``.predict(perturbations, n_control=, seed=)`` returning
        a prediction AnnData.
    genes
        Genes whose singles and pairs are predicted.
    n_control
        Control cells averaged per prediction (passed to ``model.predict``).
    batch_size
        Perturbation sets per call of ``model.predict`` or, for a model with ``predict_deltas``
        (GEARS: all sets in one call, no AnnData per batch), per forward pass.
    seed
        Seed of the control cells drawn by ``model.predict`` (the same for every batch, so singles
        and doubles are relative to the same control mean) and of the Theil-Sen subsets.
    uncertainty_threshold
        Flag pairs with an unseen gene and ``uncertainty_z`` above this; ``None``: no threshold.
    uncertainty_quantile
        Alternative to ``uncertainty_threshold``: flag the pairs with an unseen gene whose
        uncertainty is above this quantile of theirs.
    drop_uncertain
        Drop the flagged pairs instead of flagging them.
    n_projections
        As in :func:`gi_scores`, but ``'auto'`` is exact up to 500 genes, else 4 projections (not
        6): a third less scoring time, similarity within 7e-3 of the 6-projection value on
        Norman-sized maps (``benchmarks/results/gi_scoring_knobs.json``; 6 projections are within
        2e-3 of the exact value).
    thresholds, n_subsamples, subsample_size, model_fit
        As in :func:`gi_scores`.
    progress_bar
        Show progress bars.
    n_jobs
        Threads of the scoring (numba kernels, parallel over pairs; they sleep when idle);
        ``None``: torch's setting (``torch.set_num_threads``, else torch's default, the number of
        cores), no environment variable needed. The prediction runs on torch's threads as you set
        them: on a machine whose cores are busy with other work, ``torch.set_num_threads(1)`` and
        ``n_jobs=2`` (or more) is faster, as torch's threads spin-wait at every operation.

    Returns
    -------
    DataFrame, one row per pair (index ``A+B``), with the columns of :func:`gi_scores` and
    ``n_unseen`` (genes of the pair not seen perturbed in training, when the model knows),
    ``uncertainty_z`` (when the model predicts uncertainty) and ``uncertain`` (flagged; all
    ``False`` without uncertainty).
    """
    if not hasattr(model, "predict"):
        raise TypeError(
            f"`model` must be a predictor with a .predict method (GEARS or a baseline), got {type(model).__name__}."
        )
    if isinstance(genes, str):
        raise TypeError("`genes` must be a list of gene names, not one string.")
    genes = sorted({str(g) for g in genes})
    if len(genes) < 2:
        raise ValueError(f"A GI map needs at least 2 genes, got {genes}.")
    if uncertainty_threshold is not None and uncertainty_quantile is not None:
        raise ValueError(
            "Give either `uncertainty_threshold` or `uncertainty_quantile` (set the other to None)."
        )
    if uncertainty_quantile is not None and not 0 < uncertainty_quantile < 1:
        raise ValueError(f"`uncertainty_quantile` must be in (0, 1), got {uncertainty_quantile}.")
    if model_fit not in ("pearson", "dcor"):
        raise ValueError(f"`model_fit` must be 'pearson' or 'dcor', got {model_fit!r}.")
    resolve_gi_thresholds(thresholds)
    perturbable = getattr(model, "perturbable_genes", None)
    if perturbable is not None:
        unknown = sorted(set(genes) - {str(g) for g in perturbable})
        if unknown:
            raise ValueError(
                f"{len(unknown)} of the genes cannot be perturbed by {getattr(model, 'name', 'the model')} (not in "
                f"its GO graph): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}. Leave them out of `genes`, "
                "e.g. `genes = [g for g in genes if g in set(model.perturbable_genes)]`."
            )
    pairs = list(itertools.combinations(genes, 2))
    sets = [(g,) for g in genes] + pairs
    _n_threads(n_jobs)  # a bad value fails before the prediction
    one_pass = callable(getattr(model, "predict_deltas", None)) and not getattr(model, "contexts_", None)
    delta, obs = _predict_sets(model, sets, n_control, int(batch_size), seed, progress_bar, one_pass)
    if not np.isfinite(delta).all():
        raise ValueError("The predicted changes hold NaN or inf values; the model cannot be scored.")
    if n_projections == "auto":
        n_projections = None if delta.shape[1] <= _EXACT_SIMILARITY_MAX_GENES else 4
    df = _score_table(
        delta,
        {DELIM.join(c): i for i, c in enumerate(sets)},
        pairs,
        thresholds=thresholds,
        n_subsamples=n_subsamples,
        subsample_size=subsample_size,
        seed=seed,
        n_projections=n_projections,
        model_fit=model_fit,
        progress_bar=progress_bar,
        n_jobs=n_jobs,
    )
    pair_obs = obs.iloc[len(genes) :]
    if "n_unseen" in pair_obs:
        unseen = pair_obs["n_unseen"].to_numpy().astype(np.int64)
    elif getattr(model, "seen_genes", None) is not None:
        unseen = np.array([sum(g not in model.seen_genes for g in p) for p in pairs], dtype=np.int64)
    else:
        unseen = None
    if unseen is not None:
        df["n_unseen"] = unseen
    df["uncertain"] = False
    if "uncertainty_z" in pair_obs:
        z = pair_obs["uncertainty_z"].to_numpy().astype(np.float64)
        df["uncertainty_z"] = z
        candidates = np.ones(len(df), dtype=bool) if unseen is None else unseen > 0
        cut = uncertainty_threshold
        if uncertainty_quantile is not None and candidates.any():
            cut = float(np.quantile(z[candidates], uncertainty_quantile))
        if cut is not None:
            df["uncertain"] = candidates & (z > cut)
        logger.info(
            "%d of %d pairs flagged as uncertain (uncertainty_z > %s).",
            int(df["uncertain"].sum()),
            len(df),
            cut,
        )
    else:
        logger.info("The model predicts no uncertainty (obs['uncertainty_z']): no pair is flagged.")
    if drop_uncertain:
        df = df[~df["uncertain"].to_numpy()].copy()
    return df


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def _as_scores(x, what: str) -> pd.DataFrame:
    if isinstance(x, pd.DataFrame):
        return x
    if isinstance(x, AnnData):
        if GI_KEY not in x.uns:
            raise KeyError(f"{what} holds no uns[{GI_KEY!r}]: run pg.tl.gi_scores on it first.")
        return x.uns[GI_KEY]
    raise TypeError(
        f"{what} must be a GI score DataFrame (from pg.tl.gi_scores / gi_map), got {type(x).__name__}."
    )


def evaluate_gi(
    true_scores: pd.DataFrame,
    predicted_scores: pd.DataFrame,
    *,
    thresholds: Mapping | None = None,
    k: int = 10,
    n_random: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """How well predicted GI scores find the interaction subtypes of the true ones (GEARS Fig. 4c, ED Fig. 6).

    Per subtype with rule ``score > t`` (or ``< t``), on the doubles in both tables:

    ``precision``, ``recall``
        Of the doubles whose predicted score passes the rule, against those whose true score does
        (NaN when there are none).
    ``precision_at_k``
        Fraction of the ``k`` doubles with the most extreme predicted score (highest for ``>``,
        lowest for ``<``) that truly show the subtype.
    ``top_k_accuracy``
        Overlap of those ``k`` with the ``k`` most extreme true scores, divided by ``k``.
    ``random_precision_at_k_mean`` / ``_std``, ``random_top_k_accuracy_mean`` / ``_std``
        The same for ``n_random`` random draws of ``k`` doubles (the paper's random baseline).
    ``r2``
        Coefficient of determination of the predicted score for the true one (``1 - SS_res / SS_tot``,
        identity line; can be negative).

    Parameters
    ----------
    true_scores, predicted_scores
        Outputs of :func:`gi_scores` (on the data and on a prediction), or AnnData holding them.
    thresholds
        Subtype rules, as in :func:`gi_scores`.
    k
        Size of the top list (the paper: 10; fewer when fewer doubles are scored).
    n_random
        Random draws of the baseline.
    seed
        Seed of the random draws.

    Returns
    -------
    DataFrame, one row per subtype, with ``score``, ``rule``, ``n``, ``n_true``, ``n_predicted``, ``k``
    and the metrics above.
    """
    t = _as_scores(true_scores, "`true_scores`")
    p = _as_scores(predicted_scores, "`predicted_scores`")
    common = t.index.intersection(p.index)
    if len(common) == 0:
        raise ValueError(
            "The true and predicted score tables share no double (their indices, e.g. 'A+B', differ)."
        )
    if len(common) < max(len(t), len(p)):
        logger.info("Evaluating on the %d doubles scored in both tables.", len(common))
    t, p = t.loc[common], p.loc[common]
    rules = resolve_gi_thresholds(thresholds)
    n = len(common)
    kk = min(int(k), n)
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((int(n_random), n)), axis=1)[:, :kk]  # n_random random k-subsets
    records = []
    for subtype, (score, op, value) in rules.items():
        tv = t[score].to_numpy(dtype=np.float64)
        pv = p[score].to_numpy(dtype=np.float64)
        true_set = _apply_rule(tv, op, value)
        pred_set = _apply_rule(pv, op, value)
        sign = -1.0 if op == ">" else 1.0  # ascending order of sign * score: most extreme first
        top_p = np.argsort(np.where(np.isnan(pv), np.inf, sign * pv), kind="stable")[:kk]
        top_t = np.argsort(np.where(np.isnan(tv), np.inf, sign * tv), kind="stable")[:kk]
        in_top_t = np.zeros(n, dtype=bool)
        in_top_t[top_t] = True
        tp = int((true_set & pred_set).sum())
        rand_prec = true_set[draws].mean(axis=1)
        rand_top = in_top_t[draws].mean(axis=1)
        ok = np.isfinite(tv) & np.isfinite(pv)
        ss_tot = ((tv[ok] - tv[ok].mean()) ** 2).sum() if ok.any() else 0.0
        records.append(
            {
                "subtype": subtype,
                "score": score,
                "rule": f"{score} {op} {value:g}",
                "n": n,
                "n_true": int(true_set.sum()),
                "n_predicted": int(pred_set.sum()),
                "k": kk,
                "precision": tp / pred_set.sum() if pred_set.any() else np.nan,
                "recall": tp / true_set.sum() if true_set.any() else np.nan,
                "precision_at_k": float(true_set[top_p].mean()),
                "top_k_accuracy": float(in_top_t[top_p].mean()),
                "random_precision_at_k_mean": float(rand_prec.mean()),
                "random_precision_at_k_std": float(rand_prec.std()),
                "random_top_k_accuracy_mean": float(rand_top.mean()),
                "random_top_k_accuracy_std": float(rand_top.std()),
                "r2": 1.0 - ((tv[ok] - pv[ok]) ** 2).sum() / ss_tot if ss_tot > 0 else np.nan,
            }
        )
    return pd.DataFrame.from_records(records).set_index("subtype")


def nonadditive_mse(
    adata_true,
    prediction: AnnData,
    pairs: Sequence | None = None,
    *,
    n_genes: int = 20,
    modality: str | None = None,
) -> pd.DataFrame:
    """MSE of predicted doubles on their most non-additive genes (GEARS ED Fig. 6a).

    For each double ``A+B``, the ``n_genes`` genes with the largest true deviation from additivity
    ``|ab - (a + b)|`` (true changes over control) are selected, and the mean squared error of
    the predicted change of ``A+B`` on them is computed, beside that of the additive prediction
    ``a + b``.

    Parameters
    ----------
    adata_true
        Parsed perturbation data with ``A``, ``B`` and ``A+B`` (or a MuData with ``modality``).
    prediction
        Prediction AnnData holding ``A+B`` (``layers['delta']``), on the same genes.
    pairs
        Doubles to evaluate; default: every double of ``prediction`` whose singles and double are in
        the data.
    n_genes
        Number of most non-additive genes (the paper: 20).
    modality
        Modality of a MuData ``adata_true``.

    Returns
    -------
    DataFrame, one row per double: ``mse`` (prediction), ``mse_additive`` (a + b) and ``genes`` (the
    selected genes, most non-additive first, comma-separated).
    """
    adata = get_adata(adata_true, modality)
    t_delta, t_rows, _ = _deltas_of(adata)
    p_delta, p_rows, _ = _deltas_of(prediction)
    if pairs is None:
        sets = [tuple(nm.split(DELIM)) for nm in p_rows if nm.count(DELIM) == 1]
        sets = [s for s in sets if all(x in t_rows for x in (s[0], s[1], DELIM.join(s)))]
        if not sets:
            raise ValueError("No double of the prediction has its two singles and the double in the data.")
    else:
        sets = _pair_sets(pairs)
        miss_t = sorted({x for s in sets for x in (s[0], s[1], DELIM.join(s)) if x not in t_rows})
        miss_p = sorted({DELIM.join(s) for s in sets if DELIM.join(s) not in p_rows})
        if miss_t or miss_p:
            raise ValueError(
                f"Missing perturbations: {miss_t[:10]} in the data, {miss_p[:10]} in the prediction. Each pair "
                "needs A, B and A+B in the data and A+B in the prediction."
            )
    cols = pd.Index(prediction.var_names.astype(str)).get_indexer(adata.var_names.astype(str))
    if (cols < 0).any():
        raise ValueError(
            f"The prediction lacks {int((cols < 0).sum())} genes of the data, e.g. "
            f"{list(adata.var_names[cols < 0][:5])}; predict on the same genes."
        )
    names = [DELIM.join(s) for s in sets]
    a = t_delta[[t_rows[s[0]] for s in sets]].astype(np.float64)
    b = t_delta[[t_rows[s[1]] for s in sets]].astype(np.float64)
    ab = t_delta[[t_rows[nm] for nm in names]].astype(np.float64)
    pred = p_delta[[p_rows[nm] for nm in names]][:, cols].astype(np.float64)
    m = min(int(n_genes), ab.shape[1])
    dev = np.abs(ab - (a + b))
    top = np.argsort(-dev, axis=1, kind="stable")[:, :m]
    take = functools.partial(np.take_along_axis, indices=top, axis=1)
    out = pd.DataFrame(
        {
            "mse": ((take(pred) - take(ab)) ** 2).mean(axis=1),
            "mse_additive": ((take(a + b) - take(ab)) ** 2).mean(axis=1),
            "genes": [",".join(adata.var_names[r]) for r in top],
        },
        index=pd.Index(names),
    )
    return out
