import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from mudata import MuData

import pertpy_gnn as pg
from pertpy_gnn.pp._perturbations import as_perturbation_sets, get_parsed, layer_of, split_label

GENES = ["A", "B", "C", "D", "E"]
GO_TABLE = "go/human_gene2go_orgHsEgDb_20220912.tsv.gz"


def make(labels, genes=GENES, *, x=None, key="condition") -> ad.AnnData:
    """Small log-normalized AnnData with the given labels (two cells per label)."""
    labels = list(np.repeat(labels, 2))
    rng = np.random.default_rng(0)
    if x is None:
        x = np.log1p(rng.poisson(2.0, (len(labels), len(genes))) * 1.7).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=list(genes)))
    adata.obs[key] = pd.Categorical(labels) if key else labels
    return adata


def parsed_names(adata) -> list[str]:
    return list(adata.obs["pg_perturbation"].astype(str))


# ---------------------------------------------------------------- conventions


def test_gears_convention():
    adata = make(["ctrl", "A+ctrl", "ctrl+B", "A+B"])
    pg.pp.parse_perturbations(adata)
    assert parsed_names(adata)[::2] == ["control", "A", "B", "A+B"]
    assert list(adata.obs["pg_perturbation"].cat.categories) == ["control", "A", "B", "A+B"]
    assert adata.obs["pg_n_genes"].tolist()[::2] == [0, 1, 1, 2]
    info = adata.uns["pg_perturbation"]
    assert info["perturbation_key"] == "condition" and info["delimiter"] == "+" and info["layer"] == "X"
    assert list(info["genes"]) == ["A", "B"]


def test_pertpy_scperturb_convention():
    adata = make(["control", "A", "B_A", "C"])
    pg.pp.parse_perturbations(adata)
    assert parsed_names(adata)[::2] == ["control", "A", "A+B", "C"]
    assert adata.uns["pg_perturbation"]["delimiter"] == "_"


def test_control_label_with_the_delimiter_is_control():
    adata = make(["non_targeting", "A", "A_B"])
    pg.pp.parse_perturbations(adata)
    assert parsed_names(adata)[::2] == ["control", "A", "A+B"]
    assert split_label("non_targeting", delimiter="_", control_labels=["non_targeting"]) == ()


def test_custom_control_label_and_delimiter():
    adata = make(["safe-harbor", "A", "A|C", "C|A|E"])
    with pytest.raises(ValueError, match="No control cells"):
        pg.pp.parse_perturbations(adata, delimiter="|")
    pg.pp.parse_perturbations(adata, control_label="safe-harbor", delimiter="|")
    assert parsed_names(adata)[::2] == ["control", "A", "A+C", "A+C+E"]
    assert adata.uns["pg_perturbation"]["control_label"] == ["safe-harbor"]
    # several delimiters at once
    adata = make(["ctrl", "A;B", "B,C"])
    pg.pp.parse_perturbations(adata, delimiter=[";", ","])
    assert parsed_names(adata)[::2] == ["control", "A+B", "B+C"]


def test_sets_of_three_and_order_invariance():
    adata = make(["control", "C+A+B", "B+C+A", "A+B", "B+A"])
    pg.pp.parse_perturbations(adata)
    names = parsed_names(adata)[::2]
    assert names == ["control", "A+B+C", "A+B+C", "A+B", "A+B"]
    assert list(adata.obs["pg_perturbation"].cat.categories) == ["control", "A+B", "A+B+C"]
    assert adata.obs["pg_n_genes"].max() == 3
    col, sets = get_parsed(adata)
    assert sets == [(), ("A", "B"), ("A", "B", "C")] and col is adata.obs["pg_perturbation"]


def test_user_column_is_unchanged_and_copy():
    adata = make(["ctrl", "B+A", "A+ctrl"])
    before = adata.obs["condition"].copy()
    x_before = adata.X.copy()
    out = pg.pp.parse_perturbations(adata, copy=True)
    assert "pg_perturbation" not in adata.obs and "pg_perturbation" not in adata.uns
    assert parsed_names(out)[::2] == ["control", "A+B", "A"]
    assert pg.pp.parse_perturbations(adata) is None
    pd.testing.assert_series_equal(adata.obs["condition"], before)
    assert (adata.X != x_before).nnz == 0


