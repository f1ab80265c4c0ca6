"""The bundled GO annotation table and the GAF parser."""

import gzip
import importlib.util
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest

import pertpy_gnn as pg
from pertpy_gnn.datasets._go import BUNDLED_GO_TABLE, EVIDENCE_GROUPS, read_gaf

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_go_table.py"


@pytest.fixture(scope="module")
def go():
    return pg.datasets.go_annotations()


def test_bundled_table_is_packaged():
    resource = files("pertpy_gnn.datasets").joinpath("data", BUNDLED_GO_TABLE)
    assert resource.is_file()
    assert resource.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert files("pertpy_gnn.datasets").joinpath("data", "README.md").is_file()


def test_bundled_counts(go):
    assert list(go.columns) == ["gene", "go_id"]
    assert not go.duplicated().any()
    assert go["gene"].nunique() == 20728
    assert go["go_id"].nunique() == 18933
    assert len(go) == 300448
    assert go["go_id"].str.fullmatch(r"GO:\d{7}").all()
    assert go.equals(go.sort_values(["gene", "go_id"]).reset_index(drop=True))
    # a known annotation: KLF1 is a DNA-binding transcription factor (GO:0003700 family, here GO:0000981)
    assert ((go["gene"] == "KLF1") & (go["go_id"] == "GO:0000981")).any()


def test_filters(go):
    bp = pg.datasets.go_annotations(ontologies="BP")
    mf_cc = pg.datasets.go_annotations(ontologies=["mf", "CC"])
    assert set(bp["go_id"]).isdisjoint(mf_cc["go_id"])  # every term belongs to one ontology
    assert len(bp) + len(mf_cc) == len(go)
    assert "GO:0008150" in set(bp["go_id"]) and "GO:0003674" not in set(bp["go_id"])  # BP / MF roots

    iea = pg.datasets.go_annotations(evidence="IEA")
    electronic = pg.datasets.go_annotations(evidence=["electronic"])
    pd.testing.assert_frame_equal(iea, electronic)
    experimental = pg.datasets.go_annotations(evidence="experimental")
    both = pg.datasets.go_annotations(evidence=["experimental", "iea"])
    assert len(experimental) < len(both) < len(go)
    assert set(map(tuple, experimental.values)) <= set(map(tuple, both.values))
    nd = pg.datasets.go_annotations(evidence="ND")  # "no data": annotations to the three roots only
    assert set(nd["go_id"]) == {"GO:0008150", "GO:0003674", "GO:0005575"}


def test_filter_errors():
    with pytest.raises(ValueError, match="Unknown GO evidence 'XYZ'.*experimental"):
        pg.datasets.go_annotations(evidence=["IDA", "XYZ"])
    with pytest.raises(ValueError, match="Unknown GO ontologies.*'BP', 'MF', 'CC'"):
        pg.datasets.go_annotations(ontologies="biological_process")
    with pytest.raises(ValueError, match="`evidence` is empty"):
        pg.datasets.go_annotations(evidence=[])
    with pytest.raises(ValueError, match="'bundled', 'goa' or the path"):
        pg.datasets.go_annotations("gene2go")


def test_norman_perturbed_genes_are_covered(norman, go):
    labels = norman.obs["condition"].astype(str).unique()
    genes = {g for label in labels if label != "control" for g in label.split("+")}
    assert len(genes) == 31
    annotated = set(go["gene"])
    assert genes - annotated == {"IER5L"}  # IER5L has no GO annotation in the source


def test_read_gaf_plain_file(tmp_path):
    gaf = (
        "!gaf-version: 2.2\n"
        "UniProtKB\tQ1\tTP53\t\tGO:0000010\tPMID:1\tIDA\t\tP\tn\t\tprotein\ttaxon:9606\t20200101\tUniProt\t\t\n"
        "UniProtKB\tQ1\tTP53\tNOT\tGO:0000011\tPMID:1\tIDA\t\tP\tn\t\tprotein\ttaxon:9606\t20200101\tUniProt\t\t\n"
        "UniProtKB\tQ1\tTP53\tcolocalizes_with\tGO:0000012\tPMID:1\tHDA\t\tC\tn\t\tprotein\ttaxon:9606\t20200101\tUniProt\t\t\n"
    )
    path = tmp_path / "mini.gaf"
    path.write_text(gaf)
    table = read_gaf(path)
    assert table.values.tolist() == [["TP53", "GO:0000010", "BP", "IDA"], ["TP53", "GO:0000012", "CC", "HDA"]]
    gz = tmp_path / "mini.gaf.gz"
    gz.write_bytes(gzip.compress(gaf.encode()))
    pd.testing.assert_frame_equal(read_gaf(gz), table)
    assert pg.datasets.go_annotations(gz, evidence="high_throughput").values.tolist() == [
        ["TP53", "GO:0000012"]
    ]


def test_evidence_groups_are_disjoint():
    codes = [c for group in EVIDENCE_GROUPS.values() for c in group]
    assert len(codes) == len(set(codes))
    source = pd.read_csv(files("pertpy_gnn.datasets").joinpath("data", BUNDLED_GO_TABLE), sep="\t")
    assert set(source["evidence"]) <= set(codes)  # every shipped code belongs to a group


def test_build_script_reproduces_shipped_table(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("build_go_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "go.tsv.gz"
    module.main([str(shared_data / "go" / "human_gene2go_orgHsEgDb_20220912.tsv.gz"), "--out", str(out)])
    shipped = files("pertpy_gnn.datasets").joinpath("data", BUNDLED_GO_TABLE).read_bytes()
    assert out.read_bytes() == shipped


def test_bundled_table_is_in_the_wheel(tmp_path):
    pytest.importorskip("hatchling")
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert f"pertpy_gnn/datasets/data/{BUNDLED_GO_TABLE}" in names, (
        "the GO table is missing from the wheel: is src/pertpy_gnn/datasets/data/ ignored by .gitignore?"
    )
    assert "pertpy_gnn/datasets/data/README.md" in names
