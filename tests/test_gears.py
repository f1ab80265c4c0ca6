"""GEARS: the network, its loss, training, prediction, save / load (small data, 1-3 epochs)."""

from __future__ import annotations

import copy
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pertpy_gnn as pg
from pertpy_gnn.gears import GEARS, GEARSModule
from pertpy_gnn.gears._constants import TENSOR_KEYS as K
from pertpy_gnn.gears._module import (
    MLP,
    GraphEncoder,
    LearnedEncoder,
    PretrainedGeneEncoder,
    _column_var,
    _GeneDot,
    _post_mlp_train,
    grid_relu,
)

GO_FILE = "go/human_gene2go_orgHsEgDb_20220912.tsv.gz"


# ----------------------------------------------------------------------------- data
def _toy(
    n_genes: int = 60,
    n_modules: int = 2,
    per_module: int = 4,
    n_cells: int = 20,
    n_ctrl: int = 100,
    seed: int = 0,
):
    """Small screen whose GO terms are informative: genes of a module share terms and effects."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    modules = {f"M{m}": genes[m * per_module : (m + 1) * per_module] for m in range(n_modules)}
    module_effect = {m: rng.normal(0, 1.5, n_genes) * (rng.random(n_genes) < 0.3) for m in modules}
    effect = {g: module_effect[m] + rng.normal(0, 0.1, n_genes) for m, gs in modules.items() for g in gs}
    singles = [g for gs in modules.values() for g in gs]
    doubles = [f"{a}+{b}" for i, a in enumerate(singles) for b in singles[i + 1 : i + 3]]
    base = rng.gamma(3, 0.6, n_genes)
    blocks, labels = [], []
    for c in ["control", *singles, *doubles]:
        n = n_ctrl if c == "control" else n_cells
        mu = base + (sum(effect[g] for g in c.split("+")) if c != "control" else 0)
        x = np.clip(mu + rng.normal(0, 0.3, (n, n_genes)), 0, None)
        x[rng.random(x.shape) < 0.2] = 0
        blocks.append(x)
        labels += [c] * n
    adata = ad.AnnData(
        sp.csr_matrix(np.vstack(blocks).astype(np.float32)),
        obs=pd.DataFrame({"condition": labels}, index=[f"cell{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )
    rows = [(g, f"GO:{m}{t}") for m, gs in modules.items() for g in gs for t in range(4)]
    rows += [(g, f"GO:bg{rng.integers(0, 15)}") for g in [*genes, "X1", "X2", "X3"] for _ in range(2)]
    adata.uns["pg_go_annotations"] = pd.DataFrame(rows, columns=["gene", "go_id"])
    return adata


def _prepare(adata, **split_kwargs):
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    pg.pp.split_perturbations(adata, seed=0, **split_kwargs)
    pg.pp.rank_de_genes(adata)
    pg.pp.go_graph(adata)
    pg.pp.coexpression_graph(adata)
    return adata


@pytest.fixture
def toy():
    return _prepare(_toy())


@pytest.fixture(scope="module")
def trained_toy():
    adata = _prepare(_toy())
    model = pg.tl.train_gears(adata, max_epochs=2, hidden_dim=16, progress_bar=False)
    return adata, model


@pytest.fixture
def go_table(shared_data, norman):
    """Human GO annotations, restricted to Norman's genes, its perturbed genes and 1,500 others (fast graph)."""
    go = pd.read_csv(shared_data / GO_FILE, sep="\t", usecols=["symbol", "go_id"]).rename(
        columns={"symbol": "gene"}
    )
    perturbed = {g for c in norman.obs["condition"].unique() for g in c.split("+")}
    others = pd.Series(sorted(set(go["gene"]))).sample(1500, random_state=0)
    keep = set(norman.var_names) | perturbed | set(others)
    return go[go["gene"].isin(keep)]


def _small_module(n_genes=12, n_nodes=10, d=8, **kwargs):
    g = torch.Generator().manual_seed(0)
    gene_edges = torch.randint(0, n_genes, (2, 40), generator=g)
    pert_edges = torch.randint(0, n_nodes, (2, 30), generator=g)
    torch.manual_seed(0)
    module = GEARSModule(
        n_genes,
        n_nodes,
        gene_edges,
        torch.rand(40, generator=g),
        pert_edges,
        torch.rand(30, generator=g),
        hidden_dim=d,
        **kwargs,
    )
    module.control_mean.copy_(torch.rand(n_genes, generator=g))
    return module


