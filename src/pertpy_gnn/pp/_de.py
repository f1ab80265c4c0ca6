"""Differentially expressed genes of every perturbation versus control, vectorized."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import DE_KEY
from .._utils import check_overwrite, get_adata, get_matrix, group_sums, logger
from ._perturbations import Groups, get_parsed, layer_of


def group_moments(x, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group cell counts, means and unbiased variances of the rows of ``x``.

    ``codes`` holds a group index per row; rows with ``-1`` are ignored. Sums and sums of squares
    are accumulated in float64 in one pass, block by block (:func:`~pertpy_gnn._utils.group_sums`:
    no float64 copy of ``x``).
    """
    chunk = 1 << 21 if sp.issparse(x) else 1 << 22
    n, s1, s2 = group_sums(x, codes, n_groups, squares=True, chunk_elements=chunk)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n[:, None]
        var = (s2 - n[:, None] * mean**2) / (n[:, None] - 1)
    return n, mean, np.maximum(var, 0)


def _top_by_magnitude(t: np.ndarray, n: int) -> np.ndarray:
    """Columns of the ``n`` largest ``|t|`` of each row, largest first, ties by column.

    The first ``n`` columns of a stable argsort of ``-|t|``, from a partition and a sort of the few
    candidates (the values reaching the ``n``-th).
    """
    key = -np.abs(t)
    if n == 0 or n >= key.shape[1] or key.shape[0] == 0:
        return np.argsort(key, axis=1, kind="stable")[:, :n]
    nth = np.partition(key, n - 1, axis=1)[:, n - 1 : n]
    rows, cols = np.nonzero(key <= nth)  # at least n per row (more with ties at the n-th), by column
    cand = np.lexsort((key[rows, cols], rows))  # stable: by row, then value, then column
    first = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=key.shape[0]))[:-1]])
    return cols[cand][first[:, None] + np.arange(n)]


def rank_de_genes(
    data,
    *,
    n_genes: int = 20,
    layer: str | None = None,
    key_added: str = DE_KEY,
    overwrite: bool = False,
    modality: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Top differentially expressed genes of every perturbation versus control cells.

    Welch's t-test per gene (the score of :func:`scanpy.tl.rank_genes_groups` with
    ``method='t-test'``), genes ranked by the absolute score as in GEARS. Computed for all
    perturbations at once with sparse group sums: seconds for 90,000 cells x 5,000 genes.

    Parameters
    ----------
    data
        AnnData parsed by :func:`pertpy_gnn.pp.parse_perturbations`, or a MuData with ``modality``.
    n_genes
        Number of top genes kept per perturbation (GEARS uses 20).
    layer
        Expression layer; by default the one recorded by ``parse_perturbations``.
    key_added
        Key in ``adata.uns``.
    overwrite
        Replace an existing result under ``key_added``.
    modality
        Modality of a MuData.
    copy
        Return a copy instead of writing into ``data``.

    Returns
    -------
    ``None`` or a copy if ``copy=True``. Sets ``adata.uns['pg_de_genes']``, a dict with

    ``names``
        DataFrame, one row per perturbation, columns ``0 .. n_genes-1``: gene names by rank. With
        contexts (``parse_perturbations(..., context_key=)``) one row per (context, perturbation)
        group, labelled ``'context|perturbation'``, each against the control cells of its context.
    ``indices``
        Same shape, integer positions of those genes in ``var_names``.
    ``scores``
        Same shape, t-statistics (signed).
    ``params``
        ``n_genes``, ``layer``, ``method``.
    """
    adata = get_adata(data, modality)
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    get_parsed(adata)  # clear error if not parsed, before any work
    adata = adata.copy() if copy else adata

    layer = layer_of(adata) if layer is None else layer
    x = get_matrix(adata, layer)
    n_genes = int(min(n_genes, adata.n_vars))
    groups = Groups(adata)
    n, mean, var = group_moments(x, groups.codes, len(groups))
    n_control = n[groups.control[groups.is_control]] if groups.is_control.any() else np.zeros(1)
    if (n_control < 2).any():
        where = [
            groups.labels[i]
            for i in np.flatnonzero(groups.is_control)[n_control[: groups.is_control.sum()] < 2]
        ]
        raise ValueError(
            f"{int(n_control.min())} control cells ({where[:5]}): at least 2 are needed to rank DE genes against "
            "control. Keep the control cells when subsetting (they define the reference)."
        )
    perts = np.flatnonzero(~groups.is_control & (n > 0))
    too_small = [groups.labels[i] for i in perts if n[i] < 2]
    if too_small:
        logger.warning("Perturbations with a single cell get a variance of 0: %s", too_small[:10])
    c = groups.control[perts]  # each group against the control cells of its context
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(np.nan_to_num(var[perts] / n[perts, None]) + np.nan_to_num(var[c] / n[c, None]))
        t = (mean[perts] - mean[c]) / se
    t = np.where(np.isfinite(t), t, 0.0)
    order = _top_by_magnitude(t, n_genes)
    scores = np.take_along_axis(t, order, axis=1)
    index = [groups.labels[i] for i in perts]
    names = np.asarray(adata.var_names)[order]
    adata.uns[key_added] = {
        "names": pd.DataFrame(names, index=index, columns=[str(i) for i in range(n_genes)]),
        "indices": pd.DataFrame(
            order.astype(np.int64), index=index, columns=[str(i) for i in range(n_genes)]
        ),
        "scores": pd.DataFrame(
            scores.astype(np.float32), index=index, columns=[str(i) for i in range(n_genes)]
        ),
        "params": {"n_genes": n_genes, "layer": "X" if layer is None else layer, "method": "t-test (Welch)"},
    }
    return adata if copy else None
