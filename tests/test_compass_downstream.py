"""GeneCompass downstream tools: embeddings, in-silico perturbation and screens, annotation, GRN, GEARS hook."""

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

matplotlib.use("Agg")
torch = pytest.importorskip("torch")

import pertpy_gnn as pg  # noqa: E402
from pertpy_gnn.compass._ds_core import edit_tokens, encode, tokenize_kwargs, tokenized  # noqa: E402
from pertpy_gnn.pp._compass_vocab import PAD_ID, compass_vocab  # noqa: E402

N_GENES, N_CELLS, MAX_LEN = 30, 24, 20
GENES = [f"G{i:02d}" for i in range(N_GENES)]
TOK = {
    "species": "human",
    "input_kind": "normalized",
    "gene_medians": pd.Series(1.0, index=GENES),
    "progress_bar": False,
}


@pytest.fixture(scope="module")
def model():
    from pertpy_gnn.compass import GeneCompass

    torch.manual_seed(0)
    m = GeneCompass(
        vocab=compass_vocab(human_genes=GENES),
        seq_len=MAX_LEN + 1,
        n_layers=1,
        d_model=32,
        n_heads=2,
        init_std=0.3,
    )
    m.module.eval()
    return m


@pytest.fixture
def adata():
    """Normalized values (token value = log1p(x) with medians 1); G00 = 1 in every cell; G29 never expressed;
    groups a and b express disjoint gene sets G01-G05 / G06-G10."""
    rng = np.random.default_rng(0)
    x = rng.gamma(1.0, 3.0, size=(N_CELLS, N_GENES)) * (rng.random((N_CELLS, N_GENES)) < 0.7)
    x[(x > 0.9) & (x < 1.1)] = 1.5  # no value ties with G00
    x[:, 0] = 1.0
    x[:, N_GENES - 1] = 0.0
    half = N_CELLS // 2
    x[:half, 1:6] += 8.0  # group a: G01-G05 high, no G06-G10; group b: the reverse
    x[:half, 6:11] = 0.0
    x[half:, 1:6] = 0.0
    obs = pd.DataFrame(
        {"group": np.repeat(["a", "b"], N_CELLS // 2), "batch": np.tile(["b1", "b2"], N_CELLS // 2)},
        index=[f"c{i}" for i in range(N_CELLS)],
    )
    return ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=GENES))


def _tokens(adata, model, max_len=MAX_LEN):
    kw = tokenize_kwargs(**{k: v for k, v in TOK.items() if k != "progress_bar"})
    with tokenized(adata, model, max_len=max_len, tok=kw) as corpus:
        ids, vals = corpus.read(np.arange(adata.n_obs))
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(vals.astype(np.float32))


# ------------------------------------------------------------------------------------ token edits
def test_edit_tokens_delete_knockdown_overexpress():
    # species token 2, genes 10..14 by decreasing value, one padding slot
    ids = torch.tensor([[2, 12, 10, 14, 11, 13, 0]])
    vals = torch.tensor([[0.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.0]])
    none = torch.tensor([[-1]])
    same_ids, same_vals, _ = edit_tokens(ids, vals, none, mode="delete")
    assert torch.equal(same_ids, ids) and torch.equal(same_vals, vals)

    d_ids, d_vals, present = edit_tokens(ids, vals, torch.tensor([[14]]), mode="delete")
    assert present.tolist() == [[True]]
    assert d_ids.tolist() == [[2, 12, 10, 11, 13, 0, 0]]  # exactly its token removed, order kept
    assert torch.allclose(d_vals, torch.tensor([[0.0, 3.0, 2.5, 1.0, 0.5, 0.0, 0.0]]))

    k_ids, k_vals, _ = edit_tokens(ids, vals, torch.tensor([[12]]), mode="knockdown", factor=0.5)
    v = float(np.log1p(0.5 * np.expm1(3.0)))  # 2.35: re-ranked below 10 (2.5)
    assert k_ids.tolist() == [[2, 10, 12, 14, 11, 13, 0]]
    assert k_vals[0, 2].item() == pytest.approx(v, rel=1e-6)

    # knockdown to 0 = deletion up to the zero-valued token ranked last
    z_ids, z_vals, _ = edit_tokens(ids, vals, torch.tensor([[10]]), mode="knockdown", factor=0.0)
    d2_ids, _, _ = edit_tokens(ids, vals, torch.tensor([[10]]), mode="delete")
    n = int((d2_ids != PAD_ID).sum())
    assert (
        torch.equal(z_ids[0, :n], d2_ids[0, :n]) and z_ids[0, n].item() == 10 and z_vals[0, n].item() == 0.0
    )

    # overexpression: an absent gene enters at its rank, a present one moves; the last gene falls off at max_len
    o_ids, o_vals, present = edit_tokens(
        ids, vals, torch.tensor([[20, 13]]), mode="overexpress", level=torch.tensor([[2.2, 2.8]]), max_len=5
    )
    assert present.tolist() == [[False, True]]
    assert o_ids.tolist() == [[2, 12, 13, 10, 20, 14]]
    assert torch.allclose(o_vals, torch.tensor([[0.0, 3.0, 2.8, 2.5, 2.2, 2.0]]))


