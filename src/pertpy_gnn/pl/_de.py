"""True versus predicted change of the top DE genes of one perturbation (GEARS Fig. 2g)."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.axes import Axes

from pertpy_gnn._constants import CONTROL, DE_KEY, DELIM
from pertpy_gnn._utils import get_adata, get_matrix, group_means
from pertpy_gnn.pp._perturbations import as_perturbation_sets, get_parsed, layer_of
from pertpy_gnn.tl._evaluate import prediction_matrix


def de_genes(
    data,
    perturbation: str,
    prediction=None,
    *,
    n_genes: int = 20,
    de_key: str = DE_KEY,
    layer: str | None = None,
    modality: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Per-cell change over control of a perturbation's top DE genes, with predictions as points.

    One box per gene (the measured cells minus the control mean), the predicted mean change of
    each model as a marker, and a line at 0 (the control mean), as in GEARS Fig. 2g.

    Parameters
    ----------
    data
        AnnData parsed by :func:`pertpy_gnn.pp.parse_perturbations` with DE genes from
        :func:`pertpy_gnn.pp.rank_de_genes`, or a MuData with ``modality``.
    perturbation
        The perturbation to draw (``"A"``, ``"A+B"``; order does not matter).
    prediction
        ``None``, a prediction AnnData, a predictor (asked to predict ``perturbation``), or a dict
        ``name -> either``.
    n_genes
        Number of top DE genes (at most as many as ``uns[de_key]`` holds).
    de_key
        Key of the DE genes in ``uns``.
    layer
        Expression layer; by default the one recorded by ``parse_perturbations``.
    modality
        Modality of a MuData.
    ax
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    The matplotlib axes.
    """
    adata = get_adata(data, modality)
    col, _ = get_parsed(adata)
    if de_key not in adata.uns:
        raise KeyError(
            f"adata.uns[{de_key!r}] not found: rank the DE genes first with pg.pp.rank_de_genes(adata)."
        )
    name = DELIM.join(as_perturbation_sets(perturbation)[0])
    de = adata.uns[de_key]["indices"]
    if name not in de.index:
        raise KeyError(
            f"{name!r} has no DE genes in uns[{de_key!r}]; perturbations there include {list(de.index[:5])}."
        )
    if n_genes > de.shape[1]:
        raise ValueError(
            f"uns[{de_key!r}] holds {de.shape[1]} genes per perturbation, fewer than n_genes={n_genes}: "
            f"lower n_genes or rerun pg.pp.rank_de_genes(adata, n_genes={n_genes}, overwrite=True)."
        )
    idx = de.loc[name].to_numpy()[:n_genes].astype(np.int64)
    genes = np.asarray(adata.var_names)[idx]
    x = get_matrix(adata, layer_of(adata) if layer is None else layer)
    labels = col.astype(str).to_numpy()
    ctrl = group_means(x[:, idx], np.where(labels == CONTROL, 0, -1), 1)[0].astype(np.float64)
    cells = x[np.flatnonzero(labels == name)][:, idx]
    change = np.asarray(cells.toarray() if sp.issparse(cells) else cells, dtype=np.float64) - ctrl

    if prediction is None:
        preds = {}
    elif isinstance(prediction, Mapping):
        preds = dict(prediction)
    else:
        preds = {getattr(prediction, "name", None) or "prediction": prediction}

    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.4 * n_genes + 1), 3.5))
    pos = np.arange(n_genes)
    ax.boxplot(
        change,
        positions=pos,
        widths=0.6,
        patch_artist=True,
        showfliers=False,
        boxprops={"facecolor": "lightgrey", "edgecolor": "grey"},
        medianprops={"color": "black"},
    )
    markers = ["o", "^", "s", "D", "v", "P", "X"]
    for i, (model, p) in enumerate(preds.items()):
        pred_ad = p if isinstance(p, AnnData) else p.predict(name)
        pred = prediction_matrix(
            pred_ad, [name], pd.Index(np.asarray(adata.var_names[idx]).astype(str)), model=model
        )[0]
        ax.scatter(pos, pred - ctrl, marker=markers[i % len(markers)], s=30, zorder=3, label=str(model))
    ax.axhline(0, color="green", linestyle="--", linewidth=1)
    ax.set_xticks(pos)
    ax.set_xticklabels(genes, rotation=90)
    ax.set_xlim(-0.7, n_genes - 0.3)
    ax.set_ylabel("change over control")
    ax.set_title(name)
    if preds:
        ax.legend(frameon=False, fontsize="small")
    return ax
