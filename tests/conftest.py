from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NORMAN = SHARED_DATA / "perturbation" / "norman2019_k562_subset.h5ad"


def additive_screen(
    seed: int = 0, n_genes: int = 30, n_cells: int = 30, *, silent_gene: bool = False
) -> ad.AnnData:
    """Parsed synthetic screen: control, singles G0..G5 and doubles, additive effects plus noise,
    log-scale-like values; ``silent_gene``: the last gene is zero in every cell."""
    import pertpy_gnn as pg

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    effect = {g: rng.normal(0, 0.8, n_genes) * (rng.random(n_genes) < 0.3) for g in genes[:6]}
    conds = ["control"] * 2 + genes[:6] + ["G0+G1", "G2+G3", "G0+G4", "G1+G5", "G4+G5"]
    mu = rng.uniform(0.5, 2.0, n_genes)
    if silent_gene:
        mu[-1] = -5.0
    rows, labels = [], []
    for c in conds:
        shift = sum((effect[g] for g in c.split("+") if g != "control"), np.zeros(n_genes))
        rows.append(np.maximum(0, mu + shift + rng.normal(0, 0.3, (n_cells, n_genes))))
        labels += [c] * n_cells
    adata = ad.AnnData(
        X=sp.csr_matrix(np.vstack(rows).astype(np.float32)),
        obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    return adata


class Picky:
    """A baseline that says it cannot predict the sets containing some genes (as GEARS for genes without
    a GO-graph node)."""

    def __init__(self, model, genes):
        self.model, self.genes, self.name = model, set(genes), "picky"

    def unpredictable(self, sets):
        return {
            "+".join(s): f"{'+'.join(s)} has no embedding; fix: add it" for s in sets if self.genes & set(s)
        }

    def predict(self, sets, **kwargs):
        bad = [s for s in sets if self.genes & set(s)]
        assert not bad, f"asked to predict {bad}"  # evaluate must not ask
        return self.model.predict(sets, **kwargs)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep tests light on the 2-core CI machine."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it is only on the project's machines)")
    return SHARED_DATA


@pytest.fixture
def norman() -> ad.AnnData:
    """The real Norman 2019 subset, read fresh for each test (tests may write into it)."""
    if not NORMAN.is_file():
        pytest.skip(f"{NORMAN} is absent (the real data folder is only on the project's machines)")
    return ad.read_h5ad(NORMAN)
