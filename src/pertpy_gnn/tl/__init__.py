"""Tools: train models, predict, evaluate against baselines, score genetic interactions, GeneCompass."""

from ._baselines import fit_baseline
from ._compass import (
    annotate_compass,
    compass_gears,
    compass_gene_embeddings,
    compass_grn,
    embed_compass,
    grn_auprc,
    in_silico,
    in_silico_screen,
    pretrain_compass,
)
from ._evaluate import evaluate, summarize_evaluation
from ._gears import predict, train_gears
from ._gi import evaluate_gi, gi_map, gi_scores, nonadditive_mse
from ._phenotypes import phenotypes, reference_de

__all__ = [
    # GEARS
    "train_gears",
    "predict",
    # baselines and evaluation
    "fit_baseline",
    "evaluate",
    "summarize_evaluation",
    # genetic interactions
    "gi_scores",
    "gi_map",
    "evaluate_gi",
    "nonadditive_mse",
    # phenotype discovery
    "phenotypes",
    "reference_de",
    # GeneCompass
    "pretrain_compass",
    "embed_compass",
    "compass_gene_embeddings",
    "in_silico",
    "in_silico_screen",
    "annotate_compass",
    "compass_grn",
    "grn_auprc",
    "compass_gears",
]
