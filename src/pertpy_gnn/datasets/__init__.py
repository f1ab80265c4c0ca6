"""Datasets: the simulated screen, remote loaders and readers."""

from ._gears_data import read_gears_data
from ._go import EVIDENCE_GROUPS as EVIDENCE_GROUPS  # re-exported, not in the API pages
from ._go import go_annotations, read_gaf
from ._read import read_perturbation_h5ad
from ._remote import (
    ChecksumError,
    DownloadError,
    InvalidDownloadError,
    adamson_2016,
    dixit_2016,
    get_cache_dir,
    norman_2019,
    replogle_2022_k562_essential,
)
from ._simulate import simulate_perturbseq

__all__: list[str] = [
    "simulate_perturbseq",
    "norman_2019",
    "adamson_2016",
    "dixit_2016",
    "replogle_2022_k562_essential",
    "read_perturbation_h5ad",
    "read_gears_data",
    "go_annotations",
    "read_gaf",
    "get_cache_dir",
    "DownloadError",
    "ChecksumError",
    "InvalidDownloadError",
]
