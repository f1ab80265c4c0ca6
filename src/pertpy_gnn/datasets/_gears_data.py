"""Read a data folder of the published GEARS code (PyPI ``cell-gears``) into our perturbation contract."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import CONTROL, GEARS_DATA_KEY, PERT_KEY, SPLIT_KEY
from .._pickle import read_plain_pickle
from .._utils import logger

#: the processed file ``PertData.new_data_process`` / ``load`` write into a dataset folder
PROCESSED = "perturb_processed.h5ad"
#: cell-gears' control label
GEARS_CONTROL = "ctrl"
_SPLITS = ("train", "val", "test")


def _split_files(folder: Path) -> list[Path]:
    d = folder / "splits"
    return sorted(p for p in d.glob("*.pkl") if not p.stem.endswith("_subgroup")) if d.is_dir() else []


def _choose_split(folder: Path, split: str | os.PathLike | None) -> Path | None:
    files = _split_files(folder)
    if split is not None:
        p = Path(split)
        if p.is_file():
            return p
        hits = [f for f in files if f.stem == str(split)] or [f for f in files if str(split) in f.stem]
        if len(hits) != 1:
            raise ValueError(
                f"`split={split!r}` matches {len(hits)} of the split files in {folder / 'splits'}: "
                f"{[f.stem for f in files]}. Give one of these names, or the path of a split file."
            )
        return hits[0]
    if len(files) > 1:
        raise ValueError(
            f"{folder / 'splits'} holds several splits {[f.stem for f in files]}: choose one with `split=`."
        )
    return files[0] if files else None


def _read_split(path: Path) -> dict[str, list[str]]:
    """cell-gears ``set2conditions``: ``{'train': [...], 'val': [...], 'test': [...]}`` of conditions."""
    table = read_plain_pickle(path)
    if not isinstance(table, dict) or not set(table) <= {*_SPLITS} or "train" not in table:
        raise ValueError(
            f"{path} is not a cell-gears split file (a dict with 'train', 'val', 'test' lists of conditions); "
            f"it holds {type(table).__name__} with keys {list(table)[:5] if isinstance(table, dict) else '-'}."
        )
    return {k: [str(c) for c in v] for k, v in table.items()}


def read_gears_data(
    path: str | os.PathLike,
    *,
    split: str | os.PathLike | None = None,
    use_gene_names: bool = True,
) -> AnnData:
    """Read a cell-gears dataset folder: the processed screen with our perturbation contract and its split.

    The folder is what cell-gears' ``PertData`` writes for a dataset (``<data_path>/<name>/``):
    ``perturb_processed.h5ad`` (``obs['condition']`` as ``A+ctrl`` / ``A+B`` / ``ctrl``,
    ``var['gene_name']``) and the split files ``splits/<name>_<split>_<seed>_<fraction>.pkl``
    made by its ``prepare_split`` (``{'train', 'val', 'test'}`` lists of conditions, with an
    optional ``..._subgroup.pkl``). Pickles are read by a restricted unpickler (plain data only).
    A split made by cell-gears is then evaluated here on the same test perturbations.

    Parameters
    ----------
    path
        The dataset folder (or its ``perturb_processed.h5ad``).
    split
        Which split file of ``splits/``: its name (stem, or a unique part of it) or a path. Needed
        when there are several; ``None`` with none leaves the data unsplit.
    use_gene_names
        Use ``var['gene_name']`` as ``var_names`` (cell-gears names genes by it and perturbations
        refer to it); the original index is kept in ``var['gears_var_name']``.

    Returns
    -------
    A new AnnData (``X`` as stored). Sets:

    ``obs['pg_perturbation']``, ``obs['pg_n_genes']``, ``uns['pg_perturbation']``
        as :func:`pertpy_gnn.pp.parse_perturbations` (from ``obs['condition']``).
    ``obs['pg_split']``, ``obs['pg_subgroup']``, ``uns['pg_split']``
        with a split file: cell-gears' split as :func:`pertpy_gnn.pp.split_perturbations`
        ``kind='custom'`` writes it (control cells in train). Cells of conditions in none of its
        lists (cell-gears never uses them, e.g. perturbations of genes outside its GO graph) are
        dropped, and listed in ``uns['pg_gears_data']``.
    ``uns['pg_gears_data']``
        ``path``, ``data_path`` (the parent folder, where cell-gears keeps ``gene2go_all.pkl`` and
        ``essential_all_data_pert_genes.pkl``; read by :meth:`pertpy_gnn.gears.GEARS.load_reference`),
        ``split_file``, ``dropped_conditions``, and cell-gears' ``test_subgroup`` table if present
        (DataFrame ``perturbation``, ``subgroup``).
    """
    from ..pp import parse_perturbations, split_perturbations

    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    h5 = path if path.is_file() else path / PROCESSED
    if not h5.is_file():
        raise FileNotFoundError(
            f"{h5} not found: give a cell-gears dataset folder (the one PertData.new_data_process writes, with "
            f"{PROCESSED} and splits/)."
        )
    adata = ad.read_h5ad(h5)
    if "condition" not in adata.obs:
        raise KeyError(f"{h5} has no obs['condition']: it is not a cell-gears processed file.")
    if use_gene_names and "gene_name" in adata.var:
        names = adata.var["gene_name"].astype(str)
        if names.duplicated().any():
            raise ValueError(
                f"{h5}: var['gene_name'] has duplicates {names[names.duplicated()].unique()[:5].tolist()}; "
                "pass use_gene_names=False."
            )
        adata.var["gears_var_name"] = adata.var_names.astype(str)
        adata.var_names = pd.Index(names.to_numpy())
    split_file = _choose_split(folder, split)
    info: dict = {
        "path": str(folder),
        "data_path": str(folder.parent),
        "split_file": "" if split_file is None else str(split_file),
        "dropped_conditions": np.array([], dtype=object),
    }
    cond = adata.obs["condition"].astype(str)
    table = None
    if split_file is not None:
        table = _read_split(split_file)
        listed = {c for v in table.values() for c in v} | {GEARS_CONTROL}
        keep = cond.isin(listed).to_numpy()
        dropped = sorted(set(cond[~keep]))
        if dropped:
            logger.warning(
                "Dropping %d cells of %d conditions that the split %s does not list (cell-gears never uses them): %s",
                int((~keep).sum()),
                len(dropped),
                split_file.name,
                dropped[:10],
            )
            adata = adata[keep].copy()
        info["dropped_conditions"] = np.array(dropped, dtype=object)
    genes = {
        g for c in adata.obs["condition"].astype(str).unique() for g in c.split("+") if g != GEARS_CONTROL
    }
    parse_perturbations(
        adata,
        perturbation_key="condition",
        control_label=GEARS_CONTROL,
        delimiter="+",
        gene_universe=genes,
    )
    if table is not None:
        assignment = {c: s for s in _SPLITS for c in table.get(s, []) if c != GEARS_CONTROL}
        present = set(adata.obs["condition"].astype(str))
        split_perturbations(
            adata, kind="custom", assignment={c: s for c, s in assignment.items() if c in present}
        )
        sub = split_file.with_name(split_file.stem + "_subgroup.pkl")
        if sub.is_file():
            groups = read_plain_pickle(sub)
            rows = [
                (str(c), str(g))
                for g, conds in dict(groups.get("test_subgroup", {})).items()
                for c in conds
                if str(c) in present
            ]
            canon = dict(
                zip(adata.obs["condition"].astype(str), adata.obs[PERT_KEY].astype(str), strict=True)
            )
            info["test_subgroup"] = pd.DataFrame(
                {"perturbation": [canon[c] for c, _ in rows], "subgroup": [g for _, g in rows]}
            )
        n_test = adata.obs.loc[adata.obs[SPLIT_KEY] == "test", PERT_KEY].nunique()
        logger.info("cell-gears split %s: %d test perturbations.", split_file.name, n_test)
    if CONTROL not in set(adata.obs[PERT_KEY].astype(str)):
        logger.warning("%s has no control cells (condition 'ctrl').", h5)
    adata.uns[GEARS_DATA_KEY] = info
    return adata
