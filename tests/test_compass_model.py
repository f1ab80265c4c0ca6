import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pertpy_gnn as pg
from pertpy_gnn.compass import PRESETS, CompassModule, GeneCompass, mask_tokens
from pertpy_gnn.compass._module import resolve_config
from pertpy_gnn.compass._training import warmup_linear

TINY = {"n_layers": 1, "d_model": 64, "n_heads": 2}


def toy_corpus(path, n_cells=320, seed=0):
    """Four cell types, each expressing its own 24 of 40 genes in a fixed order (library sizes vary)."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(40)]
    kind = np.arange(n_cells) % 4
    x = np.zeros((n_cells, 40), np.float32)
    for t in range(4):
        rows = np.flatnonzero(kind == t)
        x[np.ix_(rows, rng.permutation(40)[:24])] = np.linspace(200, 20, 24)
    x *= rng.uniform(0.5, 2.0, (n_cells, 1)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes))
    vocab = pg.pp.compass_vocab(human_genes=genes)
    # medians of 1: genes stay ranked by expression, so rank and cell type determine the gene
    ones = pd.Series(1.0, index=genes)
    return pg.pp.compass_tokenize(
        adata, path, vocab, species="human", max_len=16, gene_medians=ones, progress_bar=False
    ), kind


def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (400, 300), generator=g)
    ids[:, 0] = 2
    ids[:, 250:] = 0  # padding
    values = torch.rand(400, 300, generator=g) + 0.5
    t = mask_tokens(ids, values, vocab_size=1000, generator=g)
    sel = t["label_ids"] != -100
    assert not sel[:, 0].any() and not sel[:, 250:].any()
    assert sel[:, 1:250].float().mean().item() == pytest.approx(0.15, abs=0.005)
    masked = sel & (t["ids"] == 1)
    kept = sel & (t["ids"] == ids)
    assert masked.sum() / sel.sum() == pytest.approx(0.8, abs=0.02)
    assert kept.sum() / sel.sum() == pytest.approx(0.1 + 0.1 / 996, abs=0.02)
    random = sel & ~masked & ~kept
    assert (t["ids"][random] >= 4).all()
    hidden = t["values"] == -1  # <mask> and random tokens lose their value; kept tokens keep it
    assert (hidden[masked | random]).all() and hidden[sel].float().mean().item() == pytest.approx(
        0.9, abs=0.02
    )
    assert torch.equal(t["values"][~hidden], values[~hidden]) and not hidden[~sel].any()
    assert torch.equal(t["ids"][sel & ~hidden], ids[sel & ~hidden])
    assert torch.equal(t["label_ids"][sel], ids[sel]) and torch.equal(t["ids"][~sel], ids[~sel])
    assert torch.equal(t["label_values"], values)


def test_presets_and_module():
    assert PRESETS["base"] == {"n_layers": 12, "d_model": 768, "n_heads": 12}
    assert PRESETS["small"] == {"n_layers": 6, "d_model": 256, "n_heads": 4}
    cfg = resolve_config("cpu")
    assert cfg["dropout"] == 0.02 and cfg["layer_norm_eps"] == 1e-12 and cfg["beta"] == 0.8
    with pytest.raises(ValueError, match="preset must be one of"):
        resolve_config("huge")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        resolve_config("cpu", d_model=30)
    torch.manual_seed(0)
    prior = torch.randn(60, 5)
    m = CompassModule(60, 10, priors={"grn": prior}, **TINY)
    emb = m.bert.embeddings
    # a given prior is a fixed buffer, the others learned matrices; all in the published concatenation order
    assert emb.priors == ("promoter", "co_exp", "gene_family", "peca_grn") and emb.fixed == {"peca_grn"}
    buffers = dict(m.named_buffers())
    assert torch.equal(buffers["bert.embeddings.peca_grn_knowledge"], prior)
    assert {"bert.embeddings.promoter_knowledge", "bert.embeddings.co_exp_knowledge"} <= dict(
        m.named_parameters()
    ).keys()
    # concat width: word (d) + value (1) + 4 priors (d each)
    assert emb.concat_embeddings.cat_fc.in_features == 5 * 64 + 1
    assert emb.word_embeddings.weight[1:].std().item() == pytest.approx(0.02, rel=0.1)
    # the id decoder is the word embedding; cat_ln keeps PyTorch's eps, every other LayerNorm the config's
    assert m.cls.predictions.decoder.weight is emb.word_embeddings.weight
    assert emb.concat_embeddings.cat_ln.eps == 1e-5
    assert all(
        ln.eps == 1e-12
        for ln in m.modules()
        if isinstance(ln, torch.nn.LayerNorm) and ln is not emb.concat_embeddings.cat_ln
    )
    m.eval()
    ids = torch.tensor([[2, 10, 11, 12, 0, 0], [3, 20, 21, 22, 23, 24]])
    values = torch.rand(2, 6)
    h = m.encode(ids, values)
    assert h.shape == (2, 6, 64)
    # padding is not attended: what sits in a padded slot does not change the other tokens
    v2 = values.clone()
    v2[0, 4:] = 5.0
    assert torch.allclose(m.encode(ids, v2)[0, :4], h[0, :4], atol=1e-5)
    # the GRN prior is used: changing a gene's prior row changes its embedding
    m.bert.embeddings.peca_grn_knowledge[10] += 1.0
    assert not torch.allclose(m.encode(ids, values)[0, 1], h[0, 1])
    t = mask_tokens(ids, values, vocab_size=60, mask_prob=0.5, generator=torch.Generator().manual_seed(1))
    inf, gen, loss = m(t)
    sel = t["label_ids"] != -100
    ce = torch.nn.functional.cross_entropy(gen["id_logits"], t["label_ids"][sel])
    mse = torch.nn.functional.mse_loss(gen["value_pred"], values[sel])
    assert loss.loss.item() == pytest.approx((0.2 * ce + 0.8 * mse).item(), rel=1e-5)
    assert gen["id_logits"].shape == (int(sel.sum()), 60)
    with pytest.raises(ValueError, match="Unknown priors"):
        CompassModule(60, 10, priors={"pathway": prior})


def test_warmup_schedule():
    f = [warmup_linear(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 90)


def test_pretrain_learns_checkpoints_and_resumes(tmp_path):
    corpus, kind = toy_corpus(tmp_path / "corpus")
    train, held = corpus.split(0.25, seed=0)
    ck = tmp_path / "ckpt"
    # beta 0.2: the id task learns within a few dozen steps (with 0.8 the value loss dominates this short run)
    kw = {
        "batch_size": 16,
        "lr": 3e-3,
        "warmup": 5,
        "accelerator": "cpu",
        "progress_bar": False,
        "beta": 0.2,
        **TINY,
    }
    model = pg.tl.pretrain_compass(
        corpus, max_epochs=12, train_indices=train, validation_indices=held, ckpt_dir=ck, **kw
    )
    assert model.is_trained_ and (ck / "last.ckpt").is_file()
    hist = model.history
    assert {
        "loss_train_step",
        "loss_validation",
        "accuracy_validation",
        "loss_value_validation",
        "lr",
    } <= set(hist)
    val = hist["loss_validation"]["loss_validation"].to_numpy(float)
    assert val[-1] < val[0]
    trained = model.evaluate(corpus, held, seed=1)
    shuffled = model.evaluate(corpus, held, seed=1, control="shuffled")
    swapped = model.evaluate(corpus, held, seed=1, control="context_swap")
    torch.manual_seed(5)
    fresh = GeneCompass(vocab=corpus.vocab, seq_len=corpus.seq_len, **TINY).evaluate(corpus, held, seed=1)
    assert trained["n_masked"] == fresh["n_masked"] == shuffled["n_masked"] == swapped["n_masked"] > 50
    assert trained["accuracy"] > fresh["accuracy"] + 0.2
    # with the gene order shuffled the rank structure the model learned is gone
    assert trained["accuracy"] > shuffled["accuracy"] + 0.1 and trained["value_mse"] < shuffled["value_mse"]
    # a short run learns rank statistics first: swapping the context for other cells' costs little yet
    assert (
        swapped["accuracy"] <= trained["accuracy"] + 0.02 and swapped["loss_id"] >= trained["loss_id"] - 0.05
    )
    assert trained["accuracy_top10"] >= trained["accuracy"]
    assert trained["value_mse"] < fresh["value_mse"]
    # the two cell types separate in the cell embedding (species-token state)
    z = model.get_latent_representation(corpus, held)
    assert z.shape == (held.size, 64)
    k = kind[held]
    centroid_gap = np.linalg.norm(z[k == 0].mean(0) - z[k == 1].mean(0))
    assert centroid_gap > np.mean([z[k == j].std(0).mean() for j in (0, 1)])
    # the checkpoint rebuilds the same model
    restored = GeneCompass.from_checkpoint(ck / "last.ckpt")
    for (n1, p1), (n2, p2) in zip(
        model.module.state_dict().items(), restored.module.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    assert restored.evaluate(corpus, held, seed=1) == trained
    # the corpus medians travel with the model (downstream tools tokenize new data with them)
    pd.testing.assert_series_equal(model.gene_medians_, corpus.gene_medians)
    pd.testing.assert_series_equal(restored.gene_medians_, corpus.gene_medians)
    # resume: the step counter and optimizer state continue from the checkpoint
    steps = model.trainer.global_step
    resumed = pg.tl.pretrain_compass(
        corpus, max_epochs=13, train_indices=train, ckpt_dir=ck, resume_from="last", **kw
    )
    assert resumed.trainer.global_step == steps + steps // 12
    # scvi-tools save / load
    model.save(tmp_path / "saved", overwrite=True)
    loaded = GeneCompass.load(tmp_path / "saved")
    assert loaded.evaluate(corpus, held, seed=1) == trained and loaded.vocab == corpus.vocab
    pd.testing.assert_series_equal(loaded.gene_medians_, corpus.gene_medians)


def test_pretrain_bf16_mixed_on_cpu(tmp_path):
    """``precision='bf16-mixed'`` pre-trains on CPU too (the default there is float32): finite loss, validation
    included, float32 weights and embeddings."""
    corpus, _ = toy_corpus(tmp_path / "corpus", n_cells=48)
    train, held = corpus.split(0.25, seed=0)
    model = pg.tl.pretrain_compass(
        corpus,
        max_epochs=1,
        batch_size=16,
        train_indices=train,
        validation_indices=held,
        accelerator="cpu",
        precision="bf16-mixed",
        progress_bar=False,
        **TINY,
    )
    assert str(model.trainer.precision) == "bf16-mixed"
    val = model.history["loss_validation"]["loss_validation"].to_numpy(float)
    assert len(val) == 1 and np.isfinite(val).all()
    state = model.module.state_dict()
    assert all(
        v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values() if v.is_floating_point()
    )


def test_model_errors(tmp_path):
    corpus, _ = toy_corpus(tmp_path / "corpus", n_cells=8)
    with pytest.raises(ValueError, match="not an AnnData"):
        GeneCompass(ad.AnnData(np.ones((2, 2))), vocab=corpus.vocab, seq_len=17)
    other = pg.pp.compass_vocab(human_genes=["A", "B"])
    with pytest.raises(ValueError, match="another vocabulary"):
        GeneCompass(vocab=other, seq_len=17).train(corpus, progress_bar=False)
    with pytest.raises(ValueError, match="17 tokens per cell, the model at most 5"):
        GeneCompass(vocab=corpus.vocab, seq_len=5).train(corpus, progress_bar=False)
    with pytest.raises(FileNotFoundError, match="Checkpoint"):
        pg.tl.pretrain_compass(corpus, resume_from=tmp_path / "none.ckpt", progress_bar=False, **TINY)
    with pytest.raises(ValueError, match="control must be"):
        GeneCompass(vocab=corpus.vocab, seq_len=17, **TINY).evaluate(corpus, control="noise")


def test_resume_is_exact(tmp_path):
    """A 2-epoch run, or the same run stopped after epoch 1 and resumed: the same parameters, bit for bit."""
    from lightning.pytorch import Callback

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    corpus, _ = toy_corpus(tmp_path / "corpus", n_cells=48)
    kw = {
        "batch_size": 16,
        "lr": 3e-3,
        "warmup": 2,
        "accelerator": "cpu",
        "progress_bar": False,
        "max_epochs": 2,
    }

    def fresh():
        torch.manual_seed(0)
        return GeneCompass(vocab=corpus.vocab, seq_len=corpus.seq_len, **TINY)

    whole = fresh()
    whole.train(corpus, ckpt_dir=tmp_path / "a", **kw)
    fresh().train(corpus, ckpt_dir=tmp_path / "b", callbacks=[StopAfterFirstEpoch()], **kw)
    resumed = fresh()
    resumed.train(corpus, ckpt_dir=tmp_path / "b", resume_from="last", **kw)
    assert resumed.trainer.global_step == whole.trainer.global_step == 6
    for (n1, p1), (n2, p2) in zip(
        whole.module.state_dict().items(), resumed.module.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_resume_mid_epoch_is_exact_or_refused(tmp_path):
    """A checkpoint written part-way through an epoch (``ckpt_every_n_steps``) resumes bit for bit:
    the rest of the epoch's cells in the same order, the same masks, dropout and schedule. A resume
    that cannot continue exactly (other batch size, or no stored loader position) is refused by name."""
    from lightning.pytorch import Callback

    class Interrupted(Exception):
        pass

    class CrashAfterStep(Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                raise Interrupted

    corpus, _ = toy_corpus(tmp_path / "corpus", n_cells=64)  # 4 batches per epoch
    kw = {"batch_size": 16, "lr": 3e-3, "warmup": 2, "accelerator": "cpu", "progress_bar": False}
    kw["max_epochs"] = 2

    def fresh():
        torch.manual_seed(0)
        return GeneCompass(vocab=corpus.vocab, seq_len=corpus.seq_len, **TINY)

    whole = fresh()
    whole.train(corpus, **kw)
    # the checkpoint of step 2 (batch 2 of 4 of epoch 1) is the last one written before the crash at step 3
    with pytest.raises(Interrupted):
        fresh().train(
            corpus, ckpt_dir=tmp_path / "b", ckpt_every_n_steps=2, callbacks=[CrashAfterStep(3)], **kw
        )
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert (
        ckpt["global_step"] == 2
        and ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 2
    )
    torch.save(ckpt, tmp_path / "mid.ckpt")
    resumed = fresh()
    resumed.train(corpus, ckpt_dir=tmp_path / "b", resume_from="last", **kw)
    assert resumed.trainer.global_step == whole.trainer.global_step == 8
    for (n1, p1), (n2, p2) in zip(
        whole.module.state_dict().items(), resumed.module.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1

    # refused: the cells left in the epoch depend on the batch size
    with pytest.raises(
        ValueError, match=r"part-way through an epoch.*batch_size 16 in the checkpoint, 8 now"
    ):
        fresh().train(corpus, resume_from=tmp_path / "mid.ckpt", **{**kw, "batch_size": 8})
    # refused: a mid-epoch checkpoint without the loader's position (older pertpy-gnn)
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"without the train loader's position.*end of an epoch"):
        fresh().train(corpus, resume_from=tmp_path / "old.ckpt", **kw)