def _batch(module, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = module.n_genes
    return {
        K.X: torch.rand(n, k, generator=g) * 2,
        K.X_CTRL: torch.rand(n, k, generator=g) * 2,
        K.PERT_IDX: torch.tensor([[0, 1], [1, 0], [2, -1], [3, 4], [-1, -1], [2, -1]][:n]),
        K.GROUP: torch.tensor([0, 0, 1, 2, 3, 1][:n]),
        K.MASK: (torch.rand(4, k, generator=g) > 0.2)[
            torch.tensor([0, 0, 1, 2, 3, 1][:n])
        ],  # per perturbation
    }


# ----------------------------------------------------------------------------- network
def test_sgc_matches_torch_geometric_and_row_subsets():
    from torch_geometric.nn import SGConv

    g = torch.Generator().manual_seed(1)
    edges, weights = torch.randint(0, 30, (2, 120), generator=g), torch.rand(120, generator=g)
    enc = GraphEncoder(30, 8, 1, "sgc", edges, weights)
    conv = SGConv(8, 8, K=1)
    conv.lin.load_state_dict(enc.lins[0].state_dict())
    x = enc.embedding / enc.embedding.norm(dim=1, keepdim=True).clamp(min=1)
    full = enc()
    torch.testing.assert_close(full, conv(x, edges, weights))
    rows = torch.tensor([3, 17, 29, 3])
    w = torch.randn(4, 8, generator=g)
    for gnn, layers in (("sgc", 1), ("gcn", 1), ("gcn", 2), ("gat", 2)):
        # a subset of rows (one propagation: only the neighbours' rows normalized): same values, same gradients
        enc2 = enc if gnn == "sgc" else GraphEncoder(30, 8, layers, gnn, edges, weights)
        grads = []
        for out in (enc2(rows=rows), enc2()[rows]):
            enc2.zero_grad()
            (out * w).sum().backward()
            grads.append((out.detach(), enc2.embedding.grad.clone()))
        (sub, d_sub), (ref, d_ref) = grads
        torch.testing.assert_close(sub, ref)
        torch.testing.assert_close(d_sub, d_ref)
        assert d_ref.abs().sum() > 0


def test_gene_dot_and_column_var_equal_torch():
    """The per-gene decoder product (:class:`_GeneDot`) gives :func:`torch.baddbmm`'s values and gradients,
    also for a transposed incoming gradient; :func:`_column_var` equals ``var(0, unbiased=False)``."""
    g = torch.Generator().manual_seed(2)
    y0 = torch.randn(7, 3, 5, dtype=torch.float64, generator=g)
    w0 = torch.randn(7, 5, dtype=torch.float64, generator=g)
    up = torch.randn(3, 7, dtype=torch.float64, generator=g)  # the decoders read z as n x K
    results = []
    for fn in (
        lambda y, w: _GeneDot.apply(y, w),
        lambda y, w: torch.baddbmm(torch.zeros(7, 3, 1, dtype=y.dtype), y, w.unsqueeze(-1)).squeeze(-1),
    ):
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        z = fn(y, w)
        (z.T * up).sum().backward()
        results.append((z.detach(), y.grad, w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert results[0][1].is_contiguous()
    x = torch.randn(50, 4, generator=g) * 3 + 10
    torch.testing.assert_close(_column_var(x), x.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_gcn_norm_equals_torch_geometric():
    from torch_geometric.nn.conv.gcn_conv import gcn_norm as pyg_gcn_norm

    from pertpy_gnn.gears._module import gcn_norm

    g = torch.Generator().manual_seed(2)
    edges = torch.randint(0, 25, (2, 150), generator=g)  # with self-loops, duplicates and isolated nodes
    edges[:, :5] = torch.tensor([[3, 3, 7, 9, 9], [3, 3, 7, 9, 4]])
    weights = torch.rand(150, generator=g)

    def dense(ei, w):
        return torch.zeros(30, 30).index_put_((ei[1], ei[0]), w, accumulate=True)

    ei, w = gcn_norm(edges, weights, 30)
    ref_ei, ref_w = pyg_gcn_norm(edges, weights, 30, add_self_loops=True)
    assert ei.shape == ref_ei.shape
    torch.testing.assert_close(dense(ei, w), dense(ref_ei, ref_w))


@pytest.mark.parametrize("gnn", ["sgc", "gcn", "gat"])
def test_every_gnn_kind_trains(gnn):
    module = _small_module(gnn=gnn, n_gene_gnn_layers=2, n_go_gnn_layers=2)
    _, _, out = module(_batch(module))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert module.pert_encoder.embedding.grad.abs().sum() > 0  # the GO embeddings of the batch's genes train
    assert module.gene_encoder.embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False])
def test_gene_graph_computed_once_and_shared_by_every_cell(training):
    module = _small_module()
    module.train(training)
    calls = []
    module.gene_encoder.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    pert_idx = torch.tensor([[2, 5], [2, 5], [5, 2], [-1, -1], [-1, -1]])
    ref = copy.deepcopy(module)
    out = module.inference(pert_idx)
    assert calls == [(module.n_genes, 8)]  # once per step, on the K gene nodes only
    h_post = out["h_post"]  # K x n x d
    torch.testing.assert_close(h_post[:, 0], h_post[:, 1])
    torch.testing.assert_close(h_post[:, 0], h_post[:, 2])  # sum over the set: order does not matter
    torch.testing.assert_close(h_post[:, 3], h_post[:, 4])
    assert not torch.allclose(h_post[:, 0], h_post[:, 3])
    # the batch norms folded into the broadcast / the decoders give what the plain layers give
    h_gene = ref.gene_mlp(ref.gene_encoder())
    h_p = torch.zeros(5, 8)
    perturbed = torch.tensor([0, 1, 2])
    h_p[perturbed] = ref.pert_fuse(ref.pert_encoder()[pert_idx[:3]].sum(1))
    h = (h_gene[:, None] + h_p[None]).reshape(-1, 8)
    plain = ref.post_mlp(torch.relu(ref.bn_post(h))).reshape(module.n_genes, 5, 8)
    fused = module.generative(h_post)
    z_plain = (torch.einsum("knd,kd->kn", plain, ref.w1[..., 0]) + ref.b1[:, 0]).T
    torch.testing.assert_close(fused["z"], z_plain, rtol=1e-4, atol=1e-5)
    z = fused["z"].detach()  # the cross-gene batch norm over 5 rows would amplify rounding differences
    zhat_plain = ((z * ref.w2[:, 0]).T + ref.w2[:, 1:] @ ref.cross_gene(z).T + ref.b2).T
    torch.testing.assert_close(fused["zhat"], zhat_plain, rtol=1e-4, atol=1e-5)
    if training:  # running statistics updated as nn.BatchNorm1d does
        torch.testing.assert_close(module.bn_post.running_mean, ref.bn_post.running_mean)
        torch.testing.assert_close(module.bn_post.running_var, ref.bn_post.running_var)
        torch.testing.assert_close(module.post_mlp[-1].running_var, ref.post_mlp[-1].running_var)


@pytest.mark.parametrize(("block_rows", "cross_gene"), [(1, True), (7, True), (10_000, True), (7, False)])
def test_folded_blocked_inference_equals_plain_layers(block_rows, cross_gene):
    """Eval-mode prediction with the batch norms folded and the gene grid in blocks gives the plain path's values."""
    module = _small_module(uncertainty=True, cross_gene=cross_gene)
    module.train()
    for seed in range(3):  # non-trivial running statistics
        module(_batch(module, seed=seed))
    with torch.no_grad():
        for bn in (module.bn_post, module.post_mlp[1], module.post_mlp[-1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    module.eval()
    pert_idx = torch.tensor([[2, 5], [5, 2], [-1, -1], [3, -1], [7, 1]])
    with torch.no_grad():
        plain = module.generative(**module._get_generative_input({}, module.inference(pert_idx)))
        zhat, logvar = module.predict_delta(pert_idx, block_rows=block_rows)
        zhat2, _ = module.predict_delta(pert_idx, h_gene=module.gene_states())
    torch.testing.assert_close(zhat, plain["zhat"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, plain["logvar"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zhat2, zhat)
    torch.testing.assert_close(zhat[0], zhat[1])  # order within a set does not matter


def test_loss_averages_over_distinct_perturbations_on_expressed_genes():
    module = _small_module(direction_lambda=0.0)
    batch = _batch(module)
    zhat = torch.randn(4, module.n_genes)  # one row per distinct group of the batch
    loss = module.loss(batch, {}, {"zhat": zhat, "logvar": None}).loss
    err = (zhat[batch[K.GROUP]] + batch[K.X_CTRL] - batch[K.X]).abs() ** 4
    m = batch[K.MASK].float()
    per_cell = (err * m).sum(1) / m.sum(1)
    groups = batch[K.GROUP]
    expected = torch.stack([per_cell[groups == g].mean() for g in groups.unique()]).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(("direction", "nonzero"), [("tanh", True), ("sign", False)])
def test_direction_term_gradient(direction, nonzero):
    module = _small_module(direction=direction)
    batch = _batch(module)
    grads = []
    for lam in (0.0, 1.0):
        module.direction_lambda = lam
        zhat = torch.zeros(4, module.n_genes, requires_grad=True)
        module.loss(batch, {}, {"zhat": zhat, "logvar": None}).loss.backward()
        grads.append(zhat.grad)
    direction_grad = grads[1] - grads[0]
    assert (direction_grad.abs().sum() > 0) == nonzero
    if not nonzero:
        assert torch.equal(direction_grad, torch.zeros_like(direction_grad))


def test_uncertainty_loss_is_minimized_at_log_error():
    module = _small_module(uncertainty=True, direction_lambda=0.0)
    batch = _batch(module)
    zhat = torch.randn(4, module.n_genes)
    err = (zhat[batch[K.GROUP]] + batch[K.X_CTRL] - batch[K.X]).abs() ** 4
    # s varies per cell only through the group here: give each group log of its mean error
    s_opt = torch.stack([torch.log(err[batch[K.GROUP] == g].mean(0)) for g in range(4)])
    s = s_opt.clone().requires_grad_(True)
    module.loss(batch, {}, {"zhat": zhat, "logvar": s}).loss.backward()
    assert s.grad.abs().max() < 1e-5
    far = module.loss(batch, {}, {"zhat": zhat, "logvar": s_opt + 3}).loss
    assert far > module.loss(batch, {}, {"zhat": zhat, "logvar": s_opt}).loss


def test_uncertainty_loss_stays_finite_for_a_runaway_log_variance():
    """A log-variance far below the errors (a constant learning rate reached it in 3 epochs) gives a
    finite loss and finite gradients: ``s`` is bounded, and unexpressed genes (weight 0) add nothing."""
    module = _small_module(uncertainty=True, direction_lambda=0.0)
    batch = _batch(module)
    batch[K.MASK][:, 0] = False  # an unexpressed gene with a large error
    batch[K.X][:, 0] = 50.0
    zhat = torch.randn(4, module.n_genes)
    s = torch.full((4, module.n_genes), -1e4, requires_grad=True)
    loss = module.loss(batch, {}, {"zhat": zhat, "logvar": s}).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_bf16_autocast_trains_with_float32_statistics():
    """Under ``torch.autocast(bfloat16)`` a step runs forward and backward; batch-norm buffers stay float32."""
    losses = []
    for autocast in (False, True):
        module = _small_module(uncertainty=True)
        module.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, _, out = module(_batch(module))
        out.loss.backward()
        losses.append(out.loss.detach().float())
        for bn in (module.bn_post, module.post_mlp[-1], module.cross_gene[1]):
            assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
            assert torch.isfinite(bn.running_var).all()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert abs(losses[1] - losses[0]) < 0.05 * losses[0]


def test_eval_predictions_float32_under_bf16_autocast():
    """In eval mode (validation of a bf16-mixed run) ``predict_delta`` runs in float32 also under autocast,
    the shared gene states included: the same values as without autocast."""
    module = _small_module(uncertainty=True)
    module.eval()
    pert_idx = _batch(module)[K.PERT_IDX]
    with torch.no_grad():
        ref = module.predict_delta(pert_idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = module.predict_delta(pert_idx)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _plain_post_mlp(mlp, g, q, **_):
    """The training-mode first post-perturbation block through the plain nn layers (what ``_post_mlp_train`` replaces)."""
    out = mlp(grid_relu(g, q).reshape(-1, g.shape[1]), last_norm=False)
    return out, out.sum(0), (out * out).sum(0)


@pytest.mark.parametrize("keep_bytes", [0, 2**30])  # h and r recomputed per chunk in backward / kept
@pytest.mark.parametrize(
    "chunk_rows", [12, 3, 10_000]
)  # chunks of 2 genes (the last of 1), of 1 gene, one chunk
@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float64, 1e-9, 1e-11), (torch.float32, 2e-4, 2e-5)]
)
def test_folded_post_mlp_training_block_equals_plain_layers(dtype, rtol, atol, chunk_rows, keep_bytes):
    """``ReLU(g_u + q_s) -> Linear -> BN -> ReLU -> Linear`` as one chunked Function (BN folded through the
    Gram matrix) equals the plain layers over the gene x set grid.

    Outputs, the column moments, the gradients of ``g``, ``q`` and of every parameter (for a loss
    through all three outputs), and the running statistics; then eval mode on the updated statistics.
    """
    torch.manual_seed(0)
    d, k, n = 8, 37, 5
    mlp = MLP([d, 2 * d, d]).to(dtype)
    with torch.no_grad():
        for bn in (mlp[1], mlp[-1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(mlp)
    mlp.train(), ref.train()
    big_n = k * n
    weights = [
        torch.randn(big_n, d, dtype=dtype),
        torch.randn(d, dtype=dtype),
        torch.randn(d, dtype=dtype) / big_n,
    ]
    for step in range(3):  # running statistics move over several steps
        g0, q0 = torch.randn(k, d, dtype=dtype) + 0.3 * step, torch.randn(n, d, dtype=dtype)
        results = []
        for fn, m in ((_post_mlp_train, mlp), (_plain_post_mlp, ref)):
            g, q = g0.clone().requires_grad_(), q0.clone().requires_grad_()
            m.zero_grad()
            outs = fn(m, g, q, chunk_rows=chunk_rows, keep_bytes=keep_bytes)
            sum(
                ((o * w).sum() for o, w in zip(outs, weights, strict=True)), torch.zeros((), dtype=dtype)
            ).backward()
            grads = {f"grad {k}": p.grad for k, p in m.named_parameters() if p.grad is not None}
            names = ("out", "sum", "sumsq")
            results.append(dict(zip(names, outs, strict=True)) | {"grad g": g.grad, "grad q": q.grad} | grads)
        new, old = results
        assert new.keys() == old.keys() and len(new) == 5 + 6  # lin1, bn1, lin2 (not the last batch norm)
        assert new["out"].shape == (big_n, d)
        # the first linear layer's bias is followed by a batch norm: its gradient is zero, exactly here,
        # rounding noise of the sum over the rows through the plain layers (small beside its weight's)
        assert (new.pop("grad 0.bias") == 0).all()
        assert old.pop("grad 0.bias").abs().max() < 10 * atol * old["grad 0.weight"].abs().max()
        for k_, b in old.items():
            scale = b.abs().max().clamp(min=1.0)
            torch.testing.assert_close(
                new[k_].detach() / scale,
                b.detach() / scale,
                rtol=rtol,
                atol=atol,
                msg=lambda m, k_=k_: f"{k_}: {m}",
            )
        for name, buf in ref[1].named_buffers():
            torch.testing.assert_close(dict(mlp[1].named_buffers())[name], buf, rtol=rtol, atol=atol)
    assert int(mlp[1].num_batches_tracked) == 3
    mlp.eval(), ref.eval()
    h = torch.rand(big_n, d, dtype=dtype)
    torch.testing.assert_close(mlp(h, last_norm=False), ref(h, last_norm=False), rtol=rtol, atol=atol)


def test_folded_post_mlp_training_block_gradients_of_some_outputs_only():
    """A loss through the output alone or through the column moments alone (autograd passes ``None`` for
    the others) gives the plain layers' gradients."""
    torch.manual_seed(1)
    mlp = MLP([4, 8, 4]).train().double()
    ref = copy.deepcopy(mlp)
    g0, q0 = torch.randn(9, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for which, w, keep in (
        (0, torch.randn(27, 4, dtype=torch.float64), 0),
        (2, torch.randn(4, dtype=torch.float64), 0),
        (0, torch.randn(27, 4, dtype=torch.float64), 2**30),
        (2, torch.randn(4, dtype=torch.float64), 2**30),
    ):
        grads = []
        for fn, m in ((_post_mlp_train, mlp), (_plain_post_mlp, ref)):
            g, q = g0.clone().requires_grad_(), q0.clone().requires_grad_()
            m.zero_grad()
            (fn(m, g, q, chunk_rows=6, keep_bytes=keep)[which] * w).sum().backward()
            grads.append((g.grad, q.grad, m[0].weight.grad, m[3].weight.grad))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_folded_post_mlp_training_block_keeps_only_its_output_for_backward():
    """Of the grid's size (``K n`` rows) a block over more than ``keep_bytes`` keeps its output only: ``h``
    and the hidden ``K n x 2d`` activation are recomputed per chunk in backward, not saved. A smaller
    grid keeps them too (the default threshold, 16 MiB, for this tiny grid)."""
    torch.manual_seed(0)
    mlp = MLP([4, 8, 4]).train()
    g, q = torch.randn(10, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    for keep_bytes, kept_shapes in ((50 * 12 * 4 - 1, [(50, 4)]), (50 * 12 * 4, [(50, 4), (50, 4), (50, 8)])):
        out, colsum, sumsq = _post_mlp_train(mlp, g, q, chunk_rows=20, keep_bytes=keep_bytes)
        saved = out.grad_fn.saved_tensors
        assert [tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] == 50] == kept_shapes
        assert any(t is out or t.data_ptr() == out.data_ptr() for t in saved)
        (out.sum() + colsum.sum() + sumsq.sum()).backward()
        assert g.grad.shape == (10, 4) and q.grad.shape == (5, 4)
    out = _post_mlp_train(mlp, g, q)[0]
    assert len([t for t in out.grad_fn.saved_tensors if t.dim() == 2 and t.shape[0] == 50]) == 3


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float64, 1e-8, 1e-10), (torch.float32, 1e-3, 1e-4)]
)
def test_training_steps_with_folded_post_mlp_equal_plain_layers(monkeypatch, dtype, rtol, atol):
    """Three SGD steps of the module with the folded block and with the plain layers: same losses,
    gradients, parameters, running statistics and eval-mode predictions (to rounding: each tensor is
    compared relative to its largest entry; float32 rounding differences grow through the batch norms
    of a 12-gene module)."""
    import pertpy_gnn.gears._module as gears_module

    fused = _small_module(uncertainty=True).to(dtype)
    plain = copy.deepcopy(fused)
    pert_idx = torch.tensor([[2, 5], [-1, -1], [3, -1], [7, 1]])

    def close(a, b, what, floor=1e-6):
        scale = b.abs().max().clamp(min=floor)
        torch.testing.assert_close(a / scale, b / scale, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")

    states = []
    for module, block in ((fused, gears_module._post_mlp_train), (plain, _plain_post_mlp)):
        monkeypatch.setattr(gears_module, "_post_mlp_train", block)
        module.train()
        opt = torch.optim.SGD(module.parameters(), lr=0.1)  # Adam would scale the noise of zero gradients up
        losses, grads = [], []
        for seed in range(3):
            opt.zero_grad()
            batch = {
                k: v.to(dtype) if v.is_floating_point() else v for k, v in _batch(module, seed=seed).items()
            }
            _, _, out = module(batch)
            out.loss.backward()
            losses.append(out.loss.detach())
            grads.append({k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})
            opt.step()
        module.eval()
        with torch.no_grad():  # eval mode: the plain layers on the running statistics, in both
            out = module.generative(**module._get_generative_input({}, module.inference(pert_idx)))
        states.append((losses, grads, module.state_dict(), out["zhat"], out["logvar"]))
    (l1, g1, s1, z1, v1), (l2, g2, s2, z2, v2) = states
    close(torch.stack(l1), torch.stack(l2), "losses")
    for a, b in zip(g1, g2, strict=True):
        assert a.keys() == b.keys()
        # relative to the step's largest gradient: a bias followed by a batch norm has a zero gradient,
        # in either path rounding noise (post_mlp.0.bias: exactly zero in the folded block)
        scale = max(float(v.abs().max()) for v in b.values())
        assert (a["post_mlp.0.bias"] == 0).all()
        for k in a:
            torch.testing.assert_close(
                a[k] / scale, b[k] / scale, rtol=rtol, atol=atol, msg=lambda m, k=k: f"gradient of {k}: {m}"
            )
    for k in s1:
        if s1[k].is_floating_point():  # the zero-gradient parameters differ by lr x rounding noise
            close(s1[k], s2[k], k, floor=1.0)
        else:
            assert torch.equal(s1[k], s2[k])
    close(z1, z2, "zhat")
    close(v1, v2, "logvar")


@pytest.mark.parametrize(
    "batching, forced, folded",
    [("cells", True, True), ("sets", True, True), ("sets", False, False), ("cells", False, False)],
)
def test_training_block_folded_unless_told(toy, monkeypatch, batching, forced, folded):
    """Both batchings train the folded post-perturbation block by default;
    ``GEARSModule.fold_training_block = False`` trains the plain layers."""
    import pertpy_gnn.gears._module as gears_module

    assert GEARSModule.fold_training_block is True
    calls = []
    real = gears_module._post_mlp_train

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gears_module, "_post_mlp_train", counting)
    monkeypatch.setattr(GEARSModule, "fold_training_block", forced)
    GEARS.setup_anndata(toy)
    model = GEARS(toy, hidden_dim=8, seed=0)
    model.train(max_epochs=1, batch_size=16, batching=batching, progress_bar=False)
    assert bool(calls) is folded


@pytest.mark.parametrize(
    "model_kwargs, train_kwargs",
    [
        ({"uncertainty": True}, {}),  # the paper's GEARS, cell batches, validation-selected epoch
        ({"anchor": "additive"}, {"batching": "sets", "selection": "last"}),  # the anchored preset's
    ],
)
def test_train_bf16_mixed_precision(toy, model_kwargs, train_kwargs):
    """``GEARS.train(precision='bf16-mixed')`` trains an epoch with validation; weights, running statistics
    and predictions stay float32 and finite."""
    GEARS.setup_anndata(toy)
    model = GEARS(toy, hidden_dim=16, seed=0, **model_kwargs)
    model.train(max_epochs=1, precision="bf16-mixed", progress_bar=False, **train_kwargs)
    assert len(model.history_) == 1
    assert np.isfinite(model.history_[["train_loss", "val_top20_de_mse"]].to_numpy()).all()
    state = model.module.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    pred = model.predict(["G000", "G000+G001"], n_control=None)
    for arr in (pred.X, pred.layers["delta"]):
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
    assert np.abs(pred.layers["delta"]).max() > 0


# ----------------------------------------------------------------------------- model
@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_train_records_run_and_predicts(trained_toy, tmp_path):
    adata, model = trained_toy
    rec = adata.uns["pg_gears"]
    assert set(rec) == {"params", "split", "history", "best_epoch", "best_val_top20_de_mse", "seen_genes"}
    assert list(rec["history"].columns) == ["epoch", "train_loss", "val_top20_de_mse", "lr"]
    assert len(rec["history"]) == 2 and np.isfinite(rec["history"]["val_top20_de_mse"]).all()
    assert rec["history"]["lr"].tolist() == [1e-3, 5e-4]
    assert rec["params"]["hidden_dim"] == 16 and rec["params"]["gnn"] == "sgc"
    assert rec["split"]["n_train_cells"] == int((adata.obs["pg_split"] == "train").sum())
    assert set(rec["seen_genes"]) == model.seen_genes
    assert model.seen_genes == {
        g
        for p in adata.obs.loc[adata.obs["pg_split"] == "train", "pg_perturbation"].unique()
        for g in p.split("+")
    } - {"control"}
    adata.write_h5ad(tmp_path / "a.h5ad")  # the record is h5ad-writable
    assert "pg_gears" in ad.read_h5ad(tmp_path / "a.h5ad").uns
    assert not any(c.startswith("_scvi") for c in adata.obs.columns)
    with pytest.raises(ValueError, match="already exists"):
        pg.tl.train_gears(adata, max_epochs=1, progress_bar=False)

    seen = sorted(model.seen_genes)
    unseen = sorted(set(adata.uns["pg_perturbation"]["genes"]) - model.seen_genes)
    pred = pg.tl.predict(
        model,
        [
            f"{seen[0]}+{seen[1]}",
            (seen[1], seen[0]),
            f"{seen[0]}+{unseen[0]}",
            f"{seen[0]}+X1",
            (seen[0], seen[1], unseen[0]),
        ],
    )
    assert pred.shape == (5, adata.n_vars) and pred.uns["pg_prediction"]["model"] == "GEARS"
    assert list(pred.obs["perturbation"]) == [f"{seen[0]}+{seen[1]}"] * 2 + [
        f"{seen[0]}+{unseen[0]}",
        f"{seen[0]}+X1",
        "+".join(sorted([seen[0], seen[1], unseen[0]])),
    ]
    np.testing.assert_array_equal(pred.X[0], pred.X[1])  # A+B == B+A
    assert pred.obs["n_unseen"].tolist() == [0, 0, 1, 1, 1] and pred.obs["n_genes"].tolist() == [
        2,
        2,
        2,
        2,
        3,
    ]
    assert np.isfinite(pred.X).all() and len({tuple(r) for r in pred.X[[0, 2, 3, 4]].round(5)}) == 4
    ctrl = pred.uns["pg_prediction"]["control_mean"]
    np.testing.assert_allclose(pred.layers["delta"], pred.X - ctrl, atol=1e-6)
    # the mean of the drawn control cells, exactly (a different draw moves X, not delta)
    other = model.predict(f"{seen[0]}+{seen[1]}", n_control=20, seed=1)
    np.testing.assert_allclose(other.layers["delta"][0], pred.layers["delta"][0], atol=1e-6)
    assert not np.allclose(other.X[0], pred.X[0])


def test_training_lowers_validation_error(toy):
    GEARS.setup_anndata(toy)
    model = GEARS(toy, hidden_dim=16)
    _, val, control_mean, _, _ = model._training_data(0)
    model.module.control_mean.copy_(torch.from_numpy(control_mean))

    def val_mse():
        zhat, _ = model._delta_from_index(val[K.PERT_IDX])
        de = val[K.DE_IDX]
        return float(((zhat.gather(1, de) + model.module.control_mean[de] - val[K.DE_MEAN]) ** 2).mean())

    before = val_mse()
    model.train(max_epochs=3, batch_size=8, progress_bar=False)
    assert val_mse() < 0.9 * before
    assert val_mse() == pytest.approx(model.best_val, rel=1e-5)
    assert model.best_val == model.history_["val_top20_de_mse"].min()


def test_norman_real_data(norman, go_table):
    pg.pp.parse_perturbations(
        norman, perturbation_key="condition", gene_universe=set(go_table["gene"]) | {"IER5L"}
    )
    pg.pp.split_perturbations(norman, seed=0)
    pg.pp.rank_de_genes(norman)
    pg.pp.go_graph(norman, annotations=go_table)
    pg.pp.coexpression_graph(norman)
    model = pg.tl.train_gears(norman, max_epochs=2, progress_bar=False)
    rec = norman.uns["pg_gears"]
    assert rec["split"]["excluded_perturbations"].tolist() == ["IER5L"]  # no GO annotation: left out, logged
    assert "IER5L" not in model.seen_genes and "KLF1" in model.seen_genes
    assert np.isfinite(rec["history"]["val_top20_de_mse"]).all()
    test = norman.uns["pg_split"]["table"].query("split == 'test'").index.tolist()
    pred = model.predict(test)
    assert pred.shape == (len(test), 500) and list(pred.obs_names) == test
    assert (pred.obs.loc[pred.obs["n_genes"] == 2, "n_unseen"] >= 0).all()
    with pytest.raises(ValueError, match=r"not in the GO graph.*\['IER5L'\]"):
        model.predict(["KLF1+IER5L", "KLF1"])


def test_norman_evaluate_leaves_out_a_gene_without_go_node(norman, go_table, caplog):
    """IER5L (no GO annotation) held out: evaluate completes, names it, scores every model on the rest."""
    pg.pp.parse_perturbations(
        norman, perturbation_key="condition", gene_universe=set(go_table["gene"]) | {"IER5L"}
    )
    pg.pp.split_perturbations(norman, seed=4)  # this seed puts IER5L among the test perturbations
    test = norman.uns["pg_split"]["table"].query("split == 'test'").index.tolist()
    assert "IER5L" in test
    pg.pp.rank_de_genes(norman)
    pg.pp.go_graph(norman, annotations=go_table)
    pg.pp.coexpression_graph(norman)
    model = pg.tl.train_gears(norman, max_epochs=1, hidden_dim=16, progress_bar=False)
    reasons = model.unpredictable(test)
    assert list(reasons) == ["IER5L"] and "no node in the GO graph" in reasons["IER5L"]
    baselines = {k: pg.tl.fit_baseline(norman, k) for k in ("no_change", "train_mean", "additive")}
    with caplog.at_level(logging.WARNING, logger="pertpy_gnn"):
        df = pg.tl.evaluate(norman, {"GEARS": model, **baselines})
    assert (
        "GEARS cannot predict 1 of the 20" in caplog.text
        and "IER5L: IER5L has no node in the GO graph" in caplog.text
    )
    assert "fix: build the GO graph from a GO source that annotates it" in caplog.text
    skipped = norman.uns["pg_evaluation"]["skipped"]
    assert set(skipped["perturbation"]) == {"IER5L"} and list(skipped["model"]) == ["GEARS", *baselines]
    assert "GO graph" in skipped.set_index("model").at["GEARS", "reason"]
    # GEARS and the baselines on the same 19 perturbations (additive gives NaN, not scored, where a single
    # of the double was not trained: counted in its n, as before)
    scored = (
        df[(df["metric"] == "mse_all") & (df["skipped"] == "")].groupby("model")["perturbation"].apply(set)
    )
    expected = set(test) - {"IER5L"}
    assert all(scored[m] == expected for m in ("GEARS", "no_change", "train_mean", "additive"))
    ier = df[df["perturbation"] == "IER5L"]
    assert ier["value"].isna().all() and (ier["skipped"] != "").all()
    summary = norman.uns["pg_evaluation"]["summary"].query("subgroup == 'all' and metric == 'mse_top20'")
    n = summary.set_index("model")["n"]
    assert n["GEARS"] == n["no_change"] == n["train_mean"] == 19 and (summary["n_skipped"] == 1).all()
    # the prediction with skip_unknown=True records what it dropped and evaluates the same
    pred = model.predict(test, skip_unknown=True)
    assert "IER5L" not in pred.obs_names and "IER5L" in pred.uns["pg_prediction"]["skipped"].index
    again = pg.tl.evaluate(norman, {"GEARS": pred, **baselines}, overwrite=True)
    pd.testing.assert_frame_equal(again, df)


def test_save_load_gives_identical_predictions(trained_toy, tmp_path):
    adata, model = trained_toy
    sets = ["G000+G001", "G002", "G004+X2"]
    before = model.predict(sets, n_control=30, seed=3)
    model.save(tmp_path / "m")
    fresh = adata.copy()
    del fresh.uns["pg_go_graph"], fresh.uns["pg_coexpression_graph"]  # graphs travel with the model
    loaded = GEARS.load(tmp_path / "m", adata=fresh)
    after = loaded.predict(sets, n_control=30, seed=3)
    np.testing.assert_array_equal(before.X, after.X)
    assert loaded.seen_genes == model.seen_genes and loaded.best_epoch_ == model.best_epoch_
    assert loaded.history_.equals(model.history_)


def test_fixed_seed_is_deterministic():
    runs = []
    for seed in (0, 0, 1):
        adata = _prepare(_toy())
        model = pg.tl.train_gears(adata, max_epochs=1, hidden_dim=16, seed=seed, progress_bar=False)
        runs.append((adata.uns["pg_gears"]["history"], model.predict(["G000+G005", "G003"]).X))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][1], runs[2][1])


@pytest.mark.parametrize("clip", [1e-3, None])
def test_gradient_clipping_by_value_equals_lightnings(monkeypatch, clip):
    """The plan's in-place ``foreach`` clipping trains to exactly the parameters Lightning's own clipping gives."""
    import lightning.pytorch as lp

    from pertpy_gnn.gears._training_plan import GEARSTrainingPlan

    calls = []
    real = torch._foreach_clamp_min_
    monkeypatch.setattr(torch, "_foreach_clamp_min_", lambda *a: calls.append(1) or real(*a))
    states = []
    for ours in (True, False):
        if not ours:  # Lightning's path: the LightningModule's hook
            monkeypatch.setattr(
                GEARSTrainingPlan,
                "configure_gradient_clipping",
                lp.LightningModule.configure_gradient_clipping,
            )
        adata = _prepare(_toy())
        GEARS.setup_anndata(adata)
        model = GEARS(adata, hidden_dim=16, seed=0)
        model.train(max_epochs=1, progress_bar=False, gradient_clip_val=clip, seed=0)
        states.append({k: v.clone() for k, v in model.module.state_dict().items()})
        if ours:
            n_ours = len(calls)
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=k)
    assert n_ours > 0 if clip else n_ours == 0  # the fast path ran, once per step, only when clipping


def test_uncertainty_and_per_cell_predictions(toy):
    model = pg.tl.train_gears(toy, max_epochs=1, hidden_dim=16, uncertainty=True, progress_bar=False)
    train_sets = [
        tuple(p.split("+"))
        for p in toy.obs.loc[toy.obs["pg_split"] == "train", "pg_perturbation"].unique()
        if p != "control"
    ]
    pred = model.predict(train_sets)
    assert {"uncertainty", "uncertainty_z"} <= set(pred.obs.columns)
    mu, sd = model.module.uncertainty_stats.tolist()
    np.testing.assert_allclose(pred.obs["uncertainty_z"], (pred.obs["uncertainty"] - mu) / sd, rtol=1e-5)
    assert sd > 0 and np.isfinite(pred.obs["uncertainty"]).all()

    ctrl = np.flatnonzero(toy.obs["pg_perturbation"] == "control")[:5]
    pg.tl.predict(model, "G000+G001", adata=toy, cells=toy.obs_names[ctrl], layer_added="gears_cells")
    layer = toy.layers["gears_cells"]
    zhat = model.predict("G000+G001", n_control=None).layers["delta"][0]
    np.testing.assert_allclose(layer[ctrl], toy.X[ctrl].toarray() + zhat, rtol=1e-5, atol=1e-5)
    assert np.isnan(np.delete(layer, ctrl, axis=0)).all()
    with pytest.raises(ValueError, match="already exists"):
        pg.tl.predict(model, "G000", adata=toy, cells=ctrl, layer_added="gears_cells")
    with pytest.raises(ValueError, match="one per selected cell"):
        model.predict_cells(["G000", "G001"], cells=ctrl, layer_added="other")


def test_bad_inputs_fail_with_clear_messages(trained_toy, caplog):
    adata, model = trained_toy
    raw = _toy()
    with pytest.raises(KeyError, match="parse_perturbations"):
        GEARS.setup_anndata(raw)
    pg.pp.parse_perturbations(raw, perturbation_key="condition")
    with pytest.raises(KeyError, match="split_perturbations"):
        GEARS.setup_anndata(raw)
    pg.pp.split_perturbations(raw, seed=0)
    GEARS.setup_anndata(raw)
    with pytest.raises(KeyError, match=r"pg.pp.go_graph\(adata\)"):
        GEARS(raw)
    pg.pp.go_graph(raw)
    with pytest.raises(KeyError, match=r"pg.pp.coexpression_graph\(adata\)"):
        GEARS(raw)
    pg.pp.coexpression_graph(raw)
    untrained = GEARS(raw, hidden_dim=8)
    with pytest.raises(RuntimeError, match="not trained"):
        untrained.predict("G000")
    with pytest.raises(KeyError, match="rank_de_genes"):
        untrained.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="var_names"):
        GEARS(
            raw,
            coexpression_graph={**raw.uns["pg_coexpression_graph"], "genes": raw.var_names[::-1].to_numpy()},
        )
    with pytest.raises(ValueError, match="`gnn` must be one of"):
        GEARS(raw, gnn="gin")

    with pytest.raises(
        ValueError, match=r"2 genes are not in the GO graph.*\['NOPE', 'ZZZ'\].*skip_unknown=True"
    ):
        model.predict(["G000+NOPE", "ZZZ", "G001"])
    with caplog.at_level(logging.WARNING, logger="pertpy_gnn"):
        pred = model.predict(["G000+NOPE", "ZZZ", "G001"], skip_unknown=True)
    assert list(pred.obs_names) == ["G001"] and "Dropping 2 perturbation sets" in caplog.text
    with pytest.raises(ValueError, match="Empty perturbation set"):
        model.predict(["control"])
    with pytest.raises(ValueError, match="n_control"):
        model.predict("G001", n_control=0)


