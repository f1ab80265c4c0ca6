"""GeneCompass entry points: pre-training here; the downstream tools live in :mod:`pertpy_gnn.compass`.

The downstream tools (embeddings, in-silico perturbation, cell-type annotation, GRN, GEARS with
GeneCompass gene embeddings) are implemented in the ``compass`` package and exposed in ``pg.tl``
under the names below, with their documentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..compass._ds_annotate import annotate_compass
from ..compass._ds_embed import compass_gene_embeddings, embed_compass
from ..compass._ds_gears import compass_gears
from ..compass._ds_grn import compass_grn, grn_auprc
from ..compass._ds_insilico import in_silico, in_silico_screen

__all__ = [
    "annotate_compass",
    "compass_gears",
    "compass_gene_embeddings",
    "compass_grn",
    "embed_compass",
    "grn_auprc",
    "in_silico",
    "in_silico_screen",
    "pretrain_compass",
]


def pretrain_compass(
    corpus,
    *,
    priors: Mapping | None = None,
    preset: str = "cpu",
    model=None,
    max_epochs: int = 1,
    batch_size: int = 8,
    lr: float = 5e-5,
    warmup: int | float = 0.1,
    weight_decay: float = 0.01,
    mask_prob: float = 0.15,
    train_indices=None,
    validation_indices=None,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | str | list = "auto",
    strategy: str = "auto",
    precision: str | int | None = None,
    ckpt_dir: str | Path | None = None,
    ckpt_every_n_steps: int | None = None,
    resume_from: str | Path | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    **model_kwargs,
):
    """Pre-train GeneCompass by masked gene-id and value prediction on a tokenized corpus.

    15% of the gene tokens of each cell are selected (80% -> ``<mask>``, 10% -> random gene, 10%
    kept; masked values -1); the loss is ``(1 - beta) * CE(gene id) + beta * MSE(value)`` with
    ``beta = 0.8``. AdamW with linear warm-up and linear decay. Data are streamed from the sharded
    corpus on disk, so a corpus larger than memory trains, with at most ``corpus.max_open_files``
    shard files open and resident memory that stays flat however many cells are streamed (see
    ``benchmarks/results/compass_corpus_scale.md``); Lightning runs it on any accelerator and
    distributed strategy (e.g. ``strategy='ddp', devices=4``).

    Parameters
    ----------
    corpus
        :class:`~pertpy_gnn.compass.CompassCorpus` or its folder (from
        :func:`~pertpy_gnn.pp.compass_tokenize`).
    priors
        ``{name: CompassPrior}`` from :func:`~pertpy_gnn.pp.compass_priors`; absent priors are learned
        embeddings.
    preset
        Model size: ``'cpu'`` (2 x 128), ``'small'`` (6 x 256, 4 heads), ``'base'`` (12 x 768, 12 heads).
    model
        Continue training this :class:`~pertpy_gnn.compass.GeneCompass` instead of a new one.
    max_epochs, batch_size, lr, warmup, weight_decay, mask_prob
        Training schedule: epochs, cells per batch and device, peak learning rate (paper 5e-5),
        warm-up steps (int) or fraction of all steps (float < 1), AdamW weight decay, masking rate.
    train_indices, validation_indices
        Cells to train on (default all) and cells whose masked loss and accuracy are logged each
        epoch.
    num_workers
        DataLoader worker processes.
    accelerator, devices, strategy
        Passed to Lightning (``strategy='ddp'`` for data-parallel training; on CPU it uses gloo).
    precision
        Lightning precision; ``None``: ``'bf16-mixed'`` (or ``'16-mixed'``) on a CUDA GPU, else 32-bit.
        ``'bf16-mixed'`` also trains on CPU (tested), for CPUs with bf16 units (AVX512-BF16 / AMX).
    ckpt_dir
        Write ``last.ckpt`` (weights, optimizer, scheduler and loop state) there every epoch (and every
        ``ckpt_every_n_steps`` steps).
    ckpt_every_n_steps
        See ``ckpt_dir``.
    resume_from
        Checkpoint path to resume from, or ``'last'`` for ``ckpt_dir/last.ckpt``. The run continues
        exactly as an uninterrupted one (same parameters, bit for bit on CPU), also from a checkpoint
        written part-way through an epoch: the rest of that epoch's cells in the same order, the same
        masks, dropout and learning rate. A part-way checkpoint needs the same training cells,
        ``batch_size`` and ``seed``, and one device; otherwise the resume is refused with the reason.
    seed
        Seed of initialization, data order and masks.
    progress_bar
        Show Lightning's progress bar.
    **model_kwargs
        Overrides of the preset (``n_layers``, ``d_model``, ``n_heads``, ``dropout``, ``beta``, ...).

    Returns
    -------
    The trained :class:`~pertpy_gnn.compass.GeneCompass`; ``model.history`` holds the logged curves
    (``loss_train``, ``accuracy_validation``, ...).
    """
    from lightning.pytorch import seed_everything

    from ..compass._model import GeneCompass, as_corpus

    corpus = as_corpus(corpus)
    if model is None:
        seed_everything(seed, verbose=False)
        model = GeneCompass(
            vocab=corpus.vocab, seq_len=corpus.seq_len, priors=priors, preset=preset, **model_kwargs
        )
    elif priors is not None or model_kwargs:
        raise ValueError(
            "`priors` and model options apply to a new model only; drop them when passing `model=`."
        )
    model.train(
        corpus,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        mask_prob=mask_prob,
        train_indices=train_indices,
        validation_indices=validation_indices,
        num_workers=num_workers,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        ckpt_dir=ckpt_dir,
        ckpt_every_n_steps=ckpt_every_n_steps,
        resume_from=resume_from,
        seed=seed,
        progress_bar=progress_bar,
    )
    return model