def test_delete_brings_in_the_next_gene(adata, model):
    ids, vals = _tokens(adata, model, max_len=MAX_LEN + 1)  # one token beyond the model's length
    top = ids[:, 1:2]
    d_ids, _, _ = edit_tokens(ids, vals, top, mode="delete", max_len=MAX_LEN)
    full = (ids[:, 1:] != PAD_ID).sum(1) == MAX_LEN + 1
    assert full.any()
    assert torch.equal(d_ids[full, 1:], ids[full, 2:])  # everything moves up, the 21st gene enters
    assert not (d_ids[:, 1:] == top).any()


# ------------------------------------------------------------------------------------- embeddings
def test_embed_compass_keys_shapes_and_scanpy(adata, model):
    import scanpy as sc

    pg.tl.embed_compass(adata, model, batch_size=7, **TOK)
    assert adata.obsm["X_compass"].shape == (N_CELLS, 32) and adata.obsm["X_compass"].dtype == np.float32
    g = adata.varm["pg_compass_gene"]
    assert g.shape == (N_GENES, 32)
    assert np.isnan(g[-1]).all() and np.isfinite(g[:-1]).all()  # G29 is never among the tokens
    ids, vals = _tokens(adata, model)
    per_gene = np.array([(ids == model.vocab.token_id(gn)).sum().item() for gn in GENES])
    np.testing.assert_array_equal(adata.uns["pg_compass_gene"]["n_cells"], per_gene)
    sc.pp.neighbors(adata, use_rep="X_compass", n_neighbors=5, method="gauss")
    assert adata.obsp["connectivities"].shape == (N_CELLS, N_CELLS)
    with pytest.raises(ValueError, match="already exists"):
        pg.tl.embed_compass(adata, model, **TOK)

    # the cell embedding is the species token's state; a gene's is its token state averaged over cells
    with torch.inference_mode():
        h = encode(model.module, ids, vals)
    np.testing.assert_allclose(adata.obsm["X_compass"], h[:, 0].numpy(), atol=1e-5)
    tok = model.vocab.token_id("G03")
    mask = ids == tok
    np.testing.assert_allclose(g[3], h[mask].mean(0).numpy(), atol=1e-5)
    gm = pg.tl.compass_gene_embeddings(model, adata, cells=("group", "a"), **TOK)
    mask_a = mask & torch.from_numpy((adata.obs["group"] == "a").to_numpy())[:, None]
    np.testing.assert_allclose(gm[3], h[mask_a].mean(0).numpy(), atol=1e-5)


def test_mean_cell_embedding_pools_gene_tokens(adata, model, tmp_path):
    pg.tl.embed_compass(adata, model, genes=False, cell_embedding="mean", key_added="X_mean", **TOK)
    assert adata.uns["X_mean"]["cell_embedding"] == "mean"
    ids, vals = _tokens(adata, model)
    with torch.inference_mode():
        h = encode(model.module, ids, vals)
    gene = ids >= 4  # after padding, <mask>, <human>, <mouse>
    expected = torch.stack([h[i][gene[i]].mean(0) for i in range(N_CELLS)])
    np.testing.assert_allclose(adata.obsm["X_mean"], expected.numpy(), atol=1e-5)
    assert not np.allclose(adata.obsm["X_mean"], h[:, 0].numpy(), atol=1e-3)
    corpus = pg.pp.compass_tokenize(adata, tmp_path / "corpus", model.vocab, max_len=MAX_LEN, **TOK)
    latent = model.get_latent_representation(corpus, cell_embedding="mean")
    np.testing.assert_allclose(latent, expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="cell_embedding must be one of"):
        pg.tl.embed_compass(adata, model, cell_embedding="cls", overwrite=True, **TOK)


