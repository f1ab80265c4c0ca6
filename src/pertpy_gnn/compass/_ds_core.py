"""Shared machinery of the GeneCompass downstream tools.

Tokenize an AnnData for a pre-trained model, run the encoder in batches, edit token sequences
(in-silico perturbation) and compare embeddings. Token sequences are those of
:func:`pertpy_gnn.pp.compass_tokenize`: column 0 the species token, then gene tokens by decreasing
value (ties: increasing token id), then padding (token 0, value 0);
the value of a gene is ``log1p(x / median)`` with ``x`` its per-cell normalized expression and
``median`` its corpus-wide median of non-zero values.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import logger

#: value of a gene expressed exactly at its corpus median: ``log1p(median / median)``
MEDIAN_VALUE = float(np.log1p(1.0))
EDIT_MODES = ("delete", "knockdown", "overexpress")


# ------------------------------------------------------------------------------------------- model
def check_model(model):
    """The encoder module and vocabulary of a pre-trained GeneCompass, with a clear error otherwise."""
    module = getattr(model, "module", None)
    vocab = getattr(model, "vocab", None)
    if module is None or vocab is None or not hasattr(module, "encode"):
        raise TypeError(
            f"Expected a pre-trained pertpy_gnn.compass.GeneCompass (from pg.tl.pretrain_compass), got {type(model).__name__}."
        )
    return module, vocab


def value_scale(model) -> float:
    """``ln(log_base)`` of the model's token values (1 for natural-log values): ``value * scale`` is ``log1p(x / median)``.

    The in-silico edits work in natural-log units; a model whose values are ``log2(1 + x / median)``
    (a published checkpoint) has its values scaled before the edit and back after it.
    """
    base = getattr(model, "tokenization_", {}).get("log_base")
    return 1.0 if base is None else float(np.log(base))


def model_medians(model, gene_medians) -> pd.Series | None:
    """Corpus medians to tokenize new data with: given, else stored on the model, else ``None``.

    ``gene_medians`` may be a Series indexed by token name or a
    :class:`~pertpy_gnn.compass.CompassCorpus` (its ``gene_medians``).
    """
    if gene_medians is None:
        gene_medians = getattr(model, "gene_medians_", None)
        if gene_medians is None:
            gene_medians = getattr(model, "gene_medians", None)
    if gene_medians is not None and hasattr(gene_medians, "gene_medians"):
        gene_medians = gene_medians.gene_medians
    if gene_medians is None:
        logger.info(
            "No corpus gene medians given: values use this data's own medians. Pass `gene_medians=` the pre-training "
            "corpus (or its .gene_medians) to tokenize exactly as in pre-training."
        )
    return gene_medians


def tokenize_kwargs(
    *,
    species: str | None = None,
    input_kind: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    gene_ids=None,
    gene_medians=None,
) -> dict:
    """Options passed to :func:`pertpy_gnn.pp.compass_tokenize` (see there)."""
    return {
        "species": species,
        "input_kind": input_kind,
        "layer": layer,
        "gene_symbols": gene_symbols,
        "gene_ids": gene_ids,
        "gene_medians": gene_medians,
    }


@contextmanager
def tokenized(adata: AnnData, model, *, max_len: int, tok: Mapping, progress_bar: bool = False) -> Iterator:
    """Tokenize ``adata`` (all its cells, in order) into a temporary corpus and yield it."""
    from ..pp._compass_tokens import compass_tokenize

    _, vocab = check_model(model)
    # the model's tokenization (e.g. the published preprocessing of a published checkpoint), then the caller's
    kw = {"input_kind": "counts", **getattr(model, "tokenization_", {})}
    kw.update({k: v for k, v in tok.items() if v is not None or k not in kw})
    kw["gene_medians"] = model_medians(model, kw.get("gene_medians"))
    with tempfile.TemporaryDirectory(prefix="pg_compass_tok_") as tmp:
        corpus = compass_tokenize(
            adata, Path(tmp) / "corpus", vocab, max_len=max_len, progress_bar=progress_bar, **kw
        )
        try:
            yield corpus
        finally:  # close the corpus's open shard files before the folder goes
            corpus.close()


def token_arrays(corpus, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int64) and values (float32) of ``rows`` of a corpus (all rows by default)."""
    rows = np.arange(len(corpus)) if rows is None else np.asarray(rows)
    ids, values = corpus.read(rows)
    return ids.astype(np.int64), values.astype(np.float32)


