"""Tools: train models, predict, evaluate against baselines, score genetic interactions, GeneCompass."""

from ._baselines import fit_baseline
from ._compass import pretrain_compass
from ._compass_ds_annotate import annotate_compass
from ._compass_ds_embed import compass_gene_embeddings, embed_compass
from ._compass_ds_gears import compass_gears
from ._compass_ds_grn import compass_grn, grn_auprc
from ._compass_ds_insilico import in_silico, in_silico_screen
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
