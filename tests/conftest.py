from pathlib import Path

import anndata as ad
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NORMAN = SHARED_DATA / "perturbation" / "norman2019_k562_subset.h5ad"


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
