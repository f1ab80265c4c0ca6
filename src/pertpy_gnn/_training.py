"""Per-perturbation summaries of the training cells of a split.

The maths shared by the baselines (:mod:`pertpy_gnn.tl._baselines`) and the anchor of the
baseline-anchored GEARS (:mod:`pertpy_gnn.gears`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from pertpy_gnn._constants import CONTROL
from pertpy_gnn._utils import get_matrix
from pertpy_gnn.pp._de import group_moments
from pertpy_gnn.pp._perturbations import get_parsed, layer_of


@dataclass
class _Training:
    """Per-perturbation summaries of the training cells (computed once per fit)."""

    var_names: pd.Index
    control_x: object  # training control cells x genes (sparse or dense)
    control_mean: np.ndarray  # (genes,)
    sets: list[tuple[str, ...]]  # training perturbations (control excluded)
    means: np.ndarray  # (len(sets), genes) mean expression
    n_cells: np.ndarray  # (len(sets),)

    @property
    def deltas(self) -> np.ndarray:
        return self.means - self.control_mean[None, :]

    @property
    def seen_genes(self) -> set[str]:
        return {g for s in self.sets for g in s}

    @property
    def mean_delta(self) -> np.ndarray:
        """Change of the mean of all perturbed training cells (each cell weighs the same)."""
        return (self.n_cells / self.n_cells.sum()) @ self.deltas

    def single_deltas(self) -> tuple[pd.Index, np.ndarray]:
        """Genes perturbed alone in training and their changes (``len(genes) x n_vars``)."""
        singles = [i for i, s in enumerate(self.sets) if len(s) == 1]
        return pd.Index([self.sets[i][0] for i in singles]), self.deltas[singles]


def _training_data(adata: AnnData, split_key: str, layer: str | None) -> _Training:
    """Summaries of the cells with ``obs[split_key] == 'train'``; ``layer`` ``None``: the parsed layer, ``'X'``: ``X``."""
    col, sets = get_parsed(adata)
    if split_key not in adata.obs:
        raise KeyError(
            f"obs[{split_key!r}] not found: split the perturbations first, e.g. "
            "pg.pp.split_perturbations(adata, kind='simulation'), or pass `split_key=` naming your split column."
        )
    train = (adata.obs[split_key].astype(str) == "train").to_numpy()
    codes = col.cat.codes.to_numpy().astype(np.int64)
    codes = np.where(train, codes, -1)
    ci = list(col.cat.categories).index(CONTROL)
    ctrl_rows = np.flatnonzero(codes == ci)
    if ctrl_rows.size == 0:
        raise ValueError(
            f"No control cells have obs[{split_key!r}] == 'train'; control cells must be in the training split "
            "(pg.pp.split_perturbations always puts them there)."
        )
    x = get_matrix(adata, layer_of(adata) if layer is None else None if layer == "X" else layer)
    # the same float64 sums as pg.tl.evaluate, so that no_change is exactly the evaluated control mean
    n_cells, means, _ = group_moments(x, codes, len(sets))
    n_cells = n_cells.astype(np.int64)
    keep = [i for i in range(len(sets)) if i != ci and n_cells[i] > 0]
    if not keep:
        raise ValueError(
            f"No perturbed cells have obs[{split_key!r}] == 'train': nothing to fit a baseline on."
        )
    control_x = x[ctrl_rows] if sp.issparse(x) else np.asarray(x[ctrl_rows])
    return _Training(
        var_names=pd.Index(adata.var_names.astype(str)),
        control_x=control_x,
        control_mean=means[ci].astype(np.float64),
        sets=[sets[i] for i in keep],
        means=means[keep].astype(np.float64),
        n_cells=n_cells[keep],
    )
