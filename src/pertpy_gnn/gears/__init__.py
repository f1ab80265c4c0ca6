"""GEARS (Roohani et al. 2023) as an scvi-tools model.

The classes are imported on first access (``pg.gears.GEARS``), so that ``import pertpy_gnn`` does
not pay for Lightning and scvi-tools.
"""

import importlib

_LAZY = {
    "GEARS": "._model",
    "GEARSModule": "._module",
    "GEARSTrainingPlan": "._training_plan",
    "ReferenceGEARS": "._reference",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
