"""GeneCompass tokenization: cells -> ranked (gene token, value) sequences in sharded files on disk.

Per cell (Yang et al. 2024; Geneformer-style): normalize to ``target_sum`` per cell, divide each gene
by its corpus-wide median of non-zero normalized values, ``log1p``, rank genes by value, keep the top
``max_len`` as (token id, value) pairs and prepend the species token. The published code skips the
per-cell step (``input_kind='normalized'`` does that); the paper's description is the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._utils import logger
from ._compass_vocab import CompassVocab, gene_id_table, guess_species, var_tokens

INPUT_KINDS = ("counts", "log1p", "normalized")
_SOURCE_KEYS = {"data", "name", "species", "input_kind", "layer", "gene_symbols", "gene_ids"}
#: log-space histogram used for the corpus medians: ln(x) in [_LO, _LO + _NB * _W)
_LO, _W, _NB = -12.0, 0.1, 240


def normalize_rows(
    x: sp.csr_matrix, input_kind: str, target_sum: float = 1e4, totals: np.ndarray | None = None
) -> sp.csr_matrix:
    """Per-cell normalized expression (not log-transformed) of a CSR block.

    ``'counts'`` (raw counts, or TPM/FPKM): rows scaled to sum to ``target_sum`` (``totals``: the
    row sums to use, e.g. over all genes when ``x`` holds a subset); ``'log1p'``: ``expm1`` of values
    that are already ``log1p`` of normalized expression (no rescaling: the genes may be a subset);
    ``'normalized'``: used as they are.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}.")
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    if x.nnz and x.data.min() < 0:
        raise ValueError(
            "The expression matrix has negative values (scaled or centered data?). GeneCompass tokenizes "
            "counts or log1p-normalized values: pass the raw counts (or a `layer=` holding them)."
        )
    if input_kind == "log1p":
        x.data = np.expm1(x.data)
    elif input_kind == "counts":
        tot = np.asarray(x.sum(axis=1)).ravel() if totals is None else np.asarray(totals, dtype=np.float64)
        scale = np.divide(target_sum, tot, out=np.zeros_like(tot), where=tot > 0)
        x.data *= np.repeat(scale, np.diff(x.indptr))
    return x


class _Reader:
    """Row-chunk reader of one source: an .h5ad path (read through h5py, never fully loaded) or an AnnData."""

    def __init__(self, data, layer: str | None):
        self._file = None
        if isinstance(data, AnnData):
            self.var = data.var
            if layer is not None and layer not in data.layers:
                raise KeyError(f"Layer {layer!r} not found; available layers: {list(data.layers)}.")
            self.mat = data.X if layer is None else data.layers[layer]
        else:
            import h5py
            from anndata.io import read_elem, sparse_dataset

            path = Path(data)
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist.")
            self._file = h5py.File(path, "r")
            self.var = read_elem(self._file["var"])
            if layer is None:
                elem = self._file["X"]
            elif "layers" in self._file and layer in self._file["layers"]:
                elem = self._file["layers"][layer]
            else:
                raise KeyError(f"Layer {layer!r} not found in {path}.")
            self.mat = sparse_dataset(elem) if isinstance(elem, h5py.Group) else elem
        self.n_obs = int(self.mat.shape[0])
        if self.mat is None:
            raise ValueError("The AnnData has no expression matrix.")

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        x = self.mat[start:stop]
        return sp.csr_matrix(x) if not sp.issparse(x) else x.tocsr()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _resolve_sources(sources, defaults: dict) -> list[dict]:
    if isinstance(sources, (str, Path, AnnData, Mapping)):
        sources = [sources]
    specs = []
    for i, s in enumerate(sources):
        spec = dict(defaults)
        if isinstance(s, Mapping):
            unknown = set(s) - _SOURCE_KEYS
            if unknown or "data" not in s:
                raise ValueError(
                    f"A source dict needs 'data' and may hold {sorted(_SOURCE_KEYS)}; got {sorted(s)}."
                )
            spec.update(s)
        else:
            spec["data"] = s
        if not isinstance(spec["data"], (str, Path, AnnData)):
            raise TypeError(
                f"Source {i}: expected an .h5ad path or an AnnData, got {type(spec['data']).__name__}."
            )
        if spec["input_kind"] not in INPUT_KINDS:
            raise ValueError(
                f"Source {i}: input_kind must be one of {INPUT_KINDS}, got {spec['input_kind']!r}."
            )
        spec["name"] = spec.get("name") or (
            Path(spec["data"]).stem if not isinstance(spec["data"], AnnData) else f"adata_{i}"
        )
        specs.append(spec)
    if not specs:
        raise ValueError("No sources were given.")
    return specs


