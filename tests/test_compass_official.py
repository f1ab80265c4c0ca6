"""Published GeneCompass format: load, parity with the published code's outputs, tokenization, save, downstream.

The fixture (a tiny checkpoint in the published format with random weights, its inputs tokenized by
the published preprocessing and the published code's outputs) is read from ``../shared/data`` at run
time; the tests skip when it is absent.
"""

import pickle
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import pertpy_gnn as pg  # noqa: E402
from pertpy_gnn._pickle import UnsafePickleError, read_plain_pickle  # noqa: E402
from pertpy_gnn.compass import GeneCompass  # noqa: E402
from pertpy_gnn.compass._module import IDS, LABEL_IDS, LABEL_VALUES, VALUES  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "genecompass_official_format"
pytestmark = pytest.mark.skipif(
    not (FIX / "outputs.npz").is_file(), reason=f"GeneCompass format fixture not found at {FIX}"
)
MEDIANS = [
    FIX / "preprocess" / "human_gene_median_after_filter.pickle",
    FIX / "preprocess" / "mouse_gene_median_after_filter.pickle",
]
# README tolerances: atol/rtol 1e-5 on hidden states and value predictions, 1e-4 on logits and losses
TOL_H, TOL_LOGIT = 1e-5, 1e-4


@pytest.fixture(scope="module")
def official():
    return GeneCompass.load_official(
        FIX / "checkpoint", prior_knowledge_dir=FIX / "prior_knowledge", gene_medians=MEDIANS
    )


@pytest.fixture(scope="module")
def io():
    return np.load(FIX / "inputs.npz"), np.load(FIX / "outputs.npz")


def _t(a):
    return torch.from_numpy(np.asarray(a))


def _close(got, want, tol):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    return float(np.abs(got - want).max())


def _forward(module, ids, values, species, mask):
    with torch.no_grad():
        hs = []
        h = module.encode_genes(
            _t(ids), _t(values), None if species is None else _t(species), _t(mask), hidden_states=hs
        )
        logits, value = module.heads(h[:, 1:])
    return h, logits, value, hs


