"""GeneCompass cell and gene embeddings of an AnnData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import COMPASS_CELL_KEY, COMPASS_GENE_KEY
from .._utils import check_overwrite, get_adata, logger
from ._ds_core import (
    batches,
    cell_states,
    check_cell_embedding,
    check_model,
    encode,
    select_cells,
    tokenize_kwargs,
    tokenized,
)


def _embed(
    adata: AnnData,
    model,
    *,
    cells,
    batch_size: int,
    progress_bar: bool,
    tok: dict,
    genes: bool = True,
    cell_embedding: str = "species",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Cell embeddings of ``cells`` and the static embedding of each ``var`` (mean token state over cells).

    Returns ``(cell_emb (n_cells, d), gene_emb (n_vars, d) or None, n_cells_per_var or None)``.
    """
    import torch

    from ..pp._compass_vocab import var_tokens

    module, vocab = check_model(model)
    rows = np.arange(adata.n_obs) if cells is None else select_cells(adata, cells, "cells")
    sub = adata if cells is None else adata[rows]
    d = module.d_model
    var_ids = None
    if genes:
        var_ids, _ = var_tokens(
            sub,
            vocab,
            species=tok.get("species"),
            gene_symbols=tok.get("gene_symbols"),
            gene_ids=tok.get("gene_ids"),
        )
        used = np.unique(var_ids[var_ids >= 0])
        slot = torch.full((len(vocab),), -1, dtype=torch.long)
        slot[torch.from_numpy(used)] = torch.arange(used.size)
        sums = torch.zeros(used.size, d, dtype=torch.float64)
        counts = torch.zeros(used.size, dtype=torch.float64)
    was_training = module.training
    module.eval()
    out = []
    try:
        with (
            tokenized(sub, model, max_len=module.seq_len - 1, tok=tok, progress_bar=progress_bar) as corpus,
            torch.inference_mode(),
        ):
            for sl in batches(
                len(corpus), batch_size, progress_bar=progress_bar, desc="GeneCompass embeddings"
            ):
                ids, values = corpus.read(np.arange(sl.start, sl.stop))
                h = encode(module, ids.astype(np.int64), values.astype(np.float32))
                out.append(cell_states(h, ids.astype(np.int64), cell_embedding).cpu().numpy())
                if genes:
                    s = slot[torch.from_numpy(ids.astype(np.int64))].to(h.device)
                    m = s >= 0
                    sums.index_add_(0, s[m].cpu(), h[m].double().cpu())
                    counts.index_add_(0, s[m].cpu(), torch.ones(int(m.sum()), dtype=torch.float64))
    finally:
        module.train(was_training)
    cell = np.concatenate(out).astype(np.float32) if out else np.zeros((0, d), np.float32)
    if not genes:
        return cell, None, None
    with np.errstate(invalid="ignore", divide="ignore"):
        tok_emb = (sums / counts[:, None]).numpy().astype(np.float32)
    gene = np.full((adata.n_vars, d), np.nan, dtype=np.float32)
    n = np.zeros(adata.n_vars, dtype=np.int64)
    mapped = var_ids >= 0
    idx = slot[torch.from_numpy(var_ids[mapped])].numpy()
    gene[mapped] = tok_emb[idx]
    n[mapped] = counts.numpy()[idx].astype(np.int64)
    return cell, gene, n