def _aggregator(ids: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse (n_vars, n_used) matrix summing the variables of each used token, and the used tokens."""
    mapped = np.flatnonzero(ids >= 0)
    used, col = np.unique(ids[mapped], return_inverse=True)
    agg = sp.csr_matrix((np.ones(mapped.size), (mapped, col)), shape=(ids.size, used.size))
    return agg, used


def _chunk_values(
    reader: _Reader, spec: dict, agg: sp.csr_matrix, start: int, stop: int, target_sum: float
) -> sp.csr_matrix:
    """Normalized values of rows [start, stop) on the used tokens (cells x used), explicit zeros removed."""
    x = reader.rows(start, stop)
    totals = np.asarray(x.sum(axis=1)).ravel() if spec["input_kind"] == "counts" else None
    x = normalize_rows(x, spec["input_kind"], target_sum, totals=totals)
    xm = (x @ agg).tocsr()
    xm.eliminate_zeros()
    return xm


def _median_from_hist(hist: np.ndarray) -> np.ndarray:
    """Median of each row's distribution from a log-space histogram (linear within the bin)."""
    total = hist.sum(axis=1)
    cum = np.cumsum(hist, axis=1)
    half = total / 2.0
    b = np.argmax(cum >= half[:, None], axis=1)
    rows = np.arange(hist.shape[0])
    prev = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
    inbin = np.maximum(hist[rows, b], 1)
    frac = np.clip((half - prev) / inbin, 0.0, 1.0)
    med = np.exp(_LO + (b + frac) * _W)
    return np.where(total > 0, med, np.nan)


def _check_kind(reader: _Reader, spec: dict) -> None:
    x = reader.rows(0, min(reader.n_obs, 200))
    if x.nnz == 0:
        return
    if not np.isfinite(x.data).all():
        raise ValueError(
            f"Source {spec['name']!r} has NaN or infinite expression values: a corpus written from them would "
            "hold meaningless ranks. Remove or fix those cells / genes first (e.g. `np.nan_to_num` only if a "
            "missing value truly means 0)."
        )
    if x.data.min() < 0:
        raise ValueError(
            f"Source {spec['name']!r} has negative values (scaled data?): pass raw counts or log1p-normalized "
            "values (`layer=` may point to them)."
        )
    noninteger = np.mean(x.data != np.round(x.data))
    if spec["input_kind"] == "counts" and x.data.max() < 20 and noninteger > 0.5:
        raise ValueError(
            f"Source {spec['name']!r} looks log-transformed (max {float(x.data.max()):.2f}, non-integer values) "
            "but input_kind='counts': normalizing it again would distort every rank. Pass input_kind='log1p' "
            "if it holds log1p-normalized values, or the raw counts (`layer=`)."
        )
    if spec["input_kind"] == "log1p" and x.data.max() > 30:
        raise ValueError(
            f"Source {spec['name']!r}: input_kind='log1p' but values reach {x.data.max():.0f}; these look like counts."
        )


def _write_rows(
    files: list, starts: np.ndarray, seq_len: int, g0: int, ids: np.ndarray, values: np.ndarray
) -> None:
    """Write rows [g0, g0 + len(ids)) of the corpus into the shard files (positioned writes)."""
    g1 = g0 + ids.shape[0]
    for k in range(np.searchsorted(starts, g0, side="right") - 1, len(files)):
        a, b = max(g0, starts[k]), min(g1, starts[k + 1])
        if a >= b:
            break
        for (path, offset), arr in zip(files[k], (ids, values), strict=True):
            with open(path, "r+b") as f:
                f.seek(offset + int(a - starts[k]) * seq_len * arr.itemsize)
                f.write(np.ascontiguousarray(arr[a - g0 : b - g0]).tobytes())


def compass_tokenize(
    sources,
    out_dir: str | Path,
    vocab: CompassVocab,
    *,
    species: str | None = None,
    input_kind: str = "counts",
    layer: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    gene_medians: pd.Series | None = None,
    missing_median: float | None = None,
    log_base: float | None = None,
    value_dtype: str = "float16",
    max_len: int = 2048,
    target_sum: float = 1e4,
    chunk_size: int = 512,
    shard_size: int = 100_000,
    overwrite: bool = False,
    progress_bar: bool = True,
):
    """Tokenize a corpus of cells once into compact sharded files that training streams from disk.

    Parameters
    ----------
    sources
        One or several ``.h5ad`` paths (read in chunks through h5py, never fully loaded; backed
        mode) or AnnData objects, human and mouse mixed. An element may be a dict
        ``{'data': path_or_adata, 'species': ..., 'input_kind': ..., 'layer': ..., 'gene_symbols':
        ..., 'gene_ids': ..., 'name': ...}`` overriding the defaults below for that source.
    out_dir
        Folder to write (see :class:`~pertpy_gnn.compass.CompassCorpus` for the layout).
    vocab
        Vocabulary from :func:`~pertpy_gnn.pp.compass_vocab`.
    species
        ``'human'`` or ``'mouse'``; ``None`` guesses per source from its gene names.
    input_kind
        What the matrix holds: ``'counts'`` (raw counts, or TPM/FPKM: scaled per cell to
        ``target_sum``), ``'log1p'`` (``log1p`` of already normalized values, e.g. the Norman
        subset: ``expm1`` is applied and the cell is not rescaled, since its genes may be a subset of
        the transcriptome), ``'normalized'`` (used as is; the published code's behaviour).
    layer
        Layer to read instead of ``X``.
    gene_symbols
        ``var`` column with gene symbols to use instead of ``var_names``.
    gene_ids
        Ensembl id -> symbol table (path or DataFrame, :func:`~pertpy_gnn.pp.gene_id_table`) for
        sources whose genes are Ensembl ids.
    gene_medians
        Per-token medians (index: token name) to reuse, e.g. ``CompassCorpus(pretraining).gene_medians``
        when tokenizing new data for a pre-trained model; tokens it lacks get this corpus's medians.
        ``None``: computed from this corpus (one extra pass; a log-space histogram per token, so
        memory does not grow with the number of cells).
    missing_median
        Median used for the tokens ``gene_medians`` lacks instead of this corpus's (the published
        preprocessing uses 1).
    log_base
        Base of the value's logarithm, ``log(1 + x / median) / log(log_base)``; ``None``: natural
        logarithm (ours); ``2``: as published.
    value_dtype
        ``'float16'`` (compact) or ``'float32'`` (the published precision) values on disk.
    max_len
        Gene tokens kept per cell (the top ``max_len`` by value); sequences are ``max_len + 1`` long
        with the species token first and padding (token 0, value 0) at the end.
    target_sum
        Per-cell total for ``input_kind='counts'``.
    chunk_size
        Cells processed at once (vectorized per chunk).
    shard_size
        Cells per shard file.
    overwrite
        Replace an existing corpus in ``out_dir``.
    progress_bar
        Show progress: a bar in a terminal or notebook, else one log line (``pertpy_gnn`` logger, INFO)
        per tenth of the chunks; ``False``: none.

    Returns
    -------
    :class:`~pertpy_gnn.compass.CompassCorpus` opened on ``out_dir``.
    """
    from .._progress import Progress
    from ..compass._corpus import MANIFEST, CompassCorpus, write_manifest

    if max_len < 1 or chunk_size < 1 or shard_size < 1:
        raise ValueError("max_len, chunk_size and shard_size must be positive.")
    if value_dtype not in ("float16", "float32"):
        raise ValueError(f"value_dtype must be 'float16' or 'float32', got {value_dtype!r}.")
    if log_base is not None and not (log_base > 0 and log_base != 1):
        raise ValueError(f"log_base must be positive and not 1 (or None), got {log_base!r}.")
    if missing_median is not None and not missing_median > 0:
        raise ValueError(f"missing_median must be positive, got {missing_median!r}.")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} is not empty; pass overwrite=True to replace the corpus there, or another out_dir."
            )
        if not (out / MANIFEST).is_file():
            raise FileExistsError(
                f"{out} holds files but no corpus manifest; refusing to overwrite it. Choose an empty folder."
            )
        for f in [out / MANIFEST, out / "vocab.json", out / "gene_medians.tsv", *out.glob("shard_*.npy")]:
            f.unlink(missing_ok=True)
    specs = _resolve_sources(
        sources,
        {
            "species": species,
            "input_kind": input_kind,
            "layer": layer,
            "gene_symbols": gene_symbols,
            "gene_ids": gene_ids,
        },
    )
    # ---- open every source and map its genes before any long work
    tables: dict = {}
    readers, aggs, useds = [], [], []
    for spec in specs:
        reader = _Reader(spec["data"], spec["layer"])
        gid = spec["gene_ids"]
        if gid is not None and not isinstance(gid, pd.Series):
            key = id(gid) if isinstance(gid, pd.DataFrame) else str(gid)
            if key not in tables:
                tables[key] = gene_id_table(gid)
            gid = tables[key]
        names = reader.var[spec["gene_symbols"]] if spec["gene_symbols"] else reader.var.index
        spec["species"] = spec["species"] or guess_species(names)
        ids, report = var_tokens(
            AnnData(var=reader.var),
            vocab,
            species=spec["species"],
            gene_symbols=spec["gene_symbols"],
            gene_ids=gid,
        )
        spec.update({k: report[k] for k in ("n_genes", "n_mapped", "n_tokens")})
        logger.info(
            "%s: %d of %d %s genes map to the vocabulary",
            spec["name"],
            report["n_mapped"],
            report["n_genes"],
            spec["species"],
        )
        _check_kind(reader, spec)
        agg, used = _aggregator(ids)
        readers.append(reader)
        aggs.append(agg)
        useds.append(used)
    n_cells = sum(r.n_obs for r in readers)
    if n_cells == 0:
        raise ValueError("The sources hold no cells.")
    all_tokens = np.unique(np.concatenate(useds))
    n_chunks = sum(math.ceil(r.n_obs / chunk_size) for r in readers)
    try:
        # ---- pass 1: per-token median of non-zero normalized values
        med = np.full(all_tokens.size, np.nan)
        if gene_medians is not None:
            given = pd.Series(gene_medians, dtype=float)
            med = given.reindex(vocab.tokens[all_tokens]).to_numpy()
        missing = ~(np.isfinite(med) & (med > 0))
        if missing_median is not None:
            med[missing] = float(missing_median)
            missing[:] = False
        if missing.any():
            hist = np.zeros((all_tokens.size, _NB), dtype=np.int64)
            bar = Progress(n_chunks, "gene medians", enabled=progress_bar)
            for reader, spec, agg, used in zip(readers, specs, aggs, useds, strict=True):
                pos = np.searchsorted(all_tokens, used)
                for start in range(0, reader.n_obs, chunk_size):
                    xm = _chunk_values(reader, spec, agg, start, start + chunk_size, target_sum)
                    b = np.clip(((np.log(xm.data) - _LO) / _W).astype(np.int64), 0, _NB - 1)
                    keys, cnt = np.unique(pos[xm.indices] * _NB + b, return_counts=True)
                    hist.ravel()[keys] += cnt
                    bar.update()
            bar.close()
            med[missing] = _median_from_hist(hist[missing])
            n_nonzero = hist.sum(axis=1)
        else:
            n_nonzero = np.zeros(all_tokens.size, dtype=np.int64)
        # ---- pass 2: tokens
        out.mkdir(parents=True, exist_ok=True)
        seq_len = max_len + 1
        starts = np.arange(0, n_cells, shard_size, dtype=np.int64)
        shard_n = np.diff(np.append(starts, n_cells))
        starts = np.append(starts, n_cells)
        files, shards = [], []
        for k, n in enumerate(shard_n):
            entry = []
            for key, dtype in (("ids", np.int32), ("values", np.dtype(value_dtype))):
                name = f"shard_{k:05d}_{key}.npy"
                mm = np.lib.format.open_memmap(out / name, mode="w+", dtype=dtype, shape=(int(n), seq_len))
                offset = mm.offset
                del mm
                entry.append((str(out / name), offset))
            files.append(entry)
            shards.append(
                {
                    "ids": f"shard_{k:05d}_ids.npy",
                    "values": f"shard_{k:05d}_values.npy",
                    "start": int(starts[k]),
                    "n_cells": int(n),
                }
            )
        bar = Progress(n_chunks, "tokenize", enabled=progress_bar)
        g0 = 0
        for reader, spec, agg, used in zip(readers, specs, aggs, useds, strict=True):
            med_used = med[np.searchsorted(all_tokens, used)]
            spec["start"] = g0
            n_tok = 0
            for start in range(0, reader.n_obs, chunk_size):
                xm = _chunk_values(reader, spec, agg, start, start + chunk_size, target_sum)
                nrow = xm.shape[0]
                rows = np.repeat(np.arange(nrow), np.diff(xm.indptr))
                if not np.isfinite(xm.data).all():
                    raise ValueError(
                        f"Source {spec['name']!r} has NaN or infinite expression values in cells "
                        f"{start}-{start + nrow - 1}; the corpus in {out} is incomplete. Fix those cells first."
                    )
                val = np.log1p(xm.data / med_used[xm.indices])
                if log_base is not None:
                    val = val / np.log(log_base)
                tok = used[xm.indices]
                order = np.lexsort((tok, -val, rows))  # by cell, then value descending, then token id
                rank = np.arange(order.size) - xm.indptr[rows[order]]
                keep = order[rank < max_len]
                rank = rank[rank < max_len]
                ids = np.zeros((nrow, seq_len), dtype=np.int32)
                values = np.zeros((nrow, seq_len), dtype=value_dtype)
                ids[:, 0] = vocab.species_token(spec["species"])
                ids[rows[keep], rank + 1] = tok[keep]
                values[rows[keep], rank + 1] = val[keep]
                _write_rows(files, starts, seq_len, g0, ids, values)
                n_tok += keep.size
                g0 += nrow
                bar.update()
            spec["n_cells"] = reader.n_obs
            spec["mean_tokens_per_cell"] = n_tok / max(reader.n_obs, 1)
        bar.close()
    finally:
        for r in readers:
            r.close()
    vocab.write(out / "vocab.json")
    pd.DataFrame({"token": vocab.tokens[all_tokens], "median": med, "n_nonzero": n_nonzero}).to_csv(
        out / "gene_medians.tsv", sep="\t", index=False
    )
    write_manifest(
        out,
        n_cells=n_cells,
        seq_len=seq_len,
        vocab_size=len(vocab),
        value_dtype=value_dtype,
        shards=shards,
        sources=[
            {
                "name": s["name"],
                "data": "<AnnData>" if isinstance(s["data"], AnnData) else str(s["data"]),
                **{
                    k: s[k]
                    for k in (
                        "species",
                        "input_kind",
                        "layer",
                        "gene_symbols",
                        "start",
                        "n_cells",
                        "n_genes",
                        "n_mapped",
                        "n_tokens",
                        "mean_tokens_per_cell",
                    )
                },
            }
            for s in specs
        ],
        params={
            "target_sum": target_sum,
            "chunk_size": chunk_size,
            "shard_size": shard_size,
            "medians_given": gene_medians is not None,
            "missing_median": missing_median,
            "log_base": log_base,
        },
    )
    corpus = CompassCorpus(out)
    logger.info("%r", corpus)
    return corpus
