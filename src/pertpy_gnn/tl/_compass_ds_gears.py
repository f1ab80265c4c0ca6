"""GEARS with GeneCompass gene embeddings in place of its co-expression gene embeddings (paper Fig. 5)."""

from __future__ import annotations

import functools

import numpy as np
from anndata import AnnData


def _encoder_cls():
    import torch
    from torch import nn

    class PretrainedGeneEncoder(nn.Module):
        """Gene embeddings of GEARS from a fixed matrix: ``h_gene = unit(E) W + b`` (``K x d``).

        Drop-in replacement of GEARS's co-expression :class:`~pertpy_gnn.gears._module.GraphEncoder`
        (same ``forward(edge_index, edge_weight)`` signature; the graph is not used). ``E`` holds one
        row per measured gene (rows scaled to unit norm); with ``freeze=True`` it stays fixed and only
        the projection ``W, b`` is trained, otherwise ``E`` is fine-tuned too. Genes without a
        pre-trained embedding (``NaN`` rows) get a learned embedding of their own instead.
        """

        def __init__(self, embeddings: np.ndarray, dim: int, freeze: bool):
            super().__init__()
            e = np.asarray(embeddings, dtype=np.float32)
            missing = ~np.isfinite(e).all(1)
            e = np.where(missing[:, None], 0.0, e)
            norm = np.linalg.norm(e, axis=1, keepdims=True)
            e = torch.from_numpy(e / np.where(norm > 0, norm, 1.0))
            if freeze:
                self.register_buffer("pretrained", e)
            else:
                self.pretrained = nn.Parameter(e)
            self.register_buffer("missing", torch.from_numpy(missing))
            self.proj = nn.Linear(e.shape[1], dim)
            self.own = nn.Parameter(torch.randn(int(missing.sum()), dim) / dim**0.5)

        def forward(self, edge_index=None, edge_weight=None) -> torch.Tensor:
            h = self.proj(self.pretrained)
            if self.own.numel():
                h = h.index_put((torch.nonzero(self.missing).squeeze(1),), self.own)
            return h

    return PretrainedGeneEncoder


@functools.cache
def _compass_gears_cls():
    import torch

    from ..gears._model import GEARS

    class GEARSCompass(GEARS):
        """GEARS whose gene embeddings come from a pre-trained GeneCompass (see :func:`compass_gears`)."""

        name = "GEARS+GeneCompass"

        def __init__(self, adata: AnnData, *, gene_embeddings: np.ndarray, freeze_gene_embeddings: bool = True, **kwargs):
            super().__init__(adata, **kwargs)
            e = np.asarray(gene_embeddings, dtype=np.float32)
            if e.ndim != 2 or e.shape[0] != adata.n_vars:
                raise ValueError(
                    f"gene_embeddings must be n_vars x d ({adata.n_vars} rows, aligned to adata.var_names), got shape "
                    f"{e.shape}; make it with pg.tl.compass_gene_embeddings(model, adata)."
                )
            if not np.isfinite(e).all(1).any():
                raise ValueError("gene_embeddings has no finite row: no gene of adata has a GeneCompass embedding.")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._seed)
                self.module.gene_encoder = _encoder_cls()(e, self.module.hidden_dim, freeze_gene_embeddings)
            # GEARS records its init parameters against this class's signature: record them again, so that
            # save / load rebuild the same model (graphs and embeddings as non-keyword parameters)
            graphs = {k: self.init_params_["non_kwargs"][k] for k in ("go_graph", "coexpression_graph")}
            self.init_params_ = {
                "kwargs": {"kwargs": {k: v for k, v in kwargs.items() if k not in graphs}},
                "non_kwargs": {"gene_embeddings": e, "freeze_gene_embeddings": freeze_gene_embeddings, **graphs},
            }
            n_missing = int((~np.isfinite(e).all(1)).sum())
            self._model_summary_string += (
                f"; gene embeddings from GeneCompass (d={e.shape[1]}, {'frozen' if freeze_gene_embeddings else 'fine-tuned'}, "
                f"{n_missing} genes without one learned)"
            )

    return GEARSCompass


def compass_gears(adata: AnnData, gene_embeddings: np.ndarray, *, freeze: bool = True, **gears_kwargs):
    """A GEARS model whose gene embeddings are GeneCompass gene embeddings (Yang et al. 2024, Fig. 5a).

    GEARS embeds the measured genes with a GNN over the gene co-expression graph; here that
    embedding is replaced by ``unit(E) W + b``, with ``E`` the static GeneCompass embedding of each
    gene (:func:`pertpy_gnn.tl.compass_gene_embeddings`) and ``W, b`` learned; everything else
    (GO perturbation graph, compositional module, cross-gene decoder, loss, training, prediction) is
    GEARS's. ``freeze=True`` keeps ``E`` fixed; ``freeze=False`` fine-tunes it with the rest. Genes
    of ``adata`` without a GeneCompass embedding (``NaN`` rows) get a learned embedding.

    Parameters
    ----------
    adata
        AnnData prepared for GEARS (parsed, split, DE genes, GO graph and co-expression graph, which
        GEARS validates but this model does not use); it is registered for this model with the
        arguments of a previous :meth:`pertpy_gnn.gears.GEARS.setup_anndata` call, if any.
    gene_embeddings
        ``n_vars x D`` matrix aligned to ``adata.var_names``.
    freeze
        Keep the GeneCompass embeddings fixed.
    **gears_kwargs
        Passed to :class:`pertpy_gnn.gears.GEARS` (``hidden_dim``, ``uncertainty``, ``seed``, ...).

    Returns
    -------
    The untrained model (a :class:`~pertpy_gnn.gears.GEARS` subclass named ``'GEARS+GeneCompass'``):
    train it with ``model.train(...)`` and evaluate it beside plain GEARS with
    :func:`pertpy_gnn.tl.evaluate`. ``save`` / ``load`` keep the embeddings (init parameters).
    """
    from ..gears._model import GEARS

    cls = _compass_gears_cls()
    # scvi-tools keeps AnnData registrations per model class: register adata for this class with the
    # same setup arguments as for GEARS (or GEARS's defaults)
    manager = GEARS._get_most_recent_anndata_manager(adata, required=False)
    setup_args = dict(manager.registry.get("setup_args", {})) if manager is not None else {}
    cls.setup_anndata(adata, **setup_args)
    return cls(adata, gene_embeddings=gene_embeddings, freeze_gene_embeddings=freeze, **gears_kwargs)
