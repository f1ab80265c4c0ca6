"""The perturbation data contract: parse any common perturbation-label convention."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import CONTEXT_KEY, CONTEXT_SEP, CONTROL, DELIM, N_GENES_KEY, PERT_KEY, PERT_UNS_KEY
from .._utils import get_adata, get_matrix, logger

#: labels recognised as control when ``control_label`` is not given (case-insensitive)
DEFAULT_CONTROL_LABELS = (
    "control",
    "ctrl",
    "non-targeting",
    "nontargeting",
    "non_targeting",
    "nt",
    "unperturbed",
)


def canonical_name(genes: Iterable[str]) -> str:
    """Canonical name of a perturbation set: genes sorted and joined by ``+``; ``control`` if empty."""
    genes = sorted(set(genes))
    return DELIM.join(genes) if genes else CONTROL


def split_label(
    label: str, *, delimiter: str | Sequence[str] = DELIM, control_labels: Iterable[str] = ()
) -> tuple[str, ...]:
    """Split one perturbation label into its sorted gene set, dropping control tokens.

    ``"A+ctrl"`` -> ``("A",)``, ``"B+A"`` -> ``("A", "B")``, ``"ctrl"`` -> ``()``. A whole label
    equal to a control label is control even if it contains the delimiter (``"non_targeting"``).
    """
    controls = {c.lower() for c in control_labels}
    if label.strip().lower() in controls:
        return ()
    delims = [delimiter] if isinstance(delimiter, str) else list(delimiter)
    parts = [label]
    for d in delims:
        parts = [p for part in parts for p in part.split(d)]
    genes = {p.strip() for p in parts if p.strip() and p.strip().lower() not in controls}
    return tuple(sorted(genes))


def as_perturbation_sets(perturbations, *, delimiter: str = DELIM) -> list[tuple[str, ...]]:
    """Normalize user input to a list of sorted gene tuples.

    A string is one set (``"A"``, ``"A+B"``); a tuple of genes is one set (``("A", "B", "C")``);
    a list holds several sets, each a string or a list/tuple of genes
    (``["A", "A+B", ["A", "B", "C"]]``). An empty list gives an empty list.
    """
    if isinstance(perturbations, (str, tuple)):
        perturbations = [perturbations]
    if perturbations is None or isinstance(perturbations, bytes) or not isinstance(perturbations, Iterable):
        raise TypeError(
            f"Perturbations must be a set ('A', 'A+B', ('A', 'B')) or a list of sets, got "
            f"{type(perturbations).__name__}."
        )
    out = []
    for p in perturbations:
        if isinstance(p, str):
            genes = split_label(p, delimiter=delimiter, control_labels=DEFAULT_CONTROL_LABELS)
        else:
            genes = tuple(sorted({str(g) for g in p}))
        if not genes:
            raise ValueError(f"Empty perturbation set {p!r}: give at least one gene per set.")
        out.append(genes)
    return out


def _detect_delimiter(labels: Sequence[str], controls: Iterable[str] = ()) -> str:
    lower = {c.lower() for c in controls}
    joined = "".join(lab for lab in labels if lab.strip().lower() not in lower)
    if "+" in joined:
        return "+"
    if "_" in joined:
        return "_"
    return "+"


def _check_labels(labels: pd.Series, key: str) -> None:
    bad = (
        labels.isna()
        | (labels.astype(str).str.strip() == "")
        | labels.astype(str).str.lower().isin(["nan", "none"])
    )
    if bad.any():
        examples = list(labels.index[bad][:5])
        raise ValueError(
            f"{int(bad.sum())} cells have an empty or missing label in obs[{key!r}] (e.g. cells {examples}). "
            "Label every cell (use the control label for unperturbed cells) or subset them away first: "
            f"adata = adata[adata.obs[{key!r}].notna()].copy()."
        )


def validate_expression(adata: AnnData, *, layer: str | None = None, expect: str = "log-normalized") -> None:
    """Check that the expression matrix is finite and log-normalized, not raw counts.

    Parameters
    ----------
    adata
        Annotated data matrix.
    layer
        Layer to check; ``None`` checks ``adata.X``.
    expect
        What the data should be; only ``"log-normalized"`` is checked for now.

    Raises
    ------
    ValueError
        On non-finite values, or on data that looks like raw counts.
    """
    x = get_matrix(adata, layer)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    vals = x.data if sp.issparse(x) else np.asarray(x)
    if vals.size == 0:
        raise ValueError(f"{where} is empty.")
    if not np.all(np.isfinite(vals)):
        n = int((~np.isfinite(vals)).sum())
        raise ValueError(
            f"{where} has {n} non-finite values (NaN or inf). Replace or remove them before modelling."
        )
    sample = vals.ravel()[:1_000_000]
    fix = (
        "Normalize into a layer without touching X: "
        "adata.layers['lognorm'] = sc.pp.log1p(sc.pp.normalize_total(adata, target_sum=1e4, inplace=False)['X']), "
        "then pass layer='lognorm'."
    )
    if expect == "log-normalized" and sample.max() > 1 and np.all(np.mod(sample, 1) == 0):
        raise ValueError(
            f"{where} looks like raw counts (integer values up to {sample.max():.0f}), but log-normalized data "
            f"is expected. {fix}"
        )
    if expect == "log-normalized" and sample.max() > 50:
        raise ValueError(
            f"{where} has values up to {sample.max():.3g}, too large for log-normalized data (log1p of counts "
            f"per 10,000 stays below ~10): is it normalized but not log-transformed? {fix}"
        )
    if sample.min() < 0:
        logger.warning(
            "%s has negative values: is it scaled? Log-normalized, unscaled data is expected.", where
        )


def _refuse_second_parse(adata: AnnData) -> None:
    for where, mapping, key in (("obs", adata.obs, PERT_KEY), ("uns", adata.uns, PERT_UNS_KEY)):
        if key in mapping:
            raise ValueError(
                f"adata.{where}[{key!r}] already exists: the perturbations were parsed before. Pass "
                "`overwrite=True` to parse them again (results computed from the earlier parse, e.g. the "
                "split or DE genes, then need recomputing), or `copy=True` to parse into a copy."
            )


def parse_perturbations(
    data,
    *,
    perturbation_key: str = "condition",
    control_label: str | Sequence[str] | None = None,
    delimiter: str | Sequence[str] | None = None,
    gene_universe: Iterable[str] | None = None,
    drop_unknown: bool = False,
    layer: str | None = None,
    check_expression: bool = True,
    context_key: str | None = None,
    modality: str | None = None,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Parse the perturbation column into canonical gene sets, validating the data first.

    Reads every common convention: GEARS (``ctrl``, ``A+ctrl``, ``A+B``), pertpy / scPerturb
    (``control``, ``A``, ``A+B``, ``A_B``), any control label and delimiter, sets of any size.
    ``B+A`` and ``A+B`` are the same set. The user's columns are never changed.

    Parameters
    ----------
    data
        AnnData, or MuData together with ``modality``.
    perturbation_key
        Column of ``obs`` with the perturbation label of each cell.
    control_label
        Label(s) of unperturbed cells. By default any of ``control``, ``ctrl``, ``non-targeting``, ``NT``.
    delimiter
        Separator(s) of genes within a label. By default ``+`` (or ``_`` when no label has ``+``).
    gene_universe
        Genes that may be perturbed although they are not in ``var_names`` (e.g. every GO-annotated
        gene). A perturbed gene in neither is an error.
    drop_unknown
        Instead of failing on perturbed genes in neither ``var_names`` nor ``gene_universe``, drop
        their cells; a filtered copy is then returned and ``data`` is left as it was.
    layer
        Layer with log-normalized expression; ``None`` uses ``X``.
    check_expression
        Check the expression for non-finite values and raw counts.
    context_key
        Column of ``obs`` with the cell context of each cell (cell line, donor, condition) of a
        screen run in several contexts. Every context needs control cells (its perturbations are
        compared with them). Splits, DE genes, baselines, evaluation and GEARS then work per
        (context, perturbation) group; see ``docs/methods.md`` ("Cell contexts").
    modality
        Modality of a MuData.
    copy
        Return a copy instead of writing into ``data``.
    overwrite
        Replace an earlier parse (``obs['pg_perturbation']``, ``obs['pg_n_genes']``,
        ``uns['pg_perturbation']``) when writing into ``data``; without it a second parse of the same
        AnnData is refused (results computed from the first parse would silently no longer match it).

    Returns
    -------
    ``None``, or an AnnData if ``copy=True`` or cells were dropped. Sets:

    ``adata.obs['pg_perturbation']``
        Canonical name of every cell's set (``control``, ``A``, ``A+B``), categorical.
    ``adata.obs['pg_n_genes']``
        Number of perturbed genes (0 for control).
    ``adata.obs['pg_context']``
        With ``context_key``: the context of every cell as a string categorical.
    ``adata.uns['pg_perturbation']``
        How the column was parsed: key, control labels, delimiter, layer, perturbed genes, and
        with ``context_key`` also ``context_key`` and ``contexts``.
    """
    adata = get_adata(data, modality)
    if not (copy or overwrite or drop_unknown):  # writing into `data`: refuse early
        _refuse_second_parse(adata)
    if context_key is not None:
        if context_key not in adata.obs:
            raise KeyError(
                f"obs[{context_key!r}] not found; pass `context_key=` naming the column with the cell context "
                f"(cell line, donor, condition) of each cell, or None for a single context (obs has "
                f"{list(adata.obs.columns)})."
            )
        if context_key in (perturbation_key, CONTEXT_KEY, PERT_KEY):
            raise ValueError(
                f"`context_key` {context_key!r} must be a column of its own, not the perturbation column or "
                f"{CONTEXT_KEY!r}."
            )
        _check_labels(adata.obs[context_key], context_key)
    if perturbation_key not in adata.obs:
        raise KeyError(
            f"obs[{perturbation_key!r}] not found; pass `perturbation_key=` naming the column with "
            f"perturbation labels (obs has {list(adata.obs.columns)})."
        )
    if adata.var_names.has_duplicates:
        dups = adata.var_names[adata.var_names.duplicated()].unique()[:10].tolist()
        raise ValueError(
            f"var_names has duplicates {dups}. Make them unique first: adata.var_names_make_unique()."
        )
    if check_expression:
        validate_expression(adata, layer=layer)

    labels = adata.obs[perturbation_key]
    _check_labels(labels, perturbation_key)
    labels = labels.astype(str)
    categories = pd.unique(labels)
    controls = (
        list(DEFAULT_CONTROL_LABELS)
        if control_label is None
        else [control_label]
        if isinstance(control_label, str)
        else list(control_label)
    )
    delim = _detect_delimiter(categories, controls) if delimiter is None else delimiter

    sets = {c: split_label(c, delimiter=delim, control_labels=controls) for c in categories}
    control_cats = [c for c, s in sets.items() if not s]
    n_control = int(labels.isin(control_cats).sum())
    if n_control == 0:
        raise ValueError(
            f"No control cells: no label of obs[{perturbation_key!r}] matches the control label(s) {controls}. "
            f"Labels seen include {list(categories[:8])}; pass `control_label=` with your control label."
        )

    known = set(adata.var_names) | (set(gene_universe) if gene_universe is not None else set())
    perturbed = sorted({g for s in sets.values() for g in s})
    unknown = [g for g in perturbed if g not in known]
    out = adata
    if unknown:
        where = "var_names" + (" or gene_universe" if gene_universe is not None else "")
        if not drop_unknown:
            raise ValueError(
                f"{len(unknown)} perturbed genes are not in {where}: {unknown[:20]}"
                f"{' ...' if len(unknown) > 20 else ''}. Pass `drop_unknown=True` to drop their cells, or "
                "`gene_universe=` with the genes that may be perturbed (e.g. the GO-annotated genes)."
            )
        bad_cats = [c for c, s in sets.items() if any(g in unknown for g in s)]
        keep = ~labels.isin(bad_cats).to_numpy()
        logger.warning(
            "Dropping %d cells of %d perturbations with unknown genes %s.",
            (~keep).sum(),
            len(bad_cats),
            unknown[:10],
        )
        out = adata[keep].copy()
        labels = labels[keep]
        perturbed = sorted({g for c, s in sets.items() if c not in bad_cats for g in s})
    elif copy:
        out = adata.copy()

    if context_key is not None:
        ctx = adata.obs[context_key].astype(str).to_numpy()
        is_control = labels.isin(control_cats).to_numpy()
        ctx_all = pd.unique(ctx)
        no_ctrl = sorted(set(ctx_all) - set(ctx[is_control]))
        if no_ctrl:
            raise ValueError(
                f"Contexts {no_ctrl[:10]} of obs[{context_key!r}] have no control cells; every context needs its "
                "own control cells (its perturbations are compared with them). Drop those contexts first: "
                f"adata = adata[~adata.obs[{context_key!r}].isin({no_ctrl[:3]})].copy()."
            )
        if any(CONTEXT_SEP in c for c in ctx_all):
            raise ValueError(
                f"Context names must not contain {CONTEXT_SEP!r} (it joins a context and a perturbation in group "
                f"labels); rename them, e.g. adata.obs[{context_key!r}] = adata.obs[{context_key!r}]"
                f".astype(str).str.replace({CONTEXT_SEP!r}, '_')."
            )
    if out is adata and not overwrite:
        _refuse_second_parse(adata)
    canon = {c: canonical_name(s) for c, s in sets.items()}
    names = labels.map(canon)
    order = [CONTROL] + sorted(set(names) - {CONTROL}, key=lambda n: (n.count(DELIM), n))
    out.obs[PERT_KEY] = pd.Categorical(names.to_numpy(), categories=order)
    out.obs[N_GENES_KEY] = labels.map({c: len(s) for c, s in sets.items()}).to_numpy().astype(np.int64)
    out.uns[PERT_UNS_KEY] = {
        "perturbation_key": perturbation_key,
        "control_label": list(controls),
        "delimiter": delim if isinstance(delim, str) else list(delim),
        "layer": "X" if layer is None else layer,
        "genes": np.array(perturbed, dtype=object),
    }
    if context_key is not None:
        ctx = out.obs[context_key].astype(str)
        order_ctx = (
            [str(c) for c in out.obs[context_key].cat.categories if str(c) in set(ctx)]
            if isinstance(out.obs[context_key].dtype, pd.CategoricalDtype)
            else sorted(set(ctx))
        )
        out.obs[CONTEXT_KEY] = pd.Categorical(ctx.to_numpy(), categories=order_ctx)
        out.uns[PERT_UNS_KEY]["context_key"] = context_key
        out.uns[PERT_UNS_KEY]["contexts"] = np.array(order_ctx, dtype=object)
    elif CONTEXT_KEY in out.obs:  # a re-parse without contexts drops the old context column
        del out.obs[CONTEXT_KEY]
    logger.info(
        "Parsed %d perturbations (%d genes) and %d control cells.",
        len(order) - 1,
        len(perturbed),
        int((names == CONTROL).sum()),
    )
    return out if (copy or out is not adata) else None


