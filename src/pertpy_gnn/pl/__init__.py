"""Plotting: DE genes, metrics against baselines, GI maps and scores, GeneCompass in-silico shifts.

The plotting functions (and matplotlib) are imported on first use: ``import pertpy_gnn`` does not
load ``matplotlib.pyplot``.
"""

from importlib import import_module

#: public function -> submodule that defines it
_FUNCTIONS = {
    "de_genes": "._de",
    "metrics": "._metrics",
    "gi_map": "._gi",
    "nonadditive_bars": "._gi",
    "gi_scatter": "._gi",
    "phenotypes": "._phenotypes",
    "in_silico_shift": "._compass",
    "in_silico_screen": "._compass",
}

__all__ = list(_FUNCTIONS)


def __getattr__(name: str):
    if name in _FUNCTIONS:
        value = getattr(import_module(_FUNCTIONS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