def test_plain_string_column_and_layer():
    adata = make(["control", "A", "A+B"], key=None)
    adata.obs["guide"] = np.repeat(["control", "A", "A+B"], 2)
    adata.layers["lognorm"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.round(np.expm1(adata.X.toarray()) * 3))  # raw counts in X
    pg.pp.parse_perturbations(adata, perturbation_key="guide", layer="lognorm")
    assert layer_of(adata) == "lognorm" and adata.uns["pg_perturbation"]["layer"] == "lognorm"
    assert adata.obs["guide"].dtype == object


def test_as_perturbation_sets():
    assert as_perturbation_sets("B+A") == [("A", "B")]
    assert as_perturbation_sets(("C", "A", "B")) == [("A", "B", "C")]
    assert as_perturbation_sets(["A", "A+ctrl", ["B", "A"]]) == [("A",), ("A",), ("A", "B")]
    with pytest.raises(ValueError, match="Empty perturbation set"):
        as_perturbation_sets(["A", "ctrl"])
    assert pg.pp.canonical_name(["B", "A", "B"]) == "A+B" and pg.pp.canonical_name([]) == "control"


# ---------------------------------------------------------------- bad input


def test_no_control_cells():
    adata = make(["A", "A+B"])
    with pytest.raises(ValueError, match=r"No control cells.*pass `control_label=`"):
        pg.pp.parse_perturbations(adata)


def test_missing_key():
    with pytest.raises(KeyError, match=r"obs\['guide'\] not found; pass `perturbation_key=`"):
        pg.pp.parse_perturbations(make(["control", "A"]), perturbation_key="guide")


@pytest.mark.parametrize("bad", [np.nan, None, "", "  ", "nan"])
def test_empty_or_missing_labels(bad):
    adata = make(["control", "A", "B"], key=None)
    labels = pd.Series(["control", "control", "A", "A", "B", "B"], dtype=object)
    labels[3] = bad
    adata.obs["condition"] = labels.to_numpy()
    with pytest.raises(ValueError, match=r"1 cells have an empty or missing label.*notna\(\)"):
        pg.pp.parse_perturbations(adata)


def test_unknown_gene_is_listed():
    adata = make(["control", "A", "A+ZZZ9", "QQQ1"])
    with pytest.raises(
        ValueError, match=r"2 perturbed genes are not in var_names: \['QQQ1', 'ZZZ9'\].*drop_unknown=True"
    ):
        pg.pp.parse_perturbations(adata)
    # a gene universe makes genes outside var_names valid
    with pytest.raises(ValueError, match=r"not in var_names or gene_universe: \['QQQ1'\]"):
        pg.pp.parse_perturbations(adata, gene_universe=["ZZZ9"])
    pg.pp.parse_perturbations(adata, gene_universe={"ZZZ9", "QQQ1"})
    assert parsed_names(adata)[::2] == ["control", "A", "A+ZZZ9", "QQQ1"]


def test_drop_unknown_returns_filtered_copy():
    adata = make(["control", "A", "A+ZZZ9", "QQQ1", "B"])
    out = pg.pp.parse_perturbations(adata, drop_unknown=True)
    assert out is not adata and out.n_obs == 6
    assert parsed_names(out)[::2] == ["control", "A", "B"]
    assert list(out.uns["pg_perturbation"]["genes"]) == ["A", "B"]
    # the original is untouched
    assert adata.n_obs == 10 and "pg_perturbation" not in adata.obs and "pg_perturbation" not in adata.uns
    # nothing unknown: written in place as usual
    clean = make(["control", "A"])
    assert pg.pp.parse_perturbations(clean, drop_unknown=True) is None and "pg_perturbation" in clean.obs


def test_duplicated_var_names():
    adata = make(["control", "A"], genes=["A", "B", "B", "C", "C"])
    with pytest.raises(ValueError, match=r"var_names has duplicates \['B', 'C'\].*var_names_make_unique"):
        pg.pp.parse_perturbations(adata)


