"""Logs and progress: each line once; one line per epoch when output is not a terminal; lazy pyplot."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import pertpy_gnn as pg
from test_gears import _prepare, _toy
adata = _prepare(_toy())
pg.tl.train_gears(adata, max_epochs=2, hidden_dim=16, progress_bar=True, accelerator="cpu")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=300
    )


def test_training_logs_each_line_once_and_one_line_per_epoch():
    res = _run(TRAIN.format(tests=str(ROOT / "tests")))
    err = res.stderr
    assert err.count("GPU available") == 1, err  # Lightning's banner: once, through the root logger
    epochs = [ln for ln in err.splitlines() if "pertpy_gnn epoch " in ln]
    assert len(epochs) == 2, err
    assert epochs[0].startswith("INFO pertpy_gnn epoch 1/2 (")
    assert "(epoch mean)" in epochs[1] and "val_top20_de_mse" in epochs[1]
    assert "━" not in err and "it/s" not in err  # no progress bar drawn into a file


def test_import_does_not_load_pyplot():
    code = (
        "import sys, pertpy_gnn as pg\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'imported eagerly'\n"
        "pg.pl.metrics\n"
        "assert 'matplotlib.pyplot' in sys.modules\n"
        "print('ok')\n"
    )
    assert _run(code).stdout.strip() == "ok"


def _lines(caplog, prefix):
    return [
        r.getMessage() for r in caplog.records if r.name == "pertpy_gnn" and r.getMessage().startswith(prefix)
    ]


def test_tokenize_and_embed_log_progress_when_not_a_terminal(caplog, monkeypatch, tmp_path):
    """Output redirected: one log line per tenth of the chunks / batches; progress_bar=False: none."""
    import logging

    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch

    import pertpy_gnn as pg
    import pertpy_gnn._progress as progress
    from pertpy_gnn.compass import GeneCompass

    monkeypatch.setattr(progress, "interactive", lambda: False)
    genes = [f"G{i}" for i in range(12)]
    x = np.random.default_rng(0).poisson(5.0, (40, 12)).astype(np.float32)
    adata = ad.AnnData(x, var=pd.DataFrame(index=genes))
    vocab = pg.pp.compass_vocab(human_genes=genes)
    with caplog.at_level(logging.INFO, logger="pertpy_gnn"):
        pg.pp.compass_tokenize(adata, tmp_path / "c", vocab, species="human", max_len=8, chunk_size=2)
    tok = _lines(caplog, "tokenize: ")
    assert len(tok) == 10 and tok[0].startswith("tokenize: 2/20 chunks (10%)")  # 20 chunks, a line per 2
    assert tok[-1].startswith("tokenize: 20/20 chunks (100%), ") and tok[-1].endswith(" s")
    assert len(_lines(caplog, "gene medians: ")) == 10
    caplog.clear()
    torch.manual_seed(0)
    model = GeneCompass(vocab=vocab, seq_len=9, n_layers=1, d_model=16, n_heads=2)
    kw = {"species": "human", "gene_medians": pd.Series(1.0, index=genes), "batch_size": 8}
    with caplog.at_level(logging.INFO, logger="pertpy_gnn"):
        pg.tl.embed_compass(adata, model, genes=False, **kw)
    emb = _lines(caplog, "GeneCompass embeddings: ")
    assert [m.split(" (")[0] for m in emb] == [f"GeneCompass embeddings: {i}/5 batches" for i in range(1, 6)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pertpy_gnn"):
        pg.tl.embed_compass(adata, model, genes=False, overwrite=True, progress_bar=False, **kw)
        pg.pp.compass_tokenize(
            adata, tmp_path / "d", vocab, species="human", max_len=8, chunk_size=2, progress_bar=False
        )
    assert not [r for r in caplog.records if "%)" in r.getMessage()]
