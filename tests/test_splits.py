import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pertpy_gnn as pg

SUBGROUPS_TEST = {"unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"}


def _screen(n_singles=20, n_doubles=30, n_orphan_doubles=6, n_cells=4, seed=0, labels=None):
    """Synthetic screen: singles of G00.., doubles among them, and doubles with genes that have no single."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:02d}" for i in range(n_singles)]
    pairs = set()
    while len(pairs) < n_doubles:
        a, b = rng.choice(n_singles, 2, replace=False)
        pairs.add(f"{genes[min(a, b)]}+{genes[max(a, b)]}")
    orphans = [f"{genes[i % n_singles]}+X{i:02d}" for i in range(n_orphan_doubles)]  # X genes: no single
    conds = labels if labels is not None else ["ctrl"] + genes + sorted(pairs) + orphans
    obs = pd.DataFrame({"condition": np.repeat(conds, n_cells)})
    obs.index = obs.index.astype(str)
    x = sp.random(len(obs), 15, density=0.3, format="csr", dtype=np.float32, random_state=seed)
    adata = ad.AnnData(x, obs=obs)
    universe = {g for c in conds for g in c.split("+")}
    pg.pp.parse_perturbations(adata, perturbation_key="condition", gene_universe=universe)
    return adata


def _table(adata, key="pg_split"):
    return adata.uns[key]["table"]


def _genes(name):
    return name.split("+")


def test_simulation_split_rules_and_fractions():
    adata = _screen()
    pg.pp.split_perturbations(adata, seed=3)
    info = adata.uns["pg_split"]
    table = _table(adata)
    seen = set(info["seen_genes"])
    assert info["kind"] == "simulation" and info["seed"] == 3
    assert info["params"]["train_gene_fraction"] == 0.75 and info["params"]["gene_pool"] == "singles"
    # 75% of the 20 genes with a single perturbation are seen; genes without a single never are
    assert len(seen) == 15 and not any(g.startswith("X") for g in seen)
    assert table.loc["control"].tolist() == ["train", "control"]
    for name, (split, subgroup) in table.drop("control").iterrows():
        genes = _genes(name)
        n_seen = sum(g in seen for g in genes)
        if len(genes) == 1:
            assert (split == "test") == (genes[0] not in seen)
        if split == "test":
            assert subgroup == ("unseen_single" if len(genes) == 1 else f"combo_seen{n_seen}")
        else:
            assert subgroup == split and n_seen == len(genes)  # train+val only holds all-seen sets
    assert set(table.loc[table["split"] == "test", "subgroup"]) == SUBGROUPS_TEST
    # doubles with a gene lacking a single perturbation always go to test
    assert (table.loc[table.index.str.contains("X"), "split"] == "test").all()
    # train_combo_fraction of the all-seen doubles stay in train+val (rounded down)
    doubles = table.drop("control")[table.drop("control").index.str.contains(r"\+")]
    all_seen = doubles[[all(g in seen for g in _genes(n)) for n in doubles.index]]
    assert (all_seen["split"] != "test").sum() == int(len(all_seen) * 0.75)
    # val: 90% of the 15 seen genes stay in train, so singles of 2 genes go to val
    singles = table.drop("control")[~table.drop("control").index.str.contains(r"\+")]
    assert (singles["split"] == "val").sum() == 15 - int(15 * 0.9)
    # obs columns agree with the table, control cells are train
    obs = adata.obs
    assert isinstance(obs["pg_split"].dtype, pd.CategoricalDtype)
    assert list(obs["pg_split"].cat.categories) == ["train", "val", "test"]
    expect = table.loc[obs["pg_perturbation"].astype(str)]
    assert (obs["pg_split"].astype(str).to_numpy() == expect["split"].to_numpy()).all()
    assert (obs["pg_subgroup"].astype(str).to_numpy() == expect["subgroup"].to_numpy()).all()
    assert (obs.loc[obs["pg_perturbation"] == "control", "pg_split"] == "train").all()


def test_simulation_is_seeded():
    a, b, c = _screen(), _screen(), _screen()
    pg.pp.split_perturbations(a, seed=1)
    pg.pp.split_perturbations(b, seed=1)
    pg.pp.split_perturbations(c, seed=2)
    pd.testing.assert_frame_equal(_table(a), _table(b))
    assert (a.obs["pg_split"] == b.obs["pg_split"]).all()
    assert not _table(a)["split"].equals(_table(c).reindex(_table(a).index)["split"])
    assert list(a.uns["pg_split"]["seen_genes"]) != list(c.uns["pg_split"]["seen_genes"])


def test_gene_pool_all_follows_reference_code():
    adata = _screen(n_orphan_doubles=12)
    pg.pp.split_perturbations(adata, seed=0, gene_pool="all", train_gene_fraction=0.9)
    seen = set(adata.uns["pg_split"]["seen_genes"])
    n_genes = 20 + 12
    assert len(seen) == int(n_genes * 0.9)
    assert any(g.startswith("X") for g in seen)  # genes perturbed only in doubles can be "seen"
    table = _table(adata)
    for name, (split, subgroup) in table.drop("control").iterrows():
        if split == "test" and "+" in name:
            assert subgroup == f"combo_seen{sum(g in seen for g in _genes(name))}"


def test_single_kind():
    labels = ["ctrl"] + [f"G{i:02d}" for i in range(20)]
    adata = _screen(labels=labels)
    pg.pp.split_perturbations(adata, kind="single", seed=0)
    table = _table(adata).drop("control")
    assert (table["split"] == "test").sum() == 5 and set(table.loc[table["split"] == "test", "subgroup"]) == {
        "unseen_single"
    }
    assert (table["split"] == "val").sum() == 15 - int(15 * 0.9)
    with pytest.raises(ValueError, match="kind='single' is for single-gene data"):
        pg.pp.split_perturbations(_screen(), kind="single")


def test_leave_one_out():
    adata = _screen()
    doubles = [c for c in adata.obs["pg_perturbation"].cat.categories if "+" in c and "X" not in c]
    held = doubles[:2]
    reversed_name = "+".join(_genes(held[1])[::-1])  # 'B+A' names the same set
    pg.pp.split_perturbations(
        adata, kind="leave_one_out", test_perturbations=[held[0], reversed_name], seed=0
    )
    table = _table(adata)
    assert sorted(table.index[table["split"] == "test"]) == sorted(held)
    assert set(table.loc[held, "subgroup"]) <= {"combo_seen2"}  # both singles stay in train
    for gene in {g for h in held for g in _genes(h)}:
        assert table.loc[gene, "split"] == "train"
    val = table.index[table["split"] == "val"]
    assert len(val) >= 2 and any("+" in v for v in val) and any("+" not in v for v in val)
    assert list(adata.uns["pg_split"]["params"]["test_perturbations"]) == sorted(held)
    with pytest.raises(ValueError, match="not perturbations of this data"):
        pg.pp.split_perturbations(adata, kind="leave_one_out", test_perturbations="G00+G99", overwrite=True)
    with pytest.raises(ValueError, match="needs `test_perturbations=`"):
        pg.pp.split_perturbations(adata, kind="leave_one_out", overwrite=True)


def test_custom_assignment_with_user_labels():
    labels = ["ctrl", "A+ctrl", "B+ctrl", "C+ctrl", "B+A", "C+A"]
    adata = _screen(labels=labels)
    assignment = {"A+ctrl": "train", "B": "train", "C+ctrl": "val", "B+A": "TRAIN", "A+C": "test"}
    pg.pp.split_perturbations(adata, kind="custom", assignment=assignment)
    table = _table(adata)
    assert table["split"].to_dict() == {
        "control": "train",
        "A": "train",
        "B": "train",
        "C": "val",
        "A+B": "train",
        "A+C": "test",
    }
    assert table.loc["A+C", "subgroup"] == "combo_seen2"  # A seen in train, C in val
    assert set(adata.uns["pg_split"]["seen_genes"]) == {"A", "B", "C"}
    kw = {"kind": "custom", "overwrite": True}
    with pytest.raises(ValueError, match="misses 1 perturbations"):
        pg.pp.split_perturbations(adata, assignment={k: v for k, v in assignment.items() if k != "A+C"}, **kw)
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        pg.pp.split_perturbations(adata, assignment={**assignment, "A+C": "holdout"}, **kw)
    with pytest.raises(ValueError, match="not in the data"):
        pg.pp.split_perturbations(adata, assignment={**assignment, "D": "test"}, **kw)
    with pytest.raises(ValueError, match="always in 'train'"):
        pg.pp.split_perturbations(adata, assignment={**assignment, "ctrl": "test"}, **kw)
    with pytest.raises(ValueError, match="leaves val without perturbations"):
        pg.pp.split_perturbations(adata, assignment={**assignment, "C+ctrl": "train"}, **kw)


def test_errors_name_group_and_fix():
    adata = _screen()
    with pytest.raises(ValueError, match="leaves test without perturbations.*Lower train_gene_fraction"):
        pg.pp.split_perturbations(
            _screen(n_orphan_doubles=0), train_gene_fraction=1.0, train_combo_fraction=1.0
        )
    with pytest.raises(ValueError, match="leaves val without perturbations.*Lower val_gene_fraction"):
        pg.pp.split_perturbations(adata, val_gene_fraction=1.0, val_combo_fraction=1.0)
    with pytest.raises(ValueError, match="leaves train without perturbations.*gene_pool='all'"):
        pg.pp.split_perturbations(_screen(labels=["ctrl", "A+B", "C+D", "A+C"]))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        pg.pp.split_perturbations(adata, train_gene_fraction=0)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        pg.pp.split_perturbations(adata, kind="random")
    with pytest.raises(ValueError, match="only used with kind='leave_one_out'"):
        pg.pp.split_perturbations(adata, test_perturbations=["G00+G01"])
    with pytest.raises(KeyError, match="parse_perturbations"):
        pg.pp.split_perturbations(ad.AnnData(np.zeros((2, 2), dtype=np.float32)))
    no_control = _screen()
    no_control = no_control[no_control.obs["pg_perturbation"] != "control"].copy()
    with pytest.raises(ValueError, match="No control cells"):
        pg.pp.split_perturbations(no_control)
    assert "pg_split" not in adata.obs  # nothing written by failed calls
    pg.pp.split_perturbations(adata)
    with pytest.raises(ValueError, match="overwrite=True"):
        pg.pp.split_perturbations(adata, seed=1)
    pg.pp.split_perturbations(adata, seed=1, overwrite=True)
    assert adata.uns["pg_split"]["seed"] == 1
    out = pg.pp.split_perturbations(adata, key_added="split2", copy=True)
    assert "split2_subgroup" in out.obs and "split2" not in adata.obs


def test_norman_simulation_split_h5ad(norman, tmp_path):
    genes = {g for c in norman.obs["condition"].unique() for g in c.split("+")}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=genes)
    pg.pp.split_perturbations(norman, seed=0)
    table = _table(norman)
    singles = [c for c in table.index if c != "control" and "+" not in c]
    seen = set(norman.uns["pg_split"]["seen_genes"])
    assert len(singles) == 18 and len(seen) == int(18 * 0.75)
    test = table[table["split"] == "test"]
    assert (test.loc[test.index.isin(singles), "subgroup"] == "unseen_single").all()
    # KLF1+MAP2K6 style doubles: combo_seen2 only if both genes are seen
    for name in test.index[test["subgroup"] == "combo_seen2"]:
        assert set(_genes(name)) <= seen
    for name in test.index[test["subgroup"] == "combo_seen0"]:
        assert not set(_genes(name)) & seen
    n_cells = norman.obs["pg_split"].value_counts()
    assert n_cells["train"] > n_cells["val"] > 0 and n_cells["test"] > 0
    norman.write_h5ad(tmp_path / "n.h5ad")
    back = ad.read_h5ad(tmp_path / "n.h5ad")
    pd.testing.assert_frame_equal(back.uns["pg_split"]["table"], table)
    assert list(back.uns["pg_split"]["seen_genes"]) == sorted(seen)
    assert (back.obs["pg_subgroup"] == norman.obs["pg_subgroup"]).all()
