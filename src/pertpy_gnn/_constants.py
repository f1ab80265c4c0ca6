"""Keys under which pertpy-gnn reads and writes results in an AnnData.

Every key is documented in ``docs/keys.md``; nothing outside these keys is ever written.
"""

#: canonical control label written by :func:`pertpy_gnn.pp.parse_perturbations`
CONTROL = "control"
#: delimiter of canonical perturbation names (``"A+B"``, genes sorted)
DELIM = "+"

#: ``adata.obs`` column: canonical perturbation name of each cell (categorical)
PERT_KEY = "pg_perturbation"
#: prefix of the keys of :func:`pertpy_gnn.tl.phenotypes` in a prediction AnnData (obs, obsm, obsp, uns)
PHENOTYPE_KEY = "pg_phenotype"
#: ``adata.obs`` column: number of perturbed genes of each cell (0 for control)
N_GENES_KEY = "pg_n_genes"
#: ``adata.obs`` column: cell context (cell line, donor, condition) of each cell, when parsed with ``context_key``
CONTEXT_KEY = "pg_context"
#: separator of a context and a perturbation in the label of a (context, perturbation) group (``"K562|A+B"``)
CONTEXT_SEP = "|"
#: ``adata.uns`` entry: how the perturbation column was parsed
PERT_UNS_KEY = "pg_perturbation"
#: ``adata.uns`` entry: top differentially expressed genes of every perturbation
DE_KEY = "pg_de_genes"
#: ``adata.obs`` column: train / val / test assignment
SPLIT_KEY = "pg_split"
#: ``adata.obs`` column: test subgroup (unseen_single, combo_seen0, ...)
SUBGROUP_KEY = "pg_subgroup"
#: ``adata.uns`` entry: the GO perturbation graph
GO_GRAPH_KEY = "pg_go_graph"
#: ``adata.uns`` entry: the gene co-expression graph
COEXPR_GRAPH_KEY = "pg_coexpression_graph"
#: ``adata.uns`` entry: GO annotations (DataFrame ``gene``, ``go_id``) read by ``pp.go_graph``; the simulator writes it
GO_ANNOTATIONS_KEY = "pg_go_annotations"
#: ``adata.uns`` entry of a simulated screen: its ground truth (``datasets.simulate_perturbseq``)
SIMULATION_KEY = "simulation"
#: ``adata.uns`` entry: GEARS training run record
GEARS_UNS_KEY = "pg_gears"
#: ``adata.layers`` entry: GEARS per-cell predictions (``GEARS.predict_cells`` / ``pg.tl.predict(..., adata=)``)
GEARS_PRED_LAYER = "pg_gears_prediction"
#: ``adata.uns`` entry: where a cell-gears data folder was read from (``datasets.read_gears_data``)
GEARS_DATA_KEY = "pg_gears_data"
#: ``adata.uns`` entry: evaluation table
EVAL_KEY = "pg_evaluation"
#: ``adata.uns`` entry: genetic-interaction scores
GI_KEY = "pg_gi_scores"
#: ``adata.var`` column and ``adata.uns`` entry: GeneCompass token of each gene / mapping report
COMPASS_TOKEN_KEY = "pg_compass_token"
#: ``adata.obsm`` entry: GeneCompass cell embeddings (species token's last-layer state)
COMPASS_CELL_KEY = "X_compass"
#: ``adata.varm`` and ``adata.uns`` entry: GeneCompass static gene embeddings (token states averaged over cells)
COMPASS_GENE_KEY = "pg_compass_gene"
#: ``adata.obs`` column prefix and ``adata.uns`` entry: GeneCompass in-silico perturbation
COMPASS_INSILICO_KEY = "pg_compass_insilico"
#: ``adata.uns`` entry: GeneCompass in-silico screen of candidate drivers
COMPASS_SCREEN_KEY = "pg_compass_screen"
#: ``adata.obs`` column prefix and ``adata.uns`` entry: GeneCompass cell-type annotation
COMPASS_ANNOT_KEY = "pg_compass_annotation"
#: ``adata.varp`` and ``adata.uns`` entry: GRN from GeneCompass gene-embedding similarity
COMPASS_GRN_KEY = "pg_compass_grn"