# ----------------------------------------------------------------------------- pre-trained gene embeddings
def _embeddings(adata, d=6, n_missing=3):
    e = np.random.default_rng(1).normal(size=(adata.n_vars, d)).astype(np.float32)
    e[:n_missing] = np.nan
    return e


def test_pretrained_gene_encoder():
    e = torch.randn(7, 5)
    e[[1, 4]] = float("nan")
    enc = PretrainedGeneEncoder(e, 3, freeze=True)
    h = enc()
    ok = torch.tensor([0, 2, 3, 5, 6])
    unit = e[ok] / e[ok].norm(dim=1, keepdim=True)
    torch.testing.assert_close(h[ok], enc.proj(unit))
    torch.testing.assert_close(h[[1, 4]], enc.own)
    rows = torch.tensor([4, 0])
    torch.testing.assert_close(enc(rows=rows), h[rows])
    h.sum().backward()
    assert enc.own.grad.abs().sum() > 0 and enc.proj.weight.grad.abs().sum() > 0
    assert "pretrained" not in dict(enc.named_parameters()) and "pretrained" not in enc.state_dict()
    tuned = PretrainedGeneEncoder(e, 3, freeze=False)
    tuned().sum().backward()
    assert tuned.pretrained.grad[ok].abs().sum() > 0
    # the module uses it in place of the co-expression GNN, which then needs no graph
    module = GEARSModule(
        7, 10, None, None, torch.randint(0, 10, (2, 30)), torch.rand(30), hidden_dim=3, gene_embeddings=e
    )
    assert isinstance(module.gene_encoder, PretrainedGeneEncoder)
    with pytest.raises(ValueError, match="co-expression graph"):
        GEARSModule(7, 10, None, None, torch.randint(0, 10, (2, 30)), torch.rand(30))


