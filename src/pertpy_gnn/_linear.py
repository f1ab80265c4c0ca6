"""Linear algebra of the linear baselines, below ``tl`` so that models can reuse it.

* :func:`graph_embedding`: a spectral embedding of a gene graph (GO, co-expression);
* :func:`pca_gene_embedding`: the PCA gene embedding of a pseudobulk (Ahlmann-Eltze et al. 2025);
* :func:`bilinear_ridge`: the closed-form ridge fit of ``Y ~ G W P^T + b`` for a grid of penalties,
  vectorized over the grid with two eigendecompositions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh


def graph_embedding(graph: dict, n_components: int = 10, *, seed: int = 0) -> pd.DataFrame:
    r"""Spectral embedding of a gene graph (a dict of :func:`pertpy_gnn.pp.go_graph` form).

    The edge weights are symmetrized, ``A = (W + W^T) / 2``, and regularized as in regularized
    spectral clustering (Amini et al. 2013; Qin & Rohe 2013), :math:`A_\tau = A + (\tau / n) 1 1^T`
    with :math:`\tau` the mean degree, so that the many small components of a k-nearest-neighbour
    graph do not take the leading eigenvectors. The embedding is made of the eigenvectors
    ``2 .. n_components + 1`` (the first is the degree vector) of
    :math:`D_\tau^{-1/2} A_\tau D_\tau^{-1/2}`, each scaled by its eigenvalue. ``A_tau`` is never
    formed: ``eigsh`` runs on a sparse-plus-rank-one operator.

    Parameters
    ----------
    graph
        ``genes``, ``edge_index`` (2, E) and ``edge_weight`` (E,).
    n_components
        Embedding dimension (at most the number of nodes - 2).
    seed
        Seed of the start vector of the Lanczos iteration (the result is deterministic).

    Returns
    -------
    DataFrame, one row per node of the graph (index: gene names), ``n_components`` columns.
    """
    genes = pd.Index(np.asarray(graph["genes"]).astype(str))
    n = len(genes)
    k = int(min(n_components, n - 2))
    if k < 1:
        raise ValueError(f"A graph of {n} nodes is too small for a spectral embedding.")
    src, tgt = np.asarray(graph["edge_index"], dtype=np.int64).reshape(2, -1)
    w = np.asarray(graph["edge_weight"], dtype=np.float64)
    a = sp.csr_matrix((w, (tgt, src)), shape=(n, n))
    a = ((a + a.T) * 0.5).tocsr()
    deg = np.asarray(a.sum(axis=1)).ravel()
    tau = max(float(deg.mean()), 1e-12)
    inv = 1.0 / np.sqrt(deg + tau)

    def matmat(x):
        x = np.asarray(x).reshape(n, -1) * inv[:, None]
        return inv[:, None] * (a @ x + (tau / n) * x.sum(axis=0, keepdims=True))

    op = LinearOperator(
        (n, n),
        matvec=lambda x: matmat(x).ravel(),
        matmat=matmat,
        rmatvec=lambda x: matmat(x).ravel(),
        dtype=np.float64,
    )
    v0 = np.random.default_rng(seed).random(n)
    vals, vecs = eigsh(op, k=k + 1, which="LA", v0=v0)
    order = np.argsort(-vals)
    vals, vecs = vals[order][1:], vecs[:, order][:, 1:]
    vecs = vecs * np.where(vecs[np.abs(vecs).argmax(axis=0), np.arange(k)] < 0, -1.0, 1.0)  # fixed signs
    return pd.DataFrame(vecs * vals[None, :], index=genes, columns=[f"c{i}" for i in range(k)])


def pca_gene_embedding(pseudobulk: np.ndarray, n_components: int) -> np.ndarray:
    """PCA scores of the genes of a conditions x genes pseudobulk (genes as observations).

    Each condition (column of the genes x conditions matrix) is centred over the genes; the scores
    ``U S`` come from the small conditions x conditions Gram matrix. Returns genes x k, with
    ``k = min(n_components, genes, conditions)``.
    """
    m = pseudobulk.T - pseudobulk.T.mean(axis=0, keepdims=True)
    k = int(min(n_components, *m.shape))
    _, v = np.linalg.eigh(m.T @ m)
    return m @ v[:, ::-1][:, :k]


def bilinear_ridge(
    g: np.ndarray, y: np.ndarray, p: np.ndarray, lam_g: np.ndarray, lam_p: np.ndarray
) -> np.ndarray:
    r"""Closed-form ridge solutions of ``Y - b ~ G W P^T`` for several penalty pairs at once.

    :math:`W = (G^T G + \lambda_G I)^{-1} G^T Y P (P^T P + \lambda_P I)^{-1}` (Ahlmann-Eltze et al.
    2025), computed through the eigendecompositions :math:`G^T G = V_G S_G V_G^T`,
    :math:`P^T P = V_P S_P V_P^T`:
    :math:`W = V_G [(V_G^T G^T Y P V_P) / ((s_G + \lambda_G)(s_P + \lambda_P)^T)] V_P^T`.

    Parameters
    ----------
    g
        Read-out gene embedding, genes x k.
    y
        Centred changes (``Y - b``), genes x conditions.
    p
        Perturbation embedding, conditions x d.
    lam_g, lam_p
        Penalties, one per grid point (same length ``L``).

    Returns
    -------
    ``L x k x d`` array of the ``W``.
    """
    sg, vg = np.linalg.eigh(g.T @ g)
    sp_, vp = np.linalg.eigh(p.T @ p)
    m = vg.T @ (g.T @ y @ p) @ vp
    lam_g, lam_p = np.atleast_1d(lam_g), np.atleast_1d(lam_p)
    denom = (np.maximum(sg, 0)[None, :, None] + lam_g[:, None, None]) * (
        np.maximum(sp_, 0)[None, None, :] + lam_p[:, None, None]
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        rot = np.where(denom > 0, m[None] / denom, 0.0)
    return np.einsum("ik,lkm,jm->lij", vg, rot, vp)


def relative_penalties(g: np.ndarray, p: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Penalties ``alpha * tr(G^T G) / k`` and ``alpha * tr(P^T P) / d``: scale-free ridge strengths."""
    alphas = np.asarray(alphas, dtype=np.float64)
    sg = float((g * g).sum()) / max(g.shape[1], 1)
    spp = float((p * p).sum()) / max(p.shape[1], 1)
    return alphas * sg, alphas * spp