def batches(n: int, batch_size: int, *, progress_bar: bool, desc: str):
    """``slice`` objects over ``range(n)`` with progress (see :class:`pertpy_gnn._progress.Progress`)."""
    from .._progress import track

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    starts = range(0, n, batch_size)
    for s in track(starts, len(starts), desc, enabled=progress_bar):
        yield slice(s, min(s + batch_size, n))


def encode(module, ids, values):
    """Last-layer states ``(b, n, d)`` (float32, on the module's device) of token sequences."""
    import torch

    dev = next(module.parameters()).device
    ids = torch.as_tensor(ids, device=dev).long()
    values = torch.as_tensor(values, device=dev).float()
    return module.encode(ids, values).float()


def check_cell_embedding(how: str) -> str:
    """Validate a ``cell_embedding`` option (``'species'`` or ``'mean'``)."""
    from ._module import CELL_EMBEDDINGS

    if how not in CELL_EMBEDDINGS:
        raise ValueError(
            f"cell_embedding must be one of {CELL_EMBEDDINGS} (the species token's state, or the mean of the gene tokens' states), got {how!r}."
        )
    return how


def cell_states(h, ids, how: str):
    """Cell embeddings ``(b, d)`` of encoded sequences ``h`` ``(b, n, d)`` with token ids ``ids``."""
    import torch

    from ._module import cell_embedding

    return cell_embedding(h, torch.as_tensor(ids, device=h.device), how)


# ------------------------------------------------------------------------------------------ cells
def select_cells(adata: AnnData, spec, what: str) -> np.ndarray:
    """Row indices of the cells described by ``spec``.

    ``spec``: a boolean mask, integer positions, ``obs_names``, a ``(column, value_or_values)`` tuple
    or a ``{column: value_or_values}`` dict (all conditions must hold).
    """
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and spec[0] in adata.obs:
        spec = {spec[0]: spec[1]}
    if isinstance(spec, Mapping):
        keep = np.ones(adata.n_obs, dtype=bool)
        for col, val in spec.items():
            if col not in adata.obs:
                raise KeyError(
                    f"`{what}`: obs column {col!r} not found; available: {list(adata.obs.columns)}."
                )
            vals = [val] if isinstance(val, (str, int, float, bool, np.generic)) else list(val)
            keep &= adata.obs[col].isin(vals).to_numpy()
        rows = np.flatnonzero(keep)
    else:
        arr = np.asarray(spec)
        if arr.dtype == bool:
            if arr.shape != (adata.n_obs,):
                raise ValueError(
                    f"`{what}`: a boolean mask needs one entry per cell ({adata.n_obs}), got shape {arr.shape}."
                )
            rows = np.flatnonzero(arr)
        elif np.issubdtype(arr.dtype, np.integer):
            rows = arr.ravel().astype(np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= adata.n_obs):
                raise IndexError(f"`{what}`: cell positions must be in [0, {adata.n_obs}).")
        else:
            rows = adata.obs_names.get_indexer(arr.astype(str).ravel())
            if (rows < 0).any():
                bad = arr.ravel()[rows < 0][:5]
                raise KeyError(
                    f"`{what}`: {int((rows < 0).sum())} names are not in adata.obs_names, e.g. {list(bad)}."
                )
    if rows.size == 0:
        raise ValueError(f"`{what}` selects no cell.")
    return rows


def gene_tokens(vocab, genes: str | Sequence[str], species: str) -> np.ndarray:
    """Token ids of gene names (symbols, case-insensitive), with a clear error for unknown genes."""
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise ValueError("Give at least one gene.")
    ids = vocab.lookup(genes, species)
    if (ids < 0).any():
        bad = [g for g, i in zip(genes, ids, strict=True) if i < 0]
        raise ValueError(
            f"{len(bad)} genes are not in the model's vocabulary as {species} genes: {bad[:10]}. Check names and `species=`."
        )
    if np.unique(ids).size != ids.size:
        raise ValueError(
            f"Genes {genes} map to repeated tokens (e.g. a mouse gene and its 1:1 human ortholog); give each once."
        )
    return ids.astype(np.int64)


def data_species(adata: AnnData, species: str | None, gene_symbols: str | None) -> str:
    """Species of the data: given, else guessed from the gene names as the tokenizer does."""
    from ..pp._compass_vocab import guess_species

    if species is not None:
        return species
    names = adata.var[gene_symbols].astype(str) if gene_symbols is not None else adata.var_names
    return guess_species(names)