@pytest.mark.parametrize("freeze", [True, False])
def test_gene_embeddings_without_coexpression_graph_save_load(toy, freeze, tmp_path):
    del toy.uns["pg_coexpression_graph"]
    e = _embeddings(toy)
    GEARS.setup_anndata(toy)
    model = GEARS(toy, hidden_dim=8, gene_embeddings=e, freeze_gene_embeddings=freeze)
    assert model.name == "GEARS+embeddings" and isinstance(model.module.gene_encoder, PretrainedGeneEncoder)
    assert ("gene_encoder.pretrained" in dict(model.module.named_parameters())) is not freeze
    state = "frozen" if freeze else "fine-tuned"
    assert f"gene embeddings d=6 ({state}, 3 genes without one learned)" in model._model_summary_string
    before_e = model.module.gene_encoder.pretrained.detach().clone()
    model.train(max_epochs=1, progress_bar=False)
    assert torch.equal(model.module.gene_encoder.pretrained, before_e) is freeze
    sets = ["G000+G001", "G002", "G004+X2"]
    before = model.predict(sets, n_control=30, seed=3)
    assert np.isfinite(before.X).all() and before.uns["pg_prediction"]["model"] == "GEARS+embeddings"
    model.save(tmp_path / "m")
    fresh = toy.copy()
    del fresh.uns["pg_go_graph"]  # graphs and embeddings travel with the model
    loaded = GEARS.load(tmp_path / "m", adata=fresh)
    assert loaded.name == "GEARS+embeddings" and loaded.module.gene_encoder.freeze is freeze
    np.testing.assert_array_equal(loaded.predict(sets, n_control=30, seed=3).X, before.X)


