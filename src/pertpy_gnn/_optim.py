"""How to run torch's Adam / AdamW fastest for a set of parameters (the update itself is unchanged)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def fast_adam_kwargs(params: Iterable[torch.Tensor], precision: object = None) -> dict[str, bool]:
    """``fused=True`` where torch has a fused Adam kernel for every parameter, else ``foreach=True``.

    The fused kernel updates all parameters in one pass; torch's default on CPU is a Python loop over
    the parameter tensors, which cost a third of a GEARS set-batch step (``benchmarks/compare_speed``).
    Under Lightning's mixed precision (``precision`` containing ``"mixed"``) it is ``foreach``: the
    precision plugin clips gradients itself and refuses optimizers that unscale them (fused ones).
    """
    params = list(params)
    fused = (
        "mixed" not in str(precision or "")
        and bool(params)
        and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    )
    return {"fused": True} if fused else {"foreach": True}
