"""The loss of a batch with many cells per set, from per-set moments, equals the per-cell loss."""

import pytest
import torch

import pertpy_gnn.gears._module as gm
from pertpy_gnn.gears._constants import TENSOR_KEYS as K
from pertpy_gnn.gears._module import GEARSModule


def _module(**kwargs):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = GEARSModule(
        20,
        10,
        torch.randint(0, 20, (2, 60), generator=g),
        torch.rand(60, generator=g),
        torch.randint(0, 10, (2, 30), generator=g),
        torch.rand(30, generator=g),
        hidden_dim=8,
        **kwargs,
    )
    module.control_mean.copy_(torch.rand(20, generator=g) * 3)
    return module


def _set_batch(n_per_set=(40, 17, 25), k=20, seed=0):
    """Three sets (the third the control) with their cells, expression like log-counts (many zeros)."""
    g = torch.Generator().manual_seed(seed)
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(n_per_set)])
    n = len(group)
    sets = torch.tensor([[0, 1], [2, -1], [-1, -1]])
    expression = torch.relu(torch.randn(2, n, k, generator=g) * 2 + 1)
    return {
        K.X: expression[0],
        K.X_CTRL: expression[1],
        K.PERT_IDX: sets[group],
        K.GROUP: group,
        K.MASK: (torch.rand(3, k, generator=g) > 0.2)[group],
    }


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"loss": "mse"}, {"uncertainty": True}, {"direction": "sign", "direction_lambda": 1.0}],
)
def test_set_moment_loss_equals_per_cell_loss(kwargs, monkeypatch):
    module = _module(**kwargs).train()
    batch = _set_batch()
    results = []
    for min_cells in (1, 10**9):  # per-set moments, then the per-cell loss
        monkeypatch.setattr(gm, "SET_MOMENT_MIN_CELLS", min_cells)
        module.zero_grad()
        out = module(batch)[2]
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), {k: float(v) for k, v in out.extra_metrics.items()}, grads))
    (loss_m, extra_m, grads_m), (loss_c, extra_c, grads_c) = results
    torch.testing.assert_close(loss_m, loss_c, rtol=1e-5, atol=1e-6)
    assert extra_m.keys() == extra_c.keys()
    for key in extra_c:
        assert extra_m[key] == pytest.approx(extra_c[key], rel=1e-5, abs=1e-6)
    assert grads_m.keys() == grads_c.keys() and len(grads_c) > 5
    # float32 rounding through the batch norms' backward (some gradients are zero up to rounding, e.g. a bias
    # before a batch norm): all parameters' gradients as one vector
    v_m = torch.cat([grads_m[n].flatten() for n in grads_c])
    v_c = torch.cat([grads_c[n].flatten() for n in grads_c])
    assert (v_m - v_c).norm() <= 1e-5 * v_c.norm()
    assert (v_m - v_c).abs().max() <= 1e-5 * v_c.abs().max()


def test_set_moment_loss_is_used_only_where_it_applies(monkeypatch):
    calls = []
    original = GEARSModule._set_moment_loss

    def spy(self, *args):
        calls.append(args[-1])
        return original(self, *args)

    monkeypatch.setattr(GEARSModule, "_set_moment_loss", spy)
    batch = _set_batch()  # 82 cells, 3 sets
    _module()(batch)
    assert calls == [4]  # autofocus, gamma 2: |e|^4
    _module(direction="tanh")(batch)  # the tanh direction term has a per-cell gradient
    _module(gamma=1.5)(batch)  # |e|^3.5 is no polynomial
    _module()(_set_batch(n_per_set=(8, 9, 7)))  # few cells per set: the per-cell loss
    assert calls == [4]
    with torch.no_grad():
        _module(direction="tanh")(batch)
    assert calls == [4, 4]
