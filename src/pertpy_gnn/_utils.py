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


def group_means(x, codes: np.ndarray, n_groups: int, *, chunk_elements: int = 1 << 21) -> np.ndarray:
    """Mean of the rows of ``x`` per group (``float32``), summed in ``float64`` a block of rows at a time.

    ``codes`` holds a group index per row (``-1`` rows are ignored). Each block of about
    ``chunk_elements`` stored values is converted to ``float64`` and summed into the groups by a
    sparse indicator product, so the extra memory is one block (16 MiB by default), not a
    ``float64`` copy of ``x``.
    """
    codes = np.asarray(codes)
    n_obs, n_vars = x.shape
    keep = codes >= 0
    counts = np.bincount(codes[keep], minlength=n_groups).astype(np.float64)
    sums = np.zeros((n_groups, n_vars))
    sparse = sp.issparse(x)
    if sparse:
        x = x.tocsr() if x.format != "csr" else x
        per_row = max(1.0, x.nnz / max(1, n_obs))
    else:
        per_row = max(1, n_vars)
    step = max(1, int(chunk_elements // per_row))
    for start in range(0, n_obs, step):
        stop = min(n_obs, start + step)
        c = codes[start:stop]
        k = np.flatnonzero(c >= 0)
        if k.size == 0:
            continue
        ind = sp.csr_matrix((np.ones(k.size), (c[k], k)), shape=(n_groups, stop - start))
        if sparse:  # the block's float64 values over the index arrays of x (no copy of those)
            a, b = x.indptr[start], x.indptr[stop]
            block = sp.csr_matrix(
                (x.data[a:b].astype(np.float64), x.indices[a:b], x.indptr[start : stop + 1] - a),
                shape=(stop - start, n_vars),
            )
        else:
            block = np.asarray(x[start:stop], dtype=np.float64)
        part = ind @ block
        sums += part.toarray() if sp.issparse(part) else np.asarray(part)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)


def check_overwrite(mapping, key: str, overwrite: bool, where: str) -> None:
    """Refuse to overwrite an existing result unless asked to."""
    if key in mapping and not overwrite:
        raise ValueError(
            f"{where}[{key!r}] already exists; pass `overwrite=True` to replace it or choose another `key_added`."
        )
