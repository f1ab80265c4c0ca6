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


#: stored values of ``x`` handled at once inside a block of :func:`group_sums` (1 MiB of float64: cache-resident)
_SUB_BLOCK = 1 << 17


def group_sums(
    x, codes: np.ndarray, n_groups: int, *, squares: bool = False, chunk_elements: int = 1 << 21
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-group row counts, sums and (``squares=True``) sums of squares of the rows of ``x``, in ``float64``.

    ``codes`` holds a group index per row (``-1`` rows are ignored). One pass over ``x``: the sums of
    each block of rows of about ``chunk_elements`` stored values are accumulated over its rows in
    order, then added to the totals block after block. Sparse rows are added into their groups with
    ``np.add.at`` at ``group * n_vars + column``, a few hundred rows at a time (about 1 MiB of
    buffers; no copy of the index arrays of ``x``), both moments in the same pass; dense blocks
    with a sparse indicator product. The extra memory is never a ``float64`` copy of ``x``.

    Returns
    -------
    ``(counts, sums, sums_of_squares)``: ``(n_groups,)`` and two ``n_groups x n_vars`` arrays (the
    last ``None`` unless ``squares``).
    """
    codes = np.asarray(codes, dtype=np.intp)
    n_obs, n_vars = x.shape
    counts = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    size = n_groups * n_vars
    s1 = np.zeros(size)
    s2 = np.zeros(size) if squares else None
    sparse = sp.issparse(x)
    if sparse:
        x = x.tocsr() if x.format != "csr" else x
        per_row = max(1.0, x.nnz / max(1, n_obs))
        indptr, indices, data = x.indptr, x.indices, x.data
        sub_rows = max(1, int(_SUB_BLOCK // per_row))
        # block sums; the extra last group takes the ignored rows of a block
        acc1, acc2 = np.zeros(size + n_vars), np.zeros(size + n_vars) if squares else None
        values = np.empty(0)
        key_dtype = np.int32 if size + n_vars < 2**31 else np.intp  # int32 keys: no widening of x.indices
    else:
        per_row = max(1, n_vars)
    step = max(1, int(chunk_elements // per_row))
    for start in range(0, n_obs, step):
        stop = min(n_obs, start + step)
        c = codes[start:stop]
        kept = c >= 0
        if not kept.any():
            continue
        if not sparse:
            k = np.flatnonzero(kept)
            ind = sp.csr_matrix((np.ones(k.size), (c[k], k)), shape=(n_groups, stop - start))
            block = np.asarray(x[start:stop], dtype=np.float64)  # a view of a float64 x: never written
            s1 += np.asarray(ind @ block).ravel()
            if squares:
                s2 += np.asarray(ind @ np.square(block)).ravel()
            continue
        offset = (np.where(kept, c, n_groups) * n_vars).astype(key_dtype)
        acc1.fill(0)
        if squares:
            acc2.fill(0)
        for r0 in range(start, stop, sub_rows):
            r1 = min(stop, r0 + sub_rows)
            a, b = indptr[r0], indptr[r1]
            if b - a > values.size:
                values = np.empty(b - a)
            k = np.repeat(offset[r0 - start : r1 - start], np.diff(indptr[r0 : r1 + 1]))
            k += indices[a:b]
            v = values[: b - a]
            np.copyto(v, data[a:b])
            np.add.at(acc1, k, v)
            if squares:
                np.square(v, out=v)
                np.add.at(acc2, k, v)
        s1 += acc1[:size]
        if squares:
            s2 += acc2[:size]
    shape = (n_groups, n_vars)
    return counts, s1.reshape(shape), None if s2 is None else s2.reshape(shape)


def group_means(x, codes: np.ndarray, n_groups: int, *, chunk_elements: int = 1 << 21) -> np.ndarray:
    """Mean of the rows of ``x`` per group (``float32``), summed in ``float64`` a block of rows at a time.

    ``codes`` holds a group index per row (``-1`` rows are ignored; empty groups are NaN). The sums
    are those of :func:`group_sums`: the extra memory is a few blocks of about ``chunk_elements``
    values, not a ``float64`` copy of ``x``.
    """
    counts, sums, _ = group_sums(x, codes, n_groups, chunk_elements=chunk_elements)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)


def check_overwrite(mapping, key: str, overwrite: bool, where: str) -> None:
    """Refuse to overwrite an existing result unless asked to."""
    if key in mapping and not overwrite:
        raise ValueError(
            f"{where}[{key!r}] already exists; pass `overwrite=True` to replace it or choose another `key_added`."
        )
