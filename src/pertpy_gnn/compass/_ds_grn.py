"""Gene regulatory network from GeneCompass gene embeddings, and its AUPRC against a reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import COMPASS_GENE_KEY, COMPASS_GRN_KEY
from .._utils import check_overwrite, get_adata, logger


def _unit_embeddings(
    adata: AnnData, embedding_key: str, center: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm rows of ``varm[embedding_key]`` (optionally centered first) and which genes have an embedding."""
    if embedding_key not in adata.varm:
        raise KeyError(
            f"adata.varm[{embedding_key!r}] not found: compute the gene embeddings first with "
            "pg.tl.embed_compass(adata, model), or pass `embedding_key=`."
        )
    e = np.asarray(adata.varm[embedding_key], dtype=np.float64)
    ok = np.isfinite(e).all(1)
    if center and ok.any():
        e = e - e[ok].mean(0)
    norm = np.linalg.norm(np.nan_to_num(e), axis=1)
    ok &= norm > 0
    u = np.zeros_like(e)
    u[ok] = e[ok] / norm[ok, None]
    return u, ok


def _names(adata: AnnData, gene_symbols: str | None) -> pd.Index:
    if gene_symbols is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_symbols not in adata.var:
        raise KeyError(f"var column {gene_symbols!r} not found; available: {list(adata.var.columns)}.")
    return pd.Index(adata.var[gene_symbols].astype(str))