def test_gene_embeddings_name_and_errors(toy, tmp_path):
    GEARS.setup_anndata(toy)
    e = _embeddings(toy)
    assert GEARS(toy, hidden_dim=8).name == "GEARS"
    named = GEARS(toy, hidden_dim=8, gene_embeddings=e, name="mine")
    assert named.name == "mine" and named.init_params_["non_kwargs"]["name"] == "mine"
    named.save(tmp_path / "m")
    assert GEARS.load(tmp_path / "m", adata=toy).name == "mine"
    with pytest.raises(ValueError, match=r"n_vars x d matrix \(60 rows.*compass_gene_embeddings"):
        GEARS(toy, gene_embeddings=e[:5])
    with pytest.raises(ValueError, match="n_vars x d"):
        GEARS(toy, gene_embeddings=e[:, 0])
    with pytest.raises(ValueError, match="no finite row"):
        GEARS(toy, gene_embeddings=np.full_like(e, np.nan))
    # train_gears forwards them
    model = pg.tl.train_gears(toy, max_epochs=1, hidden_dim=8, gene_embeddings=e, progress_bar=False)
    assert isinstance(model.module.gene_encoder, PretrainedGeneEncoder)
    assert toy.uns["pg_gears"]["params"]["name"] == "GEARS+embeddings"
    assert toy.uns["pg_gears"]["params"]["coexpression_graph"] == "not used"


