"""Build the GO annotation table shipped in ``pertpy_gnn/datasets/data/``.

Usage::

    python scripts/build_go_table.py /path/to/human_gene2go_orgHsEgDb_20220912.tsv.gz \
        [--out src/pertpy_gnn/datasets/data/go_annotations_human.tsv.gz]

The input is the gene -> GO table exported from the SQLite tables ``go_bp`` / ``go_mf`` / ``go_cc`` of
the Bioconductor annotation package org.Hs.eg.db 3.16.0 (Debian package r-bioc-org.hs.eg.db; columns
``entrez_id, symbol, go_id, evidence, ontology``). The output keeps ``symbol, go_id, ontology, evidence``,
one row per distinct (symbol, GO term, evidence code), sorted, as a gzipped TSV written with a fixed
gzip timestamp so that a rebuild from the same input is byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import pandas as pd

COLUMNS = ["symbol", "go_id", "ontology", "evidence"]
DEFAULT_OUT = (
    Path(__file__).resolve().parents[1]
    / "src"
    / "pertpy_gnn"
    / "datasets"
    / "data"
    / "go_annotations_human.tsv.gz"
)


def build(source: str | Path) -> pd.DataFrame:
    """Read the org.Hs.eg.db gene2go export and return the compact table."""
    df = pd.read_csv(source, sep="\t", dtype=str, usecols=COLUMNS)
    missing = df.isna().any(axis=1)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} rows of {source} have an empty field; is this the right file?"
        )
    bad_ontology = ~df["ontology"].isin(["BP", "MF", "CC"])
    if bad_ontology.any():
        raise ValueError(
            f"Unexpected ontology values in {source}: {sorted(df.loc[bad_ontology, 'ontology'].unique())}"
        )
    return df[COLUMNS].drop_duplicates().sort_values(COLUMNS).reset_index(drop=True)


def write(table: pd.DataFrame, out: str | Path) -> Path:
    """Write ``table`` as a reproducible gzipped TSV."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = table.to_csv(sep="\t", index=False, lineterminator="\n").encode()
    out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="human_gene2go_orgHsEgDb_*.tsv.gz (org.Hs.eg.db gene2go export)")
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help="output .tsv.gz (default: the packaged table)"
    )
    args = parser.parse_args(argv)
    table = build(args.source)
    path = write(table, args.out)
    print(
        f"wrote {path}: {len(table):,} rows, {table['symbol'].nunique():,} genes, "
        f"{table['go_id'].nunique():,} GO terms, {path.stat().st_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