# ------------------------------------------------------------------------------ in-silico perturbation
@pytest.mark.parametrize("cell_embedding", ["species", "mean"])
def test_unchanged_cell_has_zero_shift(adata, model, cell_embedding):
    # G00 has value log1p(1) (float16) in every cell: overexpressing it to that value changes nothing
    level = float(np.float16(np.log1p(1.0)))
    pg.tl.in_silico(
        adata,
        model,
        "G00",
        mode="overexpress",
        level=level,
        level_unit="token",
        target=("group", "b"),
        cell_embedding=cell_embedding,
        **TOK,
    )
    assert adata.uns["pg_compass_insilico"]["params"]["cell_embedding"] == cell_embedding
    assert adata.obs["pg_compass_insilico_kept"].sum() == N_CELLS // 2  # the non-target cells
    cos = adata.obs.loc[adata.obs["pg_compass_insilico_kept"], "pg_compass_insilico_cos"]
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)
    np.testing.assert_allclose(adata.obs["pg_compass_insilico_target_shift"].dropna(), 0.0, atol=1e-6)
    assert adata.uns["pg_compass_insilico"]["effect"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(adata.uns["pg_compass_insilico"]["gene_shift"]["shift"], 0.0, atol=1e-5)


def test_target_shift_is_mean_over_target_pairs(adata, model):
    pg.tl.embed_compass(adata, model, genes=False, **TOK)
    pg.tl.in_silico(
        adata, model, ["G01", "G02"], mode="delete", target=("group", "b"), min_rank_fraction=None, **TOK
    )
    res = adata.uns["pg_compass_insilico"]
    emb = adata.obsm["X_compass"].astype(np.float64)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    kept = adata.obs["pg_compass_insilico_kept"].to_numpy()
    tgt = (adata.obs["group"] == "b").to_numpy()
    brute = (unit[kept] @ unit[tgt].T).mean(1)  # mean over all (cell, target cell) pairs
    np.testing.assert_allclose(res["target_cos"]["original"], brute, atol=1e-5)
    shift = adata.obs.loc[kept, "pg_compass_insilico_target_shift"]
    np.testing.assert_allclose(
        shift, res["target_cos"]["perturbed"] - res["target_cos"]["original"], atol=1e-12
    )
    assert res["effect"] == pytest.approx(shift.mean())
    assert (adata.obs.loc[kept, "pg_compass_insilico_cos"] < 1).all()
    gs = res["gene_shift"]
    assert (
        {"G01", "G02"}.isdisjoint(gs.index)
        and (gs["shift"] > 0).any()
        and gs["shift"].is_monotonic_decreasing
    )


def test_knockdown_keeps_cells_where_gene_ranks_in_top_half(adata, model):
    x = adata.X.toarray()
    g = 7
    # expected: the rank of G07 among the cell's expressed genes (value desc, name asc) is in the top 50%
    order = np.lexsort((np.tile(np.arange(N_GENES), (N_CELLS, 1)), -x), axis=1)
    rank = np.argmax(order == g, axis=1)
    n_tok = np.minimum((x > 0).sum(1), MAX_LEN)
    expected = (x[:, g] > 0) & (rank < 0.5 * n_tok)
    assert 0 < expected.sum() < N_CELLS
    pg.tl.in_silico(
        adata, model, "G07", mode="knockdown", factor=0.25, cells=np.arange(N_CELLS), gene_shift=False, **TOK
    )
    np.testing.assert_array_equal(adata.obs["pg_compass_insilico_kept"], expected)
    assert adata.obs["pg_compass_insilico_cos"].isna().sum() == N_CELLS - expected.sum()
    # knockdown to 0 keeps the same cells as deletion
    pg.tl.in_silico(
        adata,
        model,
        "G07",
        mode="knockdown",
        factor=0.0,
        cells=np.arange(N_CELLS),
        key_added="kd0",
        gene_shift=False,
        **TOK,
    )
    pg.tl.in_silico(
        adata, model, "G07", mode="delete", cells=np.arange(N_CELLS), key_added="del", gene_shift=False, **TOK
    )
    np.testing.assert_array_equal(adata.obs["kd0_kept"], adata.obs["del_kept"])


def test_screen_matches_single_experiments(adata, model):
    df = pg.tl.in_silico_screen(
        adata,
        model,
        target=("group", "b"),
        candidates=["G03", "G10", "G29"],
        level="max",
        batch_size=5,
        **TOK,
    )
    assert list(df.columns) == [
        "target_shift",
        "target_shift_sem",
        "specific_shift",
        "specific_shift_sem",
        "z",
        "cos",
        "n_cells",
        "n_paired_cells",
        "rank",
    ]
    assert df["target_shift"].is_monotonic_decreasing and df["rank"].tolist() == [1, 2, 3]
    assert (df["n_cells"] == N_CELLS // 2).all()
    assert adata.uns["pg_compass_screen"]["n_variants"] == 3 * N_CELLS // 2
    shifts = {}
    for gene in ["G03", "G10", "G29"]:
        pg.tl.in_silico(
            adata,
            model,
            gene,
            mode="overexpress",
            level="max",
            target=("group", "b"),
            key_added=f"oe_{gene}",
            **TOK,
        )
        assert df.loc[gene, "target_shift"] == pytest.approx(adata.uns[f"oe_{gene}"]["effect"], abs=1e-6)
        assert df.loc[gene, "cos"] == pytest.approx(adata.uns[f"oe_{gene}"]["mean_cos"], abs=1e-6)
        shifts[gene] = adata.obs[f"oe_{gene}_target_shift"].dropna().to_numpy()
    # specific shift: each cell's shift minus the mean over the candidates in that cell, paired over cells
    per_cell = pd.DataFrame(shifts)
    specific = per_cell.sub(per_cell.mean(1), axis=0)
    np.testing.assert_allclose(df.loc[specific.columns, "specific_shift"], specific.mean(), atol=1e-6)
    np.testing.assert_allclose(df.loc[specific.columns, "specific_shift_sem"], specific.sem(), atol=1e-6)
    np.testing.assert_allclose(df["z"], df["specific_shift"] / df["specific_shift_sem"])
    np.testing.assert_allclose(df.loc[specific.columns, "target_shift_sem"], per_cell.sem(), atol=1e-6)


def test_deletion_screen_variants(adata, model):
    df = pg.tl.in_silico_screen(
        adata, model, target=("group", "b"), mode="delete", source=("group", "a"), cells=("group", "a"), **TOK
    )
    ids, _ = _tokens(adata, model)
    body = ids[: N_CELLS // 2, 1:]
    n_tok = (body != PAD_ID).sum(1, keepdim=True)
    top = torch.where(torch.arange(MAX_LEN)[None, :] < 0.5 * n_tok, body, torch.zeros_like(body))
    names = model.vocab.genes_of(top[top > 0].numpy())
    expected = pd.Series(names).value_counts()
    pd.testing.assert_series_equal(
        df["n_cells"].sort_index(), expected.sort_index().astype(np.int64), check_names=False
    )
    assert "source_shift" in df


def test_in_silico_errors(adata, model):
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        pg.tl.in_silico(adata, model, "NOPE", **TOK)
    with pytest.raises(ValueError, match="factor"):
        pg.tl.in_silico(adata, model, "G01", mode="knockdown", factor=2.0, **TOK)
    with pytest.raises(ValueError, match="No cell qualifies"):
        pg.tl.in_silico(adata, model, "G29", mode="delete", **TOK)
    with pytest.raises(KeyError, match="obs column 'nope'"):
        pg.tl.in_silico(adata, model, "G01", target={"nope": "x"}, **TOK)
    with pytest.raises(TypeError, match="pre-trained"):
        pg.tl.embed_compass(adata, object(), **TOK)


def test_plots(adata, model):
    pg.tl.in_silico(adata, model, "G01", mode="overexpress", target=("group", "b"), key_added="e1", **TOK)
    pg.tl.in_silico(adata, model, "G10", mode="overexpress", target=("group", "b"), key_added="e2", **TOK)
    ax_d, ax_b = pg.pl.in_silico_shift(adata, ["e1", "e2"], labels=["G01", "G10"])
    assert [t.get_text() for t in ax_b.get_yticklabels()] == ["original", "G01", "G10"]
    assert len(ax_d.get_lines()) == 3
    with pytest.raises(ValueError, match="no target"):
        pg.tl.in_silico(adata, model, "G01", mode="overexpress", key_added="e3", **TOK)
        pg.pl.in_silico_shift(adata, "e3")
    pg.tl.in_silico_screen(adata, model, target=("group", "b"), candidates=GENES[:6], **TOK)
    ax = pg.pl.in_silico_screen(adata, n_top=4)
    assert len(ax.patches) == 4
    top4 = adata.uns["pg_compass_screen"]["results"].index[:4]
    assert {t.get_text() for t in ax.get_yticklabels()} == set(top4)


# ------------------------------------------------------------------------------------------- GRN
def test_grn_symmetric_and_thresholded():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(40, 6))
    e[5] = np.nan
    a = ad.AnnData(np.zeros((2, 40), np.float32), var=pd.DataFrame(index=[f"g{i}" for i in range(40)]))
    a.varm["pg_compass_gene"] = e
    pg.tl.compass_grn(a, threshold=0.4, block_size=7)
    adj = a.varp["pg_compass_grn"]
    assert sp.issparse(adj) and abs(adj - adj.T).max() == 0 and adj.diagonal().sum() == 0
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = u @ u.T
    expected = np.nan_to_num(cos) > 0.4
    np.fill_diagonal(expected, False)
    np.testing.assert_array_equal(adj.toarray() > 0, expected)
    assert adj.data.min() > 0.4 and adj[5].nnz == 0
    np.testing.assert_allclose(adj.toarray()[expected], cos[expected], rtol=1e-6)
    assert a.uns["pg_compass_grn"]["n_edges"] == expected.sum() // 2
    with pytest.raises(ValueError, match="already exists"):
        pg.tl.compass_grn(a)


def test_grn_auprc_on_planted_network():
    rng = np.random.default_rng(0)
    n, d = 60, 32
    e = rng.normal(size=(n, d))
    edges = [(f"g{t}", f"g{10 + 4 * t + k}") for t in range(5) for k in range(4)]
    for tf, tg in edges:
        e[int(tg[1:])] = e[int(tf[1:])] + 0.3 * rng.normal(size=d)
    a = ad.AnnData(np.zeros((2, n), np.float32), var=pd.DataFrame(index=[f"g{i}" for i in range(n)]))
    a.varm["pg_compass_gene"] = e
    ref = pd.DataFrame(edges, columns=["tf", "target"])
    res = pg.tl.grn_auprc(a, ref)
    assert res["n_tfs"] == 5 and res["n_positives"] == 20 and res["n_candidates"] == 5 * (n - 1)
    assert res["auprc"] > 0.95 and res["random_auprc"] == pytest.approx(20 / (5 * 59))
    assert res["recall"] == 1.0
    held = pg.tl.grn_auprc(a, ref.iloc[10:], exclude=ref.iloc[:10])
    assert held["n_positives"] == 10 and held["n_candidates"] == 3 * (n - 1) - 2 and held["auprc"] > 0.95
    a.varm["pg_compass_gene"] = e + 30.0  # a component shared by all genes hides the network ...
    raw, centered = pg.tl.grn_auprc(a, ref), pg.tl.grn_auprc(a, ref, center=True)
    assert (
        raw["n_predicted"] == raw["n_candidates"] and centered["precision"] > 0.5 and centered["auprc"] > 0.95
    )
    pg.tl.compass_grn(a, center=True)  # ... centering recovers it
    assert a.varp["pg_compass_grn"].nnz < 0.2 * n * n
    a.varm["pg_compass_gene"] = rng.normal(size=(n, d))  # no signal: about random
    assert pg.tl.grn_auprc(a, ref)["auprc"] < 0.4
    with pytest.raises(ValueError, match="both genes embedded"):
        pg.tl.grn_auprc(a, pd.DataFrame({"tf": ["X"], "target": ["Y"]}))


# ------------------------------------------------------------------------------------ annotation
def test_annotation_beats_chance_on_held_out_batch(adata, model):
    clf = pg.tl.annotate_compass(
        adata,
        model,
        labels_key="group",
        batch_key="batch",
        test_batches="b2",
        epochs=15,
        batch_size=4,
        lr=3e-4,
        head_lr=3e-3,
        **TOK,
    )
    res = adata.uns["pg_compass_annotation"]
    assert res["params"]["n_train"] == res["params"]["n_test"] == N_CELLS // 2
    assert res["accuracy"] >= 0.9 and res["macro_f1"] >= 0.9  # chance: 0.5
    assert adata.obs["pg_compass_annotation_split"].value_counts()["test"] == N_CELLS // 2
    assert set(adata.obs["pg_compass_annotation"].cat.categories) == {"a", "b"}
    assert res["confusion"].to_numpy().sum() == N_CELLS // 2 and list(res["history"].columns) == [
        "epoch",
        "loss",
    ]
    assert list(clf.classes_) == ["a", "b"]
    # the pre-trained model is not modified
    assert not any(p is q for p, q in zip(clf.encoder.parameters(), model.module.parameters(), strict=True))
    with pytest.raises(ValueError, match="test_batches"):
        pg.tl.annotate_compass(adata, model, labels_key="group", overwrite=True, **TOK)


# --------------------------------------------------------------------------------------- GEARS hook
def test_compass_gears_replaces_gene_embeddings():
    from pertpy_gnn.gears import GEARS

    a = pg.datasets.simulate_perturbseq(
        n_genes=60, n_singles=8, n_doubles=6, n_cells_per_perturbation=10, n_control=60, seed=0
    )
    pg.pp.parse_perturbations(a, perturbation_key="condition")
    pg.pp.split_perturbations(a, kind="simulation", seed=0)
    pg.pp.rank_de_genes(a)
    pg.pp.go_graph(a)
    e = np.random.default_rng(0).normal(size=(a.n_vars, 12)).astype(np.float32)
    e[:2] = np.nan
    # not registered for GEARS and no co-expression graph: compass_gears registers adata, the graph is not needed
    m = pg.tl.compass_gears(a, e, freeze=True, hidden_dim=8)
    assert isinstance(m, GEARS) and m.name == "GEARS+GeneCompass"
    assert GEARS._get_most_recent_anndata_manager(a, required=False) is not None
    enc = m.module.gene_encoder
    params = dict(m.module.named_parameters())
    assert "gene_encoder.pretrained" not in params and "gene_encoder.proj.weight" in params
    h = enc()
    unit = e[2:] / np.linalg.norm(e[2:], axis=1, keepdims=True)
    with torch.no_grad():
        np.testing.assert_allclose(h[2:].numpy(), enc.proj(torch.from_numpy(unit)).numpy(), atol=1e-6)
        np.testing.assert_allclose(h[:2].numpy(), enc.own.numpy())
    m.train(max_epochs=1, progress_bar=False)
    pred = m.predict(a.obs["pg_perturbation"].cat.categories[1:3].tolist(), n_control=None)
    assert pred.shape == (2, a.n_vars) and np.isfinite(pred.X).all()
    assert pred.uns["pg_prediction"]["model"] == "GEARS+GeneCompass"
    tuned = pg.tl.compass_gears(a, e, freeze=False, hidden_dim=8, name="tuned")
    assert tuned.name == "tuned"
    assert "gene_encoder.pretrained" in dict(tuned.module.named_parameters())
    with pytest.raises(ValueError, match="n_vars x d"):
        pg.tl.compass_gears(a, e[:5])


def test_linear_probe_leaves_encoder_untouched(adata, model):
    clf = pg.tl.annotate_compass(
        adata,
        model,
        labels_key="group",
        test=("batch", "b2"),
        freeze_encoder=True,
        epochs=30,
        head_lr=1e-2,
        **TOK,
    )
    for p, q in zip(clf.encoder.parameters(), model.module.parameters(), strict=True):
        assert torch.equal(p, q)
    assert adata.uns["pg_compass_annotation"]["accuracy"] >= 0.8
    clf = pg.tl.annotate_compass(
        adata,
        model,
        labels_key="group",
        test=("batch", "b2"),
        freeze_encoder=True,
        epochs=30,
        head_lr=1e-2,
        cell_embedding="mean",
        key_added="annot_mean",
        **TOK,
    )
    assert clf.cell_embedding == "mean" and adata.uns["annot_mean"]["params"]["cell_embedding"] == "mean"
    # a random frozen encoder: the mean-pooled probe is above chance (12 test cells; 0.67-1.0 over init seeds)
    assert adata.uns["annot_mean"]["accuracy"] >= 0.65


def test_results_are_h5ad_writable(adata, model, tmp_path):
    pg.tl.embed_compass(adata, model, **TOK)
    pg.tl.compass_grn(adata)
    pg.tl.in_silico(adata, model, ["G01", "G03"], mode="knockdown", factor=0.5, target=("group", "b"), **TOK)
    pg.tl.in_silico_screen(
        adata, model, target=("group", "b"), candidates=GENES[:4], source=("group", "a"), **TOK
    )
    pg.tl.annotate_compass(
        adata, model, labels_key="group", test=("batch", "b2"), freeze_encoder=True, epochs=2, **TOK
    )
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert set(back.uns) >= {
        "pg_compass_gene",
        "pg_compass_grn",
        "pg_compass_insilico",
        "pg_compass_screen",
        "pg_compass_annotation",
    }
    assert "pg_compass_grn" in back.varp and back.obsm["X_compass"].shape == (N_CELLS, 32)


def test_overexpression_never_lowers_a_gene(adata, model):
    # G01 is high in group a (value log1p(x + 8) > log1p(1)): raising it to its corpus median changes nothing
    a = (adata.obs["group"] == "a").to_numpy()
    assert (adata.X.toarray()[a, 1] > 1).all()
    pg.tl.in_silico(adata, model, "G01", mode="overexpress", level="median", cells=("group", "a"), **TOK)
    cos = adata.obs.loc[a, "pg_compass_insilico_cos"]
    assert len(cos) == a.sum() and np.allclose(cos, 1.0, atol=1e-6)
    df = pg.tl.in_silico_screen(
        adata,
        model,
        target=("group", "b"),
        candidates=["G01", "G02"],
        cells=("group", "a"),
        level="median",
        **TOK,
    )
    np.testing.assert_allclose(df["cos"], 1.0, atol=1e-6)


def test_knockdown_beyond_the_window_is_reported(model, caplog):
    import logging

    rng = np.random.default_rng(1)
    x = rng.uniform(2.0, 9.0, size=(6, N_GENES)).astype(np.float32)  # all 30 genes expressed: 30 > 20 tokens
    x[:, 3] = 20.0  # G03 ranks first
    full = ad.AnnData(
        sp.csr_matrix(x), obs=pd.DataFrame(index=[f"d{i}" for i in range(6)]), var=pd.DataFrame(index=GENES)
    )
    with caplog.at_level(logging.WARNING, logger="pertpy_gnn"):
        pg.tl.in_silico(full, model, "G03", mode="knockdown", factor=0.01, gene_shift=False, **TOK)
    res = full.uns["pg_compass_insilico"]
    # 0.2 is below every other gene: G03 moves to rank 30, past the 20-token window, in every cell
    assert res["n_kept"] == 6 and res["n_left_window"] == 6
    assert res["window_needed"] == N_GENES and not res["window_needed_is_lower_bound"]
    assert f"a window of {N_GENES} gene tokens" in caplog.text
    pg.tl.in_silico(full, model, "G03", mode="knockdown", factor=0.5, gene_shift=False, key_added="kd", **TOK)
    assert full.uns["kd"]["n_left_window"] == 0  # 10 still ranks first


def test_gene_shift_min_cells_and_screen_z_without_pairs(adata, model):
    pg.tl.in_silico(
        adata, model, ["G01"], mode="delete", cells=("group", "a"), min_rank_fraction=None, min_cells=7, **TOK
    )
    res = adata.uns["pg_compass_insilico"]
    assert (res["gene_shift"]["n_cells"] >= 7).all() and res["params"]["min_cells"] == 7
    with pytest.raises(ValueError, match="min_cells"):
        pg.tl.in_silico(adata, model, "G01", min_cells=0, overwrite=True, **TOK)
    # one candidate per cell: no paired comparison, so z is explicitly absent (NaN), with the count saying why
    df = pg.tl.in_silico_screen(
        adata, model, target=("group", "b"), candidates=["G02"], cells=("group", "a"), **TOK
    )
    assert (df["n_paired_cells"] == 0).all() and df["z"].isna().all() and df["specific_shift"].isna().all()


@pytest.mark.parametrize("log_base", [None, 2.0])
def test_overexpression_fold_change_doubles_normalized_expression(log_base):
    """level=2 (fold) doubles the gene's normalized expression x/median, in the model's value space:
    ``log(1 + 2r)/log(b)`` from ``log(1 + r)/log(b)``, for our natural-log models and published log2 ones."""
    from pertpy_gnn.compass._ds_insilico import _variants

    b = np.e if log_base is None else log_base
    scale = float(np.log(b))  # what value_scale() gives for such a model
    r = torch.tensor([[9.0, 3.0, 1.5, 0.5], [9.0, 4.0, 0.25, 0.0]])  # x / median of tokens 10..13
    ids = torch.tensor([[2, 10, 11, 12, 13], [2, 10, 11, 12, 0]])
    model_vals = torch.cat([torch.zeros(2, 1), torch.log1p(r) / scale], 1)  # values as the model stores them
    targets = torch.tensor([[12], [12]])
    _, _, p_ids, p_vals, ok = _variants(
        ids,
        model_vals * scale,
        targets,
        mode="overexpress",
        factor=None,
        level=2,
        max_len=4,
        min_rank_fraction=None,
        level_unit="fold",
        scale=scale,
    )
    new = (p_vals / scale)[p_ids == 12]  # back in model units
    np.testing.assert_allclose(b**new - 1, [3.0, 0.5], rtol=1e-5)  # 2 x 1.5 and 2 x 0.25
    assert ok.all() and p_ids[0, 2] == 12 and p_ids[1, 3] == 12  # re-ranked: 3.0 ties 11's 3.0, goes first
    # multiples of the corpus median and token values mean the same in both kinds of model
    _, _, p_ids, p_vals, _ = _variants(
        ids,
        model_vals * scale,
        targets,
        mode="overexpress",
        factor=None,
        level=5,
        max_len=4,
        min_rank_fraction=None,
        level_unit="median",
        scale=scale,
    )
    np.testing.assert_allclose(b ** (p_vals / scale)[p_ids == 12] - 1, [5.0, 5.0], rtol=1e-5)
    _, _, p_ids, p_vals, _ = _variants(
        ids,
        model_vals * scale,
        targets,
        mode="overexpress",
        factor=None,
        level=2.5,
        max_len=4,
        min_rank_fraction=None,
        level_unit="token",
        scale=scale,
    )
    np.testing.assert_allclose((p_vals / scale)[p_ids == 12], [2.5, 2.5], rtol=1e-6)
    # normalized expression: x = 6 for a gene of median 2 is three medians
    _, _, p_ids, p_vals, _ = _variants(
        ids,
        model_vals * scale,
        targets,
        mode="overexpress",
        factor=None,
        level=6,
        max_len=4,
        min_rank_fraction=None,
        level_unit="normalized",
        scale=scale,
        medians=torch.tensor([2.0]),
    )
    np.testing.assert_allclose(b ** (p_vals / scale)[p_ids == 12] - 1, [3.0, 3.0], rtol=1e-5)


def test_overexpression_level_units_end_to_end(adata, model):
    # G00 is at its corpus median (x = median = 1) in every cell: a fold of 2 is two medians
    kw = {"mode": "overexpress", "target": ("group", "b"), "gene_shift": False, **TOK}
    pg.tl.in_silico(adata, model, "G00", level=2, key_added="fold", **kw)
    pg.tl.in_silico(adata, model, "G00", level=2, level_unit="median", key_added="med", **kw)
    np.testing.assert_allclose(adata.obs["fold_cos"].dropna(), adata.obs["med_cos"].dropna(), atol=2e-3)
    assert (adata.obs["fold_cos"].dropna() < 1).all()  # raised: the cells changed
    assert adata.uns["fold"]["params"]["level_unit"] == "fold"
    # normalized expression 4 of a gene with median 2 is two medians
    med2 = {**kw, "gene_medians": pd.Series(2.0, index=GENES)}
    pg.tl.in_silico(adata, model, "G00", level=4, level_unit="normalized", key_added="norm", **med2)
    pg.tl.in_silico(adata, model, "G00", level=2, level_unit="median", key_added="med2", **med2)
    np.testing.assert_array_equal(adata.obs["norm_cos"].dropna(), adata.obs["med2_cos"].dropna())
    assert list(adata.uns["norm"]["level_median"]) == [2.0] and (adata.obs["norm_cos"].dropna() < 1).all()
    # a fold change leaves cells without the gene alone: G01 is expressed in group a only
    pg.tl.in_silico(adata, model, "G01", mode="overexpress", level=3, key_added="g1", gene_shift=False, **TOK)
    np.testing.assert_array_equal(adata.obs["g1_kept"], adata.obs["group"] == "a")
    with pytest.raises(ValueError, match="No cell expresses"):
        pg.tl.in_silico(adata, model, "G29", mode="overexpress", level=2, key_added="g29", **TOK)
    df = pg.tl.in_silico_screen(
        adata, model, target=("group", "b"), cells=("group", "a"), candidates=["G01", "G07"], level=2, **TOK
    )
    assert list(df.index) == ["G01"]  # G07 is not expressed in group a: no fold variant
    med = {k: v for k, v in med2.items() if k not in ("mode", "target", "gene_shift")}
    df = pg.tl.in_silico_screen(
        adata,
        model,
        target=("group", "b"),
        cells=("group", "a"),
        candidates=["G00", "G07"],
        level=4,
        level_unit="normalized",
        key_added="scr",
        **med,
    )
    assert set(df.index) == {"G00", "G07"} and (df["cos"] < 1).all()


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"level": 2, "level_unit": "percent"}, "level_unit must be one of"),
        ({"level": 0.5}, "would lower the gene.*knockdown"),
        ({"level": -1, "level_unit": "median"}, "must be positive"),
        ({"level": "high"}, "Overexpression needs `level`"),
        ({"mode": "knockdown", "factor": 1.5}, r"fraction of the gene's normalized expression left"),
    ],
)
def test_overexpression_bad_level_unit(adata, model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        pg.tl.in_silico(adata, model, "G01", **{"mode": "overexpress", **kw}, **TOK)
