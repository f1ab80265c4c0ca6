"""pertpy-gnn: predict the transcriptional outcome of genetic perturbations in AnnData."""

from importlib.metadata import PackageNotFoundError, version

from . import compass, datasets, gears, pl, pp, tl

try:
    __version__ = version("pertpy-gnn")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

__all__ = ["compass", "datasets", "gears", "pl", "pp", "tl", "__version__"]