def test_predict_deltas_and_gi_map_fast_path_match_predict(trained_toy):
    """``predict_deltas`` gives ``predict``'s changes; gi_map's one-pass path gives the batched path's scores."""
    adata, model = trained_toy
    sets = ["G000", "G001+G005", "G002+G003", "G004"]
    pred = model.predict(sets, n_control=50, seed=3)
    delta, obs = model.predict_deltas(sets, n_control=50, seed=3, batch_size=2)
    np.testing.assert_array_equal(delta, pred.layers["delta"])
    pd.testing.assert_frame_equal(obs, pred.obs[obs.columns], check_names=False)

    class PredictOnly:  # no predict_deltas: gi_map calls predict batch by batch
        seen_genes = model.seen_genes

        def predict(self, perturbations, **kwargs):
            return model.predict(perturbations, **kwargs)

    genes = ["G000", "G001", "G002", "G005", "G006"]
    kwargs = {"n_subsamples": 50, "subsample_size": 5, "progress_bar": False}
    fast = pg.tl.gi_map(model, genes, batch_size=3, **kwargs)
    slow = pg.tl.gi_map(PredictOnly(), genes, batch_size=3, **kwargs)
    pd.testing.assert_frame_equal(fast, slow)


# ----------------------------------------------------------------------------- set batches
def test_set_batches_draw_whole_sets_evenly():
    from pertpy_gnn.gears._data import SetBatches

    codes = np.repeat([0, 1, 2, 3, 4], [50, 3, 10, 40, 7])  # 110 cells of 5 sets
    sampler = SetBatches(codes, sets_per_batch=2, cells_per_set=8, seed=0)
    # an epoch draws about as many cells as there are: mean drawn per set (8+3+8+8+7)/5 = 6.8
    assert len(sampler) == int(np.ceil(110 / (2 * 6.8)))
    seen = np.zeros(5, dtype=int)
    for _ in range(3):
        for batch in sampler:
            sets, counts = np.unique(codes[batch], return_counts=True)
            assert len(sets) == 2 and len(set(batch)) == len(batch)
            assert (counts == np.minimum([50, 3, 10, 40, 7], 8)[sets]).all()
            seen[sets] += 1
    assert seen.max() - seen.min() <= 2  # every set equally often (a permutation stream)
    again = SetBatches(codes, sets_per_batch=2, cells_per_set=8, seed=0)
    assert list(again) == list(SetBatches(codes, sets_per_batch=2, cells_per_set=8, seed=0))
    whole = next(iter(SetBatches(codes, sets_per_batch=5, cells_per_set=None, seed=1)))
    assert sorted(whole) == list(range(110))
    with pytest.raises(ValueError, match="sets_per_batch"):
        SetBatches(codes, sets_per_batch=0, cells_per_set=8, seed=0)


