"""Read a perturbation screen stored as h5ad."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
from anndata import AnnData

#: substrings that mark a likely perturbation column, to suggest one when the given key is missing
_PERTURBATION_HINTS = ("condition", "perturb", "guide", "grna", "target")


def read_perturbation_h5ad(
    path: str | os.PathLike,
    *,
    perturbation_key: str | None = "condition",
    backed: str | None = None,
) -> AnnData:
    """Read a perturbation screen from an ``.h5ad`` file and check that it has a perturbation column.

    The data are returned exactly as stored (no normalization, no renaming, no subsetting); parse the
    perturbation column afterwards with :func:`pertpy_gnn.pp.parse_perturbations`.

    Parameters
    ----------
    path
        The ``.h5ad`` file (e.g. one downloaded by hand for :func:`~pertpy_gnn.datasets.norman_2019`).
    perturbation_key
        ``adata.obs`` column holding each cell's perturbation (``control``, ``A``, ``A+B``, ...);
        ``None`` skips the check.
    backed
        ``'r'`` (or ``'r+'``) to leave the matrix on disk and read it lazily, as in
        :func:`anndata.read_h5ad`.

    Returns
    -------
    The AnnData stored in ``path``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    KeyError
        If ``perturbation_key`` is not an ``obs`` column; the message lists the columns there.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{path} {where}. Give the path of an .h5ad file (a download cached by the loaders lies under "
            "`pg.datasets.get_cache_dir()`)."
        )
    adata = ad.read_h5ad(path, backed=backed)
    if perturbation_key is not None and perturbation_key not in adata.obs.columns:
        columns = list(adata.obs.columns)
        likely = [c for c in columns if any(h in c.lower() for h in _PERTURBATION_HINTS)]
        suggestion = f" Likely candidates: {likely}." if likely else ""
        if adata.isbacked:
            adata.file.close()
        raise KeyError(
            f"{path} has no obs column {perturbation_key!r}; its obs columns are {columns}.{suggestion} "
            "Pass the right one as `perturbation_key=` (or `perturbation_key=None` to skip this check)."
        )
    return adata
