"""Cell-type annotation by fine-tuning GeneCompass with a classification head on the cell embedding."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import COMPASS_ANNOT_KEY
from .._optim import fast_adam_kwargs
from .._utils import check_overwrite, get_adata, logger
from ._ds_core import (
    batches,
    cell_states,
    check_cell_embedding,
    check_model,
    select_cells,
    tokenize_kwargs,
    tokenized,
)


def _classifier_cls():
    import torch
    from torch import nn

    class CompassClassifier(nn.Module):
        """A fine-tuned GeneCompass encoder and a linear head on its cell embedding.

        ``forward(ids, values)`` returns class logits; ``classes_`` holds the class names. The cell
        embedding is standardized with the ``center`` / ``scale`` buffers before the head (identity
        when fine-tuning; the training cells' mean and SD for a linear probe).
        """

        def __init__(self, encoder, n_classes: int, classes, dropout: float, cell_embedding: str = "species"):
            super().__init__()
            self.cell_embedding = cell_embedding
            d = encoder.d_model
            self.encoder = encoder
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(d, n_classes)
            self.register_buffer("center", torch.zeros(d))
            self.register_buffer("scale", torch.ones(d))
            self.classes_ = np.asarray(classes)

        def logits(self, emb: torch.Tensor) -> torch.Tensor:
            """Class logits of cell embeddings."""
            return self.head(self.drop((emb - self.center) / self.scale))

        def embed(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            """Cell embeddings of token sequences."""
            return cell_states(self.encoder.encode(ids, values), ids, self.cell_embedding)

        def forward(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return self.logits(self.embed(ids, values))

    return CompassClassifier


def _split(adata: AnnData, batch_key, test_batches, train, test) -> tuple[np.ndarray, np.ndarray]:
    if test is not None:
        te = select_cells(adata, test, "test")
        tr = (
            select_cells(adata, train, "train")
            if train is not None
            else np.setdiff1d(np.arange(adata.n_obs), te)
        )
    elif batch_key is not None and test_batches is not None:
        if batch_key not in adata.obs:
            raise KeyError(
                f"obs column {batch_key!r} (batch_key) not found; available: {list(adata.obs.columns)}."
            )
        te = select_cells(adata, {batch_key: test_batches}, "test_batches")
        tr = (
            select_cells(adata, train, "train")
            if train is not None
            else np.setdiff1d(np.arange(adata.n_obs), te)
        )
    else:
        raise ValueError(
            "Say which cells to evaluate on: `batch_key=` and `test_batches=` (train on the other batches, as in "
            "the paper), or `test=` (and optionally `train=`) cell selections."
        )
    if np.intersect1d(tr, te).size:
        raise ValueError("Training and test cells overlap; choose disjoint `train` / `test` (or batches).")
    if tr.size == 0:
        raise ValueError("No training cells left.")
    return tr, te


def annotate_compass(
    adata: AnnData,
    model,
    *,
    labels_key: str,
    batch_key: str | None = None,
    test_batches=None,
    train=None,
    test=None,
    epochs: int = 10,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    freeze_encoder: bool = False,
    dropout: float = 0.1,
    cell_embedding: str = "species",
    seed: int = 0,
    species: str | None = None,
    input_kind: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    gene_ids: str | Path | pd.DataFrame | pd.Series | None = None,
    gene_medians=None,
    key_added: str = COMPASS_ANNOT_KEY,
    overwrite: bool = False,
    progress_bar: bool = True,
    modality: str | None = None,
):
    """Fine-tune GeneCompass for cell-type annotation; evaluate on held-out batches.

    A linear layer on the cell embedding (the species token's last-layer state, or the mean gene-token
    state with ``cell_embedding='mean'``) is trained with
    cross-entropy together with the whole encoder (paper: full fine-tuning), or alone with
    ``freeze_encoder=True``. The pre-trained model is not modified: a copy is fine-tuned. AdamW with
    learning rate ``lr`` for the encoder and ``head_lr`` for the head.

    Parameters
    ----------
    adata
        AnnData (or MuData with ``modality``) with cell-type labels.
    model
        Pre-trained :class:`~pertpy_gnn.compass.GeneCompass`.
    labels_key
        ``obs`` column with the cell types.
    batch_key, test_batches
        Evaluate on the cells whose ``obs[batch_key]`` is in ``test_batches`` and train on the others
        (the paper selects samples from different batches for training and testing).
    train, test
        Alternatively, cell selections (mask, positions, names, ``(column, values)``).
    epochs
        Passes over the training cells.
    lr, head_lr, weight_decay
        AdamW settings.
    batch_size
        Cells per step.
    freeze_encoder
        Train the head only: a linear probe of the frozen cell embedding (computed once per cell,
        standardized with the training cells' mean and SD).
    dropout
        Dropout before the head.
    cell_embedding
        Cell embedding the head reads: ``'species'`` (paper) or ``'mean'`` (see
        :func:`pertpy_gnn.tl.embed_compass`).
    seed
        Seed of the head initialization and the data order.
    species, input_kind, layer, gene_symbols, gene_ids, gene_medians
        Tokenization (see :func:`pertpy_gnn.tl.embed_compass`).
    key_added
        ``obs`` prefix and ``uns`` key.
    overwrite
        Replace existing results.
    progress_bar
        Show progress (a bar in a terminal or notebook, else log lines; ``False``: none).
    modality
        MuData modality.

    Returns
    -------
    The fine-tuned ``CompassClassifier`` (a torch module: ``forward(ids, values) -> logits``,
    ``classes_``). Sets

    - ``adata.obs[key_added]``: predicted cell type of every cell (categorical);
    - ``adata.obs[f'{key_added}_confidence']``: the predicted class's softmax probability;
    - ``adata.obs[f'{key_added}_split']``: ``train`` / ``test`` / ``unused``;
    - ``adata.uns[key_added]``: ``accuracy`` and ``macro_f1`` on the test cells,
      ``train_accuracy``, ``per_class`` (DataFrame: precision, recall, f1, support),
      ``confusion`` (DataFrame, true x predicted), ``history`` (DataFrame: epoch, loss), ``params``.
    """
    import torch
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    adata = get_adata(adata, modality)
    check_cell_embedding(cell_embedding)
    for c in (key_added, f"{key_added}_confidence", f"{key_added}_split"):
        check_overwrite(adata.obs, c, overwrite, "adata.obs")
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    if labels_key not in adata.obs:
        raise KeyError(
            f"obs column {labels_key!r} (labels_key) not found; available: {list(adata.obs.columns)}."
        )
    module, _ = check_model(model)
    tr, te = _split(adata, batch_key, test_batches, train, test)
    labels = adata.obs[labels_key].astype(str).to_numpy()
    classes = np.unique(labels[tr])
    unseen = sorted(set(labels[te]) - set(classes))
    if unseen:
        logger.warning("Test cells have labels never seen in training (always predicted wrong): %s", unseen)
    y = pd.Index(classes).get_indexer(labels)
    tok = tokenize_kwargs(
        species=species,
        input_kind=input_kind,
        layer=layer,
        gene_symbols=gene_symbols,
        gene_ids=gene_ids,
        gene_medians=gene_medians,
    )
    with tokenized(adata, model, max_len=module.seq_len - 1, tok=tok, progress_bar=progress_bar) as corpus:
        ids_np, vals_np = corpus.read(np.arange(adata.n_obs))
    ids, vals = torch.from_numpy(ids_np.astype(np.int64)), torch.from_numpy(vals_np.astype(np.float32))
    dev = next(module.parameters()).device

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = _classifier_cls()(copy.deepcopy(module), len(classes), classes, dropout, cell_embedding).to(dev)
    for p in clf.encoder.parameters():
        p.requires_grad_(not freeze_encoder)
    groups = [{"params": list(clf.head.parameters()), "lr": head_lr}]
    if not freeze_encoder:
        groups.append({"params": list(clf.encoder.parameters()), "lr": lr})
    opt = torch.optim.AdamW(
        groups, weight_decay=weight_decay, **fast_adam_kwargs(p for g in groups for p in g["params"])
    )
    gen = torch.Generator().manual_seed(seed)
    y_t = torch.from_numpy(y)
    feats = None
    if freeze_encoder:  # the cell embeddings do not change: encode every cell once, standardize them
        clf.encoder.eval()
        with torch.no_grad():
            feats = torch.cat(
                [
                    clf.embed(ids[sl].to(dev), vals[sl].to(dev))
                    for sl in batches(adata.n_obs, max(batch_size, 32), progress_bar=False, desc="embed")
                ]
            )
        train_feats = feats[torch.from_numpy(tr).to(dev)]
        clf.center.copy_(train_feats.mean(0))
        clf.scale.copy_(train_feats.std(0).clamp(min=1e-6))

    def logits_of(b):
        return clf.logits(feats[b.to(dev)]) if feats is not None else clf(ids[b].to(dev), vals[b].to(dev))

    history = []
    from .._progress import track

    for epoch in track(range(epochs), epochs, "fine-tune GeneCompass", enabled=progress_bar, unit="epochs"):
        clf.train()
        perm = torch.from_numpy(tr)[torch.randperm(tr.size, generator=gen)]
        total = 0.0
        for start in range(0, perm.numel(), batch_size):
            b = perm[start : start + batch_size]
            logits = logits_of(b)
            loss = torch.nn.functional.cross_entropy(logits, y_t[b].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * b.numel()
        history.append({"epoch": epoch, "loss": total / tr.size})
    clf.eval()
    probs = []
    with torch.inference_mode():
        for sl in batches(adata.n_obs, max(batch_size, 32), progress_bar=False, desc="predict"):
            probs.append(torch.softmax(logits_of(torch.arange(sl.start, sl.stop)), -1).cpu().numpy())
    prob = np.concatenate(probs)
    pred = classes[prob.argmax(1)]
    split = np.full(adata.n_obs, "unused", dtype=object)
    split[tr], split[te] = "train", "test"
    all_labels = np.unique(np.concatenate([labels[te], pred[te]]))
    p, r, f, s = precision_recall_fscore_support(labels[te], pred[te], labels=all_labels, zero_division=0)
    adata.obs[key_added] = pd.Categorical(pred, categories=classes)
    adata.obs[f"{key_added}_confidence"] = prob.max(1).astype(np.float32)
    adata.obs[f"{key_added}_split"] = pd.Categorical(split, categories=["train", "test", "unused"])
    result = {
        "accuracy": float(accuracy_score(labels[te], pred[te])),
        "macro_f1": float(f1_score(labels[te], pred[te], average="macro", zero_division=0)),
        "train_accuracy": float(accuracy_score(labels[tr], pred[tr])),
        "per_class": pd.DataFrame(
            {"precision": p, "recall": r, "f1": f, "support": s}, index=pd.Index(all_labels.astype(str))
        ),
        "confusion": pd.DataFrame(
            confusion_matrix(labels[te], pred[te], labels=all_labels),
            index=all_labels.astype(str),
            columns=all_labels.astype(str),
        ),
        "history": pd.DataFrame(history),
        "params": {
            "labels_key": labels_key,
            "batch_key": "" if batch_key is None else batch_key,
            "test_batches": np.asarray(
                [] if test_batches is None else np.atleast_1d(test_batches), dtype=str
            ),
            "epochs": int(epochs),
            "lr": float(lr),
            "head_lr": float(head_lr),
            "batch_size": int(batch_size),
            "freeze_encoder": bool(freeze_encoder),
            "cell_embedding": cell_embedding,
            "n_train": int(tr.size),
            "n_test": int(te.size),
        },
    }
    adata.uns[key_added] = result
    logger.info(
        "GeneCompass annotation: test accuracy %.3f, macro-F1 %.3f (%d test cells)",
        result["accuracy"],
        result["macro_f1"],
        te.size,
    )
    return clf
