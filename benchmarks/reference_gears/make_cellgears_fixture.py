"""Train small cell-gears models on our simulator's data and save them, their data folder and their predictions.

The committed test fixture ``tests/data/cellgears_fixture/`` is made by this script. It runs INSIDE
the reference's virtual environment (``setup_venv.sh``), on a folder written by ``export_inputs.py``
in ours; ``make_cellgears_fixture.sh`` runs both steps. Nothing is downloaded.

What it writes into ``--out``:

``data/gene2go_all.pkl``, ``data/essential_all_data_pert_genes.pkl``
    the GO files the reference reads from its data folder (they define its perturbation graph nodes).
``data/sim/perturb_processed.h5ad``, ``data/sim/splits/*.pkl``
    the cell-gears data folder made by ``PertData.new_data_process`` and its own ``simulation``
    split (``prepare_split(split='simulation', seed=1)``) with the subgroup file; the cell graphs
    (``data_pyg/``) are not kept (a large pickle of objects that nothing here reads).
``model_plain/``, ``model_unc/``
    two models saved by cell-gears' own ``save_model`` (``model.pt`` + ``config.pkl``): without and
    with the uncertainty head.
``predictions.npz``
    for each model (prefix ``plain_`` / ``unc_``): ``perts`` (``A`` or ``A+B``), ``pred`` (what
    ``GEARS.predict`` returned, n x genes), ``ctrl_cells`` (obs names of the 300 control cells it drew
    for each, n x 300), and with uncertainty ``logvar`` (its per-gene mean log-variance) and
    ``logvar_sum`` (its ``exp(-mean logvar)``).
``manifest.json``
    versions, hyperparameters, sizes.

Usage (from the repository root)::

    benchmarks/work/ref-venv/bin/python benchmarks/reference_gears/make_cellgears_fixture.py \\
        --data-dir benchmarks/work/ref_data/fixture --out tests/data/cellgears_fixture
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

DATASET = "sim"


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("cell-gears", "torch", "torch-geometric", "numpy", "scipy", "anndata")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder written by export_inputs.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--n-extra", type=int, default=6, help="doubles of doubles.txt beyond the data's to predict"
    )
    args = p.parse_args(argv)

    data_dir = args.data_dir.resolve()
    out = args.out.resolve()
    work = data_dir / "cellgears_run"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for f in ("gene2go_all.pkl", "essential_all_data_pert_genes.pkl"):
        shutil.copy(data_dir / f, work / f)
    shutil.copytree(data_dir / "go_essential_all", work / "go_essential_all")
    os.chdir(work)  # the reference writes to relative paths

    import gears.gears as gears_mod
    import numpy as np
    import scanpy as sc
    import torch
    from gears import GEARS, PertData

    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 - the reference draws from the legacy global RNG
    torch.manual_seed(args.seed)

    adata = sc.read_h5ad(data_dir / "ref_input.h5ad")
    pert_data = PertData(str(work), default_pert_graph=True)
    pert_data.new_data_process(dataset_name=DATASET, adata=adata)
    pert_data.load(data_path=str(work / DATASET))
    pert_data.prepare_split(split="simulation", seed=1)
    pert_data.get_dataloader(batch_size=32, test_batch_size=32)

    # what predict() draws: record the control cells of each call (same draw, RNG state restored)
    drawn: list = []
    original = gears_mod.create_cell_graph_dataset_for_prediction

    def recording(pert_gene, ctrl_adata, gene_names, device, num_samples=300):
        state = np.random.get_state()  # noqa: NPY002
        idx = np.random.randint(0, len(ctrl_adata), num_samples)  # noqa: NPY002 - the reference's draw
        np.random.set_state(state)  # noqa: NPY002
        drawn.append(np.asarray(ctrl_adata.obs_names[idx]).astype(str))
        return original(pert_gene, ctrl_adata, gene_names, device, num_samples)

    gears_mod.create_cell_graph_dataset_for_prediction = recording

    # cell-gears 0.1.2's uncertainty loss starts from torch.tensor(0.0, requires_grad=True).to(device) and
    # adds to it in place: on CUDA .to() copies, on CPU it returns the leaf itself and the in-place add
    # fails. Give its utils a torch whose tensor() returns a non-leaf copy of such a tensor (what CUDA gets).
    import gears.utils as gears_utils

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def tensor(*a, **k):
            t = torch.tensor(*a, **k)
            return t.clone() if t.requires_grad else t

    gears_utils.torch = _Torch()

    conditions = [c for c in pert_data.adata.obs["condition"].cat.categories if c != "ctrl"]
    perts = [[g for g in c.split("+") if g != "ctrl"] for c in conditions]
    extra = [line.split("+") for line in (data_dir / "doubles.txt").read_text().split() if line]
    names = {"+".join(sorted(q)) for q in perts}
    perts += [q for q in extra if "+".join(sorted(q)) not in names][: args.n_extra]

    arrays, models = {}, {}
    for tag, unc in (("plain", False), ("unc", True)):
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)  # noqa: NPY002
        model = GEARS(pert_data, device="cpu")
        model.model_initialize(hidden_size=args.hidden_size, uncertainty=unc)
        model.train(epochs=args.epochs)
        path = out / f"model_{tag}"
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save_model(str(path))
        drawn.clear()
        model.saved_pred = {}
        res = model.predict(perts)
        pred, logvar_sum = res if unc else (res, None)
        keys = ["_".join(q) for q in perts]
        arrays[f"{tag}_perts"] = np.array(["+".join(q) for q in perts])
        arrays[f"{tag}_pred"] = np.stack([pred[k] for k in keys]).astype(np.float32)
        arrays[f"{tag}_ctrl_cells"] = np.stack(drawn)
        if unc:
            # predict() keeps the per-gene mean log-variance in a local dict; recompute it as it does
            arrays[f"{tag}_logvar_sum"] = np.array([logvar_sum[k] for k in keys], dtype=np.float64)
        models[tag] = {
            "uncertainty": unc,
            "config": {k: v for k, v in model.config.items() if not k.startswith("G_")},
        }
        print(f"[fixture] {tag}: {len(keys)} predictions", file=sys.stderr, flush=True)

    np.savez_compressed(out / "predictions.npz", **arrays)
    dst = out / "data"
    if dst.exists():
        shutil.rmtree(dst)
    (dst / DATASET).mkdir(parents=True)
    for f in ("gene2go_all.pkl", "essential_all_data_pert_genes.pkl"):
        shutil.copy(work / f, dst / f)
    shutil.copy(work / DATASET / "perturb_processed.h5ad", dst / DATASET / "perturb_processed.h5ad")
    shutil.copytree(work / DATASET / "splits", dst / DATASET / "splits")
    manifest = {
        "made_by": "benchmarks/reference_gears/make_cellgears_fixture.py",
        "input": json.loads((data_dir / "manifest.json").read_text())["source"],
        "versions": _versions(),
        "epochs": args.epochs,
        "hidden_size": args.hidden_size,
        "seed": args.seed,
        "split": "cell-gears prepare_split(split='simulation', seed=1)",
        "n_genes": int(pert_data.adata.n_vars),
        "n_perturbation_graph_nodes": len(pert_data.pert_names),
        "models": {
            k: {
                kk: (str(vv) if not isinstance(vv, (int, float, bool, str)) else vv)
                for kk, vv in v["config"].items()
            }
            for k, v in models.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
