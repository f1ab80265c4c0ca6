"""Gene Ontology annotations of human genes: the bundled table and the GO consortium's GAF file."""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Iterable
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import pandas as pd

from ._remote import fetch, validate_gaf_gz

#: the GO annotation table shipped in the package (see ``datasets/data/README.md``)
BUNDLED_GO_TABLE = "go_annotations_human.tsv.gz"

#: the GO consortium's current human annotation file (GAF 2.2; changes with every GO release)
GOA_HUMAN_URL = "https://current.geneontology.org/annotations/goa_human.gaf.gz"

#: GO evidence codes by group (https://geneontology.org/docs/guide-go-evidence-codes/)
EVIDENCE_GROUPS: dict[str, tuple[str, ...]] = {
    "experimental": ("EXP", "IDA", "IPI", "IMP", "IGI", "IEP"),
    "high_throughput": ("HTP", "HDA", "HMP", "HGI", "HEP"),
    "phylogenetic": ("IBA", "IBD", "IKR", "IRD"),
    "computational": ("ISS", "ISO", "ISA", "ISM", "IGC", "RCA"),
    "author": ("TAS", "NAS"),
    "curator": ("IC", "ND"),
    "electronic": ("IEA",),
}
_EVIDENCE_CODES = frozenset(c for codes in EVIDENCE_GROUPS.values() for c in codes)
_ONTOLOGIES = ("BP", "MF", "CC")
#: GAF column 9 (aspect) -> ontology
_ASPECTS = {"P": "BP", "F": "MF", "C": "CC"}


