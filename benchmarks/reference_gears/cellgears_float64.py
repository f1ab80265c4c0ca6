"""Re-run cell-gears' network on the fixture's prediction batches in float32 and in float64.

Runs INSIDE the reference's virtual environment. It separates rounding from model differences in
the equality of ``GEARS.load_reference``: cell-gears' float32 ``predict`` outputs are compared
with its own network run in float64 on the same 300-cell batches (the control cells recorded in the
fixture), and the float64 outputs can then be compared with ours in float64. Loads only
``gears/model.py`` (not the package, whose import compiles numba code for minutes).

Usage (from the repository root)::

    benchmarks/work/ref-venv/bin/python benchmarks/reference_gears/cellgears_float64.py \\
        --fixture tests/data/cellgears_fixture --out benchmarks/work/cellgears_float64.npz
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader


def _model_module():
    spec = importlib.util.find_spec("gears")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    mod_spec = importlib.util.spec_from_file_location("gears_model_only", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fixture", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fix = args.fixture
    preds = dict(np.load(fix / "predictions.npz"))
    adata = ad.read_h5ad(fix / "data" / "sim" / "perturb_processed.h5ad")
    x = adata.X.toarray().astype(np.float32)
    with open(fix / "data" / "essential_all_data_pert_genes.pkl", "rb") as f:
        essential = pickle.load(f)
    with open(fix / "data" / "gene2go_all.pkl", "rb") as f:
        gene2go = pickle.load(f)
    pert_list = list(np.unique([g for g in essential if g in gene2go]))
    model_mod = _model_module()
    out = {}
    for tag in ("plain", "unc"):
        with open(fix / f"model_{tag}" / "config.pkl", "rb") as f:
            config = pickle.load(f)
        config["device"] = "cpu"
        state = torch.load(fix / f"model_{tag}" / "model.pt", map_location="cpu", weights_only=True)
        for dtype, name in ((torch.float32, "f32"), (torch.float64, "f64")):
            cfg = dict(config)
            if dtype == torch.float64:
                cfg["G_go_weight"] = cfg["G_go_weight"].double()
                cfg["G_coexpress_weight"] = cfg["G_coexpress_weight"].double()
            model = model_mod.GEARS_Model(cfg)
            model.load_state_dict(state)
            model = model.to(dtype).eval()
            res, unc = [], []
            for pert, cells in zip(preds[f"{tag}_perts"], preds[f"{tag}_ctrl_cells"], strict=True):
                genes = str(pert).split("+")
                idx = [pert_list.index(g) for g in genes]
                xs = x[adata.obs_names.get_indexer(cells)]
                graphs = [Data(x=torch.tensor(r, dtype=dtype), pert_idx=idx, pert=genes) for r in xs]
                batch = next(iter(DataLoader(graphs, 300, shuffle=False)))
                with torch.no_grad():
                    o = model(batch)
                if config["uncertainty"]:
                    o, s = o
                    unc.append(np.exp(-np.mean(s.numpy().mean(0))))
                res.append(o.numpy().mean(0))
            out[f"{tag}_{name}"] = np.stack(res)
            if unc:
                out[f"{tag}_{name}_logvar_sum"] = np.array(unc)
        print(
            tag,
            "f32 rerun vs fixture:",
            float(np.abs(out[f"{tag}_f32"] - preds[f"{tag}_pred"]).max()),
            "f64 vs fixture:",
            float(np.abs(out[f"{tag}_f64"] - preds[f"{tag}_pred"]).max()),
        )
    np.savez_compressed(args.out, **out)


if __name__ == "__main__":
    main()
