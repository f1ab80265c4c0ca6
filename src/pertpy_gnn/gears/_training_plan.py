"""GEARS optimization: Adam, step decay per epoch, validation by top-DE MSE, best-epoch selection."""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from .._malloc import keep_freed_memory
from .._optim import fast_adam_kwargs
from ._constants import TENSOR_KEYS as K
from ._module import GEARSModule

#: the training loss reaches the progress bar every this many steps
PROGRESS_EVERY_N_STEPS = 10


class GEARSTrainingPlan(pl.LightningModule):
    """Lightning training plan of :class:`~pertpy_gnn.gears.GEARSModule`.

    Adam (``lr``, ``weight_decay``) with the learning rate multiplied by ``lr_decay`` after every
    epoch (the paper's StepLR). Validation, once per epoch, predicts the mean expression of every
    validation perturbation (``zhat`` + mean control expression; exactly the mean over control
    partners, since ``zhat`` does not depend on the control cell) and scores the MSE over its top
    differentially expressed genes; the mean over perturbations is ``val_top20_de_mse``. The state of
    the best epoch is kept in memory (``best_state``) for the model to restore after training.
    Gradient clipping is the Trainer's (``gradient_clip_val``; by value, done in place with two
    ``foreach`` calls on one device or under DDP). The training loss reaches the progress bar every
    ``PROGRESS_EVERY_N_STEPS`` steps; ``history`` holds each epoch's mean over all its cells.

    Parameters
    ----------
    module
        The GEARS network.
    lr
        Learning rate.
    weight_decay
        Adam weight decay.
    lr_decay
        Factor applied to the learning rate after each epoch.
    select_best
        Keep the state of the epoch with the lowest validation score (``False``: the last epoch is
        kept, validation is only recorded).

    Notes
    -----
    While fitting, freed memory stays in the process heap (glibc's ``mallopt``, see
    :func:`pertpy_gnn._malloc.keep_freed_memory`): the large activations of one step are reused by
    the next instead of being returned to the system and faulted in again.
    """

    def __init__(
        self,
        module: GEARSModule,
        *,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        lr_decay: float = 0.5,
        select_best: bool = True,
    ):
        super().__init__()
        self.module = module
        # DDP: the graph tensors (non-persistent buffers, the same on every process) are neither synchronized
        # nor broadcast; the batch-norm statistics are (persistent buffers, and :meth:`_sync_buffers`)
        persistent = set(module.state_dict())
        self._ddp_params_and_buffers_to_ignore = [
            f"module.{name}" for name, _ in module.named_buffers() if name not in persistent
        ]
        self.lr, self.weight_decay, self.lr_decay = lr, weight_decay, lr_decay
        self.select_best = select_best
        self.history: dict[str, list] = {"epoch": [], "train_loss": [], "val_top20_de_mse": [], "lr": []}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = -1
        self.best_val = math.inf
        # the epoch's sum of loss x cells, kept on the device (no host sync per step on a GPU), and its cells
        self._epoch_loss: list = [None, 0]
        self._val_sums: list[torch.Tensor] = []
        self._val = math.nan
        self._memory: ExitStack | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._memory is None:
            self._memory = ExitStack()
            self._memory.enter_context(keep_freed_memory())

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._memory is not None:
            self._memory.close()
            self._memory = None

    def forward(self, batch):
        return self.module(batch)

    def training_step(self, batch, batch_idx):
        _, _, out = self.module(batch)
        n = batch[K.X].shape[0]
        if batch_idx % PROGRESS_EVERY_N_STEPS == 0:  # Lightning's logging costs ~1 ms, a few % of a step
            self.log("train_loss", out.loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        weighted = out.loss.detach() * n
        total = self._epoch_loss[0]
        self._epoch_loss[0] = weighted if total is None else total.add_(weighted)
        self._epoch_loss[1] += n
        return out.loss

    def validation_step(self, batch, batch_idx):
        de = batch[K.DE_IDX]
        if K.CONTEXT in batch:  # each set over the control mean of its context
            zhat, _ = self.module.predict_delta(batch[K.PERT_IDX], batch[K.CONTEXT])
            pred = zhat.gather(1, de) + self.module.control_reference(batch[K.CONTEXT]).gather(1, de)
        else:
            zhat, _ = self.module.predict_delta(batch[K.PERT_IDX])
            pred = zhat.gather(1, de) + self.module.control_mean[de]
        mse = ((pred - batch[K.DE_MEAN]) ** 2).mean(1)
        self._val_sums.append(torch.stack([mse.sum(), torch.tensor(float(mse.numel()), device=mse.device)]))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clipping by value as Lightning's, in two ``foreach`` calls on one device or under DDP.

        Lightning's path (precision plugin, ``clip_grad_value_`` grouping the tensors anew every step)
        cost 1-2 ms of a ~40 ms set-batch step on CPU. Other strategies, and clipping by norm, go
        through Lightning.
        """
        strategy = self.trainer.strategy
        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "value")
            and type(strategy) in (SingleDeviceStrategy, DDPStrategy)
        ):
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            if grads:
                torch._foreach_clamp_min_(grads, -float(gradient_clip_val))
                torch._foreach_clamp_max_(grads, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _sync_buffers(self) -> None:
        """Data-parallel: every process takes rank 0's buffers (batch-norm running statistics).

        DDP broadcasts them from rank 0 before each training forward pass, so after an epoch the other
        processes hold their own last update; this makes validation, the kept best state and the final
        model the same on every process.
        """
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            for m in self.module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    for buf in m.buffers():
                        torch.distributed.broadcast(buf, src=0)

    def on_validation_epoch_start(self):
        if not self.trainer.sanity_checking:
            self._sync_buffers()

    def on_validation_epoch_end(self):
        if not self._val_sums or self.trainer.sanity_checking:
            self._val_sums = []
            return
        sums = self.all_gather(torch.stack(self._val_sums).sum(0)).reshape(-1, 2).sum(0)
        self._val_sums = []
        val = float(sums[0] / sums[1])
        self.log("val_top20_de_mse", val, prog_bar=True, sync_dist=False)
        self._val = val
        if self.select_best and val < self.best_val:
            self.best_val, self.best_epoch = val, self.current_epoch
            self.best_state = copy.deepcopy(
                {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
            )

    def on_train_epoch_start(self):
        self._lr = self.optimizers().param_groups[0]["lr"]

    def on_train_epoch_end(self):
        self._sync_buffers()
        total, n = self._epoch_loss
        total = 0.0 if total is None else float(total)
        if self.trainer.world_size > 1:  # the mean over every process's cells
            total, n = self.trainer.strategy.reduce(
                torch.tensor([total, n], dtype=torch.float64, device=self.device), reduce_op="sum"
            ).tolist()
        self._epoch_loss = [None, 0]
        self.history["epoch"].append(self.current_epoch)
        self.history["train_loss"].append(total / max(n, 1))
        self.history["val_top20_de_mse"].append(self._val)
        self.history["lr"].append(self._lr)
        self._val = math.nan

    def configure_optimizers(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        precision = getattr(self._trainer, "precision", None)
        optimizer = torch.optim.Adam(
            params, lr=self.lr, weight_decay=self.weight_decay, **fast_adam_kwargs(params, precision)
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