# ----------------------------------------------------------------------------------- token edits
def edit_tokens(
    ids,
    values,
    targets,
    *,
    mode: str,
    factor: float | None = None,
    level=None,
    max_len: int | None = None,
):
    """Apply an in-silico perturbation to a batch of token sequences and re-rank, vectorized.

    Parameters
    ----------
    ids, values
        ``(b, n)`` token ids and values (torch), species token first, genes by decreasing value,
        padding (token 0) last.
    targets
        ``(b, e)`` token ids of the genes to perturb in each row, ``-1`` for none.
    mode
        ``'delete'``: drop the target tokens. ``'knockdown'``: multiply the normalized expression of
        a present target by ``factor`` (value ``log1p(factor * expm1(v))``; ``factor=0`` gives value 0
        and the token is ranked last). ``'overexpress'``: set the target's value to ``level`` (a
        ``(b, e)`` or scalar tensor), adding the token when the cell does not express the gene.
    factor
        Knockdown factor.
    level
        Overexpression value(s).
    max_len
        Gene tokens kept after re-ranking (default ``n - 1``); sequences are ``max_len + 1`` long.

    Returns
    -------
    ``(ids, values, present)``: the edited sequences, re-ranked by decreasing value (ties keep the
    input order, i.e. the tokenizer's; an overexpressed gene goes before the genes of equal value),
    and ``(b, e)`` whether each target was present before the edit.
    """
    import torch

    from ..pp._compass_vocab import PAD_ID

    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}.")
    b, n = ids.shape
    max_len = n - 1 if max_len is None else int(max_len)
    body, vals = ids[:, 1:], values[:, 1:].float()
    valid = body != PAD_ID
    match = (body.unsqueeze(2) == targets.unsqueeze(1)) & (targets >= 0).unsqueeze(1)  # (b, n-1, e)
    hit = match.any(2)
    present = match.any(1)
    neg = torch.finfo(vals.dtype).min
    if mode == "knockdown":
        vals = torch.where(hit, torch.log1p(float(factor) * torch.expm1(vals)), vals)
        key = torch.where(valid, vals, torch.full_like(vals, neg))
    else:
        key = torch.where(valid & ~hit, vals, torch.full_like(vals, neg))
    if mode == "overexpress":
        lv = torch.as_tensor(level, dtype=vals.dtype, device=vals.device).expand(targets.shape)
        body = torch.cat([targets.clamp(min=0), body], 1)
        vals = torch.cat([lv, vals], 1)
        key = torch.cat([torch.where(targets >= 0, lv, torch.full_like(lv, neg)), key], 1)
    # value descending; ties keep the input order (the tokenizer's), overexpressed genes first
    order = torch.argsort(key, dim=1, descending=True, stable=True)[:, :max_len]
    keep = key.gather(1, order) > neg
    new_ids = torch.where(keep, body.gather(1, order), torch.full_like(order, PAD_ID))
    new_vals = torch.where(keep, vals.gather(1, order), torch.zeros_like(new_ids, dtype=vals.dtype))
    if new_ids.shape[1] < max_len:  # fewer tokens than max_len: pad
        pad = max_len - new_ids.shape[1]
        new_ids = torch.nn.functional.pad(new_ids, (0, pad), value=PAD_ID)
        new_vals = torch.nn.functional.pad(new_vals, (0, pad), value=0.0)
    return torch.cat([ids[:, :1], new_ids], 1), torch.cat([values[:, :1].float(), new_vals], 1), present


def target_ranks(ids, targets) -> tuple:
    """Rank fraction of each target among a cell's gene tokens: ``(rank, n_tokens)`` (rank -1: absent)."""
    import torch

    from ..pp._compass_vocab import PAD_ID

    body = ids[:, 1:]
    n_tok = (body != PAD_ID).sum(1)
    match = (body.unsqueeze(2) == targets.unsqueeze(1)) & (targets >= 0).unsqueeze(1)
    pos = torch.where(match.any(1), match.float().argmax(1), torch.full_like(targets, -1))
    return pos, n_tok


def cosine(a, b):
    """Row-wise cosine similarity of two tensors of the same shape (last axis)."""
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def mean_direction(emb: np.ndarray):
    """Mean of the unit-normalized rows: ``unit(s) . mean_dir`` = mean over rows ``j`` of ``cos(s, t_j)``."""
    emb = np.asarray(emb, dtype=np.float64)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb / np.where(norm > 0, norm, 1.0)).mean(0)


def mean_cos_to(emb, direction) -> np.ndarray:
    """Mean cosine of each row of ``emb`` to a group, given the group's :func:`mean_direction`."""
    emb = np.asarray(emb, dtype=np.float64)
    norm = np.linalg.norm(emb, axis=1)
    return (emb @ np.asarray(direction, dtype=np.float64)) / np.where(norm > 0, norm, 1.0)
