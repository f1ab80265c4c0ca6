"""Preprocessing: parse perturbations, validate data, DE genes, graphs, splits, tokens."""

from ._compass_priors import (
    CompassPrior,
    coexpression_pairs,
    compass_priors,
    dorothea_edges,
    family_pairs,
    gene2vec,
    hgnc_gene_groups,
    trrust_edges,
)
from ._compass_tokens import compass_tokenize
from ._compass_vocab import CompassVocab, compass_map_genes, compass_vocab, gene_id_table, mgi_orthologs
from ._de import rank_de_genes
from ._graphs import coexpression_graph, go_graph, graph_tensors
from ._perturbations import canonical_name, parse_perturbations, validate_expression
from ._splits import split_perturbations

__all__ = [
    "parse_perturbations",
    "validate_expression",
    "canonical_name",
    "rank_de_genes",
    "split_perturbations",
    "go_graph",
    "coexpression_graph",
    "graph_tensors",
    "mgi_orthologs",
    "gene_id_table",
    "compass_vocab",
    "compass_map_genes",
    "CompassVocab",
    "trrust_edges",
    "dorothea_edges",
    "hgnc_gene_groups",
    "family_pairs",
    "coexpression_pairs",
    "gene2vec",
    "compass_priors",
    "CompassPrior",
    "compass_tokenize",
]
