"""GeneCompass in-silico perturbation plots: embedding shift distributions and candidate-driver screens."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes

from pertpy_gnn._constants import COMPASS_INSILICO_KEY, COMPASS_SCREEN_KEY
from pertpy_gnn._utils import get_adata


def _density(ax: Axes, v: np.ndarray, label: str, color) -> None:
    """Gaussian kernel density (Scott's bandwidth) of ``v``, or a vertical line for a constant sample."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return
    sd = v.std()
    if v.size < 2 or sd == 0:
        ax.axvline(v.mean(), color=color, label=label)
        return
    bw = 1.06 * sd * v.size ** (-1 / 5)
    grid = np.linspace(v.min() - 3 * bw, v.max() + 3 * bw, 256)
    dens = np.exp(-0.5 * ((grid[:, None] - v[None, :]) / bw) ** 2).sum(1) / (v.size * bw * np.sqrt(2 * np.pi))
    ax.plot(grid, dens, color=color, label=label)
    ax.fill_between(grid, dens, color=color, alpha=0.15)


def in_silico_shift(
    adata: AnnData,
    keys: str | Sequence[str] = COMPASS_INSILICO_KEY,
    *,
    kind: str = "target",
    labels: Sequence[str] | None = None,
    modality: str | None = None,
    axes: Sequence[Axes] | None = None,
) -> list[Axes]:
    """Distributions of cell-embedding similarity in in-silico experiments (paper Fig. 6b).

    Parameters
    ----------
    adata
        AnnData after :func:`pertpy_gnn.tl.in_silico` (one or several runs with different
        ``key_added``), or a MuData with ``modality``.
    keys
        The ``key_added`` of the runs to draw (e.g. OSKM overexpression and random control genes).
    kind
        ``'target'``: per cell, the mean cosine to the target cells, of the original cells (drawn once,
        from the first run) and of the perturbed cells of each run; ``'cos'``: the cosine of each
        perturbed cell to its original.
    labels
        Legend label of each run (default: its genes and mode).
    modality
        MuData modality.
    axes
        Two axes (density, box plot) to draw on; a new figure when ``None``.

    Returns
    -------
    ``[density_axes, box_axes]``: probability densities (Gaussian kernel) and box plots of the same
    distributions.
    """
    adata = get_adata(adata, modality)
    keys = [keys] if isinstance(keys, str) else list(keys)
    if kind not in ("target", "cos"):
        raise ValueError(f"kind must be 'target' or 'cos', got {kind!r}.")
    if labels is not None and len(labels) != len(keys):
        raise ValueError(f"Give one label per key ({len(keys)}), got {len(labels)}.")
    series: dict[str, np.ndarray] = {}
    for i, k in enumerate(keys):
        if k not in adata.uns or "params" not in adata.uns[k]:
            raise KeyError(f"adata.uns[{k!r}] not found: run pg.tl.in_silico(..., key_added={k!r}) first.")
        res = adata.uns[k]
        p = res["params"]
        name = (
            labels[i]
            if labels is not None
            else f"{p['mode']} {'+'.join(map(str, np.atleast_1d(p['genes'])))}"
        )
        if kind == "target":
            if "target_cos" not in res:
                raise ValueError(
                    f"Run {k!r} has no target: pass `target=` to pg.tl.in_silico, or draw kind='cos'."
                )
            tc = res["target_cos"]
            if not series:
                series["original"] = np.asarray(tc["original"], dtype=float)
            series[name] = np.asarray(tc["perturbed"], dtype=float)
        else:
            series[name] = adata.obs[f"{k}_cos"].to_numpy(dtype=float)
    if axes is None:
        fig, axes = plt.subplots(2, 1, figsize=(5, 4.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax_d, ax_b = axes[0], axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (name, v) in enumerate(series.items()):
        _density(ax_d, v, name, colors[j % len(colors)])
    ax_d.set_ylabel("density")
    ax_d.legend(frameon=False, fontsize="small")
    data = [v[np.isfinite(v)] for v in series.values()]
    bp = ax_b.boxplot(data, vert=False, patch_artist=True, widths=0.6)
    for j, patch in enumerate(bp["boxes"]):
        patch.set_facecolor(colors[j % len(colors)])
        patch.set_alpha(0.5)
    ax_b.set_yticks(np.arange(1, len(series) + 1))
    ax_b.set_yticklabels(list(series))
    ax_b.set_xlabel(
        "mean cosine similarity to target cells" if kind == "target" else "cosine similarity to original cell"
    )
    return [ax_d, ax_b]


def in_silico_screen(
    adata: AnnData,
    key: str = COMPASS_SCREEN_KEY,
    *,
    n_top: int = 20,
    bottom: bool = False,
    modality: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """The ranked candidate drivers of an in-silico screen (paper Fig. 6c).

    Parameters
    ----------
    adata
        AnnData after :func:`pertpy_gnn.tl.in_silico_screen`, or a MuData with ``modality``.
    key
        Its ``key_added``.
    n_top
        Number of genes drawn.
    bottom
        Draw the genes shifting cells most away from the target instead.
    modality
        MuData modality.
    ax
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    The axes: one horizontal bar per gene (mean shift toward the target over cells, with its
    standard error), strongest driver on top.
    """
    adata = get_adata(adata, modality)
    if key not in adata.uns or "results" not in adata.uns[key]:
        raise KeyError(
            f"adata.uns[{key!r}] not found: run pg.tl.in_silico_screen(..., key_added={key!r}) first."
        )
    df = pd.DataFrame(adata.uns[key]["results"])
    df = df.sort_values("target_shift", ascending=bottom).head(n_top)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, max(2.0, 0.22 * len(df) + 0.8)))
    y = np.arange(len(df))[::-1]
    colors = np.where(df["target_shift"].to_numpy() >= 0, "#c0392b", "#2c7fb8")
    ax.barh(
        y,
        df["target_shift"],
        xerr=df.get("target_shift_sem"),
        color=colors,
        alpha=0.8,
        error_kw={"linewidth": 0.8},
    )
    ax.set_yticks(y)
    ax.set_yticklabels(df.index.astype(str))
    ax.axvline(0, color="grey", linewidth=0.8)
    p = adata.uns[key].get("params", {})
    ax.set_xlabel(f"shift toward target ({p.get('mode', '')} {p.get('level', '')})".strip())
    return ax