def get_parsed(adata: AnnData) -> tuple[pd.Series, list[tuple[str, ...]]]:
    """The canonical perturbation column and the gene set of each of its categories.

    Raises a clear error if :func:`parse_perturbations` has not been run.
    """
    if PERT_KEY not in adata.obs or PERT_UNS_KEY not in adata.uns:
        raise KeyError(
            "Perturbations are not parsed yet: run pg.pp.parse_perturbations(adata, perturbation_key=...) first."
        )
    col = adata.obs[PERT_KEY]
    sets = [() if c == CONTROL else tuple(c.split(DELIM)) for c in col.cat.categories]
    return col, sets


def layer_of(adata: AnnData) -> str | None:
    """The expression layer recorded by :func:`parse_perturbations` (``None`` for ``X``)."""
    layer = adata.uns.get(PERT_UNS_KEY, {}).get("layer", "X")
    return None if layer == "X" else layer


def get_context(adata: AnnData) -> pd.Series | None:
    """The context column ``obs['pg_context']`` when the data was parsed with ``context_key``, else ``None``."""
    if adata.uns.get(PERT_UNS_KEY, {}).get("context_key") is None:
        return None
    if CONTEXT_KEY not in adata.obs:
        raise KeyError(
            f"obs[{CONTEXT_KEY!r}] is missing although the data was parsed with a context_key: rerun "
            "pg.pp.parse_perturbations(adata, perturbation_key=..., context_key=...)."
        )
    return adata.obs[CONTEXT_KEY]


