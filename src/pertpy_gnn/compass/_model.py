"""GeneCompass model (scvi-tools BaseModelClass) trained on a tokenized corpus."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from lightning.pytorch import seed_everything
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner

from .._utils import logger
from ..pp._compass_priors import PRIOR_NAMES, CompassPrior
from ..pp._compass_vocab import PAD_ID, CompassVocab
from ._corpus import CompassCorpus, make_dataloader
from ._module import IDS, LABEL_IDS, LABEL_VALUES, VALUES, CompassModule, mask_tokens, resolve_config
from ._module import cell_embedding as pool_cells
from ._training import (
    CKPT_KEY,
    CompassTrainingPlan,
    PeriodicCheckpoint,
    PretrainDataModule,
    ReleaseFreedMemory,
    check_resume,
)


def _registry() -> dict:
    """The minimal scvi-tools registry of a model that trains on a corpus, not an AnnData."""
    return {
        "scvi_version": scvi.__version__,
        "model_name": "GeneCompass",
        "setup_method_name": "setup_corpus",
        "setup_args": {},
        "field_registries": {},
    }


def as_corpus(corpus: CompassCorpus | str | Path) -> CompassCorpus:
    """Open a corpus folder (or pass a :class:`CompassCorpus` through)."""
    return corpus if isinstance(corpus, CompassCorpus) else CompassCorpus(corpus)


def default_precision(accelerator: str) -> str:
    """``bf16-mixed`` (or ``16-mixed``) on a CUDA GPU, ``32-true`` otherwise."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class GeneCompass(BaseModelClass):
    """GeneCompass (Yang et al. 2024): knowledge-informed, cross-species masked-token transformer.

    Parameters
    ----------
    adata
        Must be ``None``: the model trains on a tokenized corpus (see
        :func:`pertpy_gnn.pp.compass_tokenize`), not on an AnnData.
    registry
        Used when loading a saved model.
    vocab
        The :class:`CompassVocab` (or its ``to_dict()``) of the corpus.
    seq_len
        Maximum sequence length (``corpus.seq_len``).
    priors
        ``{name: CompassPrior}`` from :func:`pertpy_gnn.pp.compass_priors` (any subset of
        ``promoter``, ``grn``, ``family``, ``coexpression``; the others are learned embeddings).
    preset
        ``'cpu'`` (2 layers x 128, 4 heads), ``'small'`` (6 x 256, 4 heads) or ``'base'`` (12 x 768,
        12 heads).
    **model_kwargs
        Overrides of the preset (``n_layers``, ``d_model``, ``n_heads``, ``ff_mult``, ``dropout``,
        ``init_std``, ``layer_norm_eps``, ``beta``).
    """

    _module_cls = CompassModule
    _training_plan_cls = CompassTrainingPlan
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata=None,
        registry: dict | None = None,
        *,
        vocab: CompassVocab | dict,
        seq_len: int,
        priors: Mapping[str, CompassPrior | dict] | None = None,
        preset: str = "cpu",
        tokenization: Mapping | None = None,
        **model_kwargs,
    ):
        if adata is not None:
            raise ValueError(
                "GeneCompass trains on a tokenized corpus, not an AnnData: tokenize with pg.pp.compass_tokenize() "
                "and pass the corpus to pg.tl.pretrain_compass()."
            )
        super().__init__(None, registry=registry or _registry())
        vocab = vocab if isinstance(vocab, CompassVocab) else CompassVocab.from_dict(vocab)
        meta, mats = {}, {}
        for name, p in dict(priors or {}).items():
            if name not in PRIOR_NAMES:
                raise ValueError(f"Unknown prior {name!r}; names are {PRIOR_NAMES}.")
            if isinstance(p, CompassPrior):
                meta[name] = {"dim": p.dim, "source": p.source, "n_covered": int(p.covered.sum())}
                mats[name] = torch.from_numpy(np.asarray(p.matrix, dtype=np.float32))
            else:  # metadata only (loading): zeros, filled by the saved state dict
                meta[name] = dict(p)
                mats[name] = torch.zeros(len(vocab), int(p["dim"]))
        self.config_ = resolve_config(preset, **model_kwargs)
        self.vocab = vocab
        #: how new data is tokenized for this model (options of :func:`~pertpy_gnn.pp.compass_tokenize`:
        #: ``input_kind``, ``log_base``, ``missing_median``, ``value_dtype``); empty: our defaults
        self.tokenization_ = dict(tokenization or {})
        self.priors_ = meta
        #: corpus medians (token name -> median of the non-zero normalized values) of the corpus the model
        #: was last trained on; the downstream tools tokenize new data with them
        self.gene_medians_: pd.Series | None = None
        self.seq_len = int(seq_len)
        self.module = CompassModule(
            len(vocab),
            self.seq_len,
            priors=mats,
            species_tokens=vocab.species_ids,
            n_special=vocab.n_special,
            **self.config_,
        )
        self.module.bert.embeddings.homologous_index.copy_(torch.from_numpy(vocab.homologous_index()))
        n_par = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"GeneCompass ({preset if not model_kwargs else 'custom'}: {self.config_['n_layers']} layers x {self.config_['d_model']}, "
            f"{self.config_['n_heads']} heads, {n_par / 1e6:.1f}M parameters; vocab {len(vocab)}, "
            f"priors {sorted(meta) or 'none'} (others learned))"
        )
        self.init_params_ = self._get_init_params(locals())
        # keep saved init params light: the prior matrices live in the state dict
        self.init_params_["non_kwargs"].update({"vocab": vocab.to_dict(), "priors": meta})

    @classmethod
    def setup_anndata(cls, adata, **kwargs):
        """Not used: GeneCompass reads a tokenized corpus (:func:`pertpy_gnn.pp.compass_tokenize`)."""
        raise NotImplementedError(
            "GeneCompass trains on a tokenized corpus: use pg.pp.compass_tokenize(), not setup_anndata."
        )

    def get_var_names(self, legacy_mudata_format: bool = False) -> np.ndarray:
        """Token names of the vocabulary."""
        return self.vocab.tokens.astype(str)

    def _checkpoint_payload(self) -> dict:
        med = self.gene_medians_
        # plain lists: Lightning reads checkpoints back with ``weights_only=True`` when resuming
        medians = (
            None
            if med is None
            else {"tokens": med.index.astype(str).tolist(), "median": med.astype(float).tolist()}
        )
        return {"init": self.init_params_, "gene_medians": medians}

    # ----------------------------------------------------------------------------- training
    def train(
        self,
        corpus: CompassCorpus | str | Path,
        *,
        max_epochs: int = 1,
        batch_size: int = 8,
        lr: float = 5e-5,
        warmup: int | float = 0.1,
        weight_decay: float = 0.01,
        mask_prob: float = 0.15,
        train_indices: np.ndarray | None = None,
        validation_indices: np.ndarray | None = None,
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
        **trainer_kwargs,
    ):
        """Pre-train by masked gene-id and value prediction (see :func:`pertpy_gnn.tl.pretrain_compass`)."""
        corpus = as_corpus(corpus)
        if corpus.vocab != self.vocab:
            raise ValueError(
                "The corpus was tokenized with another vocabulary than the model's; tokenize it with the model's vocab."
            )
        if corpus.seq_len > self.seq_len:
            raise ValueError(
                f"The corpus has {corpus.seq_len} tokens per cell, the model at most {self.seq_len}."
            )
        self.gene_medians_ = corpus.gene_medians
        ckpt_path, resume = None, None
        if resume_from is not None:
            ckpt_path = (
                Path(ckpt_dir) / "last.ckpt" if str(resume_from) == "last" and ckpt_dir else Path(resume_from)
            )
            if not ckpt_path.is_file():
                raise FileNotFoundError(
                    f"Checkpoint {ckpt_path} not found (resume_from='last' needs ckpt_dir)."
                )
            resume = check_resume(
                ckpt_path,
                batch_size=batch_size,
                n_cells=len(corpus) if train_indices is None else len(train_indices),
                seed=seed,
                distributed="ddp" in str(strategy) or (isinstance(devices, int) and devices > 1),
            )
        seed_everything(seed, workers=True, verbose=False)
        dm = PretrainDataModule(
            corpus,
            train_indices=train_indices,
            validation_indices=validation_indices,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            resume=resume,
        )
        plan = CompassTrainingPlan(
            self.module,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            mask_prob=mask_prob,
            mask_seed=seed,
            extra_checkpoint=self._checkpoint_payload(),
        )
        from .._progress import progress

        show_bar, progress_callbacks = progress(progress_bar, max_epochs)
        callbacks = [*trainer_kwargs.pop("callbacks", []), *progress_callbacks, ReleaseFreedMemory()]
        if ckpt_dir is not None:
            callbacks.append(PeriodicCheckpoint(ckpt_dir, every_n_steps=ckpt_every_n_steps))
        if precision is None:
            precision = default_precision(accelerator)
        if "ddp" in str(strategy) and "log_save_dir" not in trainer_kwargs:
            # scvi's logger keeps the history on disk under DDP; keep it out of the working directory
            import tempfile

            trainer_kwargs["log_save_dir"] = (
                str(ckpt_dir) if ckpt_dir is not None else tempfile.mkdtemp(prefix="compass_log_")
            )
        has_val = validation_indices is not None and len(validation_indices) > 0
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=dm,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            callbacks=callbacks,
            enable_checkpointing=False,
            simple_progress_bar=False,
            enable_progress_bar=show_bar,
            check_val_every_n_epoch=1 if has_val else None,
            ckpt_path=None if ckpt_path is None else str(ckpt_path),
            **trainer_kwargs,
        )
        return runner()

    # --------------------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(
        self,
        corpus: CompassCorpus | str | Path,
        indices: np.ndarray | None = None,
        *,
        batch_size: int = 32,
        mask_prob: float = 0.15,
        seed: int = 0,
        control: str | None = None,
    ) -> dict[str, float]:
        """Masked-token metrics on ``indices`` (e.g. held-out cells) with a fixed random mask.

        Parameters
        ----------
        corpus
            Tokenized corpus.
        indices
            Cells to evaluate (default: all).
        batch_size
            Cells per batch.
        mask_prob
            Fraction of gene tokens masked.
        seed
            Seed of the masks (same seed = same masked positions across models).
        control
            ``'shuffled'``: the gene tokens of each cell (ids, values, and with them the masked
            targets) are put in a random order, so the input no longer ranks the genes;
            ``'context_swap'``: every unmasked context token is replaced by the token at the same rank
            position of a random other evaluated cell (drawn per position), so the context keeps the
            rank statistics of the data but no longer describes the cell. The masked targets are the
            same tokens as without control; the species token stays.

        Returns
        -------
        ``accuracy`` (top-1 masked gene id), ``accuracy_top10``, ``value_mse``, ``loss_id``
        (cross-entropy), ``n_masked``, ``n_cells``.
        """
        if control not in (None, "shuffled", "context_swap"):
            raise ValueError("control must be None, 'shuffled' or 'context_swap'.")
        corpus = as_corpus(corpus)
        idx = np.arange(len(corpus)) if indices is None else np.asarray(indices)
        module = self.module
        was_training = module.training
        module.eval()
        dev = next(module.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(seed)
        # separate random streams: the masks are the same with and without control
        gen_control = torch.Generator(device=dev).manual_seed(seed + 1)
        donor_rng = np.random.default_rng(seed + 1)
        correct = top10 = sq = ce = 0.0
        n = 0
        for batch in make_dataloader(corpus, idx, batch_size=batch_size, shuffle=False):
            ids, values = batch["ids"].to(dev), batch["values"].to(dev)
            t = mask_tokens(
                ids,
                values,
                vocab_size=module.vocab_size,
                mask_prob=mask_prob,
                generator=gen,
                n_special=module.n_special,
            )
            if control == "shuffled":
                keys = torch.rand(ids.shape, device=dev, generator=gen_control)
                keys[:, 0] = -1.0  # species token first
                keys[ids == PAD_ID] = 2.0  # padding last
                order = torch.argsort(keys, dim=1)
                t = {k: v.gather(1, order) for k, v in t.items()}
            elif control == "context_swap":
                d_ids, d_values = corpus.read(donor_rng.choice(idx, size=ids.shape[0]))
                d_ids = torch.from_numpy(d_ids[:, : ids.shape[1]].astype(np.int64)).to(dev)
                d_values = torch.from_numpy(d_values[:, : ids.shape[1]].astype(np.float32)).to(dev)
                perm = torch.argsort(torch.rand(ids.shape, device=dev, generator=gen_control), dim=0)
                context = t[LABEL_IDS] == -100
                context[:, 0] = False
                t[IDS] = torch.where(context, d_ids.gather(0, perm), t[IDS])
                t[VALUES] = torch.where(context, d_values.gather(0, perm), t[VALUES])
            sel = t[LABEL_IDS] != -100
            if not bool(sel.any()):
                continue
            gen_out = module.generative(module.encode(t[IDS], t[VALUES]), sel)
            labels, target = t[LABEL_IDS][sel], t[LABEL_VALUES][sel]
            logits = gen_out["id_logits"].float()
            correct += float((logits.argmax(-1) == labels).sum())
            top10 += float(
                (logits.topk(min(10, logits.shape[1]), dim=-1).indices == labels[:, None]).any(-1).sum()
            )
            ce += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            sq += float(((gen_out["value_pred"].float() - target) ** 2).sum())
            n += int(labels.numel())
        module.train(was_training)
        if n == 0:
            raise ValueError("No token was masked: evaluate more cells or raise mask_prob.")
        return {
            "accuracy": correct / n,
            "accuracy_top10": top10 / n,
            "value_mse": sq / n,
            "loss_id": ce / n,
            "n_masked": n,
            "n_cells": int(idx.size),
        }

    @torch.inference_mode()
    def get_latent_representation(
        self,
        corpus: CompassCorpus | str | Path,
        indices: np.ndarray | None = None,
        *,
        batch_size: int = 32,
        cell_embedding: str = "species",
    ) -> np.ndarray:
        """Cell embeddings ``(n_cells, d_model)`` of a tokenized corpus.

        ``cell_embedding='species'``: the species token's last-layer state (paper); ``'mean'``: the
        mean state of the gene tokens (see :func:`~pertpy_gnn.compass.cell_embedding`).
        """
        corpus = as_corpus(corpus)
        idx = np.arange(len(corpus)) if indices is None else np.asarray(indices)
        module = self.module
        was_training = module.training
        module.eval()
        dev = next(module.parameters()).device
        out = [
            pool_cells(module.encode(b["ids"].to(dev), b["values"].to(dev)), b["ids"].to(dev), cell_embedding)
            .float()
            .cpu()
            .numpy()
            for b in make_dataloader(corpus, idx, batch_size=batch_size, shuffle=False)
        ]
        module.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.config_["d_model"]), np.float32)

    # ---------------------------------------------------------------------------- checkpoints
    def save(self, dir_path, prefix: str | None = None, overwrite: bool = False, **kwargs) -> None:
        """Save the model to ``dir_path/[prefix]model.pt`` safely.

        Tensors and plain containers with a versioned header, read back by :meth:`load` with
        ``torch.load(weights_only=True)``.

        Returns
        -------
        ``None``.
        """
        from .._checkpoint import save_model

        if kwargs.pop("save_anndata", False):
            raise ValueError("GeneCompass trains on a corpus, not an AnnData: there is no AnnData to save.")
        save_model(self, dir_path, kind="GeneCompass", prefix=prefix, overwrite=overwrite)

    @classmethod
    def load(
        cls,
        dir_path,
        adata=None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        allow_pickle: bool = False,
    ) -> GeneCompass:
        """Load a model saved by :meth:`save`, safely and with its format checked.

        As :meth:`pertpy_gnn.gears.GEARS.load`; ``adata`` is not used.

        Returns
        -------
        The model.
        """
        from .._checkpoint import load_model

        return load_model(
            cls,
            dir_path,
            kind="GeneCompass",
            uses_adata=False,
            accelerator=accelerator,
            device=device,
            prefix=prefix,
            allow_pickle=allow_pickle,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, map_location: str = "cpu") -> GeneCompass:
        """Rebuild a model from a Lightning checkpoint written during :meth:`train` (``ckpt_dir``).

        Read with ``torch.load(weights_only=True)`` (a file cannot run code); a truncated or corrupt
        file raises :class:`pertpy_gnn._checkpoint.CheckpointError` naming it.
        """
        from .._checkpoint import read_torch_file

        ckpt = read_torch_file(path, map_location=map_location, what="GeneCompass training checkpoint")
        if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt:
            raise ValueError(f"{path} is not a GeneCompass training checkpoint.")
        init = ckpt[CKPT_KEY]["init"]
        model = cls(
            None, **init["non_kwargs"], **{k: v for d in init["kwargs"].values() for k, v in d.items()}
        )
        state = {k[len("module.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("module.")}
        model.module.load_state_dict(state)
        med = ckpt[CKPT_KEY].get("gene_medians")
        if med is not None:
            model.gene_medians_ = pd.Series(
                med["median"], index=pd.Index(med["tokens"], name="token"), name="median"
            )
        model.module.eval()
        model.is_trained_ = True
        logger.info(
            "loaded GeneCompass from %s (epoch %s, step %s)", path, ckpt.get("epoch"), ckpt.get("global_step")
        )
        return model

    # ------------------------------------------------------------------------ published format
    @classmethod
    def load_official(
        cls,
        checkpoint_dir: str | Path,
        *,
        prior_knowledge_dir: str | Path | None = None,
        token_dictionary: str | Path | None = None,
        id_to_symbol: str | Path | None = None,
        gene_medians: str | Path | Sequence[str | Path] | None = None,
        map_location: str = "cpu",
    ) -> GeneCompass:
        """Load a checkpoint in the published GeneCompass format (e.g. the released GeneCompass_Base).

        Parameters
        ----------
        checkpoint_dir
            Folder holding ``config.json`` and ``pytorch_model.bin`` (read with
            ``torch.load(weights_only=True)``). The prior-knowledge matrices and the homolog index are
            stored in it, so the prior pickles are not needed.
        prior_knowledge_dir
            The published ``prior_knowledge/`` folder; the token dictionary
            (``human_mouse_tokens.pickle`` or ``h&m_token1000W.pickle``) and the id-to-symbol dictionary
            (``gene_list/Gene_id_name_dict_human_mouse.pickle``) are taken from it unless given below.
            Default: ``checkpoint_dir / 'prior_knowledge'`` if it exists (as :meth:`save_official` writes it).
        token_dictionary
            ``{ensembl_id: token_id}`` pickle (required, here or through ``prior_knowledge_dir``).
        id_to_symbol
            ``{ensembl_id: symbol}`` pickle, so that data with gene symbols maps (optional: without
            it only Ensembl ids map).
        gene_medians
            One or several ``{ensembl_id: median}`` pickles (e.g. ``human_gene_median_after_filter.pickle``
            and the mouse one) used to tokenize new data; genes without a median use 1, as published.
        map_location
            Device the weights are loaded to.

        Every pickle is read with a restricted unpickler that accepts only plain data; a file that is
        missing, truncated, corrupt, of another model, or holding anything else fails with an error
        naming it.

        Returns
        -------
        The :class:`GeneCompass` (``eval`` mode), tokenizing new data as the published preprocessing does
        (raw counts divided by the gene medians, ``log2(1 + x)``, float32 values).
        """
        from ._official import load_official

        return load_official(
            cls,
            checkpoint_dir,
            prior_knowledge_dir=prior_knowledge_dir,
            token_dictionary=token_dictionary,
            id_to_symbol=id_to_symbol,
            gene_medians=gene_medians,
            map_location=map_location,
        )

    def save_official(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model in the published GeneCompass layout.

        Writes ``config.json`` and ``pytorch_model.bin`` (a flat state dict with the published keys,
        priors and homolog index included) and, under ``prior_knowledge/``, the token dictionary
        (``human_mouse_tokens.pickle``), the id-to-symbol dictionary
        (``gene_list/Gene_id_name_dict_human_mouse.pickle``), the homolog map
        (``homologous_hm_token.pickle``) and the gene medians (``gene_medians.pickle``) as pickles of
        plain dicts. :meth:`load_official` on ``path`` (with ``prior_knowledge_dir=path /
        'prior_knowledge'``) gives the same outputs. A model trained without some prior source
        stores its learned matrix there in place of the prior.

        Parameters
        ----------
        path
            Folder to write.
        overwrite
            Replace the files of an existing folder.

        Returns
        -------
        ``path``.
        """
        from ._official import save_official

        return save_official(self, path, overwrite=overwrite)