def test_load_official_reproduces_every_output(official, io):
    inp, out = io
    m = official.module
    assert official.vocab.layout == "official" and len(official.vocab) == 300
    assert m.bert.embeddings.concat_embeddings.cat_fc.in_features == 5 * 64 + 1
    ids, vals, mask, spc = inp["input_ids"], inp["values"], inp["attention_mask"], inp["species"]
    h, logits, value, hs = _forward(m, ids, vals, spc, mask)
    diffs = {
        "unmasked_logits": _close(logits, out["unmasked_logits"], TOL_LOGIT),
        "unmasked_value_pred": _close(value, out["unmasked_value_pred"], TOL_H),
        "unmasked_hidden_states": _close(torch.stack(hs), out["unmasked_hidden_states"], TOL_H),
        "unmasked_last_hidden_state": _close(h, out["unmasked_last_hidden_state"], TOL_H),
        "unmasked_cell_emb_cls": _close(h[:, 0], out["unmasked_cell_emb_cls"], TOL_H),
        "unmasked_gene_emb": _close(h[:, 1:], out["unmasked_gene_emb"], TOL_H),
    }
    # one unpadded cell, no attention mask (the published EmbeddingGenerator)
    for i, n in enumerate(inp["lengths"]):
        hi, *_ = _forward(
            m, ids[i : i + 1, :n], vals[i : i + 1, :n], spc[i : i + 1], np.ones((1, n), np.int64)
        )
        diffs[f"downstream_cell{i}"] = _close(hi[0], out[f"downstream_cell{i}_last_hidden_state"], TOL_H)
    # species=None: the human row and no homolog remapping (the published sequence classifier)
    hn, *_ = _forward(m, ids, vals, None, mask)
    diffs["species_none"] = _close(hn, out["species_none_last_hidden_state"], TOL_H)
    assert not np.allclose(hn[2:].numpy(), h[2:].numpy(), atol=1e-3)  # the mouse cells differ
    # alpha scales the four projected priors; the published forward first steps the warm-up
    # (alpha += 1 / emb_warmup_steps while alpha < 1), so alpha 0.5 is used as 0.5 + 1e-4
    m.emb_warmup.alpha.fill_(0.5 + 1 / 10000)
    try:
        ha, la, va, _ = _forward(m, ids, vals, spc, mask)
    finally:
        m.emb_warmup.alpha.fill_(1.0)
    diffs["alpha0p5_logits"] = _close(la, out["alpha0p5_logits"], TOL_LOGIT)
    diffs["alpha0p5_value_pred"] = _close(va, out["alpha0p5_value_pred"], TOL_H)
    diffs["alpha0p5_last_hidden_state"] = _close(ha, out["alpha0p5_last_hidden_state"], TOL_H)
    # the masked batch of the published collator, and the 0.2 / 0.8 loss through our module's loss
    mi, mv, ma, ms = (
        out[k] for k in ("masked_input_ids", "masked_values", "masked_attention_mask", "masked_species")
    )
    hm, lm, vm, _ = _forward(m, mi, mv, ms, ma)
    diffs["masked_logits"] = _close(lm, out["masked_logits"], TOL_LOGIT)
    diffs["masked_value_pred"] = _close(vm, out["masked_value_pred"], TOL_H)
    diffs["masked_last_hidden_state"] = _close(hm, out["masked_last_hidden_state"], TOL_H)
    col0 = m.species_tokens[_t(ms).view(-1)].view(-1, 1)  # our layout: the species in column 0
    tensors = {
        IDS: torch.cat([col0, _t(mi)], 1),
        VALUES: torch.cat([torch.zeros(4, 1), _t(mv)], 1),
        LABEL_IDS: torch.cat([torch.full((4, 1), -100), _t(out["masked_labels"])], 1),
        LABEL_VALUES: torch.cat([torch.zeros(4, 1), _t(out["masked_labels_values"])], 1),
    }
    with torch.no_grad():
        _, _, loss = m(tensors)
    diffs["loss_total"] = _close(loss.loss, out["loss_total"], TOL_LOGIT)
    diffs["loss_id"] = _close(loss.extra_metrics["loss_id"], out["loss_id"], TOL_LOGIT)
    diffs["loss_value"] = _close(loss.extra_metrics["loss_value"], out["loss_value"], TOL_LOGIT)
    assert len(diffs) == 20  # every float output of outputs.npz


def test_tokenize_reproduces_published_inputs(official, io, tmp_path):
    inp, _ = io
    vocab = official.vocab
    assert official.tokenization_ == {
        "input_kind": "normalized",
        "log_base": 2.0,
        "missing_median": 1.0,
        "value_dtype": "float32",
    }
    human = [t for t in vocab.tokens[2:] if t.startswith("ENSG")]
    mouse = [t for t in vocab.tokens[2:] if t.startswith("ENSMUSG")]
    for i, species in enumerate(["human", "human", "mouse", "mouse"]):
        counts = inp[f"cell{i}_{species}_counts"][None]
        adata = ad.AnnData(
            sp.csr_matrix(counts), var=pd.DataFrame(index=human if species == "human" else mouse)
        )
        corpus = pg.pp.compass_tokenize(
            adata,
            tmp_path / f"c{i}",
            vocab,
            species=species,
            gene_medians=official.gene_medians_,
            max_len=inp["input_ids"].shape[1],
            progress_bar=False,
            **official.tokenization_,
        )
        ids, values = corpus.read([0])
        assert ids[0, 0] == vocab.species_token(species) == inp["species"][i, 0]
        np.testing.assert_array_equal(ids[0, 1:], inp["input_ids"][i])
        assert values.dtype == np.float32
        np.testing.assert_array_equal(
            values[0, 1:], inp["values"][i]
        )  # exact: same float64 ops, then float32


