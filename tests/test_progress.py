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
