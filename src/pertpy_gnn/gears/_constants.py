"""Registry and tensor keys of the GEARS model."""

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    #: expression matrix (``X`` or a layer)
    X_KEY: str = "X"
    #: canonical perturbation column ``obs['pg_perturbation']``
    PERT_KEY: str = "perturbation"
    #: split column ``obs['pg_split']``
    SPLIT_KEY: str = "split"
    #: context column ``obs['pg_context']`` (registered only for data parsed with a ``context_key``)
    CONTEXT_KEY: str = "context"


class _TensorKeys(NamedTuple):
    #: observed expression of the cells of a minibatch (targets), ``batch x K``
    X: str = "x"
    #: expression of the control partner of each cell, ``batch x K``
    X_CTRL: str = "x_ctrl"
    #: GO-graph node indices of each cell's perturbation set, ``batch x max_set``, ``-1`` = padding
    PERT_IDX: str = "pert_idx"
    #: perturbation category of each cell (the loss averages over distinct ones)
    GROUP: str = "group"
    #: genes entering the loss for each cell (expressed in its perturbation's cells), ``batch x K``
    MASK: str = "mask"
    #: validation: indices of the top DE genes of each perturbation, ``n x n_de``
    DE_IDX: str = "de_idx"
    #: validation: true mean expression over those genes, ``n x n_de``
    DE_MEAN: str = "de_mean"
    #: context index of each cell / set (only for a model with contexts)
    CONTEXT: str = "context"


REGISTRY_KEYS = _RegistryKeys()
TENSOR_KEYS = _TensorKeys()

#: values of ``obs['pg_split']``
TRAIN, VAL, TEST = "train", "val", "test"
