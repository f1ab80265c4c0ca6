"""The one output form shared by GEARS and every baseline: one observation per perturbation set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ._constants import DELIM

#: ``adata.uns`` key of a prediction AnnData holding how it was made
PREDICTION_UNS_KEY = "pg_prediction"
#: layer of a prediction AnnData with the predicted change over the control mean
DELTA_LAYER = "delta"


def make_prediction_adata(
    sets: Sequence[tuple[str, ...]],
    mean: np.ndarray,
    control_mean: np.ndarray,
    var_names: Sequence[str],
    *,
    seen_genes: set[str] | None = None,
    obs_extra: pd.DataFrame | dict | None = None,
    model_name: str = "model",
    n_control: int | None = None,
) -> AnnData:
    """Build the prediction AnnData of ``sets``.

    Parameters
    ----------
    sets
        Perturbation sets (sorted gene tuples), one per row of ``mean``.
    mean
        Predicted mean expression, ``len(sets) x n_genes``.
    control_mean
        Mean expression of the control cells the prediction is relative to.
    var_names
        Gene names of the columns.
    seen_genes
        Genes seen perturbed in training (``None``: unknown).
    obs_extra
        Further per-set columns (e.g. ``uncertainty``, ``uncertainty_z``).
    model_name
        Name of the predictor, recorded in ``uns``.
    n_control
        Number of control cells averaged.

    Returns
    -------
    AnnData with ``X`` the predicted mean expression, ``layers['delta']`` the change over control,
    ``obs`` columns ``perturbation`` (canonical name), ``n_genes``, ``n_unseen`` (genes of the set not
    seen perturbed in training), ``seen`` (all genes seen) and any extra columns, and
    ``uns['pg_prediction']`` (``model``, ``n_control``, ``control_mean``).
    """
    names = [DELIM.join(s) for s in sets]
    mean = np.asarray(mean, dtype=np.float32)
    control_mean = np.asarray(control_mean, dtype=np.float32).ravel()
    obs = pd.DataFrame(index=pd.Index(names, name=None))
    obs["perturbation"] = names
    obs["n_genes"] = np.array([len(s) for s in sets], dtype=np.int64)
    if seen_genes is not None:
        n_unseen = np.array([sum(g not in seen_genes for g in s) for s in sets], dtype=np.int64)
        obs["n_unseen"] = n_unseen
        obs["seen"] = n_unseen == 0
    if obs_extra is not None:
        for k, v in pd.DataFrame(obs_extra).items():
            obs[k] = np.asarray(v)
    out = AnnData(X=mean, obs=obs, var=pd.DataFrame(index=pd.Index(list(map(str, var_names)))))
    out.obs_names_make_unique()
    out.layers[DELTA_LAYER] = mean - control_mean[None, :]
    out.uns[PREDICTION_UNS_KEY] = {
        "model": model_name,
        "n_control": -1 if n_control is None else int(n_control),
        "control_mean": control_mean,
    }
    return out


def skipped_frame(skipped: dict[str, str]) -> pd.DataFrame:
    """``{set name: reason}`` as the frame a prediction keeps in ``uns['pg_prediction']['skipped']``."""
    return pd.DataFrame(
        {"reason": [str(r) for r in skipped.values()]}, index=pd.Index(list(skipped), name="perturbation")
    )


def unpredictable_of(predictor, sets: Sequence[tuple[str, ...]]) -> dict[str, str]:
    """Sets a predictor says it cannot predict (``predictor.unpredictable``), name -> reason; ``{}`` if it has none."""
    fn = getattr(predictor, "unpredictable", None)
    return {str(k): str(v) for k, v in fn(list(sets)).items()} if callable(fn) else {}


def recorded_skipped(prediction: AnnData) -> dict[str, str]:
    """Sets a prediction AnnData records as skipped by its model (``uns['pg_prediction']['skipped']``)."""
    table = prediction.uns.get(PREDICTION_UNS_KEY, {}).get("skipped")
    if not isinstance(table, pd.DataFrame) or "reason" not in table:
        return {}
    return dict(zip(table.index.astype(str), table["reason"].astype(str), strict=True))