def go_annotations(
    source: str | os.PathLike = "bundled",
    *,
    evidence: str | Iterable[str] | None = None,
    ontologies: str | Iterable[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    url: str = GOA_HUMAN_URL,
    known_hash: str | None = None,
    retries: int = 2,
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Gene -> GO term annotations of human genes, the input of :func:`pertpy_gnn.pp.go_graph`.

    Parameters
    ----------
    source
        ``'bundled'``: the table shipped with the package, derived from NCBI gene2go as packaged in
        Bioconductor org.Hs.eg.db 3.16.0 (2022-09-12; 20,728 genes, 18,933 GO terms; the same kind of
        source GEARS builds its GO graph from), no download. ``'goa'``: the GO consortium's current
        ``goa_human.gaf.gz`` (downloaded once into the cache). Or the path of a GAF file
        (``.gaf`` or ``.gaf.gz``) you downloaded yourself.
    evidence
        Keep only annotations with these evidence codes (``'IDA'``, ``'IEA'``, ...) and/or groups of
        codes (``'experimental'``, ``'high_throughput'``, ``'phylogenetic'``, ``'computational'``,
        ``'author'``, ``'curator'``, ``'electronic'``; see ``EVIDENCE_GROUPS``). ``None`` keeps all.
    ontologies
        Keep only these GO aspects among ``'BP'``, ``'MF'``, ``'CC'``; ``None`` keeps all three.
    cache_dir
        Download cache folder for ``source='goa'``; see :func:`pertpy_gnn.datasets.get_cache_dir`.
    url, known_hash, retries, progress_bar
        Download options for ``source='goa'`` (address, checksum, further attempts, progress bar).
        The current file changes with every GO release, so no checksum is set; delete the cached
        ``goa_human.gaf.gz`` to fetch a newer one.

    Returns
    -------
    DataFrame with columns ``['gene', 'go_id']`` (HGNC symbols, ``GO:0000001`` ids), one row per
    distinct pair, sorted. ``NOT`` annotations of a GAF are dropped.

    Raises
    ------
    ValueError
        For an unknown ``source``, evidence code or ontology.
    DownloadError
        When ``source='goa'`` and the file cannot be downloaded; the message names the URL and how to
        pass a file downloaded by hand.
    """
    codes = _evidence_codes(evidence)
    aspects = _ontologies(ontologies)
    if isinstance(source, str) and source == "bundled":
        table = _read_bundled()
    elif isinstance(source, str) and source == "goa":
        path = fetch(
            "goa_human.gaf.gz",
            url,
            known_hash=known_hash,
            cache_dir=cache_dir,
            retries=retries,
            progress_bar=progress_bar,
            manual_hint="pass it as `pg.datasets.go_annotations(source=path)`",
            validate=validate_gaf_gz,
        )
        table = read_gaf(path)
    elif Path(source).expanduser().is_file():
        table = read_gaf(Path(source).expanduser())
    else:
        raise ValueError(
            f"`source` must be 'bundled', 'goa' or the path of a GAF file; {str(source)!r} is neither a "
            "keyword nor an existing file."
        )
    keep = table["ontology"].isin(aspects)
    if codes is not None:
        keep &= table["evidence"].isin(codes)
    out = table.loc[keep, ["gene", "go_id"]].drop_duplicates().sort_values(["gene", "go_id"])
    return out.reset_index(drop=True)


def read_gaf(path: str | os.PathLike) -> pd.DataFrame:
    """Parse a GO annotation file (GAF 2.x, plain or gzipped) into ``gene, go_id, ontology, evidence``.

    ``gene`` is the DB object symbol (column 3); annotations whose qualifier (column 4) contains
    ``NOT`` are dropped; the aspect (column 9: P/F/C) becomes ``BP``/``MF``/``CC``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        n_header = 0
        for line in handle:
            if not line.startswith("!"):
                break
            n_header += 1
    gaf = pd.read_csv(
        path,
        sep="\t",
        header=None,
        skiprows=n_header,
        usecols=[2, 3, 4, 6, 8],
        names=["gene", "qualifier", "go_id", "evidence", "aspect"],
        dtype=str,
        quoting=csv.QUOTE_NONE,
        compression="gzip" if path.suffix == ".gz" else None,
    )
    negated = gaf["qualifier"].fillna("").str.contains(r"(?:^|\|)NOT(?:\||$)", regex=True)
    gaf = gaf.loc[~negated & gaf["gene"].notna() & gaf["go_id"].notna()]
    table = pd.DataFrame(
        {
            "gene": gaf["gene"].to_numpy(),
            "go_id": gaf["go_id"].to_numpy(),
            "ontology": gaf["aspect"].map(_ASPECTS).to_numpy(),
            "evidence": gaf["evidence"].to_numpy(),
        }
    )
    return table.drop_duplicates().reset_index(drop=True)


@lru_cache(maxsize=1)
def _read_bundled() -> pd.DataFrame:
    """The bundled table (read once; callers must not modify it)."""
    with files(__package__).joinpath("data", BUNDLED_GO_TABLE).open("rb") as handle:
        table = pd.read_csv(handle, sep="\t", compression="gzip", dtype=str)
    return table.rename(columns={"symbol": "gene"})


def _as_list(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _evidence_codes(evidence: str | Iterable[str] | None) -> set[str] | None:
    if evidence is None:
        return None
    codes: set[str] = set()
    for item in _as_list(evidence):
        if item.lower() in EVIDENCE_GROUPS:
            codes.update(EVIDENCE_GROUPS[item.lower()])
        elif item.upper() in _EVIDENCE_CODES:
            codes.add(item.upper())
        else:
            raise ValueError(
                f"Unknown GO evidence {item!r}: give evidence codes (e.g. 'IDA', 'IEA') or groups "
                f"{sorted(EVIDENCE_GROUPS)}."
            )
    if not codes:
        raise ValueError("`evidence` is empty; pass None to keep every evidence code.")
    return codes


def _ontologies(ontologies: str | Iterable[str] | None) -> list[str]:
    if ontologies is None:
        return list(_ONTOLOGIES)
    chosen = [o.upper() for o in _as_list(ontologies)]
    bad = [o for o in chosen if o not in _ONTOLOGIES]
    if bad or not chosen:
        raise ValueError(f"Unknown GO ontologies {bad or chosen}: choose among {list(_ONTOLOGIES)}.")
    return chosen
