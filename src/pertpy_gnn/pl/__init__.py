"""Plotting: DE genes, metrics against baselines, GI maps and scores, GeneCompass in-silico shifts."""

from ._compass import in_silico_screen, in_silico_shift
from ._de import de_genes
from ._gi import gi_map, gi_scatter, nonadditive_bars
from ._metrics import metrics
from ._phenotypes import phenotypes

__all__ = [
    "de_genes",
    "metrics",
    "gi_map",
    "nonadditive_bars",
    "gi_scatter",
    "phenotypes",
    "in_silico_shift",
    "in_silico_screen",
]
