"""Small helpers shared across namespaces."""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

try:  # mudata is a dependency, but keep import errors readable
    from mudata import MuData
except ImportError:  # pragma: no cover
    MuData = None  # type: ignore[assignment,misc]

logger = logging.getLogger("pertpy_gnn")


def get_adata(data: AnnData | MuData, modality: str | None = None) -> AnnData:
    """Return the AnnData to work on: ``data`` itself or ``data[modality]`` for a MuData.

    Raises
    ------
    ValueError
        If a MuData is given without a valid modality.
    """
    if MuData is not None and isinstance(data, MuData):
        if modality is None:
            raise ValueError(
                f"A MuData was given; pass `modality=` to choose one of {list(data.mod)} (e.g. modality='rna')."
            )
        if modality not in data.mod:
            raise ValueError(f"Modality {modality!r} is not in the MuData; it has {list(data.mod)}.")
        return data.mod[modality]
    if not isinstance(data, AnnData):
        raise TypeError(f"Expected an AnnData or a MuData, got {type(data).__name__}.")
    if modality is not None:
        raise ValueError("`modality` is only meaningful for a MuData input.")
    return data


def get_matrix(adata: AnnData, layer: str | None = None):
    """Expression matrix of ``adata`` (``X`` or a layer)."""
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found; available layers: {list(adata.layers)}.")
    return adata.layers[layer]


def to_dense(x) -> np.ndarray:
    """Dense float32 numpy view of a matrix (sparse or dense)."""
    if sp.issparse(x):
        x = x.toarray()
    return np.asarray(x, dtype=np.float32)


def group_means(x, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of the rows of ``x`` per group, vectorized with a sparse indicator matrix.

    ``codes`` holds a group index per row (``-1`` rows are ignored).
    """
    keep = codes >= 0
    rows = codes[keep]
    ind = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float64), (rows, np.flatnonzero(keep))), shape=(n_groups, x.shape[0])
    )
    counts = np.asarray(ind.sum(axis=1)).ravel()
    sums = ind @ x
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)


def check_overwrite(mapping, key: str, overwrite: bool, where: str) -> None:
    """Refuse to overwrite an existing result unless asked to."""
    if key in mapping and not overwrite:
        raise ValueError(
            f"{where}[{key!r}] already exists; pass `overwrite=True` to replace it or choose another `key_added`."
        )
