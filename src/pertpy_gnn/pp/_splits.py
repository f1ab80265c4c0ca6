"""Train / validation / test splits of perturbations: GEARS 'simulation', single-gene, leave-one-out, custom."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import CONTROL, DELIM, PERT_UNS_KEY, SPLIT_KEY, SUBGROUP_KEY
from .._utils import check_overwrite, get_adata, logger
from ._perturbations import as_perturbation_sets, get_context, get_parsed, group_label, split_label

KINDS = ("simulation", "single", "leave_one_out", "custom", "context")
SPLITS = ("train", "val", "test")

Pert = tuple[str, ...]


def _floor(n: int, fraction: float) -> int:
    """``floor(n * fraction)``, robust to float error (``int(100 * 0.29)`` is 28)."""
    return int(np.floor(n * fraction + 1e-9))


def _subgroup(genes: Pert, seen: set[str]) -> str:
    """Test subgroup of a held-out perturbation: ``unseen_single``, ``combo_seen{k}``, ``combo{M}_seen{k}``."""
    if len(genes) == 1:
        return "unseen_single"
    k = sum(g in seen for g in genes)
    return f"combo_seen{k}" if len(genes) == 2 else f"combo{len(genes)}_seen{k}"


def _hold_out(
    perts: list[Pert], gene_fraction: float, combo_fraction: float, rng: np.random.Generator, gene_pool: str
) -> tuple[list[Pert], list[Pert], set[str]]:
    """The GEARS 'simulation' rule on a list of perturbations: ``(kept, held_out, seen genes)``.

    A ``gene_fraction`` of the pool genes is drawn as seen; singles of seen genes are kept; of the
    multi-gene sets whose genes are all seen, a random ``combo_fraction`` is kept; everything else
    is held out.
    """
    singles = [p for p in perts if len(p) == 1]
    pool = sorted({g for p in (singles if gene_pool == "singles" else perts) for g in p})
    seen = set(rng.choice(pool, _floor(len(pool), gene_fraction), replace=False).tolist()) if pool else set()
    candidates = [p for p in perts if len(p) > 1 and all(g in seen for g in p)]
    chosen = rng.choice(len(candidates), _floor(len(candidates), combo_fraction), replace=False)
    kept = {p for p in singles if p[0] in seen} | {candidates[i] for i in chosen}
    return [p for p in perts if p in kept], [p for p in perts if p not in kept], seen


def _leave_one_out(
    perts: list[Pert],
    test_perturbations,
    val_gene_fraction: float,
    val_combo_fraction: float,
    rng: np.random.Generator,
) -> tuple[list[Pert], list[Pert], list[Pert]]:
    if test_perturbations is None or len(test_perturbations) == 0:
        raise ValueError(
            "kind='leave_one_out' needs `test_perturbations=`, e.g. test_perturbations=['KLF1+MAP2K6']."
        )
    wanted = list(dict.fromkeys(as_perturbation_sets(test_perturbations)))
    missing = [DELIM.join(p) for p in wanted if p not in perts]
    if missing:
        raise ValueError(
            f"test_perturbations {missing} are not perturbations of this data (names are genes joined by "
            f"'{DELIM}', e.g. {[DELIM.join(p) for p in perts if len(p) > 1][:3]})."
        )
    test_genes = {g for p in wanted for g in p}
    rest = [p for p in perts if p not in wanted]
    # singles of the held-out sets' genes stay in train: their effects are what the GI analysis builds on
    eligible = [p for p in rest if not (len(p) == 1 and p[0] in test_genes)]
    val = []
    for group, fraction in (
        ([p for p in eligible if len(p) == 1], val_gene_fraction),
        ([p for p in eligible if len(p) > 1], val_combo_fraction),
    ):
        idx = rng.choice(len(group), len(group) - _floor(len(group), fraction), replace=False)
        val += [group[i] for i in sorted(idx)]
    return [p for p in rest if p not in val], val, wanted


def _custom(adata: AnnData, col: pd.Series, present: dict[str, Pert], assignment) -> dict[str, str]:
    if assignment is None:
        raise ValueError(
            "kind='custom' needs `assignment=`, a mapping perturbation name -> 'train' / 'val' / 'test'."
        )
    if not isinstance(assignment, (Mapping, pd.Series)):
        raise TypeError(
            f"`assignment` must be a dict or a Series (perturbation -> split), got {type(assignment).__name__}."
        )
    parsed = adata.uns[PERT_UNS_KEY]
    raw_key = parsed.get("perturbation_key")
    raw = {}
    if raw_key in adata.obs:
        pairs = pd.DataFrame(
            {"raw": adata.obs[raw_key].astype(str).to_numpy(), "canon": col.astype(str).to_numpy()}
        )
        raw = dict(pairs.drop_duplicates("raw").to_numpy())
    delim = parsed.get("delimiter", DELIM)
    delim = delim if isinstance(delim, str) else list(delim)
    controls = list(parsed.get("control_label", [CONTROL]))
    out, unknown, bad, conflicts = {}, [], [], []
    for name, label in dict(assignment).items():
        label = str(label).lower()
        if label not in SPLITS:
            bad.append((name, label))
            continue
        name = str(name)
        canon = name if name in present else raw.get(name)
        if canon is None:
            genes = split_label(name, delimiter=delim, control_labels=controls)
            canon = DELIM.join(genes) if genes else CONTROL
        if canon not in present:
            unknown.append(name)
        elif out.get(canon, label) != label:
            conflicts.append(canon)
        else:
            out[canon] = label
    if bad:
        raise ValueError(f"`assignment` labels must be 'train', 'val' or 'test'; got {bad[:5]}.")
    if unknown:
        raise ValueError(f"`assignment` names perturbations not in the data: {unknown[:10]}.")
    if conflicts:
        raise ValueError(f"`assignment` gives different splits to the same perturbation: {conflicts[:10]}.")
    if out.pop(CONTROL, "train") != "train":
        raise ValueError("Control cells are always in 'train'; remove the control entry from `assignment`.")
    missing = [c for c in present if c != CONTROL and c not in out]
    if missing:
        raise ValueError(
            f"`assignment` misses {len(missing)} perturbations, e.g. {missing[:10]}. Assign every perturbation, "
            "e.g. {**{p: 'train' for p in adata.obs['pg_perturbation'].cat.categories}, **assignment}."
        )
    return out


def split_perturbations(
    data,
    *,
    kind: str = "simulation",
    seed: int = 0,
    train_gene_fraction: float = 0.75,
    train_combo_fraction: float = 0.75,
    val_gene_fraction: float = 0.9,
    val_combo_fraction: float = 0.9,
    test_perturbations=None,
    assignment: Mapping[str, str] | pd.Series | None = None,
    held_out_context: str | None = None,
    gene_pool: str = "singles",
    key_added: str = SPLIT_KEY,
    overwrite: bool = False,
    modality: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Split perturbations into train / validation / test sets, as in GEARS.

    Whole perturbations are assigned, never cells: no cell of a test perturbation is seen in
    training. Control cells are always in ``train``. Seeded and reproducible.

    ``kind='simulation'`` (the GEARS paper): a ``train_gene_fraction`` of the genes is drawn as
    *seen*; singles of seen genes stay in train+val, singles of unseen genes go to test
    (``unseen_single``); of the doubles whose two genes are both seen, a ``train_combo_fraction``
    stays in train+val and the rest goes to test (``combo_seen2``); doubles with one or two unseen
    genes go to test (``combo_seen1``, ``combo_seen0``). The same rule with the ``val_*`` fractions
    inside train+val carves out the validation set. Fractions are rounded down as in the reference
    code. Sets of three or more genes follow the rule for doubles (subgroups ``combo3_seen2`` ...).

    ``kind='single'``: single-gene data only; unseen singles go to test, then to val.

    ``kind='leave_one_out'``: ``test_perturbations`` (one or more sets, e.g. a double for a
    genetic-interaction analysis) go to test, everything else to train, except a seeded validation
    set for model selection: ``1 - val_gene_fraction`` of the singles and ``1 - val_combo_fraction``
    of the multi-gene sets (at least one of each kind present), never the singles of genes of the
    test sets, which stay in train.

    ``kind='context'`` (data parsed with ``context_key``): every perturbation of the context
    ``held_out_context`` goes to test (its control cells stay in ``train``: a new cell line's
    control cells are what one has before screening it); the other contexts' perturbations go to
    train, except a seeded validation set of perturbations (``1 - val_gene_fraction`` of the singles
    and ``1 - val_combo_fraction`` of the multi-gene sets, at least one of each kind when there are
    several) held out of training in every context. Test subgroups: ``context_seen`` (the
    perturbation is trained in another context) and ``context_unseen`` (a validation perturbation,
    trained nowhere).

    With contexts, the other kinds split the perturbations the same way in every context (a
    perturbation held out is held out everywhere): held-out perturbations *within* contexts.

    ``kind='custom'``: ``assignment`` maps each perturbation (canonical name such as ``'A+B'``, or
    the label of the user's perturbation column such as ``'B+A'`` / ``'A+ctrl'``) to ``'train'``,
    ``'val'`` or ``'test'``.

    Parameters
    ----------
    data
        AnnData parsed by :func:`pertpy_gnn.pp.parse_perturbations`, or a MuData with ``modality``.
    kind
        ``'simulation'``, ``'single'``, ``'leave_one_out'`` or ``'custom'``.
    seed
        Seed of the random draws.
    train_gene_fraction, train_combo_fraction
        Fractions of seen genes and of all-seen combinations kept in train+val (paper: 0.75, 0.75).
    val_gene_fraction, val_combo_fraction
        The same fractions for the train / val split inside train+val (paper: 0.9, 0.9).
    test_perturbations
        Test sets of ``kind='leave_one_out'`` (a name ``'A+B'``, a gene tuple, or a list of them).
    assignment
        Perturbation -> split mapping of ``kind='custom'``.
    held_out_context
        The test context of ``kind='context'``.
    gene_pool
        Genes drawn from in the ``'simulation'`` rule. ``'singles'`` (default): genes with a single
        perturbation in the data, so *seen* means seen perturbed individually, the paper's definition;
        a gene perturbed only in combinations is never seen and its combinations go to test.
        ``'all'``: every perturbed gene, as the published GEARS code (``DataSplitter``) does; a gene
        perturbed only in combinations can then count as seen although it is never perturbed alone.
    key_added
        ``obs`` column and ``uns`` key of the split; the subgroup column is ``'pg_subgroup'`` for the
        default key, else ``f'{key_added}_subgroup'``.
    overwrite
        Replace an existing split under these keys.
    modality
        Modality of a MuData.
    copy
        Return a copy instead of writing into ``data``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Sets:

    ``adata.obs['pg_split']``
        ``train`` / ``val`` / ``test`` (categorical).
    ``adata.obs['pg_subgroup']``
        ``control``, ``train``, ``val``, or the test subgroup ``unseen_single``, ``combo_seen0``,
        ``combo_seen1``, ``combo_seen2`` (categorical).
    ``adata.uns['pg_split']``
        dict with ``kind``, ``seed``, ``params`` (fractions, ``gene_pool``, ``subgroup_key``,
        ``test_perturbations``), ``seen_genes`` (the genes test subgroups count as seen: genes drawn
        as seen, i.e. with their single perturbation in train or val) and ``table`` (DataFrame, one
        row per perturbation incl. control, columns ``split`` and ``subgroup``; for ``kind='context'``
        one row per (context, perturbation) group, indexed ``'context|perturbation'``, with columns
        ``context``, ``perturbation``, ``split``, ``subgroup``) and, with contexts, ``context_key``
        and ``held_out_context``.

    Raises
    ------
    ValueError
        For bad options, data without control cells, or a split leaving train, val or test
        without perturbations (the message names the group and what to change).
    """
    adata = get_adata(data, modality)
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if gene_pool not in ("singles", "all"):
        raise ValueError(f"`gene_pool` must be 'singles' or 'all', got {gene_pool!r}.")
    fractions = {
        "train_gene_fraction": train_gene_fraction,
        "train_combo_fraction": train_combo_fraction,
        "val_gene_fraction": val_gene_fraction,
        "val_combo_fraction": val_combo_fraction,
    }
    for name, value in fractions.items():
        if not 0 < value <= 1:
            raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")
    if test_perturbations is not None and kind != "leave_one_out":
        raise ValueError("`test_perturbations` is only used with kind='leave_one_out'.")
    if assignment is not None and kind != "custom":
        raise ValueError("`assignment` is only used with kind='custom'.")
    if held_out_context is not None and kind != "context":
        raise ValueError("`held_out_context` is only used with kind='context'.")
    if int(seed) != seed:
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")
    subgroup_key = SUBGROUP_KEY if key_added == SPLIT_KEY else f"{key_added}_subgroup"
    for key in (key_added, subgroup_key):
        check_overwrite(adata.obs, key, overwrite, "adata.obs")
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    col, sets = get_parsed(adata)
    counts = col.value_counts()
    present = {c: s for c, s in zip(col.cat.categories, sets, strict=True) if counts[c] > 0}
    if CONTROL not in present:
        raise ValueError(
            "No control cells: GEARS predicts changes over control cells, so the split needs control cells in "
            "'train'. Keep the control cells in the data (check `control_label=` of parse_perturbations)."
        )
    perts = sorted((s for c, s in present.items() if c != CONTROL), key=lambda s: (len(s), s))
    rng = np.random.default_rng(int(seed))
    ctx = get_context(adata)
    if kind == "context":
        return _context_split(
            adata,
            col,
            ctx,
            perts,
            held_out_context,
            rng,
            val_gene_fraction,
            val_combo_fraction,
            key_added=key_added,
            subgroup_key=subgroup_key,
            seed=int(seed),
            fractions=fractions,
            gene_pool=gene_pool,
            copy=copy,
        )

    seen = None
    if kind in ("simulation", "single"):
        multi = [DELIM.join(p) for p in perts if len(p) > 1]
        if kind == "single" and multi:
            raise ValueError(
                f"kind='single' is for single-gene data, but there are {len(multi)} multi-gene perturbations "
                f"(e.g. {multi[:3]}). Use kind='simulation', or keep the singles: adata[adata.obs['pg_n_genes'] <= 1]."
            )
        trainval, test, seen = _hold_out(perts, train_gene_fraction, train_combo_fraction, rng, gene_pool)
        train, val, _ = _hold_out(trainval, val_gene_fraction, val_combo_fraction, rng, gene_pool)
        fixes = {
            "train": "Raise the fractions or try another seed"
            + (
                " (or gene_pool='all' when few genes have a single perturbation)."
                if kind == "simulation"
                else "."
            ),
            "val": "Lower val_gene_fraction / val_combo_fraction or try another seed.",
            "test": "Lower train_gene_fraction / train_combo_fraction or try another seed.",
        }
    elif kind == "leave_one_out":
        train, val, test = _leave_one_out(
            perts, test_perturbations, val_gene_fraction, val_combo_fraction, rng
        )
        fixes = {
            "train": "Hold out fewer perturbations.",
            "val": "Too few perturbations outside the test sets to validate on; use kind='custom' to choose them.",
            "test": "",
        }
    else:
        labels = _custom(adata, col, present, assignment)
        train, val, test = ([p for p in perts if labels[DELIM.join(p)] == s] for s in SPLITS)
        fixes = dict.fromkeys(SPLITS, "Assign at least one perturbation to it in `assignment`.")
    for name, group in zip(SPLITS, (train, val, test), strict=True):
        if not group:
            raise ValueError(
                f"The {kind!r} split (seed={seed}) leaves {name} without perturbations "
                f"({len(perts)} perturbations in all). {fixes[name]}"
            )
    if seen is None:
        seen = {p[0] for p in train + val if len(p) == 1}

    rows = {CONTROL: ("train", "control")}
    rows.update({DELIM.join(p): ("train", "train") for p in train})
    rows.update({DELIM.join(p): ("val", "val") for p in val})
    rows.update({DELIM.join(p): ("test", _subgroup(p, seen)) for p in test})
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["split", "subgroup"])
    codes = col.cat.codes.to_numpy()
    per_cat = table.reindex(col.cat.categories).fillna("train")  # categories without cells do not matter
    subgroups = ["control", "train", "val", "unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"]
    subgroups += sorted(set(table["subgroup"]) - set(subgroups))
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Categorical(per_cat["split"].to_numpy()[codes], categories=list(SPLITS))
    adata.obs[subgroup_key] = pd.Categorical(per_cat["subgroup"].to_numpy()[codes], categories=subgroups)
    adata.uns[key_added] = {
        "kind": kind,
        "seed": int(seed),
        "params": {
            **{k: float(v) for k, v in fractions.items()},
            "gene_pool": gene_pool,
            "subgroup_key": subgroup_key,
            "test_perturbations": np.array(
                [DELIM.join(p) for p in test] if kind == "leave_one_out" else [], dtype=object
            ),
        },
        "seen_genes": np.array(sorted(seen), dtype=object),
        "table": table,
    }
    if ctx is not None:
        adata.uns[key_added]["context_key"] = adata.uns[PERT_UNS_KEY]["context_key"]
    logger.info(
        "Split %d perturbations: %d train, %d val, %d test (%s).",
        len(perts),
        len(train),
        len(val),
        len(test),
        table.loc[table["split"] == "test", "subgroup"].value_counts().to_dict(),
    )
    return adata if copy else None