def compass_grn(
    adata: AnnData,
    *,
    embedding_key: str = COMPASS_GENE_KEY,
    threshold: float = 0.4,
    center: bool = False,
    block_size: int = 2048,
    key_added: str = COMPASS_GRN_KEY,
    overwrite: bool = False,
    modality: str | None = None,
) -> None:
    """Gene-gene network: cosine similarity of GeneCompass gene embeddings above a threshold.

    As in the paper's GRN task: ``cos(x_i, x_j) = x_i . x_j / (|x_i| |x_j|)`` of the static gene
    embeddings, and a pair is connected when it exceeds ``threshold`` (paper: 0.4). Computed in
    blocks of genes, so no dense genes x genes matrix is held.

    Parameters
    ----------
    adata
        AnnData with gene embeddings in ``varm`` (:func:`pertpy_gnn.tl.embed_compass`), or a MuData
        with ``modality``.
    embedding_key
        ``varm`` key of the gene embeddings (rows with ``NaN`` get no edges).
    threshold
        Minimum cosine similarity of an edge.
    center
        Subtract the mean gene embedding before the cosine (the paper does not). A component shared by
        all genes, strong in small or briefly trained models, otherwise makes every pair similar.
    block_size
        Genes per block.
    key_added
        ``varp`` and ``uns`` key.
    overwrite
        Replace an existing result.
    modality
        MuData modality.

    Returns
    -------
    ``None``. Sets ``adata.varp[key_added]``: symmetric ``n_vars x n_vars`` CSR matrix (float32)
    holding the cosine similarity of every pair above ``threshold`` (diagonal empty), and
    ``adata.uns[key_added]``: a dict with ``threshold``, ``embedding_key``, ``center``, ``n_edges``
    (undirected) and ``n_genes`` (genes with an embedding).
    """
    adata = get_adata(adata, modality)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}.")
    check_overwrite(adata.varp, key_added, overwrite, "adata.varp")
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    u, ok = _unit_embeddings(adata, embedding_key, center)
    idx = np.flatnonzero(ok)
    ue = u[idx]
    rows, cols, vals = [], [], []
    for start in range(0, idx.size, block_size):
        s = ue[start : start + block_size] @ ue.T
        i, j = np.nonzero(s > threshold)
        keep = (i + start) != j
        rows.append(idx[i[keep] + start])
        cols.append(idx[j[keep]])
        vals.append(s[i[keep], j[keep]])
    n = adata.n_vars
    adj = (
        sp.csr_matrix(
            (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
            shape=(n, n),
        )
        if rows
        else sp.csr_matrix((n, n), dtype=np.float32)
    )
    adj = ((adj + adj.T) * 0.5).tocsr()  # exact symmetry despite rounding of the two products
    adj.sort_indices()
    adata.varp[key_added] = adj.astype(np.float32)
    adata.uns[key_added] = {
        "threshold": float(threshold),
        "embedding_key": embedding_key,
        "center": bool(center),
        "n_edges": int(adj.nnz // 2),
        "n_genes": int(ok.sum()),
    }
    logger.info(
        "GeneCompass GRN: %d edges among %d genes (cosine > %.2f)", adj.nnz // 2, int(ok.sum()), threshold
    )


def grn_auprc(
    adata: AnnData,
    reference: pd.DataFrame,
    *,
    embedding_key: str = COMPASS_GENE_KEY,
    threshold: float = 0.4,
    center: bool = False,
    exclude: pd.DataFrame | None = None,
    gene_symbols: str | None = None,
    modality: str | None = None,
) -> dict:
    """AUPRC of gene-embedding similarity against a reference TF -> target network.

    Candidate edges are every (TF, gene) pair with the TF among the reference's TFs, both genes
    embedded, TF != gene, and the pair not in ``exclude`` (e.g. the edges given to pre-training as
    the GRN prior, so that only held-out edges are scored). Each candidate is scored by the cosine
    similarity of the two gene embeddings; positives are the reference edges. AUPRC is the average
    precision (:func:`sklearn.metrics.average_precision_score`); a random scorer's AUPRC is the
    positive fraction.

    Parameters
    ----------
    adata
        AnnData with gene embeddings in ``varm[embedding_key]``.
    reference
        TF -> target edges: the first two columns are TF and target (e.g.
        :func:`pertpy_gnn.pp.trrust_edges`).
    embedding_key
        ``varm`` key of the gene embeddings.
    threshold
        Similarity threshold at which precision and recall of the thresholded network are reported.
    center
        Center the embeddings first (see :func:`compass_grn`).
    exclude
        Edges (first two columns TF, target) left out of the candidates.
    gene_symbols
        ``var`` column with the gene names used in ``reference`` (default ``var_names``).
    modality
        MuData modality.

    Returns
    -------
    Dict with ``auprc``, ``random_auprc`` (positive fraction), ``auprc_ratio``, ``n_tfs``,
    ``n_candidates``, ``n_positives``, and at ``threshold``: ``precision``, ``recall``,
    ``n_predicted``.
    """
    from sklearn.metrics import average_precision_score

    adata = get_adata(adata, modality)
    u, ok = _unit_embeddings(adata, embedding_key, center)
    names = _names(adata, gene_symbols).str.upper()
    pos = pd.Series(np.arange(len(names)), index=names)
    pos = pos[~pos.index.duplicated()]

    def _pairs(df: pd.DataFrame) -> pd.DataFrame:
        if df.shape[1] < 2:
            raise ValueError("An edge table needs two columns: TF and target.")
        a = pos.reindex(df.iloc[:, 0].astype(str).str.upper()).to_numpy()
        b = pos.reindex(df.iloc[:, 1].astype(str).str.upper()).to_numpy()
        keep = ~(np.isnan(a) | np.isnan(b))
        return pd.DataFrame(
            {"tf": a[keep].astype(np.int64), "target": b[keep].astype(np.int64)}
        ).drop_duplicates()

    ref = _pairs(reference)
    ref = ref[ok[ref["tf"]] & ok[ref["target"]] & (ref["tf"] != ref["target"])]
    tfs = np.unique(ref["tf"].to_numpy())
    if tfs.size == 0:
        raise ValueError(
            "No reference edge has both genes embedded in adata: check gene names (`gene_symbols=`) and the embeddings."
        )
    genes = np.flatnonzero(ok)
    score = u[tfs] @ u[genes].T  # (n_tfs, n_genes)
    cand = np.ones_like(score, dtype=bool)
    cand[tfs[:, None] == genes[None, :]] = False
    col = pd.Series(np.arange(genes.size), index=genes)
    row = pd.Series(np.arange(tfs.size), index=tfs)
    if exclude is not None:
        ex = _pairs(exclude)
        ex = ex[ex["tf"].isin(tfs) & ex["target"].isin(genes)]
        cand[row[ex["tf"]].to_numpy(), col[ex["target"]].to_numpy()] = False
    label = np.zeros_like(cand)
    label[row[ref["tf"]].to_numpy(), col[ref["target"]].to_numpy()] = True
    label &= cand
    y, s = label[cand], score[cand]
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("Every reference edge is excluded: nothing to score. Check `exclude=`.")
    ap = float(average_precision_score(y, s))
    rand = n_pos / y.size
    pred = s > threshold
    return {
        "auprc": ap,
        "random_auprc": float(rand),
        "auprc_ratio": float(ap / rand),
        "n_tfs": int(tfs.size),
        "n_candidates": int(y.size),
        "n_positives": n_pos,
        "precision": float(y[pred].mean()) if pred.any() else float("nan"),
        "recall": float(y[pred].sum() / n_pos),
        "n_predicted": int(pred.sum()),
        "threshold": float(threshold),
    }
