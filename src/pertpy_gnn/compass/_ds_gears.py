"""GEARS with GeneCompass gene embeddings in place of its co-expression gene embeddings (paper Fig. 5)."""

from __future__ import annotations

import numpy as np
from anndata import AnnData


def compass_gears(adata: AnnData, gene_embeddings: np.ndarray, *, freeze: bool = True, **gears_kwargs):
    """A GEARS model whose gene embeddings are GeneCompass gene embeddings (Yang et al. 2024, Fig. 5a).

    GEARS embeds the measured genes with a GNN over the gene co-expression graph; here that
    embedding is replaced by ``unit(E) W + b``, with ``E`` the static GeneCompass embedding of each
    gene (:func:`pertpy_gnn.tl.compass_gene_embeddings`) and ``W, b`` learned; everything else
    (GO perturbation graph, compositional module, cross-gene decoder, loss, training, prediction) is
    GEARS's. ``freeze=True`` keeps ``E`` fixed; ``freeze=False`` fine-tunes it with the rest. Genes
    of ``adata`` without a GeneCompass embedding (``NaN`` rows) get a learned embedding.

    This is ``GEARS(adata, gene_embeddings=gene_embeddings, freeze_gene_embeddings=freeze,
    name='GEARS+GeneCompass', **gears_kwargs)``, registering ``adata`` first if needed.

    Parameters
    ----------
    adata
        AnnData prepared for GEARS (parsed, split, DE genes for validation, GO graph; the
        co-expression graph is not needed). If it is not registered for GEARS yet,
        :meth:`pertpy_gnn.gears.GEARS.setup_anndata` is called with its defaults; a previous
        registration (e.g. by :func:`pertpy_gnn.tl.train_gears`) is kept.
    gene_embeddings
        ``n_vars x D`` matrix aligned to ``adata.var_names`` (``NaN`` rows: genes without one).
    freeze
        Keep the GeneCompass embeddings fixed.
    **gears_kwargs
        Passed to :class:`pertpy_gnn.gears.GEARS` (``hidden_dim``, ``uncertainty``, ``seed``,
        ``name``, ...).

    Returns
    -------
    The untrained :class:`~pertpy_gnn.gears.GEARS` model, named ``'GEARS+GeneCompass'`` unless
    ``name`` is given: train it with ``model.train(...)`` and evaluate it beside plain GEARS with
    :func:`pertpy_gnn.tl.evaluate`. ``save`` / ``load`` keep the embeddings and the name. Nothing is
    written into ``adata`` apart from the scvi-tools registration.
    """
    from ..gears import GEARS

    if GEARS._get_most_recent_anndata_manager(adata, required=False) is None:
        GEARS.setup_anndata(adata)
    gears_kwargs.setdefault("name", "GEARS+GeneCompass")
    return GEARS(adata, gene_embeddings=gene_embeddings, freeze_gene_embeddings=freeze, **gears_kwargs)
