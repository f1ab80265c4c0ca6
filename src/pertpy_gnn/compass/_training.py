"""Masked-token pre-training plan (scvi-tools TrainingPlan) and the checkpoint callback."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from lightning.pytorch import Callback
from scvi.train import TrainingPlan

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
        """Restore the RNG state stored by :meth:`on_save_checkpoint` (resume)."""
        state = checkpoint.get(RNG_KEY)
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
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError, AttributeError):
        return None


class ReleaseFreedMemory(Callback):
    """Return the heap memory freed by training steps to the system every ``every_n_steps`` steps.

    ``every_n_steps`` defaults to ``RELEASE_EVERY_N_STEPS``; 0 turns it off.

    The tensors of a step differ in size from step to step (the trimmed batch width and the number of
    masked tokens vary), and glibc keeps the memory they free in its heap, fragmented, instead of
    returning it: the resident memory of a long run creeps up by megabytes per step before it levels
    off. ``malloc_trim(0)`` hands those free pages back (about a millisecond; the next step faults in
    what it needs again). Nothing is done where the C library has no ``malloc_trim``.
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = int(RELEASE_EVERY_N_STEPS if every_n_steps is None else every_n_steps)
        self._trim = _malloc_trim()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._trim is not None and self.every_n_steps > 0 and (batch_idx + 1) % self.every_n_steps == 0:
            self._trim(0)