def _context_split(
    adata,
    col,
    ctx,
    perts,
    held_out,
    rng,
    val_gene_fraction,
    val_combo_fraction,
    *,
    key_added,
    subgroup_key,
    seed,
    fractions,
    gene_pool,
    copy,
):
    """The held-out-context split (``kind='context'``), see :func:`split_perturbations`."""
    if ctx is None:
        raise ValueError(
            "kind='context' needs contexts: parse with pg.pp.parse_perturbations(adata, perturbation_key=..., "
            "context_key='cell_line') first."
        )
    contexts = [str(c) for c in ctx.cat.categories]
    if held_out is None or str(held_out) not in contexts:
        raise ValueError(f"kind='context' needs `held_out_context=`, one of the contexts {contexts[:20]}.")
    held_out = str(held_out)
    if len(contexts) < 2:
        raise ValueError("kind='context' needs at least two contexts: one to hold out, one to train on.")
    c_cells = ctx.astype(str).to_numpy()
    names = col.astype(str).to_numpy()
    trained = sorted(
        {tuple(n.split(DELIM)) for n in pd.unique(names[(c_cells != held_out) & (names != CONTROL)])},
        key=lambda s: (len(s), s),
    )
    if not trained:
        raise ValueError(
            f"No perturbed cells outside the held-out context {held_out!r}: nothing to train on."
        )
    val = []
    for group, fraction in (
        ([p for p in trained if len(p) == 1], val_gene_fraction),
        ([p for p in trained if len(p) > 1], val_combo_fraction),
    ):
        n_val = len(group) - _floor(len(group), fraction)
        if len(group) > 1:
            n_val = max(n_val, 1)
        n_val = min(n_val, len(group) - 1) if len(group) > 1 else 0
        idx = rng.choice(len(group), n_val, replace=False)
        val += [group[i] for i in sorted(idx)]
    val_names = {DELIM.join(p) for p in val}
    if len(val_names) == len(trained):
        raise ValueError("The validation draw leaves no training perturbation; raise val_gene_fraction.")
    trained_names = {DELIM.join(p) for p in trained} - val_names
    rows = {}
    for c in contexts:
        present = pd.unique(names[c_cells == c])
        for n in sorted(present, key=lambda n: (n != CONTROL, n.count(DELIM), n)):
            if n == CONTROL:
                split, sub = "train", "control"
            elif c == held_out:
                split, sub = "test", "context_seen" if n in trained_names else "context_unseen"
            elif n in val_names:
                split, sub = "val", "val"
            else:
                split, sub = "train", "train"
            rows[group_label(c, n)] = (c, n, split, sub)
    table = pd.DataFrame.from_dict(
        rows, orient="index", columns=["context", "perturbation", "split", "subgroup"]
    )
    if not (table["split"] == "test").any():
        raise ValueError(f"The held-out context {held_out!r} has no perturbed cells to test on.")
    labels = pd.Index(c_cells).astype(str) + "|" + pd.Index(names)
    per_cell = table.reindex(labels)
    subgroups = ["control", "train", "val", "context_seen", "context_unseen"]
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Categorical(per_cell["split"].to_numpy(), categories=list(SPLITS))
    adata.obs[subgroup_key] = pd.Categorical(per_cell["subgroup"].to_numpy(), categories=subgroups)
    seen = sorted({g for n in trained_names for g in n.split(DELIM)})
    adata.uns[key_added] = {
        "kind": "context",
        "seed": seed,
        "params": {
            **{k: float(v) for k, v in fractions.items()},
            "gene_pool": gene_pool,
            "subgroup_key": subgroup_key,
            "test_perturbations": np.array([], dtype=object),
        },
        "seen_genes": np.array(seen, dtype=object),
        "table": table,
        "context_key": adata.uns[PERT_UNS_KEY]["context_key"],
        "held_out_context": held_out,
    }
    logger.info(
        "Held out context %r: %d test groups; %d train and %d val perturbations in the other contexts.",
        held_out,
        int((table["split"] == "test").sum()),
        len(trained_names),
        len(val_names),
    )
    return adata if copy else None
