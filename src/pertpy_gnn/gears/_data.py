"""Fast GEARS data loading: index batches over one expression matrix, no per-cell objects.

Under data-parallel training (Lightning's ``strategy='ddp'``) every process runs the same seeded
batch sampler and keeps its own shard of the batches (:class:`ShardedBatches`), so no
``DistributedSampler`` is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from ._constants import TENSOR_KEYS as K


class ExpressionRows:
    """Dense ``float32`` rows of an expression matrix: a CSR matrix sliced per batch, or a dense array.

    The matrix is used in place when it already is CSR / C-contiguous ``float32`` (no copy).
    """

    def __init__(self, x):
        if sp.issparse(x):
            self.x = (
                x
                if (sp.isspmatrix_csr(x) or isinstance(x, sp.csr_array)) and x.dtype == np.float32
                else sp.csr_matrix(x, dtype=np.float32)
            )
            self.sparse = True
        else:
            self.x = torch.from_numpy(np.ascontiguousarray(np.asarray(x), dtype=np.float32))
            self.sparse = False

    @property
    def n_vars(self) -> int:
        return self.x.shape[1]

    def __call__(self, idx) -> torch.Tensor:
        """Rows ``idx`` as a dense ``len(idx) x n_vars`` tensor."""
        if self.sparse:
            return torch.from_numpy(self.x[np.asarray(idx)].toarray())
        return self.x[torch.as_tensor(idx)]


def _identity(batch):
    return batch


class TrainCells(Dataset):
    """Training cells of GEARS, fetched a whole minibatch at a time (``__getitems__``).

    Every perturbed cell is paired with a random control cell, drawn anew each time the cell is
    fetched (so once per epoch) from a seeded :class:`torch.Generator`; control cells are paired
    with themselves (as in GEARS: their target change is zero).

    Parameters
    ----------
    rows
        Expression rows of the whole AnnData.
    cells
        Row indices of the training cells.
    codes
        Perturbation category of each training cell.
    control_cells
        Row indices of the control cells partners are drawn from.
    pert_table
        ``n_categories x max_set`` GO-node indices of each category's set (``-1`` padding).
    expressed
        ``n_categories x K`` genes entering the loss for each category.
    control_code
        Category code of control cells.
    seed
        Seed of the partner generator.
    groups
        With cell contexts: ``codes`` are (context, perturbation) groups, and ``groups`` is a dict
        with ``pert`` (perturbation category of each group, indexing ``pert_table``), ``context``
        (context of each group), ``control`` (whether a group is a control group) and
        ``control_context`` (context of each of ``control_cells``); a partner is drawn from the
        control cells of the cell's own context. ``None``: one context, as in the paper.
    """

    def __init__(
        self,
        rows: ExpressionRows,
        cells,
        codes,
        control_cells,
        pert_table,
        expressed,
        control_code: int,
        seed: int,
        groups: dict | None = None,
    ):
        self.rows = rows
        self.cells = torch.as_tensor(np.asarray(cells), dtype=torch.long)
        self.codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        self.control_cells = torch.as_tensor(np.asarray(control_cells), dtype=torch.long)
        self.pert_table, self.expressed, self.control_code = pert_table, expressed, control_code
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.groups = None
        if groups is not None:
            ctx = torch.as_tensor(np.asarray(groups["control_context"]), dtype=torch.long)
            order = torch.argsort(ctx, stable=True)
            self.control_cells = self.control_cells[order]
            n_ctx = int(np.max(groups["context"])) + 1
            counts = torch.bincount(ctx, minlength=n_ctx)
            self.groups = {
                "pert": torch.as_tensor(np.asarray(groups["pert"]), dtype=torch.long),
                "context": torch.as_tensor(np.asarray(groups["context"]), dtype=torch.long),
                "control": torch.as_tensor(np.asarray(groups["control"]), dtype=torch.bool),
                "offset": torch.cumsum(counts, 0) - counts,
                "count": counts,
            }

    def shard_partners(self, rank: int, world_size: int) -> None:
        """Reseed the partner generator for process ``rank`` of ``world_size`` (distinct partner draws per process)."""
        if world_size > 1:
            self.generator.manual_seed(self.seed * 1_000_003 + rank)

    def set_index(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GO-node indices and context of the sets of groups ``codes``."""
        if self.groups is None:
            return self.pert_table[codes], None
        return self.pert_table[self.groups["pert"][codes]], self.groups["context"][codes]

    def __len__(self) -> int:
        return len(self.cells)

    def __getitems__(self, positions) -> dict[str, torch.Tensor]:
        pos = torch.as_tensor(positions, dtype=torch.long)
        cells, codes = self.cells[pos], self.codes[pos]
        if self.groups is not None:
            return self._items_with_contexts(cells, codes)
        draw = self.control_cells[
            torch.randint(len(self.control_cells), (len(pos),), generator=self.generator)
        ]
        partners = torch.where(codes == self.control_code, cells, draw)
        return {
            K.X: self.rows(cells.numpy()),
            K.X_CTRL: self.rows(partners.numpy()),
            K.PERT_IDX: self.pert_table[codes],
            K.GROUP: codes,
            K.MASK: self.expressed[codes],
        }

    def _items_with_contexts(self, cells: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.groups
        ctx = g["context"][codes]
        u = torch.rand(len(cells), generator=self.generator, dtype=torch.float64)
        k = torch.minimum((u * g["count"][ctx]).long(), g["count"][ctx] - 1)
        partners = torch.where(g["control"][codes], cells, self.control_cells[g["offset"][ctx] + k])
        return {
            K.X: self.rows(cells.numpy()),
            K.X_CTRL: self.rows(partners.numpy()),
            K.PERT_IDX: self.pert_table[g["pert"][codes]],
            K.GROUP: codes,
            K.MASK: self.expressed[codes],
            K.CONTEXT: ctx,
        }

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([position])


class TensorDict(Dataset):
    """Rows of a dict of equally long tensors, fetched a batch at a time."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitems__(self, positions) -> dict[str, torch.Tensor]:
        pos = torch.as_tensor(positions, dtype=torch.long)
        return {k: v[pos] for k, v in self.tensors.items()}

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([position])


class SetBatches(Sampler[list[int]]):
    """Batches of whole perturbation sets: each batch is ``sets_per_batch`` sets and their cells.

    The network runs once per distinct set of a batch, so a batch of a few sets and many cells
    costs little more than one of a few cells, and the paper's per-cell loss (averaged per set,
    then over the sets of the batch) is applied to every drawn cell. Sets are drawn from a stream
    of random permutations of the training sets (every set equally often); a set with more than
    ``cells_per_set`` cells contributes a random sample of that many (a new one each time), the
    others all their cells. An epoch has as many batches as it takes to draw as many cells as
    there are training cells (so epochs, and a per-epoch learning-rate decay, mean what they
    mean with cell batches).

    Parameters
    ----------
    codes
        Perturbation category of each training cell (position in the dataset).
    sets_per_batch
        Sets per batch.
    cells_per_set
        Most cells drawn from one set per batch; ``None``: all of them.
    seed
        Seed of the set order and of the cell samples.
    """

    def __init__(self, codes, sets_per_batch: int, cells_per_set: int | None, seed: int):
        if sets_per_batch < 1:
            raise ValueError(f"`sets_per_batch` must be at least 1, got {sets_per_batch}.")
        if cells_per_set is not None and cells_per_set < 1:
            raise ValueError(f"`cells_per_set` must be at least 1 or None (all cells), got {cells_per_set}.")
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        order = torch.argsort(codes, stable=True)
        _, counts = torch.unique_consecutive(codes[order], return_counts=True)
        self.members = list(torch.split(order, counts.tolist()))  # positions of each set's cells
        self.sets_per_batch = min(int(sets_per_batch), len(self.members))
        self.cells_per_set = cells_per_set
        drawn = counts if cells_per_set is None else counts.clamp(max=cells_per_set)
        per_batch = float(drawn.double().mean()) * self.sets_per_batch
        self.n_batches = max(1, math.ceil(len(codes) / per_batch))
        self.generator = torch.Generator().manual_seed(seed)
        self._queue: list[int] = []

    def __len__(self) -> int:
        return self.n_batches

    def _next_sets(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.sets_per_batch:
            if not self._queue:
                self._queue = torch.randperm(len(self.members), generator=self.generator).tolist()
            s = self._queue.pop()
            if s not in out:  # a set at most once per batch (across a permutation boundary)
                out.append(s)
        return out

    def __iter__(self):
        for _ in range(self.n_batches):
            parts = []
            for s in self._next_sets():
                cells = self.members[s]
                if self.cells_per_set is not None and len(cells) > self.cells_per_set:
                    cells = cells[torch.randperm(len(cells), generator=self.generator)[: self.cells_per_set]]
                parts.append(cells)
            yield torch.cat(parts).tolist()


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the initialized default process group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedBatches(Sampler[list[int]]):
    """Shard of a sequence of batches for one process: batches ``rank, rank + world_size, ...``.

    Every process of a data-parallel run iterates the same seeded batch sampler (same seed, hence
    the same batches in the same order) and keeps every ``world_size``-th batch from its ``rank``
    on, so the shards of one epoch are disjoint and together are the single-process epoch. The last
    ``len(batches) % world_size`` batches of an epoch are left out so that every process takes the
    same number of steps (data-parallel training needs it). Each epoch's batches are all drawn when
    the epoch starts, so the sampler's random streams stay in step on every process. With one
    process: every batch, unchanged.

    Parameters
    ----------
    batches
        The batch sampler of the whole epoch (e.g. :class:`SetBatches`).
    rank, world_size
        This process's place; ``None``: read from the initialized ``torch.distributed`` default
        process group when iterating (``(0, 1)`` without one).
    on_shard
        Called once as ``on_shard(rank, world_size)`` when the first epoch starts with more than one
        process (e.g. :meth:`TrainCells.shard_partners`).
    """

    def __init__(
        self,
        batches: Iterable[list[int]],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        on_shard: Callable[[int, int], None] | None = None,
    ):
        self.batches, self.on_shard = batches, on_shard
        self._place = None if rank is None and world_size is None else (int(rank or 0), int(world_size or 1))
        if self._place is not None and not 0 <= self._place[0] < self._place[1]:
            raise ValueError(f"`rank` must be in [0, world_size), got rank={rank}, world_size={world_size}.")
        self._sharded = False

    def place(self) -> tuple[int, int]:
        """``(rank, world_size)``."""
        return self._place if self._place is not None else process_rank()

    def __len__(self) -> int:
        rank, world = self.place()
        n = len(self.batches)
        if world > 1 and n < world:
            raise ValueError(
                f"An epoch has {n} training batches, fewer than the {world} processes: use smaller batches "
                "(batch_size, or sets_per_batch / cells_per_set) or fewer devices."
            )
        return n // world

    def __iter__(self):
        rank, world = self.place()
        if world > 1 and not self._sharded:
            self._sharded = True
            if self.on_shard is not None:
                self.on_shard(rank, world)
        # the whole epoch is drawn up front, so the sampler's generators advance by one epoch whether or
        # not the consumer asks for a batch past this shard's last (Lightning stops at len(self))
        batches = list(self.batches)
        yield from batches[rank : len(self) * world : world]


def make_set_loader(
    dataset: TrainCells,
    sets_per_batch: int,
    cells_per_set: int | None,
    *,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Single-process loader of :class:`SetBatches` of the training cells (this process's shard under DDP)."""
    sampler = ShardedBatches(
        SetBatches(dataset.codes, sets_per_batch, cells_per_set, seed),
        rank=rank,
        world_size=world_size,
        on_shard=getattr(dataset, "shard_partners", None),
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_identity, num_workers=0)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    shard: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Single-process loader of whole batches (deterministic order from a seeded generator).

    ``shard=True``: this process's shard of the batches under data-parallel training
    (:class:`ShardedBatches`); otherwise every process sees every batch (validation).
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if not shard:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=_identity,
            num_workers=0,
        )
    # the batches DataLoader(shuffle=shuffle, generator=generator) draws, sharded
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    sampler = ShardedBatches(
        BatchSampler(order, batch_size, drop_last=False),
        rank=rank,
        world_size=world_size,
        on_shard=getattr(dataset, "shard_partners", None),
    )
    return DataLoader(
        dataset, batch_sampler=sampler, generator=generator, collate_fn=_identity, num_workers=0
    )
