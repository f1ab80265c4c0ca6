"""Train GEARS in one call and predict with any predictor."""

from __future__ import annotations

import math

import numpy as np

from .._constants import GEARS_PRED_LAYER, GEARS_UNS_KEY
from .._utils import check_overwrite, get_adata

#: the settings of ``train_gears(..., preset='anchored')``, the model we recommend (issue 11): model
#: arguments of :class:`~pertpy_gnn.gears.GEARS` and training arguments of its ``train``
RECOMMENDED_GEARS = {
    "model": {"anchor": "additive", "anchor_reg": 10.0, "gamma": 0.0},
    "train": {
        "lr_decay": 1.0,
        "selection": "last",
        # set batches (issue 13): as accurate as the paper's cell batches with this schedule, for
        # 0.5-0.75x the CPU per epoch (benchmarks/results/compare_batching.md)
        "batching": "sets",
        "sets_per_batch": 4,
        "cells_per_set": 8,
    },
}
#: presets of :func:`train_gears`
GEARS_PRESETS = {"paper": {"model": {}, "train": {}}, "anchored": RECOMMENDED_GEARS}


def train_gears(
    data,
    *,
    max_epochs: int = 20,
    batch_size: int = 32,
    hidden_dim: int = 64,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    strategy: str = "auto",
    uncertainty: bool = False,
    layer: str | None = None,
    key_added: str = GEARS_UNS_KEY,
    overwrite: bool = False,
    progress_bar: bool = True,
    modality: str | None = None,
    train_kwargs: dict | None = None,
    preset: str = "paper",
    **model_kwargs,
):
    """Set up, build and train :class:`pertpy_gnn.gears.GEARS`, and record the run in ``adata.uns``.

    Needs :func:`~pertpy_gnn.pp.parse_perturbations`, :func:`~pertpy_gnn.pp.split_perturbations`,
    :func:`~pertpy_gnn.pp.rank_de_genes` (for validation), :func:`~pertpy_gnn.pp.go_graph` and
    :func:`~pertpy_gnn.pp.coexpression_graph` to have been run on ``data``.

    Parameters
    ----------
    data
        AnnData, or MuData with ``modality``.
    max_epochs
        Training epochs (paper: 20).
    batch_size
        Cells per minibatch (paper: 32).
    hidden_dim
        Embedding size (paper: 64).
    seed
        Seed of weights, data order and control partners: a fixed seed gives identical results on CPU.
    accelerator, devices, strategy
        Passed to the Lightning Trainer (e.g. ``accelerator='gpu', devices=1``; data-parallel:
        ``strategy='ddp', devices=2``, see :meth:`~pertpy_gnn.gears.GEARS.train`).
    uncertainty
        Train the uncertainty head (predictions then carry ``uncertainty`` and ``uncertainty_z``).
    layer
        Expression layer; default the one recorded by ``parse_perturbations``.
    key_added
        Key of the run record in ``adata.uns``.
    overwrite
        Replace an existing record under ``key_added``.
    progress_bar
        Show the training progress bar.
    modality
        Modality of a MuData.
    train_kwargs
        Further arguments of :meth:`~pertpy_gnn.gears.GEARS.train` (``lr``, ``weight_decay``, ...),
        e.g. ``{'precision': 'bf16-mixed'}`` for bf16 mixed-precision training (as accurate as float32
        with the anchored preset, faster only on larger screens: see ``GEARS.train``).
    preset
        ``'paper'`` (default): the paper's GEARS and schedule. ``'anchored'`` (recommended):
        baseline-anchored GEARS (:data:`RECOMMENDED_GEARS`): the network predicts a residual over
        the additive prediction (sets whose genes were all seen as training singles) or the
        training mean change (other sets), penalized toward zero; squared-error loss, constant
        learning rate, last epoch kept, set batches (``batching='sets'``: 4 perturbation sets x
        up to 8 cells a step, the network run once per set; the paper's cell batches with
        ``train_kwargs={'batching': 'cells'}``). On three screens over 5 seeds it beats the paper's GEARS on
        the mean over subgroups of normalized top-20-DE MSE and Pearson delta everywhere, and every
        baseline on both on two of them; it still trails the additive baseline on doubles of seen
        singles (``benchmarks/results/compare_accuracy_screens.md``, ``docs/methods.md``).
        ``model_kwargs`` and ``train_kwargs`` override the preset's values.
    **model_kwargs
        Further arguments of :class:`~pertpy_gnn.gears.GEARS` (``gnn``, ``direction``, ...), e.g.
        ``gene_embeddings=`` (an ``n_vars x D`` matrix such as GeneCompass's, replacing the
        co-expression gene embedding; the co-expression graph is then not needed).

    Returns
    -------
    The trained model. Sets ``adata.uns['pg_gears']`` (h5ad-writable), a dict with

    ``params``
        The model and training arguments.
    ``split``
        Cells and perturbations used for training and validation, and the train/val perturbations
        left out because a gene of theirs is not in the GO graph.
    ``history``
        DataFrame, one row per epoch: ``train_loss``, ``val_top20_de_mse``, ``lr``.
    ``best_epoch``, ``best_val_top20_de_mse``
        The selected epoch (lowest validation top-20-DE MSE) and its score.
    ``seen_genes``
        Genes seen perturbed in training.
    """
    from ..gears import GEARS

    if preset not in GEARS_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {list(GEARS_PRESETS)}.")
    adata = get_adata(data, modality)
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    GEARS.setup_anndata(adata, layer=layer)
    model_kwargs = {**GEARS_PRESETS[preset]["model"], **model_kwargs}
    model = GEARS(adata, hidden_dim=hidden_dim, uncertainty=uncertainty, seed=seed, **model_kwargs)
    train_kwargs = {**GEARS_PRESETS[preset]["train"], **(train_kwargs or {})}
    model.train(
        max_epochs=max_epochs,
        batch_size=batch_size,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        progress_bar=progress_bar,
        **train_kwargs,
    )
    params = {
        k: v
        for k, v in {**model.init_params_["non_kwargs"], **train_kwargs}.items()
        if isinstance(v, str | int | float | bool)
    }
    params.update(
        max_epochs=max_epochs, batch_size=batch_size, layer="X" if layer is None else layer, preset=preset
    )
    for graph in ("go_graph", "coexpression_graph"):
        if (
            model.init_params_["non_kwargs"].get(graph) is None
        ):  # e.g. no co-expression graph with gene_embeddings
            params[graph] = "not used"
            continue
        given = model_kwargs.get(graph)
        params[graph] = (
            given
            if isinstance(given, str)
            else "given"
            if given is not None
            else GEARS.__init__.__kwdefaults__[graph]
        )
    if not model.module.use_go_graph:
        params["go_graph"] = "not used"
    best = model.best_val
    adata.uns[key_added] = {
        "params": params,
        "split": dict(model.train_summary_),
        "history": model.history_.copy(),
        "best_epoch": int(model.best_epoch_),
        "best_val_top20_de_mse": float(best) if not math.isnan(best) else float("nan"),
        "seen_genes": np.asarray(sorted(model.seen_genes), dtype=str),
    }
    return model


