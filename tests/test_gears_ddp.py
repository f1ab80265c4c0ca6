"""GEARS data-parallel training on CPU: 2 processes, gloo backend, Lightning's 'ddp' strategy.

One script trains twice under DDP (cell batches, then set batches); every process records the cells
of the batches it trained on and its final parameters, rank 0 also the single-process batch sequence
of the same seed. The test checks that the two shards are exactly the alternate batches of that
sequence (disjoint, together the whole epoch) and that both processes end with identical weights.
"""

import textwrap

import pytest
import torch

from pertpy_gnn.gears._data import SetBatches, ShardedBatches

from .ddp_run import run_script

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import lightning.pytorch as lp, torch
    torch.set_num_threads(1)
    import pertpy_gnn as pg
    from pertpy_gnn.gears._constants import TENSOR_KEYS as K
    from pertpy_gnn.gears._data import make_loader, make_set_loader

    out = Path(sys.argv[1])
    adata = pg.datasets.simulate_perturbseq(
        n_genes=40, n_singles=8, n_doubles=6, n_cells_per_perturbation=6, n_control=40, counts_layer=False, seed=0
    )
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    pg.pp.split_perturbations(adata, seed=0)
    pg.pp.rank_de_genes(adata)
    pg.pp.go_graph(adata)
    pg.pp.coexpression_graph(adata)
    pg.gears.GEARS.setup_anndata(adata)


    class Seen(lp.Callback):  # the cells (expression rows) of every batch this process trains on
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, plan, batch, batch_idx):
            self.batches.append(batch[K.X].clone())


    for mode, kw in [("cells", {"batch_size": 8}), ("sets", {"sets_per_batch": 2, "cells_per_set": 4})]:
        model = pg.gears.GEARS(adata, hidden_dim=8, seed=3)
        seen = Seen()
        model.train(
            max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", progress_bar=False, batching=mode,
            callbacks=[seen], **kw,
        )
        rank = torch.distributed.get_rank()
        state = {k: v.clone() for k, v in model.module.state_dict().items()}
        torch.save({"batches": seen.batches, "state": state, "history": model.history_["train_loss"].tolist()},
                   out / f"{mode}_rank{rank}.pt")
        if rank == 0:  # the single-process batches of the same seed, 2 epochs
            train = model._training_data(3)[0]
            loader = (
                make_set_loader(train, kw["sets_per_batch"], kw["cells_per_set"], seed=3, rank=0, world_size=1)
                if mode == "sets"
                else make_loader(train, kw["batch_size"], shuffle=True, seed=3, shard=True, rank=0, world_size=1)
            )
            expected = [[batch[K.X] for batch in loader] for _ in range(2)]
            torch.save(expected, out / f"{mode}_expected.pt")
    """
)


def _rows(batches):
    return [tuple(map(tuple, b.tolist())) for b in batches]


@pytest.mark.slow
def test_gears_ddp_two_processes_cpu(tmp_path):
    run_script(SCRIPT, tmp_path, "gears_ddp_run.py")
    for mode in ("cells", "sets"):
        r0 = torch.load(tmp_path / f"{mode}_rank0.pt")
        r1 = torch.load(tmp_path / f"{mode}_rank1.pt")
        expected = torch.load(tmp_path / f"{mode}_expected.pt")
        # each epoch: rank 0 trains on batches 0, 2, 4, ..., rank 1 on 1, 3, 5, ... of the single-process
        # sequence (same seed), the same number of steps each, an odd last batch left out
        seen0, seen1 = _rows(r0["batches"]), _rows(r1["batches"])
        assert len(seen0) == len(seen1) > 0
        per_epoch = len(seen0) // 2
        for epoch, full in enumerate(expected):
            full = _rows(full)
            assert len(full) // 2 == per_epoch
            assert seen0[epoch * per_epoch : (epoch + 1) * per_epoch] == full[0 : 2 * per_epoch : 2]
            assert seen1[epoch * per_epoch : (epoch + 1) * per_epoch] == full[1 : 2 * per_epoch : 2]
        # one DDP model: gradients all-reduced, batch-norm statistics shared, the same epoch selected
        w0, w1 = r0["state"], r1["state"]
        assert w0.keys() == w1.keys()
        assert all(torch.equal(w0[k], w1[k]) for k in w0), [k for k in w0 if not torch.equal(w0[k], w1[k])]
        assert r0["history"] == r1["history"]


def test_sharded_batches_split_one_sequence():
    codes = torch.tensor([0] * 10 + [1] * 5 + [2] * 7 + [3] * 3)

    def shard(rank, world):
        return list(ShardedBatches(SetBatches(codes, 2, 4, seed=5), rank=rank, world_size=world))

    full = shard(0, 1)
    assert full == list(SetBatches(codes, 2, 4, seed=5))  # one process: the batches, unchanged
    shards = [shard(r, 3) for r in range(3)]
    keep = len(full) // 3 * 3
    assert [len(s) for s in shards] == [keep // 3] * 3
    assert sorted(b for s in shards for b in s) == sorted(full[:keep])  # together the epoch, no batch twice
    assert shards[1] == full[1:keep:3] and shard(1, 3) == shards[1]  # deterministic per seed
    with pytest.raises(ValueError, match="rank"):
        ShardedBatches(full, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than"):
        len(ShardedBatches(full[:1], rank=0, world_size=2))


def test_sharded_cell_loader_keeps_the_single_process_order():
    from torch.utils.data import DataLoader

    from pertpy_gnn.gears._data import TensorDict, make_loader

    ds = TensorDict({"a": torch.arange(100)})
    plain = DataLoader(
        ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(4), collate_fn=lambda b: b
    )
    sharded = make_loader(ds, 7, shuffle=True, seed=4, shard=True)
    for _ in range(3):  # epochs: the same seeded stream as the paper's shuffled loader
        assert [b["a"].tolist() for b in plain] == [b["a"].tolist() for b in sharded]
    halves = [make_loader(ds, 7, shuffle=True, seed=4, shard=True, rank=r, world_size=2) for r in (0, 1)]
    first, second = ([b["a"].tolist() for b in h] for h in halves)
    assert len(first) == len(second) == 7  # 15 batches: the last one left out
    assert not set(sum(first, [])) & set(sum(second, []))
