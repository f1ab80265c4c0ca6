"""The two GEARS gene graphs: GO perturbation graph (Jaccard) and co-expression graph (Pearson)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import COEXPR_GRAPH_KEY, GO_ANNOTATIONS_KEY, GO_GRAPH_KEY, SPLIT_KEY
from .._utils import check_overwrite, get_adata, get_matrix, logger
from ._perturbations import layer_of

#: number of values held in memory at once (one dense block of cells for the covariance, and its float32 product;
#: at most this many similarities): 8 MiB of float32 (16 MiB measured as fast and 23 MiB higher peak)
_CHUNK_ELEMENTS = 2**21
#: similarities of a chunk of rows (Jaccard float32; correlations are computed in place): 2 MiB, which the
#: allocator reuses chunk after chunk (fresh pages cost more than the arithmetic here)
_SIMILARITY_ELEMENTS = 2**19
#: values per ``argpartition`` call of the top-k selection (its index array: 2 MiB)
_TOPK_ELEMENTS = 2**18
#: sparse inputs sparser than this (on 2 cores; less on more cores) take the sparse Gram product
_SPARSE_DENSITY = 0.05
#: minimum width of the gene strips of the dense Gram product (strips only where a genes x genes float32 product
#: would not fit in one block of ``_CHUNK_ELEMENTS`` values)
_STRIP_GENES = 512


def _top_neighbors(sim: np.ndarray, start: int, k: int, threshold: float) -> tuple[np.ndarray, ...]:
    """Top-``k`` columns of each row of a similarity chunk whose rows are nodes ``start ...``.

    The node itself and values ``<= threshold`` (or non-finite) are left out. Returns
    ``(source, target, weight)`` sorted by target, then by decreasing weight.
    """
    rows = np.arange(sim.shape[0])
    sim[rows, start + rows] = -np.inf
    k = min(k, sim.shape[1] - 1)
    if k <= 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    np.negative(sim, out=sim)  # in place (the chunk is a scratch array): no copy for argpartition
    idx = np.empty((sim.shape[0], k), dtype=np.intp)
    step = max(1, _TOPK_ELEMENTS // sim.shape[1])
    # a few rows at a time (no full-size index array); each row's selection is the same as in one call
    for r0 in range(0, sim.shape[0], step):
        idx[r0 : r0 + step] = np.argpartition(sim[r0 : r0 + step], k - 1, axis=1)[:, :k]
    val = -np.take_along_axis(sim, idx, axis=1)
    order = np.argsort(-val, axis=1, kind="stable")
    idx, val = np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1)
    keep = np.isfinite(val) & (val > threshold)
    target = np.broadcast_to((start + rows)[:, None], idx.shape)[keep]
    return idx[keep].astype(np.int64), target.astype(np.int64), val[keep].astype(np.float32)


def _graph(genes, parts: list[tuple[np.ndarray, ...]], params: dict) -> dict:
    src, dst, w = (np.concatenate(p) for p in zip(*parts, strict=True))
    return {
        "genes": np.asarray(genes, dtype=object),
        "edge_index": np.stack([src, dst]).astype(np.int64),
        "edge_weight": w.astype(np.float32),
        "params": params,
    }


def _check_k(n_neighbors: int) -> None:
    if int(n_neighbors) != n_neighbors or n_neighbors < 1:
        raise ValueError(f"`n_neighbors` must be a positive integer, got {n_neighbors!r}.")


def _annotations(adata: AnnData | None, annotations: pd.DataFrame | None) -> tuple[pd.DataFrame, str]:
    """The annotation table to use and where it came from."""
    if annotations is not None:
        return annotations, "annotations"
    if adata is not None and GO_ANNOTATIONS_KEY in adata.uns:
        return adata.uns[GO_ANNOTATIONS_KEY], f"adata.uns[{GO_ANNOTATIONS_KEY!r}]"
    try:
        from ..datasets import go_annotations
    except ImportError as err:
        raise ValueError(
            "No GO annotations: pass `annotations=` (a DataFrame with columns 'gene' and 'go_id') or store "
            f"them in adata.uns[{GO_ANNOTATIONS_KEY!r}]; pg.datasets.go_annotations() is not available."
        ) from err
    logger.info("Using the bundled GO annotations of pg.datasets.go_annotations().")
    return go_annotations(), "pg.datasets.go_annotations()"


def go_graph(
    adata: AnnData | None = None,
    *,
    annotations: pd.DataFrame | None = None,
    n_neighbors: int = 20,
    threshold: float = 0.0,
    key_added: str = GO_GRAPH_KEY,
    overwrite: bool = False,
    modality: str | None = None,
) -> dict:
    """GEARS perturbation graph: genes linked by the Jaccard index of their GO-term sets.

    For genes ``u, v`` with GO-term sets ``N_u, N_v``, ``J = |N_u & N_v| / |N_u | N_v|``. Each gene
    keeps its ``n_neighbors`` most similar other genes (``J > threshold``) as incoming edges. Nodes
    are every annotated gene (sorted), so genes never perturbed in training, and genes outside
    ``var_names``, can still be perturbed. Computed with a sparse gene x term matrix ``A``:
    intersections ``A @ A.T`` in row chunks, unions from row sums, top-k by ``argpartition``;
    seconds for all ~20,000 annotated human genes.

    Parameters
    ----------
    adata
        Optional AnnData (or MuData with ``modality``): the graph is stored in ``adata.uns`` and
        annotations are taken from ``adata.uns['pg_go_annotations']`` when ``annotations`` is not given.
    annotations
        DataFrame with columns ``'gene'`` (or ``'symbol'``) and ``'go_id'``, one row per annotation.
        Default: ``adata.uns['pg_go_annotations']`` if present (the simulator writes it), else
        :func:`pertpy_gnn.datasets.go_annotations`.
    n_neighbors
        Neighbours kept per gene (GEARS: ``H_pert = 20``).
    threshold
        Keep only edges with ``J > threshold``. The published GEARS code drops ``J <= 0.1`` before
        taking the top neighbours (``threshold=0.1``); the paper does not.
    key_added
        Key in ``adata.uns``.
    overwrite
        Replace an existing graph under ``key_added``.
    modality
        Modality of a MuData.

    Returns
    -------
    The graph, a dict with

    ``genes``
        Node names (object array of str).
    ``edge_index``
        int64 array ``(2, E)``: row 0 the neighbour (source), row 1 the gene (target).
    ``edge_weight``
        float32 array ``(E,)``: the Jaccard index.
    ``params``
        ``n_neighbors``, ``threshold``, ``n_terms``, ``source`` of the annotations.

    If ``adata`` is given, the same dict is stored in ``adata.uns['pg_go_graph']`` (h5ad-writable).

    Notes
    -----
    Self-loops are not included (the reference code keeps each gene as its own top neighbour with
    ``J = 1``); graph convolutions such as SGC and GCN add self-loops themselves.
    """
    _check_k(n_neighbors)
    if adata is not None:
        adata = get_adata(adata, modality)
        check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    table, source = _annotations(adata, annotations)
    if not isinstance(table, pd.DataFrame):
        raise TypeError(
            f"GO annotations must be a DataFrame with columns 'gene' and 'go_id', got {type(table).__name__}."
        )
    gene_col = "gene" if "gene" in table else "symbol"
    if gene_col not in table or "go_id" not in table:
        raise ValueError(
            f"GO annotations need columns 'gene' and 'go_id'; got {list(table.columns)}. "
            "Rename them, e.g. annotations.rename(columns={'symbol': 'gene', 'GO': 'go_id'})."
        )
    table = table[[gene_col, "go_id"]].dropna().astype(str).drop_duplicates()
    if table.empty:
        raise ValueError("The GO annotation table is empty.")
    gi, genes = pd.factorize(table[gene_col], sort=True)
    ti, terms = pd.factorize(table["go_id"], sort=True)
    a = sp.csr_matrix((np.ones(gi.size, dtype=np.float32), (gi, ti)), shape=(genes.size, terms.size))
    at = a.T.tocsr()
    n_terms = np.asarray(a.sum(axis=1), dtype=np.float32).ravel()
    chunk = max(1, min(_CHUNK_ELEMENTS, _SIMILARITY_ELEMENTS) // genes.size)
    parts = []
    for start in range(0, genes.size, chunk):
        inter = (a[start : start + chunk] @ at).toarray()
        union = np.add.outer(n_terms[start : start + chunk], n_terms)
        union -= inter
        jac = np.divide(inter, union, out=inter)  # in place: one scratch array besides the union
        del union
        parts.append(_top_neighbors(jac, start, int(n_neighbors), threshold))
    params = {
        "n_neighbors": int(n_neighbors),
        "threshold": float(threshold),
        "n_terms": int(terms.size),
        "source": source,
    }
    graph = _graph(genes, parts, params)
    logger.info("GO graph: %d genes, %d terms, %d edges.", genes.size, terms.size, graph["edge_weight"].size)
    if adata is not None:
        adata.uns[key_added] = graph
    return graph


def _train_mask(adata: AnnData, split_key: str | None) -> tuple[np.ndarray, str]:
    if split_key is None or split_key not in adata.obs:
        logger.warning(
            "obs[%r] not found: the co-expression graph uses all cells. Run pg.pp.split_perturbations first "
            "so that it uses the training cells only, as in GEARS.",
            split_key,
        )
        return np.ones(adata.n_obs, dtype=bool), "all cells"
    mask = (adata.obs[split_key].astype(str) == "train").to_numpy()
    if mask.sum() < 2:
        raise ValueError(
            f"obs[{split_key!r}] marks {int(mask.sum())} cells as 'train'; at least 2 are needed. "
            "Check the split (pg.pp.split_perturbations) or pass `split_key=` naming the split column."
        )
    return mask, f"obs[{split_key!r}] == 'train'"


def _use_sparse_gram(x) -> bool:
    """Whether the (single-threaded) sparse Gram product beats dense BLAS blocks: very sparse data, few cores."""
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sp.issparse(x) and x.nnz < _SPARSE_DENSITY * np.sqrt(2 / n_cpu) * x.shape[0] * x.shape[1]


def _gene_strips(g: int) -> np.ndarray:
    """Bounds of the gene strips of the dense Gram product.

    One strip if the ``g x g`` float32 product fits in a block (``_CHUNK_ELEMENTS`` values), else as
    few strips as keep each strip's product within a block, none narrower than ``_STRIP_GENES``.
    """
    n = -(-g * g // _CHUNK_ELEMENTS)
    return np.linspace(0, g, max(1, min(n, g // _STRIP_GENES)) + 1).astype(int)


def _covariance(x, rows: np.ndarray | None = None) -> np.ndarray:
    """Covariance matrix (float64, genes x genes) of the rows ``rows`` (default all) of ``x`` (sparse or dense).

    Working memory beyond the ``genes x genes`` result is about two blocks of cells
    (``_CHUNK_ELEMENTS`` float32 values): the rows are gathered block by block (no copy of the
    selected cells). One pass: each dense float32 block is centred on the first block's mean and its
    symmetric product (BLAS ``syrk``, half the flops of a general product) accumulated in float64 with
    the column sums; the exact centring on the mean of all rows is a rank-one correction at the end.
    """
    if sp.issparse(x) and x.format != "csr":
        x = sp.csr_matrix(x)
    n = x.shape[0] if rows is None else rows.size
    if _use_sparse_gram(x):
        xs = (x if rows is None else x[rows]).astype(np.float64)
        mean = np.asarray(xs.sum(axis=0)).ravel() / n
        gram = (xs.T @ xs).toarray()
        del xs
        gram -= n * np.outer(mean, mean)
        gram /= n - 1
        return gram
    g = x.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // g)
    gram = np.zeros((g, g), dtype=np.float64)
    total = np.zeros(g, dtype=np.float64)
    shift = None  # float32 mean of the first block: every block is centred on it
    bounds = _gene_strips(g)
    densify = sp.issparse(x) and x.dtype == np.float32  # into one reused buffer, centred in place
    dense = np.empty((min(chunk, n), g), dtype=np.float32) if densify else None
    prod = np.empty(int(np.diff(bounds).max()) * g, dtype=np.float32)  # products of a strip, reused
    for start in range(0, n, chunk):
        block = x[start : start + chunk] if rows is None else x[rows[start : start + chunk]]
        if densify:
            block = block.toarray(out=dense[: block.shape[0]])
        elif sp.issparse(block):
            block = block.toarray()
        block = np.asarray(block)
        total += block.sum(axis=0, dtype=np.float64)
        if shift is None:
            shift = (total / block.shape[0]).astype(np.float32)
        if densify:
            block -= shift
        else:  # a new array: x is never written
            block = np.subtract(block, shift, dtype=np.float32)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):  # upper triangle by row strips
            strip = block[:, lo:hi]
            diag = np.matmul(strip.T, strip, out=prod[: (hi - lo) ** 2].reshape(hi - lo, hi - lo))  # syrk
            gram[lo:hi, lo:hi] += diag
            if hi < g:
                off = np.matmul(
                    strip.T, block[:, hi:], out=prod[: (hi - lo) * (g - hi)].reshape(hi - lo, g - hi)
                )
                gram[lo:hi, hi:] += off
    for lo, hi in zip(bounds[1:-1], bounds[2:], strict=True):  # lower triangle from the upper one, in place
        gram[lo:hi, :lo] = gram[:lo, lo:hi].T
    d = total / n - shift  # the mean of all rows, less the centre used
    step = max(1, _SIMILARITY_ELEMENTS // g)
    for lo in range(0, g, step):  # gram -= n d d^T, a few rows at a time (no genes x genes temporary)
        part = np.multiply.outer(d[lo : lo + step], d)
        part *= n
        gram[lo : lo + step] -= part
    gram /= n - 1
    return gram


def coexpression_graph(
    adata: AnnData,
    *,
    n_neighbors: int = 20,
    threshold: float = 0.4,
    split_key: str | None = SPLIT_KEY,
    layer: str | None = None,
    absolute: bool = False,
    key_added: str = COEXPR_GRAPH_KEY,
    overwrite: bool = False,
    modality: str | None = None,
) -> dict:
    """GEARS gene co-expression graph: Pearson correlation between genes over the training cells.

    Each gene keeps its ``n_neighbors`` most correlated other genes with ``r > threshold`` as
    incoming edges, weighted by ``r``. Correlations are computed on the cells with
    ``obs[split_key] == 'train'`` (control cells included), vectorized: the centred Gram matrix
    ``X.T @ X - n mean mean^T`` (sparse product for very sparse data, dense float32 blocks of
    cells accumulated in float64 otherwise). Genes constant over the training cells get no edges.

    Parameters
    ----------
    adata
        AnnData (or MuData with ``modality``) of log-normalized expression.
    n_neighbors
        Neighbours kept per gene (``H_gene``; GEARS default 20).
    threshold
        Keep only edges with correlation above it (``delta``; default 0.4).
    split_key
        ``obs`` column of :func:`pertpy_gnn.pp.split_perturbations`; only its ``'train'`` cells are
        used. If the column is absent, all cells are used with a warning.
    layer
        Expression layer; by default the one recorded by ``parse_perturbations`` (``X`` if unparsed).
    absolute
        Rank and weight edges by ``|r|`` (the published GEARS code) instead of ``r`` (the paper).
    key_added
        Key in ``adata.uns``.
    overwrite
        Replace an existing graph under ``key_added``.
    modality
        Modality of a MuData.

    Returns
    -------
    The graph, a dict of the form of :func:`go_graph` (``genes`` = ``var_names``, ``edge_index``
    (2, E) int64 neighbour -> gene, ``edge_weight`` float32 correlation, ``params``), also stored
    in ``adata.uns['pg_coexpression_graph']``.

    Notes
    -----
    The published GEARS code correlates the control and single-perturbation training cells only
    and keeps self-loops; here every training cell is used and self-loops are left to the GNN.
    """
    adata = get_adata(adata, modality)
    _check_k(n_neighbors)
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    layer = layer_of(adata) if layer is None else layer
    x = get_matrix(adata, layer)
    mask, cells = _train_mask(adata, split_key)
    n = int(mask.sum())
    cov = _covariance(x, None if mask.all() else np.flatnonzero(mask))
    var = np.diag(cov).copy()
    constant = var <= 1e-12 * max(1.0, float(var.max(initial=0.0)))
    if constant.any():
        logger.info("%d genes are constant over the %d training cells and get no edges.", constant.sum(), n)
    inv = np.where(constant, 0.0, 1.0 / np.sqrt(np.where(constant, 1.0, var)))
    chunk = max(1, min(_CHUNK_ELEMENTS, _SIMILARITY_ELEMENTS) // cov.shape[0])
    parts = []
    for start in range(0, cov.shape[0], chunk):  # correlations in place of the covariances (a scratch array)
        r = cov[start : start + chunk]
        r *= inv[start : start + chunk, None]
        r *= inv[None, :]
        np.clip(r, -1, 1, out=r)
        if absolute:
            np.abs(r, out=r)
        r[:, constant] = -np.inf
        r[constant[start : start + chunk]] = -np.inf
        parts.append(_top_neighbors(r, start, int(n_neighbors), threshold))
    params = {
        "n_neighbors": int(n_neighbors),
        "threshold": float(threshold),
        "absolute": bool(absolute),
        "cells": cells,
        "n_cells": n,
        "layer": "X" if layer is None else layer,
    }
    graph = _graph(adata.var_names.to_numpy(), parts, params)
    if graph["edge_weight"].size == 0:
        logger.warning(
            "No gene pair has a correlation above %s: the co-expression graph is empty. Lower `threshold`.",
            threshold,
        )
    logger.info(
        "Co-expression graph: %d genes, %d edges from %d cells.", cov.shape[0], graph["edge_weight"].size, n
    )
    adata.uns[key_added] = graph
    return graph


def graph_tensors(graph: dict, *, genes: Iterable[str] | None = None):
    """A graph dict of :func:`go_graph` / :func:`coexpression_graph` as torch tensors.

    Parameters
    ----------
    graph
        The graph dict (e.g. ``adata.uns['pg_go_graph']``).
    genes
        Optional node order: edges are re-indexed onto these genes; edges touching genes not in
        ``genes`` are dropped and genes absent from the graph become isolated nodes (e.g. perturbed
        genes without GO annotation).

    Returns
    -------
    ``(edge_index, edge_weight, genes)``: LongTensor ``(2, E)`` (row 0 source, row 1 target),
    FloatTensor ``(E,)`` and the node names (ndarray of str) the indices refer to.
    """
    import torch

    names = np.asarray(graph["genes"]).astype(str)
    edge_index = np.asarray(graph["edge_index"], dtype=np.int64).reshape(2, -1)
    weight = np.asarray(graph["edge_weight"], dtype=np.float32)
    if genes is not None:
        order = pd.Index(np.asarray(list(genes)).astype(str))
        if order.has_duplicates:
            raise ValueError(f"`genes` has duplicates: {order[order.duplicated()].unique()[:10].tolist()}.")
        new = order.get_indexer(names)[edge_index]
        keep = (new >= 0).all(axis=0)
        edge_index, weight, names = new[:, keep], weight[keep], order.to_numpy()
    return torch.from_numpy(np.ascontiguousarray(edge_index)), torch.from_numpy(weight), names