def predict(model, perturbations, *, adata=None, cells=None, layer_added: str | None = None, **kwargs):
    """Predict with any predictor (GEARS or a baseline).

    Parameters
    ----------
    model
        A predictor: ``.predict(perturbations, *, n_control=300, seed=0, ...)``.
    perturbations
        A set (``"A"``, ``"A+B"``, a gene tuple) or a list of sets.
    adata, cells, layer_added
        Give any of them to predict single cells instead (models with ``predict_cells``, e.g.
        GEARS): each selected cell of ``adata`` (default the training AnnData; cells default to its
        control cells) gets its own expression plus the predicted change of its set, written to
        ``adata.layers[layer_added]`` (default ``'pg_gears_prediction'``).
    **kwargs
        Passed to ``model.predict`` (``n_control``, ``seed``, ``skip_unknown``, ...) or
        ``model.predict_cells`` (``overwrite``, ...).

    Returns
    -------
    The prediction AnnData (one row per set: ``X`` predicted mean, ``layers['delta']``, ``obs``
    ``perturbation``, ``n_genes``, ``n_unseen``, ``seen`` ...), or ``None`` when single cells were
    predicted into ``adata.layers[layer_added]``.
    """
    if adata is None and cells is None and layer_added is None:
        return model.predict(perturbations, **kwargs)
    if not hasattr(model, "predict_cells"):
        raise TypeError(
            f"{getattr(model, 'name', type(model).__name__)} does not predict single cells; drop adata/cells/layer_added."
        )
    model.predict_cells(
        perturbations, adata=adata, cells=cells, layer_added=layer_added or GEARS_PRED_LAYER, **kwargs
    )
    return None
