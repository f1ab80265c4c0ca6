"""In-silico perturbation with GeneCompass: deletion, quantitative knockdown, overexpression, screens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import COMPASS_INSILICO_KEY, COMPASS_SCREEN_KEY
from .._utils import check_overwrite, get_adata, logger
from ._ds_core import (
    EDIT_MODES,
    MEDIAN_VALUE,
    batches,
    cell_states,
    check_cell_embedding,
    check_model,
    cosine,
    data_species,
    edit_tokens,
    encode,
    gene_tokens,
    mean_cos_to,
    mean_direction,
    select_cells,
    target_ranks,
    tokenize_kwargs,
    tokenized,
    value_scale,
)
from ._ds_embed import _embed

#: units of a numeric overexpression ``level`` (see :func:`in_silico`)
LEVEL_UNITS = ("fold", "median", "normalized", "token")


def _check_edit(mode: str, factor, level, min_rank_fraction, level_unit: str = "fold") -> None:
    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}.")
    if mode == "knockdown" and (
        isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= float(factor) < 1
    ):
        raise ValueError(
            "Knockdown needs `factor` in [0, 1): the fraction of the gene's normalized expression left "
            f"(0.25 keeps a quarter, a 75% knockdown; 0 removes it), got {factor!r}."
        )
    if mode == "overexpress":
        if level_unit not in LEVEL_UNITS:
            raise ValueError(
                f"level_unit must be one of {LEVEL_UNITS} ('fold': times the cell's current expression of the "
                "gene; 'median': times the gene's corpus median; 'normalized': normalized expression, e.g. "
                "counts per 10,000; 'token': the model's token value), got {level_unit!r}."
            )
        numeric = isinstance(level, (int, float, np.number)) and not isinstance(level, bool)
        if not (level in ("median", "max") or numeric):
            raise ValueError(
                "Overexpression needs `level` 'median' (the gene's corpus median), 'max' (the cell's top gene) "
                f"or a number in `level_unit` ({level_unit!r}), got {level!r}."
            )
        if numeric and not np.isfinite(float(level)):
            raise ValueError(f"`level` must be finite, got {level!r}.")
        if numeric and level_unit == "fold" and float(level) < 1:
            raise ValueError(
                f"level={level!r} with level_unit='fold' would lower the gene; overexpression raises it "
                "(fold >= 1). For a reduction use mode='knockdown' with factor=<fraction left>."
            )
        if numeric and level_unit in ("median", "normalized") and not float(level) > 0:
            raise ValueError(f"level in level_unit={level_unit!r} must be positive, got {level!r}.")
    if min_rank_fraction is not None and not 0 < float(min_rank_fraction) <= 1:
        raise ValueError(f"min_rank_fraction must be in (0, 1] or None, got {min_rank_fraction!r}.")


def _current(ids, values, targets):
    """Value of each target in each row (``(b, e)``, natural-log units) and whether it is among the tokens."""
    import torch

    match = (ids[:, 1:].unsqueeze(2) == targets.unsqueeze(1)) & (targets >= 0).unsqueeze(1)
    cur = torch.where(
        match, values[:, 1:].float().unsqueeze(2), torch.full_like(match, float("-inf"), dtype=torch.float32)
    ).amax(1)
    return cur, match.any(1)


def _levels(level, level_unit: str, ids, values, targets, scale: float, medians=None):
    """Overexpression value per (row, target) in natural-log units (``log1p(x / median)``).

    ``ids, values``: the cells' tokens as read (natural-log values); ``scale``: :func:`value_scale`
    of the model (a ``'token'`` level is in the model's units); ``medians``: the targets' corpus
    medians (``(e,)`` or ``(b, e)``; for ``'normalized'``). Returns ``(levels, known)``: ``known``
    is ``False`` where a ``'fold'`` level has no current expression to multiply (the gene is not
    among the tokens read).
    """
    import torch

    b, e = targets.shape
    known = torch.ones((b, e), dtype=torch.bool)
    if level == "median":
        v = torch.full((b, e), MEDIAN_VALUE)
    elif level == "max":
        v = values[:, 1].float().unsqueeze(1).expand(-1, e)  # the top gene token's value
    elif level_unit == "median":
        v = torch.full((b, e), float(np.log1p(float(level))))
    elif level_unit == "token":
        v = torch.full((b, e), float(level) * scale)
    elif level_unit == "normalized":
        med = torch.as_tensor(medians, dtype=torch.float64)
        v = torch.log1p(float(level) / med).float().expand(b, e)
    else:  # fold of the current normalized expression
        cur, known = _current(ids, values, targets)
        v = torch.where(
            known, torch.log1p(float(level) * torch.expm1(cur.clamp(min=0))), torch.zeros_like(cur)
        )
    return v, known


def _target_medians(corpus, vocab, tokens: np.ndarray) -> np.ndarray:
    """Corpus medians the tokenization used for ``tokens`` (a ``'normalized'`` level needs them)."""
    med = corpus.gene_medians.reindex(vocab.tokens[tokens].astype(str)).to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(med) & (med > 0))
    if bad.any():
        raise ValueError(
            f"level_unit='normalized' needs each gene's corpus median, and {list(vocab.tokens[tokens[bad]])[:10]} "
            "have none here (not among the data's genes?). Give `gene_medians=` or use level_unit='median'."
        )
    return med


def _at_least_current(lv, ids, values, targets):
    """Overexpression never lowers a gene: returns ``(levels, targets)`` with those targets unedited.

    A target the cell already expresses at or above its level becomes ``-1`` (no edit: the cell keeps
    its ranking).
    """
    import torch

    cur, _ = _current(ids, values, targets)
    lv = lv.float()
    return lv, torch.where(lv > cur, targets, torch.full_like(targets, -1))


def _window_needed(ids, values, targets, factor: float, max_len: int):
    """Whether each row keeps its knocked-down targets within ``max_len`` gene tokens after the edit.

    Also returns the number of gene tokens that would keep them all (their lowest rank after the edit).
    """
    import torch

    p_ids, _, _ = edit_tokens(ids, values, targets, mode="knockdown", factor=factor, max_len=ids.shape[1] - 1)
    match = (p_ids[:, 1:].unsqueeze(2) == targets.unsqueeze(1)) & (targets >= 0).unsqueeze(1)  # (b, n, e)
    pos = torch.where(match.any(2), torch.arange(1, p_ids.shape[1], device=p_ids.device), 0).amax(1)
    return pos <= max_len, pos


def _variants(
    ids,
    values,
    targets,
    *,
    mode,
    factor,
    level,
    max_len: int,
    min_rank_fraction,
    level_unit: str = "fold",
    scale: float = 1.0,
    medians=None,
):
    """Original (re-ranked, truncated) and perturbed sequences of a batch, and which rows qualify.

    ``values`` in natural-log units (model values times ``scale``). A row qualifies for deletion /
    knockdown when every target is among its tokens and ranks in the top ``min_rank_fraction`` of them
    (``None``: present anywhere); for overexpression always, except by a ``'fold'`` level, which needs
    every target among the tokens read (a fold of no expression is none).
    """
    import torch

    none = torch.full_like(targets, -1)
    o_ids, o_vals, _ = edit_tokens(ids, values, none, mode="delete", max_len=max_len)
    lv, edited, known = None, targets, None
    if mode == "overexpress":
        lv, known = _levels(level, level_unit, ids, values, targets, scale, medians)
        lv, edited = _at_least_current(lv, ids, values, targets)
        edited = torch.where(known, edited, torch.full_like(edited, -1))
    p_ids, p_vals, _ = edit_tokens(ids, values, edited, mode=mode, factor=factor, level=lv, max_len=max_len)
    if mode == "overexpress":
        ok = (known | (targets < 0)).all(1)
    else:
        pos, n_tok = target_ranks(o_ids, targets)
        frac = 1.0 if min_rank_fraction is None else float(min_rank_fraction)
        ok = ((pos >= 0) & (pos < frac * n_tok.unsqueeze(1)) | (targets < 0)).all(1)
    return o_ids, o_vals, p_ids, p_vals, ok


def _gene_shift_sums(o_ids, p_ids, h_o, h_p, targets, n_special: int, sums, counts) -> None:
    """Add ``1 - cos(state before, state after)`` of every gene token kept by the edit, per token id."""
    import torch

    so, si = torch.sort(o_ids, dim=1)
    j = torch.searchsorted(so.contiguous(), p_ids.contiguous()).clamp(max=so.shape[1] - 1)
    found = (so.gather(1, j) == p_ids) & (p_ids >= n_special)
    found &= ~(p_ids.unsqueeze(2) == targets.unsqueeze(1)).any(2)
    opos = si.gather(1, j)
    before = h_o.gather(1, opos.unsqueeze(2).expand(-1, -1, h_o.shape[2]))
    shift = 1.0 - cosine(h_p, before)
    tok = p_ids[found].cpu()
    sums.index_add_(0, tok, shift[found].double().cpu())
    counts.index_add_(0, tok, torch.ones(tok.numel(), dtype=torch.float64))


def in_silico(
    adata: AnnData,
    model,
    genes: str | Sequence[str],
    *,
    mode: str = "delete",
    factor: float = 0.5,
    level: str | float = "median",
    level_unit: str = "fold",
    cells=None,
    target=None,
    min_rank_fraction: float | None = 0.5,
    gene_shift: bool = True,
    min_cells: int = 3,
    cell_embedding: str = "species",
    species: str | None = None,
    input_kind: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    gene_medians=None,
    batch_size: int = 32,
    key_added: str = COMPASS_INSILICO_KEY,
    overwrite: bool = False,
    progress_bar: bool = True,
    modality: str | None = None,
) -> None:
    """In-silico perturbation of one or several genes at once with a pre-trained GeneCompass.

    Every selected cell is tokenized as in pre-training; the genes are edited in its token list, the
    list is re-ranked by value (ties keep their order, an overexpressed gene goes before genes of
    equal value; the rank position embedding changes accordingly) and both the original and the
    perturbed cell are encoded (Yang et al. 2024, "In silico quantitative perturbation"). All
    selected cells are edited at once per batch (vectorized token edits):

    - ``'delete'``: the gene tokens are removed (the next-ranked genes move up; a gene beyond the
      model's length can enter);
    - ``'knockdown'``: the gene's normalized expression is multiplied by ``factor``, the fraction
      left (0.5 halves it, 0.25 keeps a quarter -- a 75% knockdown); with ``factor=0`` the token
      stays, with value 0, ranked last, so it equals deletion up to that last token;
    - ``'overexpress'``: the gene's normalized expression is raised to ``level`` (the gene is added
      to a cell that does not express it, except with a fold change). Overexpression never lowers a
      gene: where the cell already expresses it at or above the level, it keeps its value (and the
      cell is unchanged).

    **Units.** The *normalized expression* ``x`` of a gene in a cell is what the model's tokenizer
    computes: for a model of ours, the cell's counts scaled to ``target_sum`` (1e4) per cell (or the
    data's own normalization with ``input_kind='log1p'`` / ``'normalized'``); for a published checkpoint,
    the counts as they are (its preprocessing has no per-cell step). Its token value is
    ``log(1 + x / m) / log(b)``, with ``m`` the gene's corpus median (``model.gene_medians_`` or
    ``gene_medians=``) and ``b`` the model's log base (e (natural) for ours, 2 for a published
    checkpoint: ``model.tokenization_['log_base']``). The edits act on ``x`` and map to the token value
    by that formula, so they mean the same for both kinds of model. ``level``:

    - ``'median'``: ``x = m``, the gene's corpus median (token value ``log(2) / log(b)``);
    - ``'max'``: the cell's top gene token value (the gene reaches the same ``x / m`` as the cell's
      highest gene and ranks first);
    - a number, in ``level_unit``:

      - ``'fold'`` (default): times the cell's current expression of the gene (``level=2`` doubles
        ``x``: token value ``log(1 + 2 x / m) / log(b)``); ``level >= 1``. A cell that does not
        express the gene, or where it ranks beyond the tokens read (twice the model's window), is not
        edited (``kept`` is ``False``: a fold of no expression is none);
      - ``'median'``: times the gene's corpus median (``level=3``: ``x = 3 m``; ``level=1`` is
        ``'median'``);
      - ``'normalized'``: the normalized expression ``x`` itself (for a model of ours on counts:
        counts per 10,000 in the cell; for a published checkpoint: counts), mapped with the gene's
        median ``m`` used for this data (``uns[key_added]['level_median']``);
      - ``'token'``: the model's token value itself, in the model's own log base (for experts).

    The cell's total is not renormalized after an edit (as in the paper).

    A knockdown can move the gene past the model's token window (``seq_len - 1`` genes): there it
    equals deletion. Such cells are counted (``uns[key_added]['n_left_window']``) with a warning
    naming the window length that would keep the gene (``uns[key_added]['window_needed']``).

    For deletion and knockdown only cells where every gene is among the tokens and ranks in the top
    ``min_rank_fraction`` of them are kept (paper: top 50%).

    Parameters
    ----------
    adata
        AnnData (or MuData with ``modality``).
    model
        Pre-trained :class:`~pertpy_gnn.compass.GeneCompass`.
    genes
        Gene(s) perturbed together in every cell (symbols of the model's vocabulary).
    mode
        ``'delete'``, ``'knockdown'`` or ``'overexpress'``.
    factor
        Knockdown factor in ``[0, 1)``.
    level
        Overexpression level: ``'median'``, ``'max'`` or a number in ``level_unit`` (see Units above;
        never below the gene's current value).
    level_unit
        Unit of a numeric ``level``: ``'fold'`` (of the cell's current expression), ``'median'``
        (multiples of the gene's corpus median), ``'normalized'`` (normalized expression, e.g. counts
        per 10,000) or ``'token'`` (the model's token value).
    cells
        Cells to perturb (mask, positions, names, ``(column, values)`` or ``{column: values}``);
        default all cells (minus the ``target`` cells).
    target
        Cells of the target state (same forms). With it, the shift toward the target of cell ``i`` is
        ``mean_j cos(S'_i, T_j) - mean_j cos(S_i, T_j)`` over all target cells ``j`` (original ``S``,
        perturbed ``S'``); its mean over cells is the paper's effect.
    min_rank_fraction
        Rank filter of deletion / knockdown (``None``: the genes only need to be present).
    gene_shift
        Also compute the gene-level shift: ``1 - cos`` of each other gene's token state before and
        after, averaged over the kept cells where the gene is a token.
    min_cells
        Genes of ``gene_shift`` seen in fewer kept cells are left out (their mean rests on too few cells).
    cell_embedding
        Cell embedding the shifts are measured on: ``'species'`` (paper) or ``'mean'`` (see
        :func:`pertpy_gnn.tl.embed_compass`).
    species, input_kind, layer, gene_symbols, gene_ids, gene_medians
        Tokenization (see :func:`pertpy_gnn.tl.embed_compass`).
    batch_size
        Cells per forward pass.
    key_added
        Prefix of the ``obs`` columns and key in ``uns``.
    overwrite
        Replace existing results.
    progress_bar
        Show progress (a bar in a terminal or notebook, else log lines; ``False``: none).
    modality
        MuData modality.

    Returns
    -------
    ``None``. Sets

    - ``adata.obs[f'{key_added}_kept']``: bool, the cell was perturbed and passed the rank filter;
    - ``adata.obs[f'{key_added}_cos']``: cosine of the perturbed to the original cell embedding
      (``NaN`` where not kept; 1 = no shift);
    - ``adata.obs[f'{key_added}_target_shift']`` (with ``target``): the shift toward the target;
    - ``adata.uns[key_added]``: ``params``; ``n_cells`` (selected), ``n_kept``; ``mean_cos``;
      with ``target``: ``effect`` (mean target shift) and ``target_cos`` (DataFrame over kept cells,
      columns ``original`` and ``perturbed``: mean cosine to the target cells); with
      ``gene_shift``: ``gene_shift`` (DataFrame indexed by gene token, columns ``shift``,
      ``n_cells``, sorted by decreasing shift); with knockdown: ``n_left_window``,
      ``window_needed``, ``window_needed_is_lower_bound``; with ``level_unit='normalized'``:
      ``level_median`` (the median of each gene the level was mapped with).
    """
    import torch

    adata = get_adata(adata, modality)
    _check_edit(mode, factor, level, min_rank_fraction, level_unit)
    if gene_shift and int(min_cells) < 1:
        raise ValueError(f"`min_cells` must be at least 1, got {min_cells}.")
    check_cell_embedding(cell_embedding)
    cols = [f"{key_added}_kept", f"{key_added}_cos"] + (
        [f"{key_added}_target_shift"] if target is not None else []
    )
    for c in cols:
        check_overwrite(adata.obs, c, overwrite, "adata.obs")
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    module, vocab = check_model(model)
    sp_ = data_species(adata, species, gene_symbols)
    tgt_tok = torch.from_numpy(gene_tokens(vocab, genes, sp_))
    tok = tokenize_kwargs(
        species=sp_,
        input_kind=input_kind,
        layer=layer,
        gene_symbols=gene_symbols,
        gene_ids=gene_ids,
        gene_medians=gene_medians,
    )
    t_rows = None if target is None else select_cells(adata, target, "target")
    if cells is None:
        rows = np.setdiff1d(np.arange(adata.n_obs), t_rows) if t_rows is not None else np.arange(adata.n_obs)
    else:
        rows = select_cells(adata, cells, "cells")
    if rows.size == 0:
        raise ValueError("No cell to perturb: every cell is a target cell; pass `cells=`.")

    L = module.seq_len - 1
    vs = value_scale(model)
    fold = mode == "overexpress" and level not in ("median", "max") and level_unit == "fold"
    e = int(tgt_tok.numel())
    n_special = vocab.n_special
    sums = torch.zeros(len(vocab), dtype=torch.float64)
    counts = torch.zeros(len(vocab), dtype=torch.float64)
    kept = np.zeros(rows.size, dtype=bool)
    left_window = np.zeros(rows.size, dtype=bool)
    needed, capped = 0, False
    emb_o, emb_p = [], []
    was_training = module.training
    module.eval()
    try:
        with (
            # a knockdown can move a gene past the window: read twice the window to say how far it goes;
            # a fold change needs the gene's current value, also where it ranks past the window
            tokenized(
                adata[rows],
                model,
                max_len=(2 * L if mode == "knockdown" or fold else L) + e,
                tok=tok,
                progress_bar=progress_bar,
            ) as corpus,
            torch.inference_mode(),
        ):
            medians = (
                _target_medians(corpus, vocab, tgt_tok.numpy())
                if mode == "overexpress" and level_unit == "normalized" and level not in ("median", "max")
                else None
            )
            for sl in batches(rows.size, batch_size, progress_bar=progress_bar, desc=f"in-silico {mode}"):
                ids, values = corpus.read(np.arange(sl.start, sl.stop))
                ids, values = (
                    torch.from_numpy(ids.astype(np.int64)),
                    torch.from_numpy(values.astype(np.float32)) * vs,  # edits in natural-log units
                )
                targets = tgt_tok.unsqueeze(0).expand(ids.shape[0], -1)
                o_ids, o_vals, p_ids, p_vals, ok = _variants(
                    ids,
                    values,
                    targets,
                    mode=mode,
                    factor=factor,
                    level=level,
                    max_len=L,
                    min_rank_fraction=min_rank_fraction,
                    level_unit=level_unit,
                    scale=vs,
                    medians=medians,
                )
                kept[sl] = ok.numpy()
                if mode == "knockdown" and float(factor) > 0:
                    inside, pos = _window_needed(ids, values, targets, float(factor), L)
                    left = ok & ~inside
                    left_window[sl] = left.numpy()
                    if bool(left.any()):
                        needed = max(needed, int(pos[left].max()))
                        # the gene fell to the end of what was read: the window must be at least that long
                        capped = capped or bool((pos[left] >= ids.shape[1] - 1).any())
                if not bool(ok.any()):
                    continue
                h_o = encode(module, o_ids[ok], o_vals[ok] / vs)
                h_p = encode(module, p_ids[ok], p_vals[ok] / vs)
                emb_o.append(cell_states(h_o, o_ids[ok], cell_embedding).cpu().numpy())
                emb_p.append(cell_states(h_p, p_ids[ok], cell_embedding).cpu().numpy())
                if gene_shift:
                    _gene_shift_sums(
                        o_ids[ok].to(h_o.device),
                        p_ids[ok].to(h_o.device),
                        h_o,
                        h_p,
                        targets[ok].to(h_o.device),
                        n_special,
                        sums,
                        counts,
                    )
    finally:
        module.train(was_training)
    n_kept = int(kept.sum())
    if n_kept == 0 and fold:
        raise ValueError(
            f"No cell expresses {list(np.atleast_1d(genes))} among its top {2 * L + e} tokens, so a fold change "
            "raises nothing. Choose cells expressing the genes, or give a level in units of the corpus median "
            "(level_unit='median') or level='median'."
        )
    if n_kept == 0:
        raise ValueError(
            f"No cell qualifies: {list(np.atleast_1d(genes))} must all be among a cell's tokens"
            + (f" and rank in its top {min_rank_fraction:.0%}" if min_rank_fraction is not None else "")
            + ". Choose cells expressing them, or lower the filter with `min_rank_fraction=` (None: presence only)."
        )
    s = np.concatenate(emb_o).astype(np.float64)
    s_p = np.concatenate(emb_p).astype(np.float64)
    cos = np.sum(s * s_p, 1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(s_p, axis=1))
    kept_rows = rows[kept]
    obs_kept = np.zeros(adata.n_obs, dtype=bool)
    obs_kept[kept_rows] = True
    obs_cos = np.full(adata.n_obs, np.nan)
    obs_cos[kept_rows] = cos
    uns = {
        "params": {
            "genes": np.asarray(np.atleast_1d(genes), dtype=str),
            "mode": mode,
            "factor": float(factor) if mode == "knockdown" else np.nan,
            "level": str(level) if mode == "overexpress" else "",
            "level_unit": level_unit if mode == "overexpress" and level not in ("median", "max") else "",
            "min_rank_fraction": np.nan if min_rank_fraction is None else float(min_rank_fraction),
            "species": sp_,
            "max_len": int(L),
            "cell_embedding": cell_embedding,
            "min_cells": int(min_cells),
        },
        "n_cells": int(rows.size),
        "n_kept": n_kept,
        "mean_cos": float(cos.mean()),
    }
    if (
        medians is not None
    ):  # the medians a 'normalized' level was mapped with, one per gene of params['genes']
        uns["level_median"] = np.asarray(medians, dtype=np.float64)
    adata.obs[f"{key_added}_kept"] = obs_kept
    adata.obs[f"{key_added}_cos"] = obs_cos
    if target is not None:
        t_emb, _, _ = _embed(
            adata,
            model,
            cells=t_rows,
            batch_size=batch_size,
            progress_bar=progress_bar,
            tok=tok,
            genes=False,
            cell_embedding=cell_embedding,
        )
        direction = mean_direction(t_emb)
        before, after = mean_cos_to(s, direction), mean_cos_to(s_p, direction)
        shift = np.full(adata.n_obs, np.nan)
        shift[kept_rows] = after - before
        adata.obs[f"{key_added}_target_shift"] = shift
        uns["effect"] = float((after - before).mean())
        uns["target_cos"] = pd.DataFrame(
            {"original": before, "perturbed": after}, index=adata.obs_names[kept_rows].astype(str)
        )
        uns["n_target_cells"] = int(t_rows.size)
    if mode == "knockdown":
        n_left = int(left_window.sum())
        uns["n_left_window"] = n_left
        uns["window_needed"] = int(needed) if n_left else int(L)
        uns["window_needed_is_lower_bound"] = bool(capped)
        if n_left:
            logger.warning(
                "In %d of %d kept cells the knocked-down gene falls beyond the model's %d-token window, so "
                "there the knockdown equals deletion; a window of %s%d gene tokens (a model with seq_len %d) "
                "would keep it.",
                n_left,
                n_kept,
                L,
                "at least " if capped else "",
                needed,
                needed + 1,
            )
    if gene_shift:
        nz = np.flatnonzero(counts.numpy() >= int(min_cells))
        df = pd.DataFrame(
            {
                "shift": (sums.numpy()[nz] / counts.numpy()[nz]),
                "n_cells": counts.numpy()[nz].astype(np.int64),
            },
            index=pd.Index(vocab.tokens[nz].astype(str), name="gene"),
        )
        uns["gene_shift"] = df.sort_values("shift", ascending=False)
    adata.uns[key_added] = uns
    logger.info(
        "in-silico %s of %s: %d of %d cells kept, mean cos to original %.4f%s",
        mode,
        list(np.atleast_1d(genes)),
        n_kept,
        rows.size,
        uns["mean_cos"],
        f", effect toward target {uns['effect']:+.4g}" if target is not None else "",
    )


def _group_mean_sem(x: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of ``x`` per group (``NaN`` for empty groups; SEM 0 for one value)."""
    n = np.bincount(group, minlength=n_groups).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.bincount(group, weights=x, minlength=n_groups) / n
        ss = np.bincount(group, weights=(x - mean[group]) ** 2, minlength=n_groups)
        sem = np.sqrt(ss / np.maximum(n - 1, 1) / n)
    return mean, sem


def _candidate_tokens(vocab, candidates, adata: AnnData, species: str, tok: dict) -> np.ndarray:
    from ..pp._compass_vocab import var_tokens

    if candidates is None:
        ids, _ = var_tokens(
            adata, vocab, species=species, gene_symbols=tok.get("gene_symbols"), gene_ids=tok.get("gene_ids")
        )
        return np.unique(ids[ids >= 0])
    if isinstance(candidates, str) and candidates == "vocab":
        return np.flatnonzero(vocab.species_mask(species)).astype(np.int64)
    return np.unique(gene_tokens(vocab, candidates, species))


def in_silico_screen(
    adata: AnnData,
    model,
    *,
    target,
    cells=None,
    candidates=None,
    mode: str = "overexpress",
    factor: float = 0.0,
    level: str | float = "max",
    level_unit: str = "fold",
    source=None,
    min_rank_fraction: float | None = 0.5,
    cell_embedding: str = "species",
    species: str | None = None,
    input_kind: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    gene_medians=None,
    batch_size: int = 256,
    key_added: str = COMPASS_SCREEN_KEY,
    overwrite: bool = False,
    progress_bar: bool = True,
    modality: str | None = None,
) -> pd.DataFrame:
    """Rank every candidate gene as a driver toward a target state (paper Fig. 6c).

    Each candidate gene is perturbed alone in every selected cell (default: overexpressed to the
    cell's maximum) and scored by the mean over cells of ``mean_j cos(S'_i, T_j) - mean_j
    cos(S_i, T_j)`` over the target cells ``j``. All (cell, gene) variants are batched: one forward
    pass encodes ``batch_size`` variants, built by vectorized token edits of the cells' token lists;
    the original cells are encoded once.

    Parameters
    ----------
    adata
        AnnData (or MuData with ``modality``).
    model
        Pre-trained :class:`~pertpy_gnn.compass.GeneCompass`.
    target
        Cells of the target state (mask, positions, names, ``(column, values)``, ``{column: values}``).
    cells
        Cells to perturb (same forms); default every non-target cell.
    candidates
        Genes to screen: ``None`` (every gene of ``adata`` in the vocabulary), ``'vocab'`` (every gene
        token of the vocabulary for the data's species) or a list of genes.
    mode, factor, level, level_unit, min_rank_fraction
        The edit, as in :func:`in_silico` (the units of ``level`` and ``factor`` are stated there). For
        deletion / knockdown a (cell, gene) variant exists only where the gene passes the rank filter
        in that cell; for a ``'fold'`` overexpression only where the cell expresses the gene (among
        twice the model's window of tokens).
    source
        Optional cells of the source state: also reports the shift toward it (negative = away).
    cell_embedding
        Cell embedding the shifts are measured on: ``'species'`` (paper) or ``'mean'`` (see
        :func:`pertpy_gnn.tl.embed_compass`).
    species, input_kind, layer, gene_symbols, gene_ids, gene_medians
        Tokenization (see :func:`pertpy_gnn.tl.embed_compass`).
    batch_size
        (cell, gene) variants per forward pass.
    key_added
        Key in ``adata.uns``.
    overwrite
        Replace an existing result.
    progress_bar
        Show progress (a bar in a terminal or notebook, else log lines; ``False``: none).
    modality
        MuData modality.

    Returns
    -------
    DataFrame indexed by gene token, sorted by decreasing ``target_shift``, with columns
    ``target_shift`` (mean over cells), ``target_shift_sem``, ``specific_shift`` (mean over cells of
    the gene's shift minus the mean shift of all candidates in the same cell: any edit moves a cell
    a little, if only by re-ranking its tokens, and this common part cancels),
    ``specific_shift_sem``, ``z`` (``specific_shift / specific_shift_sem``: how clearly the gene
    stands out of the other candidates), ``cos`` (mean cosine of perturbed to original cell),
    ``source_shift`` (with ``source``), ``n_cells`` (cells with a variant of the gene),
    ``n_paired_cells`` (those where another candidate also has a variant: the specific shift is
    averaged over these only, and ``z`` is ``NaN`` -- explicitly absent -- below 2 of them) and ``rank``
    (1 = strongest driver by ``target_shift``; for overexpression to a level, where every gene is
    edited in every cell, the same order as ``specific_shift``; not so for a fold change, which edits
    only the cells expressing the gene). Also sets ``adata.uns[key_added]`` = ``{'results': df,
    'params': {...}, 'n_cells', 'n_variants'}``.
    """
    import torch

    adata = get_adata(adata, modality)
    _check_edit(mode, factor, level, min_rank_fraction, level_unit)
    check_cell_embedding(cell_embedding)
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    module, vocab = check_model(model)
    sp_ = data_species(adata, species, gene_symbols)
    tok = tokenize_kwargs(
        species=sp_,
        input_kind=input_kind,
        layer=layer,
        gene_symbols=gene_symbols,
        gene_ids=gene_ids,
        gene_medians=gene_medians,
    )
    t_rows = select_cells(adata, target, "target")
    rows = (
        select_cells(adata, cells, "cells")
        if cells is not None
        else np.setdiff1d(np.arange(adata.n_obs), t_rows)
    )
    if rows.size == 0:
        raise ValueError("No cell to perturb: every cell is a target cell; pass `cells=`.")
    cand = _candidate_tokens(vocab, candidates, adata, sp_, tok)
    if cand.size == 0:
        raise ValueError("No candidate gene is in the model's vocabulary.")
    L = module.seq_len - 1
    fold = mode == "overexpress" and level not in ("median", "max") and level_unit == "fold"

    emb_kw = {
        "batch_size": batch_size,
        "progress_bar": progress_bar,
        "tok": tok,
        "genes": False,
        "cell_embedding": cell_embedding,
    }
    t_dir = mean_direction(_embed(adata, model, cells=t_rows, **emb_kw)[0])
    s_dir = None
    if source is not None:
        s_dir = mean_direction(_embed(adata, model, cells=select_cells(adata, source, "source"), **emb_kw)[0])
    was_training = module.training
    module.eval()
    try:
        with (
            tokenized(
                adata[rows], model, max_len=2 * L if fold else L + 1, tok=tok, progress_bar=progress_bar
            ) as corpus,
            torch.inference_mode(),
        ):
            ids_all, vals_all = corpus.read(np.arange(rows.size))
            cand_med = (
                _target_medians(corpus, vocab, cand)
                if mode == "overexpress" and level_unit == "normalized" and level not in ("median", "max")
                else None
            )
        ids_all = torch.from_numpy(ids_all.astype(np.int64))
        vs = value_scale(model)
        vals_all = torch.from_numpy(vals_all.astype(np.float32)) * vs  # edits in natural-log units
        none = torch.full((rows.size, 1), -1, dtype=torch.long)
        o_ids, o_vals, _ = edit_tokens(ids_all, vals_all, none, mode="delete", max_len=L)
        # the (cell, gene) variants: all pairs for overexpression, qualifying pairs otherwise
        if mode == "overexpress" and not fold:
            cell_idx = np.repeat(np.arange(rows.size), cand.size)
            gene_idx = np.tile(cand, rows.size)
        elif fold:  # pairs where the cell expresses the gene (a fold of no expression is none)
            body = ids_all[:, 1:].numpy()
            cell_idx, p = np.nonzero(np.isin(body, cand))
            gene_idx = body[cell_idx, p]
        else:
            body = o_ids[:, 1:].numpy()
            n_tok = (body != 0).sum(1)
            frac = 1.0 if min_rank_fraction is None else float(min_rank_fraction)
            ok = (np.arange(L)[None, :] < frac * n_tok[:, None]) & np.isin(body, cand)
            cell_idx, p = np.nonzero(ok)
            gene_idx = body[cell_idx, p]
        if cell_idx.size == 0:
            raise ValueError(
                "No (cell, gene) variant qualifies: the candidates are not among the top tokens of the cells"
                + (" (a fold change needs cells expressing the gene)." if fold else ".")
            )
        with torch.inference_mode():
            h0 = (
                torch.cat(
                    [
                        cell_states(
                            encode(module, o_ids[sl], o_vals[sl] / vs), o_ids[sl], cell_embedding
                        ).cpu()
                        for sl in batches(
                            rows.size, batch_size, progress_bar=progress_bar, desc="original cells"
                        )
                    ]
                )
                .double()
                .numpy()
            )
            base_t = mean_cos_to(h0, t_dir)
            base_s = mean_cos_to(h0, s_dir) if s_dir is not None else None
            slot = np.searchsorted(cand, gene_idx)
            acc = np.zeros((3, cand.size))  # sum cos, sum source shift, count
            shift_all = np.empty(cell_idx.size)
            for sl in batches(cell_idx.size, batch_size, progress_bar=progress_bar, desc="screen variants"):
                c = torch.from_numpy(cell_idx[sl])
                targets = torch.from_numpy(gene_idx[sl]).unsqueeze(1)
                lv = None
                if mode == "overexpress":
                    med = None if cand_med is None else cand_med[slot[sl]][:, None]
                    lv, _ = _levels(level, level_unit, ids_all[c], vals_all[c], targets, vs, med)
                    lv, targets = _at_least_current(lv, ids_all[c], vals_all[c], targets)
                p_ids, p_vals, _ = edit_tokens(
                    ids_all[c], vals_all[c], targets, mode=mode, factor=factor, level=lv, max_len=L
                )
                h = (
                    cell_states(encode(module, p_ids, p_vals / vs), p_ids, cell_embedding)
                    .double()
                    .cpu()
                    .numpy()
                )
                orig = h0[cell_idx[sl]]
                shift = mean_cos_to(h, t_dir) - base_t[cell_idx[sl]]
                cs = np.sum(h * orig, 1) / (np.linalg.norm(h, axis=1) * np.linalg.norm(orig, axis=1))
                ss = (
                    mean_cos_to(h, s_dir) - base_s[cell_idx[sl]]
                    if s_dir is not None
                    else np.zeros_like(shift)
                )
                shift_all[sl] = shift
                for k, v in enumerate((cs, ss, np.ones_like(shift))):
                    acc[k] += np.bincount(slot[sl], weights=v, minlength=cand.size)
    finally:
        module.train(was_training)
    n = acc[2]
    has = n > 0
    mean, sem = _group_mean_sem(shift_all, slot, cand.size)
    # paired with the other candidates in the same cell: removes the shift every edit causes
    # (e.g. the re-ranking itself), leaving the candidate-specific part and its (much smaller) SEM
    per_cell = np.bincount(cell_idx, weights=shift_all, minlength=rows.size) / np.maximum(
        np.bincount(cell_idx, minlength=rows.size), 1
    )
    # only cells where the candidate shares the cell with another candidate carry a paired difference
    paired = np.bincount(cell_idx, minlength=rows.size)[cell_idx] >= 2
    spec, spec_sem = _group_mean_sem((shift_all - per_cell[cell_idx])[paired], slot[paired], cand.size)
    n_paired = np.bincount(slot[paired], minlength=cand.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where((n_paired[has] >= 2) & (spec_sem[has] > 0), spec[has] / spec_sem[has], np.nan)
    if has.any() and not np.isfinite(z).any():
        logger.warning(
            "z is undefined for every candidate: no candidate shares at least 2 cells with another candidate, "
            "so there is no paired comparison (column n_paired_cells). Screen more candidates per cell."
        )
    df = pd.DataFrame(
        {
            "target_shift": mean[has],
            "target_shift_sem": sem[has],
            "specific_shift": spec[has],
            "specific_shift_sem": spec_sem[has],
            "z": z,
            "cos": acc[0][has] / n[has],
            **({"source_shift": acc[1][has] / n[has]} if s_dir is not None else {}),
            "n_cells": n[has].astype(np.int64),
            "n_paired_cells": n_paired[has].astype(np.int64),
        },
        index=pd.Index(vocab.tokens[cand[has]].astype(str), name="gene"),
    ).sort_values("target_shift", ascending=False)
    df["rank"] = np.arange(1, len(df) + 1)
    adata.uns[key_added] = {
        "results": df,
        "params": {
            "mode": mode,
            "factor": float(factor) if mode == "knockdown" else np.nan,
            "level": str(level) if mode == "overexpress" else "",
            "level_unit": level_unit if mode == "overexpress" and level not in ("median", "max") else "",
            "min_rank_fraction": np.nan if min_rank_fraction is None else float(min_rank_fraction),
            "species": sp_,
            "max_len": int(L),
            "n_target_cells": int(t_rows.size),
            "cell_embedding": cell_embedding,
        },
        "n_cells": int(rows.size),
        "n_variants": int(cell_idx.size),
    }
    logger.info(
        "in-silico screen: %d genes x %d cells = %d variants; top driver %s (%+.4g)",
        cand.size,
        rows.size,
        cell_idx.size,
        df.index[0],
        df["target_shift"].iloc[0],
    )
    return df
