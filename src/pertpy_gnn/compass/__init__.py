"""GeneCompass: vocabulary, priors, tokenized corpus, model, training plan.

Submodules are imported on first use, so ``import pertpy_gnn`` does not import torch, Lightning or
scvi-tools.
"""

from importlib import import_module

_EXPORTS = {
    "GeneCompass": "._model",
    "CompassModule": "._module",
    "CompassTrainingPlan": "._training",
    "PeriodicCheckpoint": "._training",
    "CompassCorpus": "._corpus",
    "CompassDataModule": "._corpus",
    "CompassDataset": "._corpus",
    "PRESETS": "._module",
    "mask_tokens": "._module",
    "cell_embedding": "._module",
    "CELL_EMBEDDINGS": "._module",
    "CompassVocab": "..pp._compass_vocab",
    "CompassPrior": "..pp._compass_priors",
    "PRIOR_NAMES": "..pp._compass_priors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
