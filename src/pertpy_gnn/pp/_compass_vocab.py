"""GeneCompass gene vocabulary: one token space for human and mouse genes.

A mouse gene with a strict 1:1 human ortholog (MGI homology class with exactly one human and one
mouse gene) takes the human gene's token; every other gene keeps a species-specific token. Special
tokens come first: ``<pad>`` (0), ``<mask>`` (1) and one token per species (``<human>``, ``<mouse>``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import COMPASS_TOKEN_KEY
from .._utils import check_overwrite, get_adata, logger

#: public MGI human-mouse homology report
MGI_HOMOLOGY_URL = "https://www.informatics.jax.org/downloads/reports/HOM_MouseHumanSequence.rpt"
SPECIES = ("human", "mouse")
PAD, MASK = "<pad>", "<mask>"
SPECIAL_TOKENS = (PAD, MASK, "<human>", "<mouse>")
PAD_ID, MASK_ID = 0, 1
#: prefix of the tokens of mouse genes without a 1:1 human ortholog
MOUSE_PREFIX = "mouse:"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def fetch_file(
    path: str | Path | None, *, url: str, fname: str, cache_dir: str | Path | None, known_hash: str | None
) -> Path:
    """Return ``path`` when given, else download ``url`` once with pooch into ``cache_dir``.

    ``cache_dir=None`` uses the user cache (``pooch.os_cache('pertpy_gnn')``); the cached file is
    named ``fname`` with a hash of the URL.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; pass the path of the downloaded file, or path=None to download it."
            )
        return path
    import pooch

    cache = Path(cache_dir) if cache_dir is not None else pooch.os_cache("pertpy_gnn")
    # one cache file per URL: the same resource from two URLs must not collide
    stem, dot, ext = fname.partition(".")
    fname = f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:10]}{dot}{ext}"
    logger.info("fetching %s into %s", url, cache)
    return Path(pooch.retrieve(url, known_hash=known_hash, fname=fname, path=cache, progressbar=False))


