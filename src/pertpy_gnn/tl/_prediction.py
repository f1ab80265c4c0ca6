"""Re-export of the prediction output form (it lives in :mod:`pertpy_gnn._prediction`, below ``tl`` and the models)."""

from __future__ import annotations

from .._prediction import DELTA_LAYER, PREDICTION_UNS_KEY, make_prediction_adata

__all__ = ["DELTA_LAYER", "PREDICTION_UNS_KEY", "make_prediction_adata"]
