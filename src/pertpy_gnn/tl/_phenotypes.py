"""Phenotype discovery over predicted perturbation outcomes (GEARS Fig. 3).

Embed the predicted changes of many perturbation sets (e.g. all pairs of a gene panel), cluster
them, mark clusters as known (they hold measured perturbations) or novel (predicted only), and
score every set against reference DE vectors (e.g. a cell-state transition toward a wanted state).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import CONTROL, PHENOTYPE_KEY, SPLIT_KEY
from .._utils import check_overwrite, get_adata, get_matrix, logger
from ..pp._de import group_moments
from ..pp._perturbations import as_perturbation_sets, canonical_name, get_parsed
from ._prediction import DELTA_LAYER

#: status of a cluster holding at least ``min_measured`` measured perturbations / of the others
KNOWN, NOVEL = "known", "novel"


def reference_de(
    data,
    groupby: str,
    group: str,
    reference: str,
    *,
    n_genes: int | None = 100,
    layer: str | None = None,
    name: str | None = None,
    modality: str | None = None,
) -> pd.Series:
    """DE vector of a cell-state transition ``reference -> group`` in any AnnData.

    The reference of :func:`phenotypes` in the GEARS paper (Fig. 3e): the log fold change of the
    differentially expressed genes between haematopoietic progenitors and proerythroblasts of
    Tabula Sapiens. Genes are ranked by Welch's t (as :func:`pertpy_gnn.pp.rank_de_genes`); the
    top ``n_genes`` by ``|t|`` keep their mean difference of (log-normalized) expression
    ``mean(group) - mean(reference)``.

    Parameters
    ----------
    data
        AnnData (or MuData with ``modality``) with log-normalized expression, cells labelled in
        ``obs[groupby]``.
    groupby
        Column of ``obs`` with the cell states.
    group, reference
        The target state and the starting state (values of ``obs[groupby]``).
    n_genes
        Number of DE genes kept; ``None``: every gene.
    layer
        Expression layer (default ``X``).
    name
        Name of the vector (default ``'reference->group'``).
    modality
        Modality of a MuData.

    Returns
    -------
    Series indexed by gene name (the DE genes, by decreasing ``|t|``), named ``name``: pass it
    to :func:`phenotypes` as ``reference``.
    """
    adata = get_adata(data, modality)
    if groupby not in adata.obs:
        raise KeyError(f"obs[{groupby!r}] not found; available columns: {list(adata.obs.columns)}.")
    labels = adata.obs[groupby].astype(str).to_numpy()
    codes = np.full(adata.n_obs, -1, dtype=np.int64)
    for code, value in enumerate((reference, group)):
        hit = labels == str(value)
        if hit.sum() < 2:
            raise ValueError(
                f"obs[{groupby!r}] has {int(hit.sum())} cells of {value!r}; at least 2 are needed "
                f"(values: {sorted(set(labels))[:10]})."
            )
        codes[hit] = code
    n, mean, var = group_moments(get_matrix(adata, layer), codes, 2)
    diff = mean[1] - mean[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = diff / np.sqrt(var[1] / n[1] + var[0] / n[0])
    t = np.where(np.isfinite(t), t, 0.0)
    k = adata.n_vars if n_genes is None else int(min(n_genes, adata.n_vars))
    order = np.argsort(-np.abs(t), kind="stable")[:k]
    return pd.Series(
        diff[order].astype(np.float64),
        index=pd.Index(np.asarray(adata.var_names)[order].astype(str)),
        name=name or f"{reference}->{group}",
    )


def _as_references(reference) -> dict[str, pd.Series]:
    """Reference DE vectors as ``name -> Series(gene -> value)``."""
    if reference is None:
        return {}
    if isinstance(reference, pd.Series):
        return {str(reference.name) if reference.name is not None else "reference": reference}
    if isinstance(reference, pd.DataFrame):  # rows = references, columns = genes
        return {str(i): row for i, row in reference.iterrows()}
    if isinstance(reference, Mapping) and {"names", "scores"} <= set(reference):  # pp.rank_de_genes result
        names, scores = reference["names"], reference["scores"]
        if not isinstance(names, pd.DataFrame) or not isinstance(scores, pd.DataFrame):
            raise ValueError(
                "A rank_de_genes result must hold DataFrames 'names' and 'scores' (adata.uns['pg_de_genes'])."
            )
        return {
            str(g): pd.Series(scores.loc[g].to_numpy(np.float64), index=names.loc[g].astype(str).to_numpy())
            for g in names.index
        }
    if isinstance(reference, Mapping):
        out = {}
        for k, v in reference.items():
            if not isinstance(v, pd.Series):
                raise TypeError(
                    f"Reference {k!r} must be a pandas Series indexed by gene name, got {type(v).__name__}."
                )
            out[str(k)] = v
        return out
    raise TypeError(
        "`reference` must be a Series (gene -> value, e.g. from pg.tl.reference_de), a dict of them, a "
        "DataFrame (references x genes) or a pg.pp.rank_de_genes result (adata.uns['pg_de_genes']); "
        f"got {type(reference).__name__}."
    )


def _column_name(key: str, what: str, ref: str) -> str:
    return f"{key}_{what}_{re.sub(r'[^0-9A-Za-z_.+-]+', '_', ref)}"


def _measured_sets(measured, measured_split) -> set[str]:
    """Canonical names of the measured perturbation sets."""
    if isinstance(measured, AnnData):
        col, _ = get_parsed(measured)
        keep = np.ones(measured.n_obs, dtype=bool)
        if measured_split is not None:
            if SPLIT_KEY not in measured.obs:
                raise KeyError(
                    f"`measured` has no obs[{SPLIT_KEY!r}]; run pg.pp.split_perturbations or pass measured_split=None "
                    "(every perturbation of `measured` counts as measured)."
                )
            splits = [measured_split] if isinstance(measured_split, str) else list(measured_split)
            keep = measured.obs[SPLIT_KEY].astype(str).isin(splits).to_numpy()
        names = set(col.to_numpy()[keep].astype(str))
        names.discard(CONTROL)
        return names
    if isinstance(measured, (str, tuple)) or not isinstance(measured, Sequence | np.ndarray | pd.Index | set):
        measured = [measured]
    return {canonical_name(s) for s in as_perturbation_sets(list(measured))}


def phenotypes(
    pred: AnnData,
    *,
    measured=None,
    measured_split: str | Sequence[str] | None = "train",
    reference=None,
    n_comps: int = 20,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    min_measured: int = 1,
    seed: int = 0,
    key_added: str = PHENOTYPE_KEY,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Phenotype map of predicted perturbation outcomes: clusters, known/novel, reference scores.

    GEARS Fig. 3: the model predicts every pair of a gene panel; the predicted changes over
    control (``layers['delta']``) are embedded (PCA of the centred changes), a k-nearest-neighbour
    graph is built on the embedding (:func:`scanpy.pp.neighbors`) and clustered (Leiden,
    :func:`scanpy.tl.leiden` with the ``igraph`` flavour). A cluster is *known* when it
    holds at least ``min_measured`` measured perturbations (e.g. the training perturbations) and
    *novel* otherwise: a phenotype the screen has not shown. Each set is scored against each
    reference DE vector by the dot product of its predicted change with the reference over their
    shared genes (the paper's score) and by their cosine over the same genes.

    Parameters
    ----------
    pred
        Prediction AnnData (:func:`pertpy_gnn.tl.predict`, ``model.predict``): one row per set,
        the predicted change in ``layers['delta']``. Include the measured sets to mark clusters as
        known (e.g. all pairs of the ``tl.gi_map`` genes contain the measured doubles).
    measured
        The measured perturbations: names / gene tuples, or an AnnData parsed by
        :func:`pertpy_gnn.pp.parse_perturbations` (its perturbations in ``measured_split``).
        ``None``: clusters are not marked known / novel.
    measured_split
        With an AnnData ``measured``: the splits of ``obs['pg_split']`` that count as measured
        (default the training perturbations); ``None``: all its perturbations.
    reference
        Reference DE vectors: a Series indexed by gene (e.g. :func:`reference_de`), a dict of
        them, a DataFrame (one row per reference, genes as columns) or a
        :func:`pertpy_gnn.pp.rank_de_genes` result (``other.uns['pg_de_genes']``: each
        perturbation's top genes with their t-scores is one reference). Genes not in
        ``pred.var_names`` and missing values are ignored.
    n_comps
        Principal components of the changes (at most ``n_sets - 1``).
    n_neighbors
        Neighbours of the kNN graph.
    resolution
        Clustering resolution (higher: more clusters).
    min_measured
        Measured sets a cluster needs to be known.
    seed
        Seed of the PCA, graph and clustering.
    key_added
        Prefix of every key written.
    overwrite
        Replace an existing result under ``key_added``.
    copy
        Return a copy instead of writing into ``pred``.

    Returns
    -------
    ``None`` or a copy if ``copy=True``. Sets, with ``key = key_added`` (default ``pg_phenotype``):

    ``obs[key]``
        Cluster of each set (categorical ``'0'``, ``'1'``, ... by decreasing size).
    ``obs[key + '_measured']``, ``obs[key + '_status']``
        Whether the set was measured, and ``'known'`` / ``'novel'`` of its cluster (with ``measured``).
    ``obs[key + '_dot_' + ref]``, ``obs[key + '_cosine_' + ref]``
        Score of each set against each reference (``ref`` with characters other than letters,
        digits and ``_.+-`` replaced by ``_``).
    ``obsm[key + '_pca']``
        The embedding.
    ``obsp[key + '_connectivities']``, ``obsp[key + '_distances']``
        The kNN graph.
    ``uns[key]``
        ``params``; ``method`` (``'leiden'``); ``variance_ratio`` of the
        components; ``clusters`` (DataFrame per cluster: ``n_sets``, ``n_measured``, ``status``,
        mean score per reference); ``references`` (DataFrame per reference: its columns, genes
        in the reference and shared with the prediction).

    Examples
    --------
    >>> pairs = [f"{a}+{b}" for a, b in itertools.combinations(genes, 2)]
    >>> pred = model.predict(pairs)
    >>> ref = pg.tl.reference_de(atlas, "cell_type", "proerythroblast", "HSC")
    >>> pg.tl.phenotypes(pred, measured=adata, reference=ref)
    >>> pred.obs.sort_values(f"pg_phenotype_dot_{ref.name}", ascending=False).head()
    """
    import scanpy as sc
    from sklearn.decomposition import PCA

    if not isinstance(pred, AnnData):
        raise TypeError(f"`pred` must be a prediction AnnData, got {type(pred).__name__}.")
    if DELTA_LAYER not in pred.layers:
        raise ValueError(
            f"`pred` has no layers[{DELTA_LAYER!r}]: pass a prediction AnnData (model.predict / pg.tl.predict)."
        )
    check_overwrite(pred.obs, key_added, overwrite, "pred.obs")
    if pred.n_obs < 3:
        raise ValueError(f"A phenotype map needs at least 3 predicted sets, got {pred.n_obs}.")
    refs = _as_references(reference)
    measured_names = None if measured is None else _measured_sets(measured, measured_split)
    is_measured = None
    if measured_names is not None:
        col = pred.obs["perturbation"] if "perturbation" in pred.obs else pd.Series(pred.obs_names)
        canon = np.array([canonical_name(s) for s in as_perturbation_sets(list(col.astype(str)))])
        is_measured = np.isin(canon, list(measured_names))
        if not is_measured.any():
            raise ValueError(
                f"None of the {len(measured_names)} measured perturbations is a row of `pred` "
                f"(e.g. {sorted(measured_names)[:5]}): predict them too, so that their clusters count as known."
            )
    # reference vectors aligned to the prediction's genes (checked before anything is written)
    var_pos = pd.Index(pred.var_names.astype(str))
    aligned = {}
    for name, vec in refs.items():
        vec = pd.to_numeric(vec, errors="coerce")
        vec = vec[np.isfinite(vec.to_numpy(np.float64)) & (vec.to_numpy(np.float64) != 0)]
        vec = vec[~vec.index.astype(str).duplicated()]
        pos = var_pos.get_indexer(vec.index.astype(str))
        shared = pos >= 0
        if not shared.any():
            raise ValueError(
                f"Reference {name!r} shares no gene with the prediction ({len(vec)} genes, e.g. "
                f"{list(vec.index[:5])}; prediction genes e.g. {list(var_pos[:5])}). Use the same gene names."
            )
        if shared.sum() < 0.5 * len(vec):
            logger.warning(
                "Reference %r: only %d of its %d genes are in the prediction.",
                name,
                int(shared.sum()),
                len(vec),
            )
        aligned[name] = (pos[shared], vec.to_numpy(np.float64)[shared], len(vec))
    pred = pred.copy() if copy else pred
    d = pred.layers[DELTA_LAYER]
    delta = np.asarray(d.toarray() if sp.issparse(d) else d, dtype=np.float64)
    if not np.isfinite(delta).all():
        raise ValueError("The predicted changes hold NaN or inf values; drop those sets first.")

    # embedding and kNN graph
    n_comps = int(max(1, min(n_comps, pred.n_obs - 1, pred.n_vars)))
    pca = PCA(n_components=n_comps, random_state=seed)
    emb = pca.fit_transform(delta).astype(np.float32)
    tmp = AnnData(obsm={"X": emb}, obs=pd.DataFrame(index=pd.RangeIndex(pred.n_obs).astype(str)))
    sc.pp.neighbors(tmp, n_neighbors=int(min(n_neighbors, pred.n_obs - 1)), use_rep="X", random_state=seed)
    conn = tmp.obsp["connectivities"]
    sc.tl.leiden(
        tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False
    )
    raw, method = tmp.obs["leiden"].astype(int).to_numpy(), "leiden"
    sizes = np.bincount(raw)
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(sizes.size)
    labels = rank[raw]
    n_clusters = int(labels.max()) + 1
    cats = [str(i) for i in range(n_clusters)]
    pred.obs[key_added] = pd.Categorical.from_codes(labels, categories=cats)
    pred.obsm[f"{key_added}_pca"] = emb
    pred.obsp[f"{key_added}_connectivities"] = sp.csr_matrix(conn)
    pred.obsp[f"{key_added}_distances"] = sp.csr_matrix(tmp.obsp["distances"])

    clusters = pd.DataFrame({"n_sets": np.bincount(labels, minlength=n_clusters)}, index=pd.Index(cats))
    if is_measured is not None:
        clusters["n_measured"] = np.bincount(labels[is_measured], minlength=n_clusters)
        clusters["status"] = np.where(clusters["n_measured"] >= int(min_measured), KNOWN, NOVEL)
        pred.obs[f"{key_added}_measured"] = is_measured
        pred.obs[f"{key_added}_status"] = pd.Categorical(
            clusters["status"].to_numpy()[labels], categories=[KNOWN, NOVEL]
        )

    # reference scores over shared genes
    ref_rows, score_cols, cluster_cols = [], {}, {}
    for name, (pos, r, n_ref) in aligned.items():
        sub = delta[:, pos]
        dot = sub @ r
        norm = np.linalg.norm(sub, axis=1) * np.linalg.norm(r)
        cosine = np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0)
        c_dot, c_cos = _column_name(key_added, "dot", name), _column_name(key_added, "cosine", name)
        score_cols[c_dot], score_cols[c_cos] = dot, cosine
        cluster_cols[c_dot] = pd.Series(dot).groupby(labels).mean().reindex(range(n_clusters)).to_numpy()
        ref_rows.append(
            {
                "reference": name,
                "dot_column": c_dot,
                "cosine_column": c_cos,
                "n_genes_reference": int(n_ref),
                "n_genes_shared": int(len(pos)),
            }
        )
    if score_cols:  # all at once: many references (a rank_de_genes result) would fragment obs
        scores = pd.DataFrame(score_cols, index=pred.obs_names)
        pred.obs = pd.concat([pred.obs.drop(columns=list(score_cols), errors="ignore"), scores], axis=1)
        clusters = pd.concat([clusters, pd.DataFrame(cluster_cols, index=clusters.index)], axis=1)
    pred.uns[key_added] = {
        "params": {
            "n_comps": n_comps,
            "n_neighbors": int(n_neighbors),
            "resolution": float(resolution),
            "min_measured": int(min_measured),
            "seed": int(seed),
            "measured_split": "all"
            if measured_split is None
            else (measured_split if isinstance(measured_split, str) else ",".join(measured_split)),
        },
        "method": method,
        "variance_ratio": pca.explained_variance_ratio_.astype(np.float32),
        "clusters": clusters,
        "references": pd.DataFrame(
            ref_rows,
            columns=["reference", "dot_column", "cosine_column", "n_genes_reference", "n_genes_shared"],
        ).set_index("reference"),
    }
    logger.info(
        "%d sets in %d phenotype clusters (%s)%s.",
        pred.n_obs,
        n_clusters,
        method,
        ""
        if measured_names is None
        else f", {int((clusters['status'] == NOVEL).sum())} novel ({int(clusters.loc[clusters['status'] == NOVEL, 'n_sets'].sum())} sets)",
    )
    return pred if copy else None