def test_raw_counts_refused():
    counts = np.random.default_rng(1).poisson(3.0, (6, 5)).astype(np.float32)
    adata = make(["control", "A", "B"], x=counts)
    with pytest.raises(ValueError, match=r"adata.X looks like raw counts.*layer='lognorm'"):
        pg.pp.parse_perturbations(adata)
    # dense too, and through a layer
    adata.layers["c"] = counts
    with pytest.raises(ValueError, match=r"adata.layers\['c'\] looks like raw counts"):
        pg.pp.parse_perturbations(adata, layer="c")
    # check_expression=False skips the check
    pg.pp.parse_perturbations(adata, check_expression=False)
    assert "pg_perturbation" in adata.obs


def test_normalized_but_not_logged_refused():
    x = np.random.default_rng(1).gamma(2.0, 40.0, (6, 5)).astype(np.float32)
    adata = make(["control", "A", "B"], x=x)
    with pytest.raises(ValueError, match="not log-transformed"):
        pg.pp.parse_perturbations(adata)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values(value):
    adata = make(["control", "A", "B"])
    x = adata.X.toarray()
    x[2, 1] = value
    adata.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match=r"adata.X has 1 non-finite values"):
        pg.pp.parse_perturbations(adata)


def test_negative_values_warn(caplog):
    adata = make(["control", "A"])
    adata.X = adata.X.toarray() - 1.0
    pg.pp.parse_perturbations(adata)
    assert "negative values" in caplog.text


def test_mudata():
    rna = make(["ctrl", "A+ctrl", "A+B"])
    mdata = MuData({"rna": rna, "prot": ad.AnnData(np.ones((6, 2), dtype=np.float32))})
    with pytest.raises(ValueError, match=r"A MuData was given; pass `modality=`.*'rna'"):
        pg.pp.parse_perturbations(mdata)
    with pytest.raises(ValueError, match=r"Modality 'atac' is not in the MuData"):
        pg.pp.parse_perturbations(mdata, modality="atac")
    pg.pp.parse_perturbations(mdata, modality="rna")
    assert parsed_names(mdata["rna"])[::2] == ["control", "A", "A+B"]
    with pytest.raises(ValueError, match="only meaningful for a MuData"):
        pg.pp.parse_perturbations(rna, modality="rna")


# ---------------------------------------------------------------- the real Norman subset


def test_norman_subset(norman, shared_data):
    go = pd.read_csv(shared_data / GO_TABLE, sep="\t", usecols=["symbol"])
    universe = set(go["symbol"])
    before = norman.obs["condition"].copy()
    # IER5L has no GO annotation: named in the error
    with pytest.raises(
        ValueError, match=r"1 perturbed genes are not in var_names or gene_universe: \['IER5L'\]"
    ):
        pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=universe)
    dropped = pg.pp.parse_perturbations(
        norman, perturbation_key="condition", gene_universe=universe, drop_unknown=True
    )
    assert (
        dropped.obs["pg_perturbation"].nunique() == 1 + 32
        and "IER5L" not in dropped.obs["pg_perturbation"].values
    )
    assert dropped.n_obs == norman.n_obs - 100

    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=universe | {"IER5L"})
    pert = norman.obs["pg_perturbation"]
    counts = pert.value_counts()
    assert len(counts) == 34 and counts["control"] == 100
    assert (norman.obs["pg_n_genes"] == 1).groupby(pert, observed=True).all().sum() == 18
    assert (norman.obs["pg_n_genes"] == 2).groupby(pert, observed=True).all().sum() == 15
    # canonical names sort the genes: SET+KLF1 -> KLF1+SET, SAMD1+PTPN12 -> PTPN12+SAMD1
    assert {"KLF1+SET", "PTPN12+SAMD1", "PTPN12+ZBTB10"} <= set(pert.cat.categories)
    assert len(norman.uns["pg_perturbation"]["genes"]) == 31
    pd.testing.assert_series_equal(norman.obs["condition"], before)