@pytest.mark.parametrize(
    "model_kwargs",
    [{"uncertainty": True}, {"anchor": "additive", "gamma": 0.0}],
    ids=["paper-uncertainty", "anchored"],
)
def test_set_batch_loss_equals_per_cell_loss(toy, model_kwargs):
    """A set batch runs the network once per set and applies the per-cell loss to every drawn cell.

    Reference: the network run once per cell and the paper's per-cell loss written out (autofocus,
    sign direction, uncertainty; the anchored model's residual penalty), averaged over the cells of
    each set, then over the sets. A set's prediction broadcast to the cells of another set is
    checked to change the loss far beyond the tolerance, so the test catches a mis-broadcast.
    """
    from pertpy_gnn.gears._data import make_set_loader
    from pertpy_gnn.gears._module import LOGVAR_BOUND

    GEARS.setup_anndata(toy)
    model = GEARS(toy, hidden_dim=8, seed=0, **model_kwargs)
    model.train(max_epochs=1, lr=1e-2, progress_bar=False)  # sets predicted apart (not at initialization)
    train, *_ = model._training_data(0)
    batch = next(iter(make_set_loader(train, sets_per_batch=3, cells_per_set=5, seed=0)))
    group, n = batch[K.GROUP], batch[K.X].shape[0]
    assert len(group.unique()) == 3 and n > 3
    module = model.module.eval()
    assert module.direction == "sign"
    module.control_mean.copy_(batch[K.X].mean(0))  # both signs of x - c occur
    with torch.no_grad():
        loss = module(batch)[2].loss  # one network pass per set
        runs = [module.predict_delta(batch[K.PERT_IDX][i : i + 1]) for i in range(n)]  # one per cell
        anchors = [module.anchor_delta(batch[K.PERT_IDX][i : i + 1])[0] for i in range(n)]

    def per_cell_loss(source):
        """The loss with cell i predicted by the network run of cell ``source[i]``."""
        c, per_set, residual = module.control_mean, {}, {}
        for i in range(n):
            zhat, s = runs[source[i]]
            pred, x, m = zhat[0] + batch[K.X_CTRL][i], batch[K.X][i], batch[K.MASK][i].float()
            err = (pred - x).abs() ** (2.0 + module.gamma)
            cell = err + module.direction_lambda * (torch.sign(x - c) - torch.sign(pred - c)) ** 2
            if module.uncertainty:
                s = s[0].clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
                cell = cell + module.uncertainty_reg * (torch.exp(-s) * err + s)
            per_set.setdefault(int(group[i]), []).append((cell * m).sum() / m.sum())
            residual[int(group[i])] = ((zhat[0] - anchors[source[i]]) ** 2).mean()
        out = torch.stack([torch.stack(v).mean() for v in per_set.values()]).mean()
        if module.anchor is not None:
            out = out + module.anchor_reg * torch.stack(list(residual.values())).mean()
        return out

    torch.testing.assert_close(loss, per_cell_loss(range(n)), rtol=1e-5, atol=1e-6)
    # a mis-broadcast (each cell given the prediction of the next set's first cell) is far off
    first = {int(g): int(torch.nonzero(group == g)[0]) for g in group.unique()}
    order = sorted(first)
    wrong = [first[order[(order.index(int(g)) + 1) % len(order)]] for g in group]
    assert abs(float(per_cell_loss(wrong) - loss)) > 100 * (1e-5 * abs(float(loss)) + 1e-6), float(loss)

    # training mode (batch norms on the batch's sets): the same cells in a cell batch's random
    # order give the same loss and the same gradients
    module.train()
    shuffled = {k: v[torch.randperm(n, generator=torch.Generator().manual_seed(1))] for k, v in batch.items()}
    results = []
    for b in (batch, shuffled):
        module.zero_grad()
        out = module(b)[2].loss
        out.backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_train_with_set_batches(toy):
    GEARS.setup_anndata(toy)
    model = GEARS(toy, hidden_dim=16, seed=0)
    model.train(max_epochs=2, batching="sets", sets_per_batch=4, cells_per_set=8, progress_bar=False)
    assert len(model.history_) == 2 and np.isfinite(model.history_["train_loss"]).all()
    assert np.isfinite(model.best_val)
    with pytest.raises(ValueError, match="batching"):
        model.train(max_epochs=1, batching="genes")


