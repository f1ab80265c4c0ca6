"""Masked-token pre-training plan (scvi-tools TrainingPlan) and the checkpoint callback."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from lightning.pytorch import Callback
from scvi.train import TrainingPlan
from torch.utils.data import DataLoader

from .._malloc import _glibc
from .._optim import fast_adam_kwargs
from ._corpus import CompassDataModule, EpochRandomSampler, make_dataloader
from ._module import mask_tokens

#: key under which a Lightning checkpoint carries what rebuilds the model
CKPT_KEY = "pertpy_gnn_compass"
#: key of the RNG state in a checkpoint (exact resume)
RNG_KEY = "pertpy_gnn_rng"
#: training steps between two returns of freed heap memory to the system (:class:`ReleaseFreedMemory`)
RELEASE_EVERY_N_STEPS = 10


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class CompassTrainingPlan(TrainingPlan):
    """Masked language modelling of gene ids and values.

    Each batch is masked on the fly (:func:`~pertpy_gnn.compass._module.mask_tokens`); validation
    batches use a fixed mask per batch (seeded generator) so validation curves are comparable.
    AdamW (no weight decay on biases and layer norms) with linear warm-up and linear decay,
    stepped every optimizer step.

    Parameters
    ----------
    module
        The :class:`~pertpy_gnn.compass.CompassModule`.
    lr
        Peak learning rate (paper: 5e-5).
    weight_decay
        AdamW weight decay.
    warmup
        Warm-up steps (int) or fraction of all steps (float < 1).
    mask_prob
        Fraction of gene tokens masked.
    mask_seed
        Seed of the validation masks.
    extra_checkpoint
        Stored in every checkpoint under ``CKPT_KEY`` (what rebuilds the model).
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup: int | float = 0.1,
        mask_prob: float = 0.15,
        mask_seed: int = 0,
        extra_checkpoint: dict | None = None,
    ):
        super().__init__(
            module, optimizer="AdamW", lr=lr, weight_decay=weight_decay, eps=1e-8, on_step=True, on_epoch=True
        )
        self.warmup, self.mask_prob, self.mask_seed = warmup, mask_prob, mask_seed
        self.extra_checkpoint = extra_checkpoint or {}

    def _step(self, batch, generator=None):
        tensors = mask_tokens(
            batch["ids"],
            batch["values"],
            vocab_size=self.module.vocab_size,
            n_special=self.module.n_special,
            mask_prob=self.mask_prob,
            generator=generator,
        )
        _, _, out = self.module(tensors)
        return out

    def _log(self, out, mode: str, on_step: bool) -> None:
        sync = self.use_sync_dist
        bs = out.n_obs_minibatch
        self.log(
            f"loss_{mode}",
            out.loss.detach(),
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            batch_size=bs,
            sync_dist=sync,
        )
        for key in ("loss_id", "loss_value", "accuracy"):
            self.log(
                f"{key}_{mode}",
                out.extra_metrics[key],
                on_step=on_step,
                on_epoch=True,
                batch_size=bs,
                sync_dist=sync,
            )

    def training_step(self, batch, batch_idx):
        """Mask, predict, log; returns the loss.

        The mask of a batch depends only on ``(mask_seed, epoch, batch, rank)``, so a resumed run masks
        exactly as an uninterrupted one.
        """
        seed = (
            (self.mask_seed * 1_000_003 + self.current_epoch) * 1_000_033 + batch_idx
        ) * 64 + self.global_rank
        gen = torch.Generator(device=batch["ids"].device).manual_seed(seed % (2**63 - 1) + 1)
        out = self._step(batch, generator=gen)
        self._log(out, "train", on_step=True)
        self.log(
            "lr",
            self.trainer.optimizers[0].param_groups[0]["lr"],
            on_step=True,
            on_epoch=False,
            batch_size=out.n_obs_minibatch,
        )
        return out.loss

    def validation_step(self, batch, batch_idx):
        """Same loss on validation cells with a fixed mask per batch."""
        gen = torch.Generator(device=batch["ids"].device).manual_seed(self.mask_seed + batch_idx)
        self._log(self._step(batch, generator=gen), "validation", on_step=False)

    def configure_optimizers(self):
        """AdamW with linear warm-up and decay (per step)."""
        decay, no_decay = [], []
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            eps=self.eps,
            **fast_adam_kwargs(decay + no_decay, getattr(self._trainer, "precision", None)),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = (
            int(self.warmup * total)
            if isinstance(self.warmup, float) and self.warmup < 1
            else int(self.warmup)
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear(s, warm, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what rebuilds the model (vocabulary, configuration, prior metadata) and the RNG state.

        The global torch RNG (dropout) is stored so that a resumed run continues exactly as an
        uninterrupted one would.
        """
        checkpoint[CKPT_KEY] = self.extra_checkpoint
        checkpoint[RNG_KEY] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint[RNG_KEY]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keep the RNG state stored by :meth:`on_save_checkpoint`; it is restored before the first batch.

        Restoring it right before the first training batch (not while Lightning restores the run, which
        then still builds data loaders and optimizers) makes the next batch see the RNG as it was after
        the checkpointed batch, also for a checkpoint written part-way through an epoch.
        """
        self._rng_resume = checkpoint.get(RNG_KEY)

    def on_train_batch_start(self, batch, batch_idx):
        """Restore the RNG state of a resumed checkpoint (see :meth:`on_load_checkpoint`)."""
        state, self._rng_resume = getattr(self, "_rng_resume", None), None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class PeriodicCheckpoint(Callback):
    """Write ``last.ckpt`` (full Lightning state: weights, optimizer, scheduler, loop) to ``dirpath``.

    Written at the end of every training epoch and, if ``every_n_steps`` is set, every that many
    optimizer steps. Every rank calls ``trainer.save_checkpoint``; Lightning writes on rank 0 only.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps

    @property
    def last(self) -> Path:
        """Path of the latest checkpoint."""
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step and trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.last)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.last)


def _malloc_trim():
    """The C library's ``malloc_trim`` (glibc; None on others: macOS, Windows, musl)."""
    libc = _glibc()
    return None if libc is None else libc.malloc_trim


class ReleaseFreedMemory(Callback):
    """Return the heap memory freed by training steps to the system every ``every_n_steps`` steps.

    ``every_n_steps`` defaults to ``RELEASE_EVERY_N_STEPS``; 0 turns it off.

    The tensors of a step differ in size from step to step (the trimmed batch width and the number of
    masked tokens vary), and glibc keeps the memory they free in its heap, fragmented, instead of
    returning it: the resident memory of a run creeps up by megabytes per step (about 120 MB per
    100,000 cells for a tiny model at batch 256 in ``benchmarks/compass_corpus_scale.py``).
    ``malloc_trim(0)`` hands those free pages back; its cost, mostly the next step faulting pages in
    again, was within the noise of that benchmark every 10 steps. Nothing is done where the C library
    has no ``malloc_trim``.
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = int(RELEASE_EVERY_N_STEPS if every_n_steps is None else every_n_steps)
        self._trim = _malloc_trim()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._trim is not None and self.every_n_steps > 0 and (batch_idx + 1) % self.every_n_steps == 0:
            self._trim(0)


# --------------------------------------------------------------------------- mid-epoch resume
#: format tag of the train loader's position stored in Lightning checkpoints
LOADER_STATE = "pertpy_gnn.compass_loader/1"


class ResumableSampler(EpochRandomSampler):
    """:class:`~pertpy_gnn.compass._corpus.EpochRandomSampler` that can start an epoch part-way.

    After :meth:`resume_at` ``(epoch, n)``, the next pass over epoch ``epoch`` skips the first ``n``
    cells of that epoch's order (those trained on before the checkpoint); other epochs are whole.
    """

    def __init__(self, data_source, seed: int = 0, **kwargs):
        super().__init__(data_source, seed, **kwargs)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, n_done: int) -> None:
        self._resume = (int(epoch), int(n_done))

    def __iter__(self):
        resume, self._resume = self._resume, None
        order = super().__iter__()
        if resume is not None and resume[0] == self.epoch:
            order = islice(order, resume[1], None)
        yield from order


class ResumableLoader(DataLoader):
    """Train DataLoader whose position within the epoch goes into Lightning checkpoints.

    Lightning stores ``state_dict()`` of a loader that has one and calls ``load_state_dict`` on resume,
    before the first batch. The position is the number of batches the trainer has processed in the
    current epoch (``position``, set by :class:`PretrainDataModule`), not the batches fetched (Lightning
    fetches one batch ahead).
    """

    position = None  # callable -> batches processed in the current epoch

    def state_dict(self) -> dict:
        s = self.sampler
        ok = isinstance(s, ResumableSampler) and self.position is not None
        state = {"format": LOADER_STATE, "resumable": bool(ok)}
        if ok:
            state.update(
                epoch=int(s.epoch),
                batches=int(self.position()),
                batch_size=int(self.batch_size),
                n_cells=len(s.data_source),
                seed=int(s.seed),
            )
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("resumable") and isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(state["epoch"])
            self.sampler.resume_at(state["epoch"], state["batches"] * state["batch_size"])


class PretrainDataModule(CompassDataModule):
    """:class:`~pertpy_gnn.compass._corpus.CompassDataModule` whose train loader resumes mid-epoch exactly.

    ``resume``: the loader state of a mid-epoch checkpoint (from :func:`check_resume`), applied to the
    first train loader. Lightning would apply it itself only if the loader were made after the loops
    are restored; the learning-rate schedule (``estimated_stepping_batches``) makes it earlier.
    """

    def __init__(self, *args, resume: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume = resume

    def train_dataloader(self):
        loader = make_dataloader(
            self.corpus,
            self.train_indices,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            seed=self.seed,
            loader_cls=ResumableLoader,
            sampler_cls=ResumableSampler,
            **self._replicas(),
        )
        # the loader's base seed (worker seeds) from its own generator, not the global RNG: making an
        # iterator then draws nothing from the RNG that dropout uses, wherever Lightning makes it
        loader.generator = torch.Generator().manual_seed(int(self.seed))
        trainer = self.trainer
        loader.position = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if self.resume is not None:
            loader.load_state_dict(self.resume)
            self.resume = None
        return loader


def check_resume(path: Path, *, batch_size: int, n_cells: int, seed: int, distributed: bool) -> dict | None:
    """Refuse a resume that cannot continue exactly as the interrupted run, naming the fix.

    Returns the train loader's state of a mid-epoch checkpoint, ``None`` for an epoch-end one.

    A checkpoint written at the end of an epoch always resumes exactly. One written part-way through an
    epoch (``ckpt_every_n_steps``) resumes exactly when it stores the train loader's position and the
    run has the same cells, batch size and seed; under DDP (Lightning's DistributedSampler) it does not.
    """
    from .._checkpoint import read_torch_file

    ckpt = read_torch_file(path, what="GeneCompass training checkpoint")
    loop = (ckpt.get("loops") or {}).get("fit_loop") or {}
    progress = loop.get("epoch_loop.batch_progress") or {}
    done = int((progress.get("current") or {}).get("processed", 0))
    # an epoch-end checkpoint has seen the epoch's last batch (or no batch of the next epoch)
    if done == 0 or progress.get("is_last_batch", True):
        return None
    states = (loop.get("state_dict") or {}).get("combined_loader") or []
    state = states[0] if states else {}
    fix = (
        "Resume from a checkpoint written at the end of an epoch (train without `ckpt_every_n_steps`, "
        "or keep the checkpoint of the last finished epoch)"
    )
    if distributed:
        raise ValueError(
            f"{path} was written part-way through an epoch ({done} batch{'es' if done != 1 else ''} in), and a distributed (DDP) run "
            f"cannot restart its samplers part-way, so it would not continue as the interrupted run. {fix}, "
            "or resume on one device."
        )
    if not state.get("resumable"):
        raise ValueError(
            f"{path} was written part-way through an epoch ({done} batch{'es' if done != 1 else ''} in) without the train loader's "
            f"position (an older pertpy-gnn, or a distributed run), so a resume would not continue as the "
            f"interrupted run. {fix}."
        )
    want = {"batch_size": batch_size, "n_cells": n_cells, "seed": seed}
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        said = ", ".join(f"{k} {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
        raise ValueError(
            f"{path} was written part-way through an epoch, and this run differs from the interrupted one "
            f"({said}), so the rest of the epoch would not be the cells it had left. Resume with the same "
            f"training cells, batch_size and seed, or {fix[0].lower()}{fix[1:]}."
        )
    return state
