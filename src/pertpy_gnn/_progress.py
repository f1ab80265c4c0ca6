"""Progress that works everywhere: a bar in a terminal, log lines elsewhere.

A progress bar needs a terminal (or a notebook); when output is redirected to a file it shows
nothing useful, so training logs one line per epoch through the ``pertpy_gnn`` logger instead:
the epoch, its time and the logged metrics (training loss, validation metric). Lightning's own
console handler is dropped while the root logger has handlers, so that each line appears once.
Other long loops (tokenizing a corpus, encoding cells) use :class:`Progress`: a tqdm bar in a
terminal, else one log line per tenth of the work. The same ``progress_bar=False`` silences both.
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


class Progress:
    """Progress of a loop of ``total`` steps: a tqdm bar where one can be drawn, else log lines.

    In a terminal or notebook (:func:`interactive`) a tqdm bar. Elsewhere one INFO line through the
    ``pertpy_gnn`` logger each time another tenth of the steps is done:
    ``<desc>: <done>/<total> <unit> (<percent>%), <seconds> s``; nothing for a single step.
    ``enabled=False``: nothing at all. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "chunks"):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done, self._mark = 0, 0
        self._t0 = time.perf_counter()
        self._bar = None
        self._log = bool(enabled) and not interactive() and self.total > 1
        if enabled and interactive():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(n)
        if not self._log:
            return
        mark = min(10, 10 * self.done // self.total)
        if mark > self._mark:
            self._mark = mark
            logger.info(
                "%s: %d/%d %s (%d%%), %.1f s",
                self.desc,
                self.done,
                self.total,
                self.unit,
                100 * self.done // self.total,
                time.perf_counter() - self._t0,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable, total: int, desc: str, *, enabled: bool = True, unit: str = "batches"):
    """Iterate over ``iterable`` (``total`` items) with :class:`Progress`."""
    with Progress(total, desc, enabled=enabled, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update()