# ----------------------------------------------------------------------------- ablations (Extended Data Fig. 4)
def _unseen_and_seen(model, adata):
    seen = sorted(model.seen_genes)
    perturbed = {
        g for c in adata.obs["pg_perturbation"].astype(str).unique() if c != "control" for g in c.split("+")
    }
    unseen = sorted(perturbed - set(seen))
    return seen, unseen


def test_no_go_graph_learns_per_gene_embeddings_and_refuses_unseen_genes(toy, tmp_path):
    del toy.uns["pg_go_graph"]  # not needed without it
    model = pg.tl.train_gears(toy, max_epochs=2, hidden_dim=8, use_go_graph=False, progress_bar=False)
    assert isinstance(model.module.pert_encoder, LearnedEncoder)
    assert isinstance(model.module.gene_encoder, GraphEncoder)
    assert model.name == "GEARS[no GO graph]"
    assert toy.uns["pg_gears"]["params"]["go_graph"] == "not used"
    perturbed = {
        g for c in toy.obs["pg_perturbation"].astype(str).unique() if c != "control" for g in c.split("+")
    }
    assert set(model.perturbable_genes) == perturbed  # one embedding per gene perturbed in adata
    seen, unseen = _unseen_and_seen(model, toy)
    assert unseen, "the split should hold genes never perturbed in training"
    pred = model.predict([seen[0], f"{seen[0]}+{seen[1]}"], n_control=20)
    assert np.isfinite(pred.X).all()
    with pytest.raises(ValueError, match=r"no GO graph \(use_go_graph=False\).*not perturbed in training"):
        model.predict([unseen[0]])
    with pytest.raises(ValueError, match="use_go_graph=False"):
        model.predict([f"{seen[0]}+{unseen[0]}"])
    kept = model.predict([seen[0], f"{seen[0]}+{unseen[0]}"], skip_unknown=True, n_control=20)
    assert list(kept.obs_names) == [seen[0]]
    # save / load: the gene list travels with the model
    model.save(tmp_path / "m")
    loaded = GEARS.load(tmp_path / "m", adata=toy)
    assert not loaded.module.use_go_graph
    # the same call as before saving: a batch of other size may round differently (~1e-7)
    np.testing.assert_array_equal(loaded.predict([seen[0], f"{seen[0]}+{seen[1]}"], n_control=20).X, pred.X)


def test_no_coexpression_graph_learns_gene_embeddings(toy):
    del toy.uns["pg_coexpression_graph"]  # not needed without it
    GEARS.setup_anndata(toy)
    model = GEARS(toy, hidden_dim=8, use_coexpression_graph=False)
    before = model.module.gene_encoder.embedding.detach().clone()
    model.train(max_epochs=2, progress_bar=False)
    assert not torch.equal(model.module.gene_encoder.embedding, before)  # learned
    assert isinstance(model.module.gene_encoder, LearnedEncoder)
    assert model.module.gene_encoder.embedding.shape == (toy.n_vars, 8)
    assert model.name == "GEARS[no co-expression graph]"
    assert np.isfinite(model.predict(["G000", "G000+G005"], n_control=20).X).all()
    pg.tl.train_gears(toy, max_epochs=1, hidden_dim=8, use_coexpression_graph=False, progress_bar=False)
    assert toy.uns["pg_gears"]["params"]["coexpression_graph"] == "not used"
    with pytest.raises(KeyError, match="co-expression graph"):
        GEARS(toy, hidden_dim=8)  # the full model still needs it


def test_no_cross_gene_layer():
    module = _small_module(cross_gene=False)
    assert module.cross_gene is None and module.w2.shape == (module.n_genes, 1)
    module.train()
    batch = _batch(module)
    inf = module.inference(**module._get_inference_input(batch))
    out = module.generative(**module._get_generative_input(batch, inf))
    # each gene's output is a function of its own effect z_u only
    torch.testing.assert_close(out["zhat"], out["z"] * module.w2[:, 0] + module.b2[:, 0])
    loss = module.loss(batch, inf, out).loss
    loss.backward()
    assert module.w2.grad is not None and torch.isfinite(loss)
    full = _small_module()
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in module.parameters())


def test_mse_loss_is_plain_squared_error():
    mse = _small_module(loss="mse", gamma=2.0, direction_lambda=1.0)
    # the same network with the autofocus exponent 0 and no direction term is the same loss
    ref = _small_module(gamma=0.0, direction_lambda=0.0)
    ref.load_state_dict(mse.state_dict())
    batch = _batch(mse)
    for m in (mse, ref):
        m.eval()
    outs = []
    for m in (mse, ref):
        inf = m.inference(**m._get_inference_input(batch))
        gen = m.generative(**m._get_generative_input(batch, inf))
        outs.append(m.loss(batch, inf, gen).loss)
    torch.testing.assert_close(outs[0], outs[1])
    auto = _small_module(gamma=2.0, direction_lambda=1.0)
    auto.load_state_dict(mse.state_dict())
    auto.eval()
    inf = auto.inference(**auto._get_inference_input(batch))
    gen = auto.generative(**auto._get_generative_input(batch, inf))
    assert not torch.isclose(auto.loss(batch, inf, gen).loss, outs[0])
    with pytest.raises(ValueError, match="`loss` must be one of"):
        _small_module(loss="l1")


def test_ablations_train_and_combine(toy):
    model = pg.tl.train_gears(
        toy, max_epochs=2, hidden_dim=8, cross_gene=False, loss="mse", progress_bar=False
    )
    assert model.name == "GEARS[no cross-gene, MSE loss]"
    assert model.history_["train_loss"].notna().all()
    assert np.isfinite(model.predict(["G000+G005"], n_control=20).X).all()