def read_table(file: str | Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` that recognizes gzip by its magic bytes (downloads may lack the ``.gz`` suffix)."""
    with open(file, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return pd.read_csv(file, compression="gzip" if gz else None, **kwargs)


def mgi_orthologs(
    path: str | Path | None = None,
    *,
    url: str = MGI_HOMOLOGY_URL,
    cache_dir: str | Path | None = None,
    known_hash: str | None = None,
) -> pd.DataFrame:
    """Read the MGI human-mouse homology report (``HOM_MouseHumanSequence.rpt``).

    Parameters
    ----------
    path
        The report on disk (plain or ``.gz``). ``None`` downloads it from ``url`` with pooch.
    url
        Where to download it from (default: the public MGI report).
    cache_dir
        Download cache (default: the user cache of ``pertpy_gnn``).
    known_hash
        Optional pooch hash of the file.

    Returns
    -------
    DataFrame with one row per gene: ``class_key`` (homology class), ``species`` (``human`` or
    ``mouse``), ``symbol``, ``entrez_id``, and ``one_to_one`` (the class has exactly one human and one
    mouse gene). ``df.attrs['source']`` records where it came from.
    """
    file = fetch_file(
        path, url=url, fname="HOM_MouseHumanSequence.rpt", cache_dir=cache_dir, known_hash=known_hash
    )
    raw = read_table(file, sep="\t", dtype=str)
    need = {"DB Class Key", "Common Organism Name", "Symbol"}
    if not need <= set(raw.columns):
        raise ValueError(
            f"{file} is not an MGI homology report: columns {sorted(need - set(raw.columns))} are missing."
        )
    org = raw["Common Organism Name"].str.lower()
    species = np.where(
        org.str.startswith("human"), "human", np.where(org.str.startswith("mouse"), "mouse", "")
    )
    df = pd.DataFrame(
        {
            "class_key": raw["DB Class Key"].to_numpy(),
            "species": species,
            "symbol": raw["Symbol"].to_numpy(),
            "entrez_id": raw.get("EntrezGene ID", pd.Series(index=raw.index, dtype=str)).to_numpy(),
        }
    )
    df = df[(df["species"] != "") & df["symbol"].notna()].reset_index(drop=True)
    counts = pd.crosstab(df["class_key"], df["species"])
    one = counts.index[(counts.get("human", 0) == 1) & (counts.get("mouse", 0) == 1)]
    df["one_to_one"] = df["class_key"].isin(one).to_numpy()
    df.attrs["source"] = f"MGI HOM_MouseHumanSequence.rpt ({file})"
    return df


def gene_id_table(table: str | Path | pd.DataFrame) -> pd.Series:
    """Ensembl gene id -> symbol table.

    Accepts a path or DataFrame in any of these forms: a two-column headerless CSV (id, symbol; the
    celltypist GENCODE table), the HGNC complete set (``ensembl_gene_id``, ``symbol``), or an NCBI
    gene-info table (``ensembl_id``, ``symbol``).

    Returns
    -------
    Series indexed by Ensembl id (version suffix removed) with the gene symbol as value.
    """
    if not isinstance(table, pd.DataFrame):
        path = Path(table)
        with open(path, "rb") as fh:
            opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
        with opener(path, "rt") as fh:
            first = fh.readline()
        sep = "\t" if "\t" in first else ","
        if _ENSEMBL.match(first.split(sep)[0].strip()):  # headerless: id, symbol
            table = read_table(
                path, sep=sep, header=None, usecols=[0, 1], names=["ensembl_id", "symbol"], dtype=str
            )
        else:
            wanted = {
                "ensembl_gene_id",
                "ensembl_id",
                "gene_id",
                "ensembl",
                "symbol",
                "gene_symbol",
                "gene_name",
                "name",
            }
            table = read_table(path, sep=sep, dtype=str, usecols=lambda c: c.lower() in wanted)
    cols = {c.lower(): c for c in table.columns}
    id_col = next(
        (cols[c] for c in ("ensembl_gene_id", "ensembl_id", "gene_id", "ensembl") if c in cols), None
    )
    sym_col = next((cols[c] for c in ("symbol", "gene_symbol", "gene_name", "name") if c in cols), None)
    if id_col is None or sym_col is None:
        raise ValueError(
            f"Cannot find an Ensembl id and a symbol column among {list(table.columns)}; name them "
            "'ensembl_id' and 'symbol'."
        )
    t = table[[id_col, sym_col]].dropna()
    ids = t[id_col].str.split(".").str[0]
    return pd.Series(t[sym_col].to_numpy(), index=ids.to_numpy(), name="symbol").groupby(level=0).first()


class CompassVocab:
    """The GeneCompass token vocabulary of human and mouse genes.

    Two layouts exist. Ours (build it with :func:`pertpy_gnn.pp.compass_vocab`): ``0`` ``<pad>``,
    ``1`` ``<mask>``, ``2`` ``<human>``, ``3`` ``<mouse>``, then human genes (named by their symbol;
    shared with their 1:1 mouse ortholog), then mouse genes without a 1:1 human ortholog (named
    ``mouse:<Symbol>``). The published one (``GeneCompass.load_official`` reads it): ``0`` ``<pad>``,
    ``1`` ``<mask>``, then genes named by Ensembl id (``ENSG...`` human, ``ENSMUSG...`` mouse), each
    species its own tokens, with ``symbols`` (id -> symbol) and ``homologs`` (mouse token -> human
    token, used for the prior look-ups of mouse cells).

    Parameters
    ----------
    tokens
        Token names in id order (special tokens first).
    mouse_shared
        Mouse symbol -> human token name for mouse genes with a 1:1 human ortholog (our layout).
    symbols
        Ensembl id -> gene symbol (published layout).
    homologs
        Mouse token id -> human token id (published layout).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        mouse_shared: dict[str, str] | None = None,
        *,
        symbols: dict[str, str] | None = None,
        homologs: dict[int, int] | None = None,
    ):
        tokens = [str(t) for t in tokens]
        if tuple(tokens[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS:
            self.layout = "pertpy"
        elif tuple(tokens[:2]) == (PAD, MASK) and all(_ENSEMBL.match(t) for t in tokens[2:]):
            self.layout = "official"
        else:
            raise ValueError(
                f"The first tokens must be the special tokens {SPECIAL_TOKENS} (our vocabulary), or {(PAD, MASK)} "
                "followed by Ensembl gene ids (the published GeneCompass token dictionary)."
            )
        if len(set(tokens)) != len(tokens):
            raise ValueError("Token names must be unique.")
        self.tokens = np.asarray(tokens, dtype=object)
        self.mouse_shared = dict(mouse_shared or {})
        self.symbols = {str(k): str(v) for k, v in (symbols or {}).items()}
        self.homologs = {int(k): int(v) for k, v in (homologs or {}).items()}
        index = {t: i for i, t in enumerate(tokens)}
        self._index = index
        if self.layout == "pertpy":
            human = {
                t.upper(): i
                for i, t in enumerate(tokens)
                if i >= len(SPECIAL_TOKENS) and not t.startswith(MOUSE_PREFIX)
            }
            mouse = {
                t[len(MOUSE_PREFIX) :].upper(): i for i, t in enumerate(tokens) if t.startswith(MOUSE_PREFIX)
            }
            mouse.update({m.upper(): index[h] for m, h in self.mouse_shared.items()})
            #: ids of the human tokens shared with a 1:1 mouse ortholog
            self.shared_ids = np.array(sorted({index[h] for h in self.mouse_shared.values()}), dtype=np.int64)
            self._mouse_mask = np.array([t.startswith(MOUSE_PREFIX) for t in tokens])
        else:
            self._mouse_mask = np.array([t.startswith("ENSMUSG") for t in tokens])
            self._mouse_mask[:2] = False
            human, mouse = {}, {}
            for i, t in enumerate(tokens[2:], start=2):
                table = mouse if self._mouse_mask[i] else human
                sym = self.symbols.get(t)
                if sym:
                    table.setdefault(sym.upper(), i)
            for i, t in enumerate(tokens[2:], start=2):  # ids win over symbols
                (mouse if self._mouse_mask[i] else human)[t.upper()] = i
            self.shared_ids = np.array(sorted(set(self.homologs.values())), dtype=np.int64)
        self._lookup = {"human": human, "mouse": mouse}

    # ----------------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        if self.layout == "official":
            return (
                f"CompassVocab(published layout, {len(self)} tokens: {self.n_human} human, "
                f"{self.n_mouse_specific} mouse, {len(self.homologs)} mouse genes with a human homolog)"
            )
        return (
            f"CompassVocab({len(self)} tokens: {self.n_human} human-or-shared, {self.n_mouse_specific} "
            f"mouse-specific, {len(self.mouse_shared)} mouse genes on shared 1:1 ortholog tokens)"
        )

    @property
    def n_special(self) -> int:
        """Number of special tokens (pad, mask and, in our layout, species)."""
        return len(SPECIAL_TOKENS) if self.layout == "pertpy" else 2

    @property
    def n_human(self) -> int:
        """Number of human (or shared) gene tokens."""
        return len(self) - self.n_special - self.n_mouse_specific

    @property
    def n_mouse_specific(self) -> int:
        """Number of mouse-specific gene tokens."""
        return int(self._mouse_mask.sum())

    @property
    def species_ids(self) -> tuple[int, int]:
        """Ids written in column 0 of a token sequence for human and mouse cells.

        Our layout: the ``<human>`` / ``<mouse>`` tokens. The published layout has no species
        tokens (the model holds a separate species embedding): ``0`` / ``1`` there.
        """
        return (2, 3) if self.layout == "pertpy" else (0, 1)

    def species_token(self, species: str) -> int:
        """Id written in column 0 of a token sequence for a cell of ``species``."""
        if species not in SPECIES:
            raise ValueError(f"species must be one of {SPECIES}, got {species!r}.")
        return self.species_ids[SPECIES.index(species)]

    def species_mask(self, species: str) -> np.ndarray:
        """Boolean mask over the tokens of the gene tokens a cell of ``species`` can hold."""
        if species not in SPECIES:
            raise ValueError(f"species must be one of {SPECIES}, got {species!r}.")
        gene = np.arange(len(self)) >= self.n_special
        if species == "human":
            return gene & ~self._mouse_mask
        if self.layout == "pertpy":
            return self._mouse_mask | np.isin(np.arange(len(self)), self.shared_ids)
        return self._mouse_mask.copy()

    def homologous_index(self) -> np.ndarray:
        """Token id whose prior rows a mouse cell's token uses (identity except mouse -> human homologs)."""
        idx = np.arange(len(self), dtype=np.int64)
        if self.homologs:
            src = np.fromiter(self.homologs.keys(), dtype=np.int64)
            idx[src] = np.fromiter(self.homologs.values(), dtype=np.int64)
        return idx

    @property
    def names(self) -> np.ndarray:
        """Display name of each token: the gene symbol where known, else the token name."""
        return np.array([self.symbols.get(t, t) for t in self.tokens.tolist()], dtype=object)

    def token_id(self, name: str) -> int:
        """Id of a token by name (``'TP53'``, ``'mouse:Gm123'``, ``'<mask>'``, ``'ENSG00000141510'``)."""
        return self._index[name]

    # ---------------------------------------------------------------------------------- mapping
    def lookup(
        self,
        genes: Iterable[str],
        species: str,
        *,
        gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    ) -> np.ndarray:
        """Token id of each gene (``-1`` where the gene is not in the vocabulary).

        Parameters
        ----------
        genes
            Gene symbols (case-insensitive) or Ensembl gene ids (with or without version).
        species
            ``'human'`` or ``'mouse'``.
        gene_ids
            Ensembl id -> symbol table (see :func:`~pertpy_gnn.pp.gene_id_table`); needed when
            ``genes`` holds Ensembl ids.
        """
        if species not in SPECIES:
            raise ValueError(f"species must be one of {SPECIES}, got {species!r}.")
        genes = pd.Index([str(g) for g in genes])
        is_ens = genes.str.match(_ENSEMBL.pattern)
        if self.layout == "official" and is_ens.any():
            # the published vocabulary is keyed by Ensembl id: map ids directly, symbols through its own table
            genes = pd.Index(np.where(is_ens, genes.str.split(".").str[0], genes.to_numpy()).astype(str))
        elif is_ens.any():
            if gene_ids is None:
                raise ValueError(
                    f"{int(is_ens.sum())} gene names are Ensembl ids (e.g. {genes[is_ens][0]!r}); pass "
                    "`gene_ids=` an Ensembl -> symbol table (pg.pp.gene_id_table(path), e.g. the HGNC complete "
                    "set or a GENCODE id/name table), or `gene_symbols=` a var column holding symbols."
                )
            table = gene_ids if isinstance(gene_ids, pd.Series) else gene_id_table(gene_ids)
            stripped = genes.str.split(".").str[0]
            symbols = pd.Series(stripped).map(table).to_numpy()
            genes = pd.Index(np.where(is_ens, symbols, genes.to_numpy()).astype(str))
        table = self._lookup[species]
        return np.fromiter((table.get(g.upper(), -1) for g in genes), dtype=np.int64, count=len(genes))

    def genes_of(self, ids: np.ndarray) -> np.ndarray:
        """Token names of token ids."""
        return self.tokens[np.asarray(ids)]

    # ---------------------------------------------------------------------------------- storage
    def to_dict(self) -> dict:
        """JSON-able form (see :meth:`from_dict`)."""
        d = {
            "format": "pertpy_gnn.compass_vocab",
            "version": 1,
            "tokens": self.tokens.tolist(),
            "mouse_shared": self.mouse_shared,
        }
        if self.layout == "official":
            d["symbols"] = self.symbols
            d["homologs"] = {str(k): v for k, v in self.homologs.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CompassVocab:
        """Rebuild a vocabulary from :meth:`to_dict`."""
        return cls(
            d["tokens"],
            d.get("mouse_shared"),
            symbols=d.get("symbols"),
            homologs={int(k): int(v) for k, v in (d.get("homologs") or {}).items()},
        )

    def write(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def read(cls, path: str | Path) -> CompassVocab:
        """Read a vocabulary written by :meth:`write`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, CompassVocab)
            and self.tokens.tolist() == other.tokens.tolist()
            and self.mouse_shared == other.mouse_shared
            and self.symbols == other.symbols
            and self.homologs == other.homologs
        )

    __hash__ = None  # type: ignore[assignment]


def compass_vocab(
    orthologs: pd.DataFrame | None = None,
    *,
    human_genes: Iterable[str] | None = None,
    mouse_genes: Iterable[str] | None = None,
) -> CompassVocab:
    """Build the joint human + mouse GeneCompass vocabulary.

    Parameters
    ----------
    orthologs
        The MGI homology table from :func:`~pertpy_gnn.pp.mgi_orthologs`. Its genes all enter the
        vocabulary; a mouse gene of a class with exactly one human and one mouse gene takes the human
        token. ``None``: no orthologs (every mouse gene gets its own token).
    human_genes, mouse_genes
        Further gene symbols to include (e.g. the ``var_names`` of your data); a mouse gene that is a
        1:1 ortholog in ``orthologs`` still maps to the human token.

    Returns
    -------
    The :class:`~pertpy_gnn.compass.CompassVocab`.
    """
    human: dict[str, str] = {}
    mouse: dict[str, str] = {}
    shared: dict[str, str] = {}
    if orthologs is not None:
        need = {"class_key", "species", "symbol", "one_to_one"}
        if not need <= set(orthologs.columns):
            raise ValueError(
                f"`orthologs` lacks columns {sorted(need - set(orthologs.columns))}; read it with pg.pp.mgi_orthologs()."
            )
        for s in orthologs.loc[orthologs["species"] == "human", "symbol"]:
            human.setdefault(s.upper(), s)
        for s in orthologs.loc[orthologs["species"] == "mouse", "symbol"]:
            mouse.setdefault(s.upper(), s)
        one = orthologs[orthologs["one_to_one"]]
        pairs = one.pivot_table(
            index="class_key", columns="species", values="symbol", aggfunc="first"
        ).dropna()
        shared = dict(zip(pairs["mouse"], pairs["human"], strict=True))
    for s in human_genes if human_genes is not None else []:
        human.setdefault(str(s).upper(), str(s))
    shared_upper = {m.upper() for m in shared}
    for s in mouse_genes if mouse_genes is not None else []:
        mouse.setdefault(str(s).upper(), str(s))
    human_tokens = sorted(human.values())
    mouse_tokens = sorted(MOUSE_PREFIX + s for u, s in mouse.items() if u not in shared_upper)
    vocab = CompassVocab(
        [*SPECIAL_TOKENS, *human_tokens, *mouse_tokens], {m: human[h.upper()] for m, h in shared.items()}
    )
    logger.info("%r", vocab)
    return vocab


def guess_species(genes: Sequence[str]) -> str:
    """Guess ``'human'`` or ``'mouse'`` from gene names (Ensembl prefix, else symbol case)."""
    genes = pd.Index([str(g) for g in genes])
    if genes.str.startswith("ENSMUSG").mean() > 0.5:
        return "mouse"
    if genes.str.startswith("ENSG").mean() > 0.5:
        return "human"
    letters = genes[genes.str.contains("[A-Za-z]", regex=True)]
    upper = (letters == letters.str.upper()).mean() if len(letters) else 1.0
    return "human" if upper > 0.5 else "mouse"


def var_tokens(
    adata: AnnData,
    vocab: CompassVocab,
    *,
    species: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
) -> tuple[np.ndarray, dict]:
    """Token id of each variable of ``adata`` and a report (used by the tokenizer and compass_map_genes)."""
    names = adata.var[gene_symbols].astype(str) if gene_symbols is not None else adata.var_names
    if gene_symbols is not None and gene_symbols not in adata.var:
        raise KeyError(f"var column {gene_symbols!r} not found; available: {list(adata.var.columns)}.")
    if species is None:
        species = guess_species(names)
        logger.info("species guessed from gene names: %s (pass species= to set it)", species)
    ids = vocab.lookup(names, species, gene_ids=gene_ids)
    mapped = ids >= 0
    report = {
        "species": species,
        "n_genes": int(ids.size),
        "n_mapped": int(mapped.sum()),
        "n_tokens": int(np.unique(ids[mapped]).size),
        "n_on_shared_tokens": int(np.isin(ids, vocab.shared_ids).sum()),
        "vocab_size": len(vocab),
    }
    if report["n_mapped"] == 0:
        other = "mouse" if species == "human" else "human"
        raise ValueError(
            f"None of the {ids.size} genes maps to the vocabulary as {species} genes (e.g. {list(names[:3])}). "
            f"Check `species=` (maybe {other!r}), and pass `gene_ids=` for Ensembl ids or `gene_symbols=` for a "
            "var column of symbols."
        )
    return ids, report


def compass_map_genes(
    adata: AnnData,
    vocab: CompassVocab,
    *,
    species: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    key_added: str = COMPASS_TOKEN_KEY,
    overwrite: bool = False,
    modality: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Map the genes of ``adata`` to GeneCompass tokens and report how many map.

    Parameters
    ----------
    adata
        AnnData (or MuData with ``modality``); ``var_names`` are symbols or Ensembl ids.
    vocab
        Vocabulary from :func:`~pertpy_gnn.pp.compass_vocab`.
    species
        ``'human'`` or ``'mouse'``; ``None`` guesses from the gene names.
    gene_symbols
        A ``var`` column holding symbols, used instead of ``var_names``.
    gene_ids
        Ensembl id -> symbol table (path or DataFrame, see :func:`~pertpy_gnn.pp.gene_id_table`) for
        Ensembl ``var_names``.
    key_added
        Where to write the result.
    overwrite
        Replace an existing result.
    modality
        MuData modality.
    copy
        Return a copy instead of writing in place.

    Returns
    -------
    ``None`` (or the copy) and sets

    - ``adata.var[key_added]``: token id of each gene (int64, ``-1`` = not in the vocabulary);
    - ``adata.uns[key_added]``: ``species``, ``n_genes``, ``n_mapped``, ``n_tokens`` (distinct
      tokens), ``n_on_shared_tokens`` (genes on tokens shared by 1:1 human-mouse orthologs),
      ``vocab_size``.
    """
    adata = get_adata(adata, modality)
    check_overwrite(adata.var, key_added, overwrite, "adata.var")
    ids, report = var_tokens(adata, vocab, species=species, gene_symbols=gene_symbols, gene_ids=gene_ids)
    if copy:
        adata = adata.copy()
    adata.var[key_added] = ids
    adata.uns[key_added] = report
    logger.info(
        "%d of %d %s genes map to %d GeneCompass tokens",
        report["n_mapped"],
        report["n_genes"],
        report["species"],
        report["n_tokens"],
    )
    return adata if copy else None