def test_save_official_roundtrip(official, io, tmp_path):
    inp, out = io
    # the published fixture model: save and load back gives identical outputs
    official.save_official(tmp_path / "ckpt")
    back = GeneCompass.load_official(
        tmp_path / "ckpt", prior_knowledge_dir=tmp_path / "ckpt" / "prior_knowledge"
    )
    assert back.vocab == official.vocab and back.tokenization_ == official.tokenization_
    pd.testing.assert_series_equal(back.gene_medians_, official.gene_medians_)
    args = (inp["input_ids"], inp["values"], inp["species"], inp["attention_mask"])
    for a, b in zip(_forward(official.module, *args)[:3], _forward(back.module, *args)[:3], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileExistsError, match="not empty"):
        official.save_official(tmp_path / "ckpt")
    # one of our models (our vocabulary, a learned prior in place of a missing one) in the published layout
    genes = [f"G{i:02d}" for i in range(20)]
    vocab = pg.pp.compass_vocab(human_genes=genes, mouse_genes=["Mg1"])
    torch.manual_seed(0)
    mat = np.random.default_rng(0).normal(size=(len(vocab), 6)).astype(np.float32)
    prior = {"grn": pg.pp.CompassPrior("grn", mat, np.ones(len(vocab), bool), "random")}
    ours = GeneCompass(vocab=vocab, seq_len=11, priors=prior, n_layers=1, d_model=16, n_heads=2, init_std=0.3)
    ours.gene_medians_ = pd.Series(np.linspace(1, 2, 20), index=pd.Index(genes, name="token"), name="median")
    ours.save_official(tmp_path / "ours")
    cfg = (tmp_path / "ours" / "config.json").read_text()
    assert '"use_peca_grn": true' in cfg and '"max_position_embeddings": 10' in cfg
    state = torch.load(tmp_path / "ours" / "pytorch_model.bin", weights_only=True)
    assert {"bert.embeddings.homologous_index", "cls.predictions.decoder.weight", "emb_warmup.alpha"} <= set(
        state
    )
    again = GeneCompass.load_official(tmp_path / "ours")
    assert again.vocab == vocab and again.tokenization_ == {}
    pd.testing.assert_series_equal(again.gene_medians_, ours.gene_medians_)
    ours.module.eval()
    ids = torch.tensor([[2, 5, 7, 9, 0], [3, 8, 6, 0, 0]])
    vals = torch.rand(2, 5)
    with torch.no_grad():
        assert torch.equal(ours.module.encode(ids, vals), again.module.encode(ids, vals))
        h = ours.module.encode(ids, vals)
        assert torch.equal(torch.stack(ours.module.heads(h)[:1]), torch.stack(again.module.heads(h)[:1]))


