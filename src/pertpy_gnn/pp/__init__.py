"""Preprocessing: parse perturbations, validate data, DE genes, graphs, splits, tokens."""

from ._de import rank_de_genes
from ._perturbations import canonical_name, parse_perturbations, validate_expression

__all__ = ["parse_perturbations", "validate_expression", "canonical_name", "rank_de_genes"]