def embed_compass(
    adata: AnnData,
    model,
    *,
    cells=None,
    genes: bool = True,
    species: str | None = None,
    input_kind: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    gene_medians=None,
    cell_embedding: str = "species",
    batch_size: int = 32,
    key_added: str = COMPASS_CELL_KEY,
    gene_key_added: str = COMPASS_GENE_KEY,
    overwrite: bool = False,
    progress_bar: bool = True,
    modality: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Cell and static gene embeddings of a pre-trained GeneCompass.

    Each cell is tokenized as in pre-training (:func:`pertpy_gnn.pp.compass_tokenize`, top
    ``seq_len - 1`` genes) and run through the encoder in batches. The cell embedding is the species
    token's last-layer state (paper, "Cell and gene embedding") or, with ``cell_embedding='mean'``,
    the mean state of the cell's gene tokens; the static embedding of a gene is its token's
    last-layer state averaged over the cells where it is among the tokens.

    Parameters
    ----------
    adata
        AnnData (or MuData with ``modality``) with genes in ``var``.
    model
        Pre-trained :class:`~pertpy_gnn.compass.GeneCompass`.
    cells
        Cells to embed (mask, positions, names, ``(column, values)``); default all. Gene embeddings
        average over these cells only.
    genes
        Also compute the static gene embeddings.
    species, input_kind, layer, gene_symbols, gene_ids
        How to tokenize ``adata`` (see :func:`pertpy_gnn.pp.compass_tokenize`): ``input_kind='log1p'``
        for log-normalized ``X`` (e.g. ``pbmc68k_reduced().raw`` or the Norman subset).
        ``input_kind=None``: the model's own convention, ``'counts'`` for a model of ours and the
        published preprocessing (raw counts divided by the gene medians, no per-cell scaling) for
        one from :meth:`~pertpy_gnn.compass.GeneCompass.load_official`. Gene symbols and Ensembl ids
        both map for a published model (through its id-to-symbol dictionary); genes that do not map
        are counted in the log.
    gene_medians
        Corpus medians of the pre-training corpus (a Series by token name, or the
        :class:`~pertpy_gnn.compass.CompassCorpus`) so that values match pre-training; default those
        stored on the model (``model.gene_medians_``) if any, else this data's medians.
    cell_embedding
        ``'species'`` (the species token's state, as in the paper) or ``'mean'`` (mean of the gene
        tokens' states). Masked-token pre-training never asks the species token to summarize the
        cell, so a small or briefly trained model can give every cell nearly the same species state;
        ``'mean'`` is then the more informative choice (see the GeneCompass tutorial).
    batch_size
        Cells per forward pass.
    key_added
        ``obsm`` key of the cell embeddings.
    gene_key_added
        ``varm`` key of the gene embeddings.
    overwrite
        Replace existing results.
    progress_bar
        Show progress (a bar in a terminal or notebook, else log lines; ``False``: none).
    modality
        MuData modality.
    copy
        Return a copy instead of writing in place.

    Returns
    -------
    ``None`` (or the copy) and sets

    - ``adata.obsm[key_added]``: ``n_obs x d`` float32 cell embeddings (``NaN`` rows for cells not
      in ``cells``); ready for ``sc.pp.neighbors(adata, use_rep=key_added)`` and ``sc.tl.umap``;
    - ``adata.uns[key_added]``: ``{'cell_embedding': 'species' | 'mean', 'cells': n}``;
    - ``adata.varm[gene_key_added]``: ``n_vars x d`` float32 static gene embeddings, ``NaN`` for
      genes outside the vocabulary or never among the tokens of the cells;
    - ``adata.uns[gene_key_added]``: ``n_cells`` (per gene, cells whose tokens include it),
      ``n_embedded`` (genes with an embedding), ``d``, ``cells`` (number of cells used).
    """
    adata = get_adata(adata, modality)
    check_cell_embedding(cell_embedding)
    check_overwrite(adata.obsm, key_added, overwrite, "adata.obsm")
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    if genes:
        check_overwrite(adata.varm, gene_key_added, overwrite, "adata.varm")
    rows = None if cells is None else select_cells(adata, cells, "cells")
    tok = tokenize_kwargs(
        species=species,
        input_kind=input_kind,
        layer=layer,
        gene_symbols=gene_symbols,
        gene_ids=gene_ids,
        gene_medians=gene_medians,
    )
    cell, gene, n = _embed(
        adata,
        model,
        cells=rows,
        batch_size=batch_size,
        progress_bar=progress_bar,
        tok=tok,
        genes=genes,
        cell_embedding=cell_embedding,
    )
    if copy:
        adata = adata.copy()
    full = cell if rows is None else np.full((adata.n_obs, cell.shape[1]), np.nan, dtype=np.float32)
    if rows is not None:
        full[rows] = cell
    adata.obsm[key_added] = full
    adata.uns[key_added] = {"cell_embedding": cell_embedding, "cells": int(cell.shape[0])}
    if genes:
        adata.varm[gene_key_added] = gene
        adata.uns[gene_key_added] = {
            "n_cells": n,
            "n_embedded": int((n > 0).sum()),
            "d": int(gene.shape[1]),
            "cells": int(cell.shape[0]),
        }
        logger.info(
            "GeneCompass: embedded %d cells and %d of %d genes",
            cell.shape[0],
            int((n > 0).sum()),
            adata.n_vars,
        )
    return adata if copy else None


def compass_gene_embeddings(
    model,
    adata: AnnData,
    *,
    cells=None,
    species: str | None = None,
    input_kind: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    gene_medians=None,
    batch_size: int = 32,
    progress_bar: bool = True,
    modality: str | None = None,
) -> np.ndarray:
    """Static GeneCompass gene embeddings aligned to ``adata.var_names`` (e.g. to put into GEARS).

    Same computation as the gene part of :func:`embed_compass` (token states averaged over
    ``cells``), returned instead of written.

    Parameters
    ----------
    model
        Pre-trained :class:`~pertpy_gnn.compass.GeneCompass`.
    adata
        AnnData whose cells provide the context (e.g. the control cells of a Perturb-seq screen:
        ``cells=('pg_perturbation', 'control')``).
    cells, species, input_kind, layer, gene_symbols, gene_ids, gene_medians, batch_size, progress_bar, modality
        As in :func:`embed_compass`.

    Returns
    -------
    ``n_vars x d`` float32 array; rows of genes outside the vocabulary or never among the cells'
    tokens are ``NaN``.
    """
    adata = get_adata(adata, modality)
    rows = None if cells is None else select_cells(adata, cells, "cells")
    tok = tokenize_kwargs(
        species=species,
        input_kind=input_kind,
        layer=layer,
        gene_symbols=gene_symbols,
        gene_ids=gene_ids,
        gene_medians=gene_medians,
    )
    _, gene, n = _embed(
        adata, model, cells=rows, batch_size=batch_size, progress_bar=progress_bar, tok=tok, genes=True
    )
    logger.info("GeneCompass gene embeddings: %d of %d genes embedded", int((n > 0).sum()), adata.n_vars)
    return gene
