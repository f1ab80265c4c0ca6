"""Training progress that works everywhere: a bar in a terminal, one log line per epoch elsewhere.

A progress bar needs a terminal (or a notebook); when output is redirected to a file it shows
nothing useful, so training logs one line per epoch through the ``pertpy_gnn`` logger instead:
the epoch, its time and the logged metrics (training loss, validation metric). Lightning's own
console handler is dropped while the root logger has handlers, so that each line appears once.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from lightning.pytorch.callbacks import Callback

from ._utils import logger


def interactive() -> bool:
    """Whether a progress bar can be drawn: a terminal on stderr, or a notebook kernel."""
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def one_line_per_record() -> None:
    """Let a configured root logger print Lightning's records alone.

    The ``lightning`` package adds its own console handler to the ``lightning`` logger and still
    propagates to the root logger: once the root logger has a handler (``logging.basicConfig``) every
    Lightning line appears twice. ``lightning.pytorch`` itself follows the rule "if the root logger has
    handlers, let it process the messages"; this applies the same rule to the parent logger.
    """
    if not logging.getLogger().hasHandlers():
        return
    lg = logging.getLogger("lightning")
    for h in list(lg.handlers):
        if type(h) is logging.StreamHandler:
            lg.removeHandler(h)


class EpochLog(Callback):
    """Log one line per training epoch (rank zero only).

    ``epoch i/n (s): loss <mean over the epoch's batches> (epoch mean), <validation metrics>``.
    """

    def __init__(self, max_epochs: int | None = None):
        self.max_epochs = max_epochs
        self._t0 = time.perf_counter()
        self._loss, self._n = 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._loss, self._n = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss += float(loss)
            self._n += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        parts = [f"loss {self._loss / self._n:.4g} (epoch mean)"] if self._n else []
        for name, value in trainer.callback_metrics.items():
            if "val" not in name:  # the training metrics are the last batch's: the epoch mean is above
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                parts.append(f"{name} {v:.4g}")
        total = self.max_epochs if self.max_epochs is not None else trainer.max_epochs
        logger.info(
            "epoch %d/%s (%.1f s): %s",
            trainer.current_epoch + 1,
            total,
            time.perf_counter() - self._t0,
            ", ".join(parts) or "no metric logged",
        )


def progress(progress_bar: bool, max_epochs: int | None = None) -> tuple[bool, list[Callback]]:
    """``(enable_progress_bar, callbacks)`` for a Lightning Trainer.

    ``progress_bar=False``: neither. Otherwise a bar when :func:`interactive`, else :class:`EpochLog`.
    Also applies :func:`one_line_per_record`.
    """
    one_line_per_record()
    if not progress_bar:
        return False, []
    if interactive():
        return True, []
    return False, [EpochLog(max_epochs)]