def test_bad_files_fail_clearly(tmp_path):
    # a pickle holding anything but plain data is refused before anything of it runs
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "tokens.pickle"
    bad.write_bytes(pickle.dumps({"<pad>": 0, "x": Evil()}))
    with pytest.raises(UnsafePickleError, match="tokens.pickle.*builtins.print"):
        read_plain_pickle(bad)
    with pytest.raises(UnsafePickleError, match="tokens.pickle"):
        GeneCompass.load_official(FIX / "checkpoint", token_dictionary=bad)
    bad.write_bytes(pickle.dumps(pd.Series([1, 2])))
    with pytest.raises(UnsafePickleError, match="pandas"):
        read_plain_pickle(bad)
    assert (
        read_plain_pickle(FIX / "prior_knowledge" / "PECA2vec" / "human_PECA_vec.pickle")["HG000"].dtype
        == np.float64
    )
    pk = FIX / "prior_knowledge"
    # truncated weights
    ck = tmp_path / "trunc"
    shutil.copytree(FIX / "checkpoint", ck)
    blob = (ck / "pytorch_model.bin").read_bytes()
    (ck / "pytorch_model.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"trunc/pytorch_model.bin is not a readable PyTorch state dict"):
        GeneCompass.load_official(ck, prior_knowledge_dir=pk)
    # corrupt config
    (ck / "pytorch_model.bin").write_bytes(blob)
    (ck / "config.json").write_text('{"model_type": "bert", "hidd')
    with pytest.raises(ValueError, match=r"trunc/config.json is not valid JSON"):
        GeneCompass.load_official(ck, prior_knowledge_dir=pk)
    # a foreign checkpoint: a state dict of another model
    shutil.copy(FIX / "checkpoint" / "config.json", ck / "config.json")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, ck / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a GeneCompass checkpoint"):
        GeneCompass.load_official(ck, prior_knowledge_dir=pk)
    # a pickle with code inside the weights file: weights_only refuses it
    torch.save({"bert.embeddings.word_embeddings.weight": Path("x")}, ck / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin"):
        GeneCompass.load_official(ck, prior_knowledge_dir=pk)
    # a state dict missing layers
    state = torch.load(FIX / "checkpoint" / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if ".layer.1." not in k}, ck / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin lacks 16 parameters"):
        GeneCompass.load_official(ck, prior_knowledge_dir=pk)
    # a token dictionary of another model
    torch.save(state, ck / "pytorch_model.bin")
    small = tmp_path / "small.pickle"
    small.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000100000": 2}))
    with pytest.raises(ValueError, match="3 tokens, .*300"):
        GeneCompass.load_official(ck, token_dictionary=small)
    with pytest.raises(FileNotFoundError, match="token dictionary is needed"):
        GeneCompass.load_official(ck)


def _fixture_adata(model, n_cells=16, seed=0, species="human"):
    """Counts over the fixture's genes of one species, var_names = symbols, var['ensembl'] = Ensembl ids."""
    vocab = model.vocab
    ens = [t for t in vocab.tokens[2:] if t.startswith("ENSG" if species == "human" else "ENSMUSG")]
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, (n_cells, len(ens))) * (rng.random((n_cells, len(ens))) < 0.2)
    x[:, :3] = rng.integers(20, 40, (n_cells, 3))  # three genes high in every cell
    sym = [vocab.symbols[e] for e in ens]
    var = pd.DataFrame({"ensembl": ens}, index=sym)
    obs = pd.DataFrame(
        {"group": np.repeat(["a", "b"], n_cells // 2)}, index=[f"c{i}" for i in range(n_cells)]
    )
    return ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var)


def test_downstream_with_published_checkpoint(official, caplog):
    a = _fixture_adata(official)
    pg.tl.embed_compass(a, official, progress_bar=False)
    cell = a.obsm["X_compass"]
    assert cell.shape == (a.n_obs, 64) and np.isfinite(cell).all()
    # the same cells with Ensembl var_names, plus a gene the model does not know: same embeddings
    b = a.copy()
    del b.obsm["X_compass"]
    b.var_names = b.var["ensembl"].to_numpy()
    extra = ad.AnnData(
        sp.csr_matrix(np.ones((b.n_obs, 1), np.float32)),
        obs=b.obs,
        var=pd.DataFrame(index=["ENSG99999999999"]),
    )
    b = ad.concat([b, extra], axis=1, merge="first")
    b.obs = a.obs.copy()
    with caplog.at_level("INFO", logger="pertpy_gnn"):
        pg.tl.embed_compass(b, official, progress_bar=False)
    assert "150 of 151 human genes map" in caplog.text
    np.testing.assert_allclose(b.obsm["X_compass"], cell, atol=1e-6)
    # embeddings equal the published forward on the published tokenization of these cells
    with torch.no_grad():
        from pertpy_gnn.compass._ds_core import tokenize_kwargs, tokenized

        with tokenized(a, official, max_len=64, tok=tokenize_kwargs(species="human")) as corpus:
            ids, vals = corpus.read(np.arange(a.n_obs))
        assert vals.dtype == np.float32 and (ids[:, 0] == 0).all()
        n = (ids[:, 1:] != 0).sum(1)
        h0 = official.module.encode_genes(
            torch.from_numpy(ids[:1, 1 : 1 + n[0]].astype(np.int64)),
            torch.from_numpy(vals[:1, 1 : 1 + n[0]]),
            torch.zeros(1),
        )
    np.testing.assert_allclose(cell[0], h0[0, 0].numpy(), atol=1e-5)
    # in silico deletion of a gene every cell expresses
    pg.tl.in_silico(a, official, a.var_names[0], mode="delete", progress_bar=False)
    assert a.obs["pg_compass_insilico_kept"].all()
    cos = a.obs["pg_compass_insilico_cos"].to_numpy()
    assert np.isfinite(cos).all() and (cos < 1).all() and (cos > 0).all()
    pg.tl.in_silico(
        a, official, a.var_names[1], mode="overexpress", level="median", key_added="oe", progress_bar=False
    )
    assert np.isfinite(a.obs["oe_cos"]).all()
    # screen, gene-gene network, cell-type annotation (fine-tuning a copy of the published encoder)
    pg.tl.in_silico_screen(
        a,
        official,
        target=("group", "b"),
        cells=("group", "a"),
        candidates=list(a.var_names[:4]),
        progress_bar=False,
    )
    assert len(a.uns["pg_compass_screen"]) == 4
    assert "pg_compass_gene" in a.varm
    pg.tl.compass_grn(a, threshold=0.4)
    assert "pg_compass_grn" in a.varp
    clf = pg.tl.annotate_compass(
        a, official, labels_key="group", test=a.obs_names[::4], epochs=2, batch_size=4, progress_bar=False
    )
    assert 0 <= a.uns["pg_compass_annotation"]["accuracy"] <= 1
    assert not any(
        p is q for p, q in zip(clf.encoder.parameters(), official.module.parameters(), strict=True)
    )
    # mouse cells: mouse symbols map to the mouse tokens (the homolog index serves the prior look-up)
    m = _fixture_adata(official, species="mouse", seed=1)
    pg.tl.embed_compass(m, official, progress_bar=False)
    assert np.isfinite(m.obsm["X_compass"]).all()


def test_compass_gears_with_published_checkpoint(official):
    from pertpy_gnn.gears import GEARS

    a = pg.datasets.simulate_perturbseq(
        n_genes=60, n_singles=8, n_doubles=6, n_cells_per_perturbation=10, n_control=60, seed=0
    )
    # give the simulated genes the fixture's symbols (the 58 last ones; two stay unknown)
    a.var["symbol"] = [official.vocab.symbols[t] for t in official.vocab.tokens[2:60]] + ["NOPE1", "NOPE2"]
    e = pg.tl.compass_gene_embeddings(official, a, gene_symbols="symbol", layer="counts", progress_bar=False)
    assert e.shape == (60, 64) and np.isnan(e[-2:]).all() and np.isfinite(e[:58]).any(axis=1).sum() > 40
    pg.pp.parse_perturbations(a, perturbation_key="condition")
    pg.pp.split_perturbations(a, kind="simulation", seed=0)
    pg.pp.rank_de_genes(a)
    pg.pp.go_graph(a)
    model = pg.tl.compass_gears(a, e, hidden_dim=8)
    assert isinstance(model, GEARS)
    model.train(max_epochs=1, progress_bar=False)
    pred = model.predict(a.obs["pg_perturbation"].cat.categories[1:3].tolist(), n_control=None)
    assert np.isfinite(pred.X).all()


def test_overexpression_fold_change_in_published_log2_units(official, monkeypatch):
    """A published checkpoint's values are log2(1 + x/median): a fold change of 2 reaches the model as
    log2(1 + 2 x/median), not as a natural-log value (and not as the token value 2)."""
    import pertpy_gnn.compass._ds_insilico as insilico
    from pertpy_gnn.compass._ds_core import value_scale

    assert value_scale(official) == pytest.approx(np.log(2.0))
    a = _fixture_adata(official)
    gene = a.var_names[0]  # high in every cell
    tok = int(official.vocab.lookup([a.var["ensembl"].iloc[0]], "human")[0])
    seen = []
    encode = insilico.encode

    def spy(module, ids, values):
        seen.append((np.asarray(ids), np.asarray(values, dtype=np.float64)))
        return encode(module, ids, values)

    monkeypatch.setattr(insilico, "encode", spy)
    pg.tl.in_silico(a, official, gene, mode="overexpress", level=2, gene_shift=False, progress_bar=False)
    (o_ids, o_vals), (p_ids, p_vals) = seen  # one batch: original, then perturbed (model units)
    before, after = o_vals[o_ids == tok], p_vals[p_ids == tok]
    assert before.size == a.n_obs == after.size
    np.testing.assert_allclose(2.0**after - 1, 2 * (2.0**before - 1), rtol=1e-5)
