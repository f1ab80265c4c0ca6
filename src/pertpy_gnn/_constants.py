"""Keys under which pertpy-gnn reads and writes results in an AnnData.

Every key is documented in ``docs/keys.md``; nothing outside these keys is ever written.
"""

#: canonical control label written by :func:`pertpy_gnn.pp.parse_perturbations`
CONTROL = "control"
#: delimiter of canonical perturbation names (``"A+B"``, genes sorted)
DELIM = "+"

#: ``adata.obs`` column: canonical perturbation name of each cell (categorical)
PERT_KEY = "pg_perturbation"
#: ``adata.obs`` column: number of perturbed genes of each cell (0 for control)
N_GENES_KEY = "pg_n_genes"
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
#: ``adata.uns`` entry: GEARS training run record
GEARS_UNS_KEY = "pg_gears"
#: ``adata.uns`` entry: evaluation table
EVAL_KEY = "pg_evaluation"
#: ``adata.uns`` entry: genetic-interaction scores
GI_KEY = "pg_gi_scores"
