"""The phenotype map of predicted perturbation outcomes (GEARS Fig. 3c-e)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from .._constants import PHENOTYPE_KEY
from ..tl._phenotypes import NOVEL


def phenotypes(
    pred: AnnData,
    *,
    reference: str | None = None,
    n_top: int = 10,
    n_labels: int = 5,
    basis: str | None = None,
    key: str = PHENOTYPE_KEY,
    point_size: float = 12.0,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Draw the phenotype map of :func:`pertpy_gnn.tl.phenotypes`.

    Sets are drawn on the first two components of the embedding, coloured by cluster; clusters
    are named ``'3 novel (120)'`` / ``'0 known (45)'`` in the legend and novel clusters are drawn
    with triangles; measured sets are black crosses; the ``n_top`` sets with the highest
    reference score (dot product) are ringed in red and the first ``n_labels`` named.

    Parameters
    ----------
    pred
        Prediction AnnData after :func:`pertpy_gnn.tl.phenotypes`.
    reference
        Reference whose score is marked (a name in ``pred.uns[key]['references']``); default
        the only one, none if there are several or none.
    n_top
        Sets ringed for the reference.
    n_labels
        Of those, how many are named.
    basis
        Key of ``obsm`` to draw (first two columns); default ``key + '_pca'``.
    key
        ``key_added`` of :func:`pertpy_gnn.tl.phenotypes`.
    point_size
        Marker size.
    legend
        Draw the legend.
    ax
        Axes to draw into (default: a new figure).

    Returns
    -------
    The axes.
    """
    if key not in pred.obs or key not in pred.uns:
        raise KeyError(f"No phenotype map under {key!r}: run pg.tl.phenotypes(pred) first.")
    basis = f"{key}_pca" if basis is None else basis
    if basis not in pred.obsm:
        raise KeyError(f"obsm[{basis!r}] not found; available: {list(pred.obsm)}.")
    xy = np.asarray(pred.obsm[basis])[:, :2]
    if xy.shape[1] < 2:
        xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
    refs = pred.uns[key]["references"]
    if reference is None and len(refs) == 1:
        reference = str(refs.index[0])
    if reference is not None and reference not in refs.index:
        raise KeyError(f"Reference {reference!r} not found; references: {list(refs.index)}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 5.5))
    clusters = pred.obs[key]
    status_col = f"{key}_status"
    status = pred.obs[status_col].astype(str).to_numpy() if status_col in pred.obs else None
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(clusters.cat.categories):
        sel = (clusters == c).to_numpy()
        novel = status is not None and status[sel][0] == NOVEL
        tag = "" if status is None else (" novel" if novel else " known")
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            s=point_size,
            color=cmap(i % 20),
            marker="^" if novel else "o",
            label=f"{c}{tag} ({int(sel.sum())})",
            linewidths=0,
            alpha=0.8,
        )
    handles, labels = ax.get_legend_handles_labels()
    measured_col = f"{key}_measured"
    if measured_col in pred.obs:
        m = pred.obs[measured_col].to_numpy(bool)
        ax.scatter(xy[m, 0], xy[m, 1], s=point_size * 1.5, color="black", marker="x", linewidths=0.8)
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none"))
        labels.append("measured")
    if reference is not None:
        score = pred.obs[refs.loc[reference, "dot_column"]].to_numpy(np.float64)
        top = np.argsort(-score, kind="stable")[: int(n_top)]
        ax.scatter(
            xy[top, 0], xy[top, 1], s=point_size * 6, facecolors="none", edgecolors="red", linewidths=1.2
        )
        names = pred.obs["perturbation"] if "perturbation" in pred.obs else pred.obs_names
        for j in top[: int(n_labels)]:
            ax.annotate(
                str(np.asarray(names)[j]),
                xy[j],
                fontsize=7,
                color="red",
                xytext=(3, 3),
                textcoords="offset points",
            )
        handles.append(Line2D([], [], color="red", marker="o", markerfacecolor="none", linestyle="none"))
        labels.append(f"top {len(top)}: {reference}")
    ax.set_xlabel(f"{basis} 1")
    ax.set_ylabel(f"{basis} 2")
    method = pred.uns[key].get("method", "")
    ax.set_title(f"Phenotype map: {pred.n_obs} sets, {len(clusters.cat.categories)} {method} clusters")
    if legend:
        ax.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return ax
