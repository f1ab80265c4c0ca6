"""GeneCompass prior-knowledge gene embeddings, each a token x dim matrix aligned to the vocabulary.

Four priors (Yang et al. 2024, Materials and Methods):

- ``grn``: TF -> target pairs (paper: PECA2; here TRRUST, DoRothEA A-C or any user table),
  embedded with gene2vec;
- ``family``: pairs of genes sharing an HGNC gene group, embedded with gene2vec (mouse genes inherit
  the families of their 1:1 human orthologs through the shared token);
- ``coexpression``: gene pairs with Pearson r > 0.8 on the non-zero values of sampled cells,
  embedded with gene2vec;
- ``promoter``: a user-given per-gene embedding (paper: DNABERT on 2.5 kb around the TSS).

gene2vec (Du et al. 2019) is word2vec skip-gram with negative sampling where every "sentence" is a gene
pair; it is implemented here in torch (the same objective as ``gensim.models.Word2Vec(sentences=pairs,
sg=1, window=1, negative=k)``). A prior that is absent is replaced in the model by a learned embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._utils import get_adata, get_matrix, logger
from ._compass_vocab import _ENSEMBL, SPECIES, CompassVocab, fetch_file, guess_species, read_table

TRRUST_URL = "https://www.grnpedia.org/trrust/data/trrust_rawdata.{species}.tsv"
#: DoRothEA regulons through the OmniPath web service (the R package ships them as .rda)
DOROTHEA_URL = (
    "https://omnipathdb.org/interactions?datasets=dorothea&dorothea_levels=A,B,C,D,E&genesymbols=yes"
    "&fields=dorothea_level&organisms={taxon}"
)
HGNC_URL = "https://storage.googleapis.com/public-download-files/hgnc/tsv/tsv/hgnc_complete_set.txt"
PRIOR_NAMES = ("promoter", "grn", "family", "coexpression")
_TAXON = {"human": 9606, "mouse": 10090}


# ------------------------------------------------------------------------------------------ loaders
def _check_species(species: str) -> None:
    if species not in SPECIES:
        raise ValueError(f"species must be one of {SPECIES}, got {species!r}.")


def trrust_edges(
    path: str | Path | None = None,
    *,
    species: str = "human",
    url: str | None = None,
    cache_dir: str | Path | None = None,
    known_hash: str | None = None,
) -> pd.DataFrame:
    """TRRUST v2 TF -> target edges.

    Parameters
    ----------
    path
        ``trrust_rawdata.{human,mouse}.tsv`` on disk; ``None`` downloads it with pooch.
    species
        ``'human'`` or ``'mouse'`` (picks the public file and fills the ``species`` column).
    url
        Download URL (default: the public TRRUST file of ``species``).
    cache_dir, known_hash
        pooch cache folder and optional hash.

    Returns
    -------
    DataFrame with columns ``tf``, ``target``, ``mode`` (Activation/Repression/Unknown), ``species``.
    """
    _check_species(species)
    file = fetch_file(
        path,
        url=url or TRRUST_URL.format(species=species),
        fname=f"trrust_rawdata.{species}.tsv",
        cache_dir=cache_dir,
        known_hash=known_hash,
    )
    df = read_table(file, sep="\t", header=None, dtype=str, usecols=[0, 1, 2])
    df.columns = ["tf", "target", "mode"]
    df = df.dropna(subset=["tf", "target"]).assign(species=species)
    df.attrs["source"] = f"TRRUST v2 {species} ({file})"
    return df


def dorothea_edges(
    path: str | Path | None = None,
    *,
    species: str = "human",
    confidence: str = "ABC",
    url: str | None = None,
    cache_dir: str | Path | None = None,
    known_hash: str | None = None,
) -> pd.DataFrame:
    """DoRothEA TF regulons, filtered by confidence level.

    Parameters
    ----------
    path
        A TSV with columns ``tf, confidence, target, mor`` (a conversion of the R package's data) or an
        OmniPath ``interactions`` table (``source_genesymbol, target_genesymbol, dorothea_level``).
        ``None`` downloads the OmniPath table with pooch.
    species
        ``'human'`` or ``'mouse'``.
    confidence
        Levels to keep (``'ABC'`` = the curated core).
    url, cache_dir, known_hash
        Download URL (default: OmniPath), pooch cache folder and optional hash.

    Returns
    -------
    DataFrame with columns ``tf``, ``target``, ``confidence``, ``mor``, ``species``.
    """
    _check_species(species)
    file = fetch_file(
        path,
        url=url or DOROTHEA_URL.format(taxon=_TAXON[species]),
        fname=f"dorothea_{species}.tsv",
        cache_dir=cache_dir,
        known_hash=known_hash,
    )
    raw = read_table(file, sep="\t", dtype=str)
    if {"tf", "target", "confidence"} <= set(raw.columns):
        df = raw[["tf", "target", "confidence"]].assign(
            mor=pd.to_numeric(raw.get("mor", 1.0), errors="coerce")
        )
    elif {"source_genesymbol", "target_genesymbol", "dorothea_level"} <= set(raw.columns):
        mor = np.where(raw.get("is_inhibition", "0").astype(str).isin(["1", "True"]), -1.0, 1.0)
        # OmniPath joins the levels of merged records with ';': keep the best one
        level = raw["dorothea_level"].astype(str).str.split(";").map(min)
        df = pd.DataFrame(
            {
                "tf": raw["source_genesymbol"],
                "target": raw["target_genesymbol"],
                "confidence": level,
                "mor": mor,
            }
        )
    else:
        raise ValueError(
            f"{file} is not a DoRothEA table: expected columns tf/confidence/target(/mor) or OmniPath's "
            f"source_genesymbol/target_genesymbol/dorothea_level, got {list(raw.columns)}."
        )
    keep = df["confidence"].isin(list(confidence.upper()))
    df = df[keep].dropna(subset=["tf", "target"]).reset_index(drop=True).assign(species=species)
    df.attrs["source"] = f"DoRothEA {species} confidence {confidence} ({file})"
    return df


def hgnc_gene_groups(
    path: str | Path | None = None,
    *,
    url: str = HGNC_URL,
    cache_dir: str | Path | None = None,
    known_hash: str | None = None,
) -> pd.DataFrame:
    """HGNC gene-group (gene family) memberships of human genes.

    Parameters
    ----------
    path
        ``hgnc_complete_set.txt`` (plain or ``.gz``); ``None`` downloads it with pooch.
    url, cache_dir, known_hash
        Download URL (default: the public HGNC file), pooch cache folder and optional hash.

    Returns
    -------
    DataFrame with one row per (gene, group): ``gene`` (symbol), ``group`` (``gene_group_id``),
    ``group_name``, ``species`` (``'human'``).
    """
    file = fetch_file(
        path, url=url, fname="hgnc_complete_set.txt", cache_dir=cache_dir, known_hash=known_hash
    )
    raw = read_table(
        file, sep="\t", dtype=str, usecols=lambda c: c in {"symbol", "gene_group", "gene_group_id"}
    )
    if not {"symbol", "gene_group_id"} <= set(raw.columns):
        raise ValueError(f"{file} lacks the HGNC columns 'symbol' and 'gene_group_id'.")
    raw = raw.dropna(subset=["gene_group_id"])
    ids = raw["gene_group_id"].str.split("|")
    names = raw["gene_group"].fillna("").str.split("|")
    names = [n if len(n) == len(i) else [""] * len(i) for n, i in zip(names, ids, strict=True)]
    df = pd.DataFrame({"gene": raw["symbol"], "group": ids, "group_name": names}).explode(
        ["group", "group_name"]
    )
    df = df.reset_index(drop=True).assign(species="human")
    df.attrs["source"] = f"HGNC gene groups ({file})"
    return df


# -------------------------------------------------------------------------------------- pair tables
def family_pairs(groups: pd.DataFrame, *, max_group_size: int | None = None) -> pd.DataFrame:
    """All pairs of genes sharing a group.

    Parameters
    ----------
    groups
        DataFrame with columns ``gene`` and ``group`` (optionally ``species``), e.g. from
        :func:`~pertpy_gnn.pp.hgnc_gene_groups`.
    max_group_size
        Skip groups larger than this (the huge ones, e.g. "Antisense RNAs", carry little signal and
        most of the pairs); ``None`` keeps all, as in the paper.

    Returns
    -------
    DataFrame ``gene_a``, ``gene_b``, ``species`` with ``gene_a < gene_b``, no duplicates.
    """
    if not {"gene", "group"} <= set(groups.columns):
        raise ValueError("`groups` needs columns 'gene' and 'group' (see pg.pp.hgnc_gene_groups).")
    g = groups.assign(species=groups["species"] if "species" in groups else "human")[
        ["gene", "group", "species"]
    ]
    g = g.dropna().drop_duplicates()
    if max_group_size is not None:
        size = g.groupby("group")["gene"].transform("size")
        g = g[size <= max_group_size]
    m = g.merge(g, on=["group", "species"], suffixes=("_a", "_b"))
    m = m[m["gene_a"] < m["gene_b"]]
    out = m[["gene_a", "gene_b", "species"]].drop_duplicates().reset_index(drop=True)
    out.attrs["source"] = groups.attrs.get("source", "user gene groups")
    return out


def coexpression_pairs(
    adata: AnnData,
    *,
    species: str | None = None,
    gene_symbols: str | None = None,
    layer: str | None = None,
    input_kind: str = "counts",
    n_cells: int = 3000,
    threshold: float = 0.8,
    min_cells: int = 30,
    block_size: int = 512,
    seed: int = 0,
    modality: str | None = None,
) -> pd.DataFrame:
    """Co-expressed gene pairs: Pearson r > ``threshold`` on cells where both genes are expressed.

    ``n_cells`` cells are sampled uniformly; values are ``log1p`` of per-cell normalized expression
    (see :func:`~pertpy_gnn.pp.compass_tokenize` for ``input_kind``); the correlation of a pair uses
    only the cells where both genes are non-zero (at least ``min_cells`` of them: with fewer, r > 0.8
    happens often by chance on sparse counts). Computed in gene blocks (upper triangle only) with
    dense products of the sampled cells, never a genes x genes matrix.

    Returns
    -------
    DataFrame ``gene_a``, ``gene_b``, ``r``, ``n_cells``, ``species``.
    """
    from ._compass_tokens import normalize_rows

    adata = get_adata(adata, modality)
    names = adata.var[gene_symbols].astype(str).to_numpy() if gene_symbols else adata.var_names.to_numpy()
    species = species or guess_species(names)
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    x = get_matrix(adata, layer)[cells]
    x = sp.csr_matrix(x, dtype=np.float64)
    x = normalize_rows(x, input_kind)
    x.data = np.log1p(x.data)
    x.eliminate_zeros()
    expressed = np.asarray((x > 0).sum(axis=0)).ravel()
    genes = np.flatnonzero(expressed >= min_cells)
    # dense float32 products (BLAS); the correlation itself in float64
    x = x[:, genes].toarray().astype(np.float32)
    m = (x > 0).astype(np.float32)
    x2 = x * x
    rows, cols, rs, ns = [], [], [], []
    for start in range(0, genes.size, block_size):
        b = slice(start, start + block_size)
        right = slice(start, None)  # pairs (i, j) with j >= i only
        mb, xb = m[:, b].T, x[:, b].T
        n = (mb @ m[:, right]).astype(np.float64)
        sx = (xb @ m[:, right]).astype(np.float64)
        sy = (mb @ x[:, right]).astype(np.float64)
        sxx = (x2[:, b].T @ m[:, right]).astype(np.float64)
        syy = (mb @ x2[:, right]).astype(np.float64)
        sxy = (xb @ x[:, right]).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (n * sxy - sx * sy) / np.sqrt((n * sxx - sx**2) * (n * syy - sy**2))
        i, j = np.nonzero((r > threshold) & (n >= min_cells))
        keep = j > i  # both local: i counts from `start` in the block, j from `start` in the right part
        i, j = i[keep], j[keep]
        rows.append(i + start)
        cols.append(j + start)
        rs.append(r[i, j])
        ns.append(n[i, j])
    i, j = np.concatenate(rows), np.concatenate(cols)
    out = pd.DataFrame(
        {
            "gene_a": names[genes[i]],
            "gene_b": names[genes[j]],
            "r": np.concatenate(rs),
            "n_cells": np.concatenate(ns).astype(np.int64),
            "species": species,
        }
    )
    out.attrs["source"] = (
        f"co-expression (Pearson r > {threshold} on non-zero values of {cells.size} sampled cells)"
    )
    logger.info(
        "%d co-expressed pairs among %d genes expressed in >= %d cells", len(out), genes.size, min_cells
    )
    return out


# ----------------------------------------------------------------------------------------- gene2vec
def _sgns(
    pairs: np.ndarray,
    n_nodes: int,
    *,
    dim: int,
    epochs: int,
    negative: int,
    batch_size: int | None,
    lr: float,
    seed: int,
) -> np.ndarray:
    """Skip-gram with negative sampling over (symmetric) node pairs; returns the input vectors."""
    if batch_size is None:
        batch_size = int(np.clip(2 * len(pairs) // 100, 64, 4096))
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    src = torch.as_tensor(np.concatenate([pairs[:, 0], pairs[:, 1]]), dtype=torch.long)
    dst = torch.as_tensor(np.concatenate([pairs[:, 1], pairs[:, 0]]), dtype=torch.long)
    noise = torch.bincount(dst, minlength=n_nodes).double() ** 0.75
    emb_in = torch.nn.Embedding(n_nodes, dim)
    emb_out = torch.nn.Embedding(n_nodes, dim)
    with torch.no_grad():
        emb_in.weight.uniform_(-0.5 / dim, 0.5 / dim, generator=gen)
        emb_out.weight.zero_()
    opt = torch.optim.Adam([emb_in.weight, emb_out.weight], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(src.numel(), generator=gen)
        for start in range(0, order.numel(), batch_size):
            idx = order[start : start + batch_size]
            u = emb_in(src[idx])
            v = emb_out(dst[idx])
            neg = emb_out(torch.multinomial(noise, idx.numel() * negative, replacement=True, generator=gen))
            neg = neg.view(idx.numel(), negative, dim)
            loss = -(
                F.logsigmoid((u * v).sum(-1)) + F.logsigmoid(-(neg * u[:, None, :]).sum(-1)).sum(-1)
            ).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return emb_in.weight.detach().numpy().astype(np.float32)


def gene2vec(
    pairs: pd.DataFrame,
    *,
    dim: int = 64,
    epochs: int = 5,
    negative: int = 5,
    batch_size: int | None = None,
    lr: float = 0.01,
    seed: int = 0,
) -> pd.DataFrame:
    """gene2vec: embed genes from co-occurring gene pairs (skip-gram, negative sampling).

    Parameters
    ----------
    pairs
        DataFrame whose first two columns are the two genes of each pair.
    dim
        Embedding dimension (paper: 768 for the base model).
    epochs, negative, batch_size, lr, seed
        Passes over the pairs, negatives per positive, minibatch size (``None``: about 100 steps
        per pass, between 64 and 4,096 pairs), Adam learning rate, seed.

    Returns
    -------
    DataFrame indexed by gene, ``dim`` columns.
    """
    if len(pairs) == 0:
        raise ValueError("No gene pairs were given to gene2vec.")
    a = pairs.iloc[:, 0].astype(str).to_numpy()
    b = pairs.iloc[:, 1].astype(str).to_numpy()
    codes, names = pd.factorize(np.concatenate([a, b]))
    vec = _sgns(
        codes.reshape(2, -1).T,
        len(names),
        dim=dim,
        epochs=epochs,
        negative=negative,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    return pd.DataFrame(vec, index=pd.Index(names, name="gene"))


# ------------------------------------------------------------------------------------------- priors
@dataclass
class CompassPrior:
    """One prior-knowledge embedding aligned to a vocabulary.

    Attributes
    ----------
    name
        One of ``promoter``, ``grn``, ``family``, ``coexpression``.
    matrix
        ``(len(vocab), dim)`` float32; rows of tokens without knowledge are zero.
    covered
        ``(len(vocab),)`` bool, tokens with knowledge.
    source
        Where the knowledge came from.
    """

    name: str
    matrix: np.ndarray
    covered: np.ndarray
    source: str

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.matrix.shape[1])

    def __repr__(self) -> str:
        return f"CompassPrior({self.name!r}, dim={self.dim}, {int(self.covered.sum())} tokens covered, source={self.source!r})"


def _pair_tokens(pairs: pd.DataFrame, vocab: CompassVocab) -> np.ndarray:
    """Token-id pairs of a gene-pair table (first two columns; ``species`` column or human)."""
    species = pairs["species"].to_numpy() if "species" in pairs else np.full(len(pairs), "human")
    out = np.full((len(pairs), 2), -1, dtype=np.int64)
    for s in np.unique(species):
        for col in (0, 1):
            names = pairs.iloc[:, col].astype(str)
            rows = (species == s) & ~names.str.match(_ENSEMBL.pattern).to_numpy()  # unnamed genes: no token
            out[rows, col] = vocab.lookup(names[rows], s)
    out = out[(out >= 0).all(axis=1) & (out[:, 0] != out[:, 1])]
    return np.unique(np.sort(out, axis=1), axis=0)


def _prior_from_vectors(
    name: str, vocab: CompassVocab, ids: np.ndarray, vectors: np.ndarray, source: str
) -> CompassPrior:
    keep = ids >= 0
    ids, vectors = ids[keep], vectors[keep]
    ids, first = np.unique(ids, return_index=True)
    matrix = np.zeros((len(vocab), vectors.shape[1]), dtype=np.float32)
    matrix[ids] = vectors[first]
    covered = np.zeros(len(vocab), dtype=bool)
    covered[ids] = True
    prior = CompassPrior(name, matrix, covered, source)
    logger.info("%r", prior)
    return prior


def compass_priors(
    vocab: CompassVocab,
    *,
    grn: pd.DataFrame | None = None,
    family: pd.DataFrame | None = None,
    coexpression: pd.DataFrame | None = None,
    promoter: pd.DataFrame | None = None,
    promoter_species: str = "human",
    dim: int = 64,
    epochs: int = 5,
    negative: int = 5,
    max_group_size: int | None = None,
    sources: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[str, CompassPrior]:
    """Build the GeneCompass prior-knowledge embeddings aligned to ``vocab``.

    Parameters
    ----------
    vocab
        The vocabulary (:func:`~pertpy_gnn.pp.compass_vocab`).
    grn
        TF -> target edges: first two columns TF and target, optional ``species`` column (default
        human), e.g. :func:`~pertpy_gnn.pp.trrust_edges` or :func:`~pertpy_gnn.pp.dorothea_edges`
        (``pd.concat`` human and mouse tables to use both).
    family
        Gene-group memberships (``gene``, ``group``[, ``species``]), e.g.
        :func:`~pertpy_gnn.pp.hgnc_gene_groups`; turned into pairs by :func:`family_pairs`.
    coexpression
        Co-expressed pairs from :func:`~pertpy_gnn.pp.coexpression_pairs` (concat several datasets).
    promoter
        A per-gene embedding (DataFrame indexed by gene symbol, one column per dimension) of
        ``promoter_species`` genes. To make one as in the paper: take 2,500 bases around each gene's
        TSS (500 upstream, 2,000 downstream) from the genome (e.g. Ensembl GTF + FASTA), run them
        through DNABERT (``zhihan1996/DNA_bert_6`` with 6-mer tokens, or DNABERT-2) and keep the
        [CLS] (or mean-pooled) last hidden state: one row per gene.
    promoter_species
        Species of the promoter table's genes.
    dim, epochs, negative
        gene2vec dimension, passes and negatives.
    max_group_size
        Passed to :func:`family_pairs`.
    sources
        Override the recorded source of a prior (``{'grn': 'PECA2 ...'}``).
    seed
        Random seed of gene2vec.

    Returns
    -------
    ``{name: CompassPrior}`` for the priors that were given; the model uses a learned embedding for
    any prior that is absent.
    """
    sources = dict(sources or {})
    out: dict[str, CompassPrior] = {}
    tables = {"grn": grn, "coexpression": coexpression}
    if family is not None:
        tables["family"] = family_pairs(family, max_group_size=max_group_size)
    for name, table in tables.items():
        if table is None:
            continue
        tok = _pair_tokens(table, vocab)
        if len(tok) == 0:
            raise ValueError(
                f"No {name} pair has both genes in the vocabulary; check the species column and gene names."
            )
        nodes, inv = np.unique(tok, return_inverse=True)
        vec = _sgns(
            inv.reshape(-1, 2),
            nodes.size,
            dim=dim,
            epochs=epochs,
            negative=negative,
            batch_size=None,
            lr=0.01,
            seed=seed,
        )
        source = sources.get(name, table.attrs.get("source", f"user {name} table"))
        out[name] = _prior_from_vectors(
            name, vocab, nodes, vec, f"gene2vec of {len(tok)} pairs from {source}"
        )
    if promoter is not None:
        if not isinstance(promoter, pd.DataFrame):
            raise TypeError(
                "`promoter` must be a DataFrame indexed by gene (one column per embedding dimension)."
            )
        ids = vocab.lookup(promoter.index.astype(str), promoter_species)
        if not (ids >= 0).any():
            raise ValueError(
                "No gene of the promoter embedding is in the vocabulary; check promoter_species and the index."
            )
        source = sources.get("promoter", promoter.attrs.get("source", "user promoter embedding"))
        out["promoter"] = _prior_from_vectors("promoter", vocab, ids, promoter.to_numpy(np.float32), source)
    return out
