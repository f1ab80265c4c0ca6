"""Data-parallel pre-training on CPU: 2 processes, gloo backend, Lightning's 'ddp' strategy."""

import textwrap

import pytest
import torch

from pertpy_gnn.compass import GeneCompass

from .ddp_run import run_script

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import numpy as np, pandas as pd, scipy.sparse as sp, anndata as ad, torch
    torch.set_num_threads(1)
    import pertpy_gnn as pg
    from pertpy_gnn.compass import CompassCorpus

    out = Path(sys.argv[1])
    # Lightning re-runs this script for rank 1 once rank 0 starts fitting: tokenize on rank 0 only
    if os.environ.get("LOCAL_RANK", "0") == "0":
        rng = np.random.default_rng(0)
        genes = [f"G{i}" for i in range(30)]
        x = rng.poisson(5, (64, 30)).astype(np.float32)
        adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes))
        vocab = pg.pp.compass_vocab(human_genes=genes)
        pg.pp.compass_tokenize(adata, out / "corpus", vocab, species="human", max_len=12, progress_bar=False)
    model = pg.tl.pretrain_compass(
        CompassCorpus(out / "corpus"), max_epochs=2, batch_size=8, lr=1e-3, accelerator="cpu", devices=2,
        strategy="ddp", ckpt_dir=out / "ckpt", progress_bar=False, n_layers=1, d_model=32, n_heads=2,
    )
    rank = model.trainer.global_rank
    torch.save(model.module.state_dict(), out / f"rank{rank}.pt")
    (out / f"steps{rank}.txt").write_text(str(model.trainer.global_step))
    """
)


@pytest.mark.slow
def test_ddp_two_processes_cpu(tmp_path):
    run_script(SCRIPT, tmp_path, "ddp_run.py")
    # 64 cells split over 2 ranks, 8 per batch: 4 steps per epoch on each rank
    assert (tmp_path / "steps0.txt").read_text() == (tmp_path / "steps1.txt").read_text() == "8"
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were all-reduced: identical replicas
    restored = GeneCompass.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(v, w0[k]) for k, v in restored.module.state_dict().items())
    assert not (tmp_path / "lightning_logs").exists()  # logs kept out of the working directory