def group_label(context: str | None, perturbation: str) -> str:
    """Label of a (context, perturbation) group: ``'K562|A+B'``, or the perturbation alone without context."""
    return perturbation if context is None else f"{context}{CONTEXT_SEP}{perturbation}"


class Groups:
    """The (context, perturbation) groups of parsed data: one group per perturbation without contexts.

    Attributes
    ----------
    codes
        Group of every cell (``context * n_perturbations + perturbation``).
    labels
        Label of every group (:func:`group_label`).
    pert
        Perturbation category of every group; ``sets`` its gene set; ``names`` its name.
    context
        Context index of every group (0 without contexts); ``contexts`` the context names
        (``[None]`` without contexts).
    control
        Group of the control cells of every group's context.
    """

    def __init__(self, adata: AnnData):
        col, sets = get_parsed(adata)
        ctx = get_context(adata)
        cats = [str(c) for c in col.cat.categories]
        n = len(cats)
        self.contexts = [None] if ctx is None else [str(c) for c in ctx.cat.categories]
        nc = len(self.contexts)
        self.has_contexts = ctx is not None
        pcode = col.cat.codes.to_numpy().astype(np.int64)
        ccode = np.zeros_like(pcode) if ctx is None else ctx.cat.codes.to_numpy().astype(np.int64)
        self.codes = np.where(pcode >= 0, ccode * n + pcode, -1)
        self.pert = np.tile(np.arange(n), nc)
        self.context = np.repeat(np.arange(nc), n)
        self.names = [cats[p] for p in self.pert]
        self.sets = [sets[p] for p in self.pert]
        self.labels = [
            group_label(self.contexts[c], cats[p]) for c, p in zip(self.context, self.pert, strict=True)
        ]
        ci = cats.index(CONTROL) if CONTROL in cats else -1
        self.control = np.where(ci >= 0, self.context * n + ci, -1)
        self.n_perturbations = n
        self.is_control = self.pert == ci

    def __len__(self) -> int:
        return len(self.labels)
