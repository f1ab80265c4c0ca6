"""The GEARS network (Roohani et al.): graph encoders, compositional module, cross-gene decoder, loss.

The measured genes are embedded by a GNN over their co-expression graph (:class:`GraphEncoder`) or,
given ``gene_embeddings`` (e.g. GeneCompass's, Yang et al. 2024 Fig. 5a), by a learned projection of
those (:class:`PretrainedGeneEncoder`); see :class:`GEARSModule`.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from scvi.module.base import BaseModuleClass, LossOutput
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ._constants import TENSOR_KEYS as K

GNN_KINDS = ("sgc", "gcn", "gat")
DIRECTION_KINDS = ("tanh", "sign")
#: anchors of the baseline-anchored GEARS (``None``: the paper's GEARS)
ANCHOR_KINDS = ("additive", "train_mean")
LOSS_KINDS = ("autofocus", "mse")

#: bound of the log-variance ``s`` inside the uncertainty term (``exp(10)`` is about 2.2e4)
LOGVAR_BOUND = 10.0
#: cells per distinct set from which a batch's loss is computed from per-set moments (see ``GEARSModule.loss``)
SET_MOMENT_MIN_CELLS = 16


class MLP(nn.Sequential):
    """``Linear -> BatchNorm -> ReLU`` blocks; the last block keeps its batch norm and drops the ReLU.

    This is the layer placement of the published GEARS code. A training batch of one row (where
    batch statistics are undefined) is run as two copies of itself, as the published code does.
    """

    def __init__(self, sizes: list[int]):
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True)]
        super().__init__(*layers[:-1])

    def forward(self, x: torch.Tensor, *, last_norm: bool = True) -> torch.Tensor:
        """Apply the MLP; ``last_norm=False`` stops before the final batch norm."""
        if self.training and x.shape[0] == 1:
            return self.forward(x.expand(2, -1), last_norm=last_norm)[:1]
        layers = list(self) if last_norm else list(self)[:-1]
        for layer in layers:
            x = layer(x)
        return x


def grid_relu(g: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``ReLU(g_u + q_s)`` over the grid of ``g``'s rows ``u`` (``K x d``) and ``q``'s rows ``s`` (``n x d``): ``K x n x d`` (into ``out`` if given)."""
    return torch.add(g.unsqueeze(1), q.unsqueeze(0), out=out).relu_()


def _column_var(x: torch.Tensor) -> torch.Tensor:
    """Population variance of each column: as ``x.var(0, unbiased=False)``, several times faster on CPU."""
    centred = x - x.mean(0)
    return (centred * centred).mean(0)


def _bn_moments(
    bn: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics a batch norm uses, given the batch moments (population ``var``) of ``n`` rows.

    In training mode the batch moments, with the running statistics updated as
    :class:`torch.nn.BatchNorm1d` does (unbiased variance); in eval mode the running statistics.
    The moments are taken in the dtype of the running buffers (``float32``), also under
    :func:`torch.autocast`, whose ``bfloat16`` activations would otherwise reach the buffers.
    """
    if not bn.training:
        return bn.running_mean, bn.running_var
    mean, var = mean.to(bn.running_mean.dtype), var.to(bn.running_var.dtype)
    with torch.no_grad():
        bn.running_mean.lerp_(mean.detach(), bn.momentum)
        bn.running_var.lerp_(var.detach() * n / max(n - 1, 1), bn.momentum)
        bn.num_batches_tracked += 1
    return mean, var


#: rows of the ``K n x d`` grid per chunk of the folded post-perturbation block (:class:`_PostBlockTrain`,
#: whole genes per chunk): its temporaries are ``chunk x 2d``; 4,096 measured fastest on CPU for 23-32
#: sets per batch (smaller chunks pay Python overhead, larger ones fall out of the caches)
POST_BLOCK_CHUNK_ROWS = 4096
#: grids whose ``h`` and hidden ReLU output (``K n x 3d`` values) fit in this many bytes keep them from the
#: forward for backward rather than recompute them (set batches: 4 sets x 2,000 genes keep 6 MiB and save
#: a product and two element-wise passes per chunk; a cell batch of about 24 sets recomputes)
POST_BLOCK_KEEP_BYTES = 16 * 2**20


def _row_chunks(n_rows: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _GeneDot(torch.autograd.Function):
    """``z_us = y_us . w_u``, one weight vector per gene ``u`` (``y``: ``K x n x d``, ``w``: ``K x d``; ``K x n``).

    A batched product forward. Backward takes ``dy = dz w`` by broadcasting and ``dw`` as one batched
    product: autograd through :func:`torch.baddbmm` builds ``dy`` as ``K`` outer products, which took 2-9
    times as long on CPU (``K = 5,000`` genes and 4 sets: 4.4 ms per step, 2.0 here).
    """

    @staticmethod
    def forward(ctx, y, w):
        ctx.save_for_backward(y, w)
        return torch.bmm(y, w.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        y, w = ctx.saved_tensors
        # dz arrives transposed (the decoders read z as n x K): contiguous, so that dy comes out gene-major
        dz = dz.contiguous()
        dy = dz.unsqueeze(-1) * w.unsqueeze(1) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(dz.unsqueeze(1), y).squeeze(1) if ctx.needs_input_grad[1] else None
        return dy, dw


class _PostBlockTrain(torch.autograd.Function):
    """The first post-perturbation block in training mode, from its two terms, in chunks of genes.

    ``Linear -> BatchNorm1d -> ReLU -> Linear`` in training mode on the ``N = K n`` rows of
    ``h = ReLU(g_u + q_s)``, the grid of genes ``u`` and sets ``s`` (``g``: ``K x d``, ``q``:
    ``n x d``, the normalized gene and set embeddings), with the column sums and sums of squares of
    the output. The batch moments of ``y = h W1^T + b1`` follow from the mean ``mu`` and covariance
    ``S`` of ``h`` (``d x d``, one Gram matrix): ``mean(y) = W1 mu + b1``, ``var(y)_j = W1_j S W1_j^T``,
    so the block is ``ReLU(h W'^T + b')`` with ``W' = diag(s) W1``, ``s = gamma / sqrt(var(y) + eps)``,
    ``b' = beta - W' mu`` (``b1`` cancels), then ``Linear``: two matrix products and one ReLU, no
    element-wise batch-norm passes. The backward is the batch-norm gradient written with the same
    small matrices (``dh = g_r W' - h M + 1 v^T`` with ``M = W1^T diag(c) W1``), then through the
    first ReLU into ``g`` (summed over sets) and ``q`` (summed over genes).

    Every pass over the grid runs over chunks of ``chunk_rows`` rows. Where ``h`` and the hidden ReLU
    output ``r`` (``N x 3d`` values) would take more than ``keep_bytes``, they are recomputed per chunk
    (an add and one matrix product) rather than kept: of the grid's size only the output (``N x d``)
    is kept for backward, and backward allocates one ``N x d`` buffer (``g_r W'``, needed after a
    reduction over all rows). Autograd over the plain layers keeps ``h``, the pre-ReLU sum and
    ``N x 2d`` twice, and allocates gradients of each; the training peak of a paper cell-batch epoch
    on 20,000 x 2,000 fell by about 75 MiB. A smaller grid (set batches) keeps ``h`` and ``r`` from the
    forward, which saves a product and the element-wise passes that recompute them. ``d b1`` is zero
    (exactly; the plain layers give rounding noise). The output's moments (those of the batch norm
    that follows, folded into the decoders) are outputs, so their gradient joins the output's in one
    pass. Forward returns also the batch moments of ``y`` (mean, population variance; no gradient)
    for the running statistics.
    """

    @staticmethod
    def _h_chunk(g, q, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
        """``ReLU(g_u + q_s)`` for the genes ``a:b`` (``(b - a) n x d``), written into ``buf``'s rows."""
        return grid_relu(g[a:b], q, buf.view(-1, q.shape[0], g.shape[1])[: b - a]).view(-1, g.shape[1])

    @staticmethod
    def _hidden(hc, w1s, bias1, buf: torch.Tensor) -> torch.Tensor:
        """The hidden ReLU output ``ReLU(h W'^T + b')`` of a chunk ``hc`` of ``h``, written into ``buf``'s rows."""
        # product, then the bias in place: addmm's broadcast of the bias into its output measured
        # slower; oneDNN's fused linear layer caches a primitive per row count (+150-250 MiB RSS)
        return torch.mm(hc, w1s.T, out=buf[: hc.shape[0]]).add_(bias1).relu_()

    @staticmethod
    def forward(ctx, g, q, w1, b1, gamma, beta, w2, b2, eps: float, chunk_rows: int, keep_bytes: int):
        k, n, d, hidden = g.shape[0], q.shape[0], g.shape[1], w1.shape[0]
        big_n = k * n
        genes = max(1, chunk_rows // n)  # genes per chunk: a chunk holds all sets of its genes
        keep = big_n * (d + hidden) * g.element_size() <= keep_bytes
        # kept: h and r for all rows, each chunk its own rows; else one chunk's buffers, reused
        rows = big_n if keep else genes * n
        h_buf, r_buf = g.new_empty(rows, d), g.new_empty(rows, hidden)
        at = (lambda buf, a, b: buf[a * n : b * n]) if keep else (lambda buf, a, b: buf)
        h_sum, gram = g.new_zeros(d), g.new_zeros(d, d)
        for a, b in _row_chunks(k, genes):
            hc = _PostBlockTrain._h_chunk(g, q, a, b, at(h_buf, a, b))
            h_sum += hc.sum(0)
            gram.addmm_(hc.T, hc)
        mu = h_sum.div_(big_n)
        cov = gram.div_(big_n).sub_(torch.outer(mu, mu))
        mean_y = torch.addmv(b1, w1, mu)
        var_y = ((w1 @ cov) * w1).sum(1).clamp_(min=0.0)
        inv = torch.rsqrt(var_y + eps)
        s = gamma * inv
        w1s = w1 * s.unsqueeze(1)
        bias1 = beta - w1s @ mu
        out = g.new_empty(big_n, w2.shape[0])
        colsum, sumsq = g.new_zeros(w2.shape[0]), g.new_zeros(w2.shape[0])
        for a, b in _row_chunks(k, genes):
            hc = at(h_buf, a, b) if keep else _PostBlockTrain._h_chunk(g, q, a, b, h_buf)
            rc = _PostBlockTrain._hidden(hc, w1s, bias1, at(r_buf, a, b))
            oc = torch.mm(rc, w2.T, out=out[a * n : b * n]).add_(b2)
            colsum += oc.sum(0)
            sumsq += (oc * oc).sum(0)
        kept = (h_buf, r_buf) if keep else ()
        ctx.save_for_backward(g, q, out, w1, w2, mu, cov, s, inv, w1s, bias1, *kept)
        ctx.genes = genes
        ctx.mark_non_differentiable(mean_y, var_y)
        ctx.set_materialize_grads(False)  # no zero N x d gradient for an output without one
        return out, colsum, sumsq, mean_y, var_y

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_sum, g_sumsq, _g_mean, _g_var):
        g, q, out, w1, w2, mu, cov, s, inv, w1s, bias1, *kept = ctx.saved_tensors
        k, n, d, genes = g.shape[0], q.shape[0], g.shape[1], ctx.genes
        big_n = k * n
        keep = bool(
            kept
        )  # h and r of every row from the forward, else recomputed per chunk into one chunk's buffers
        h_buf, r_buf = kept if keep else (g.new_empty(genes * n, d), g.new_empty(genes * n, w1.shape[0]))

        def h_of(a: int, b: int) -> torch.Tensor:
            return h_buf[a * n : b * n] if keep else _PostBlockTrain._h_chunk(g, q, a, b, h_buf)

        # the moments' gradients (d values each; None where the loss does not reach them)
        two = 2.0 * g_sumsq if g_sumsq is not None else g.new_zeros(w2.shape[0])
        g_sum = g_sum if g_sum is not None else g.new_zeros(w2.shape[0])
        d_b2, d_w2 = g.new_zeros(w2.shape[0]), g.new_zeros(w2.shape)
        d_beta, a_mat = g.new_zeros(w1.shape[0]), g.new_zeros(w1.shape[0], d)
        g_r_w = g.new_empty(big_n, d)  # g_r W', then the gradient w.r.t. h
        for a, b in _row_chunks(k, genes):
            lo, hi = a * n, b * n
            hc = h_of(a, b)  # r (kept) is overwritten by its gradient below
            rc = r_buf[lo:hi] if keep else _PostBlockTrain._hidden(hc, w1s, bias1, r_buf)
            # the gradient w.r.t. the output, all of it, for this chunk (a new tensor, not the caller's)
            oc = out[lo:hi]
            gc = torch.mul(oc, two) if g_out is None else torch.addcmul(g_out[lo:hi], oc, two)
            gc.add_(g_sum)
            d_b2 += gc.sum(0)
            d_w2.addmm_(gc.T, rc)
            # through the ReLU, into r's chunk: g_r, the gradient w.r.t. the batch-norm output
            torch.ops.aten.threshold_backward.grad_input(torch.mm(gc, w2), rc, 0.0, grad_input=rc)
            d_beta += rc.sum(0)
            a_mat.addmm_(rc.T, hc)
            torch.mm(rc, w1s, out=g_r_w[lo:hi])
        d_gamma = ((a_mat - torch.outer(d_beta, mu)) * w1).sum(1) * inv
        c = s * d_gamma * inv / big_n
        m = w1.T @ (w1 * c.unsqueeze(1))  # d x d
        vec = mu @ m - (s * d_beta / big_n) @ w1
        needs_g, needs_q = ctx.needs_input_grad[:2]
        d_g = g.new_empty(k, d) if needs_g else None
        d_q = g.new_zeros(n, d) if needs_q else None
        for a, b in _row_chunks(k, genes) if needs_g or needs_q else ():
            hc = h_of(a, b)
            dh = g_r_w[a * n : b * n].add_(vec).addmm_(hc, m, alpha=-1.0)
            torch.ops.aten.threshold_backward.grad_input(dh, hc, 0.0, grad_input=dh)  # the first ReLU
            dh = dh.view(b - a, n, d)
            if needs_g:
                torch.sum(dh, 1, out=d_g[a:b])
            if needs_q:
                d_q += dh.sum(0)
        del g_r_w
        d_w1 = s.unsqueeze(1) * a_mat - torch.outer(s * d_beta, mu) - big_n * (c.unsqueeze(1) * (w1 @ cov))
        return d_g, d_q, d_w1, torch.zeros_like(s), d_gamma, d_beta, d_w2, d_b2, None, None, None


def _post_mlp_train(
    mlp: MLP,
    g: torch.Tensor,
    q: torch.Tensor,
    *,
    chunk_rows: int = POST_BLOCK_CHUNK_ROWS,
    keep_bytes: int = POST_BLOCK_KEEP_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mlp(ReLU(g_u + q_s), last_norm=False)`` over the gene x set grid in training mode (:class:`_PostBlockTrain`).

    Batch statistics, the running statistics updated as :class:`torch.nn.BatchNorm1d` does; returns
    the output (``K n x d``, gene-major) and its column sums and sums of squares.
    """
    lin1, bn1, _, lin2, _ = mlp
    out, colsum, sumsq, mean_y, var_y = _PostBlockTrain.apply(
        g,
        q,
        lin1.weight,
        lin1.bias,
        bn1.weight,
        bn1.bias,
        lin2.weight,
        lin2.bias,
        bn1.eps,
        chunk_rows,
        keep_bytes,
    )
    _bn_moments(bn1, mean_y, var_y, out.shape[0])
    return out, colsum, sumsq


def _csr_parts(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pointers, column indices and values of the ``n x n`` matrix with entries ``values`` at (``rows``, ``cols``), duplicates summed."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=True).coalesce()
    r, c = coo.indices()
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
    return crow, c.contiguous(), coo.values().contiguous()


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The CSR tensor of parts from :func:`_csr_parts` (no copy; PyTorch's once-per-process beta notice silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
        )
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


class _FixedSparseMatmul(torch.autograd.Function):
    """``A x`` for a fixed sparse ``A`` (CSR), with ``A^T`` given in CSR for the backward ``A^T dx``.

    Autograd through :func:`torch.sparse.mm` transposes and re-sorts ``A`` on every backward: with a
    co-expression graph of 2,000 genes and 16,000 edges a forward and backward took 3.1 ms (COO) or
    2.0 ms (CSR) of CPU, against about 0.7 ms here.
    """

    @staticmethod
    def forward(ctx, x, a, a_t):
        ctx.a_t = a_t
        return torch.sparse.mm(a, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return torch.sparse.mm(ctx.a_t, dy.contiguous()), None, None


def gcn_norm(
    edge_index: torch.Tensor, edge_weight: torch.Tensor, n_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GCN-normalized adjacency with self-loops, ``D^-1/2 (A + I) D^-1/2`` as edges (sources row 0, targets row 1).

    The edges of :func:`torch_geometric.nn.conv.gcn_conv.gcn_norm` (``add_self_loops=True``): a node
    that has a self-loop keeps its weight, every other node gets one of weight 1; ``D`` sums the
    weights of each target's incoming edges (the test checks equality with torch_geometric). Here
    so that building a model does not import torch_geometric (seconds of import for six lines).
    """
    src, dst = edge_index[0], edge_index[1]
    loop = src == dst
    loop_weight = torch.ones(n_nodes, dtype=edge_weight.dtype, device=edge_weight.device)
    loop_weight[src[loop]] = edge_weight[loop]
    nodes = torch.arange(n_nodes, device=edge_index.device)
    src = torch.cat([src[~loop], nodes])
    dst = torch.cat([dst[~loop], nodes])
    w = torch.cat([edge_weight[~loop], loop_weight])
    deg = torch.zeros(n_nodes, dtype=w.dtype, device=w.device).index_add_(0, dst, w)
    inv_sqrt = deg.pow(-0.5).masked_fill_(deg == 0, 0.0)
    return torch.stack([src, dst]), inv_sqrt[src] * w * inv_sqrt[dst]


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` rescaled to norm at most 1 (the published ``nn.Embedding(max_norm=1)``, without in-place edits)."""
    return w / w.norm(dim=1, keepdim=True).clamp(min=1.0)


class GraphEncoder(nn.Module):
    """Learnable node embeddings refined by a GNN over a fixed graph; computed once per step, not per cell.

    ``'sgc'`` (the paper's choice) is ``Linear(A^L x)`` with ``A`` the GCN-normalized adjacency with
    self-loops (:func:`gcn_norm`, as :func:`torch_geometric.nn.conv.gcn_conv.gcn_norm`): for ``L = 1`` exactly
    :class:`torch_geometric.nn.SGConv` (``K=1``), the published layer. ``'gcn'`` stacks ``L``
    layers ``Linear(A h)`` with ReLU in between (:class:`~torch_geometric.nn.GCNConv`; also what the
    published code computes when it stacks several ``SGConv`` layers). ``'gat'`` stacks
    :class:`~torch_geometric.nn.GATConv` layers, which learn their own edge weights.

    The normalized adjacency is computed once, and the last propagation can be restricted to the
    nodes a batch needs (``rows``): a GEARS step needs the GO embeddings of the few perturbed genes of
    its batch only, not of all ~20,000 GO nodes (``SGConv`` would build one message per edge, about
    400,000 x d values, every step).

    Parameters
    ----------
    n_nodes
        Number of graph nodes.
    dim
        Embedding size.
    n_layers
        Number of propagation steps / layers.
    gnn
        ``'sgc'``, ``'gcn'`` or ``'gat'``.
    edge_index, edge_weight
        The graph: ``2 x E`` (row 0 source, row 1 target) and ``E`` weights.
    """

    def __init__(
        self,
        n_nodes: int,
        dim: int,
        n_layers: int,
        gnn: str,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"GNN layers must be at least 1, got {n_layers}.")
        self.gnn, self.n_layers, self.n_nodes = gnn, n_layers, n_nodes
        self.embedding = nn.Parameter(torch.randn(n_nodes, dim))
        edge_index = torch.as_tensor(edge_index, dtype=torch.long)
        edge_weight = torch.as_tensor(edge_weight, dtype=torch.float32)
        if gnn == "gat":
            from torch_geometric.nn import GATConv  # only here: importing torch_geometric takes seconds

            self.convs = nn.ModuleList(GATConv(dim, dim) for _ in range(n_layers))
            self.register_buffer("edge_index", edge_index, persistent=False)
            return
        ei, w = gcn_norm(edge_index, edge_weight, n_nodes)
        # A (target x source, out[t] = sum over edges s -> t of w x[s]) and its transpose as CSR parts,
        # duplicate edges summed; dense buffers, so that they move with the module (a CSR tensor is built per call)
        for suffix, (rows_of, cols_of) in (("", (ei[1], ei[0])), ("_t", (ei[0], ei[1]))):
            crow, col, values = _csr_parts(rows_of, cols_of, w, n_nodes)
            self.register_buffer("crow" + suffix, crow, persistent=False)
            self.register_buffer("col" + suffix, col, persistent=False)
            self.register_buffer("weight" + suffix, values, persistent=False)
        self.lins = nn.ModuleList(nn.Linear(dim, dim) for _ in range(1 if gnn == "sgc" else n_layers))

    def propagate(
        self, x: torch.Tensor, rows: torch.Tensor | None = None, *, unit: bool = False
    ) -> torch.Tensor:
        """``A x`` for all nodes, or for the nodes ``rows`` only (in the graph's dtype, also under autocast).

        ``unit=True`` (with ``rows``): ``A unit(x)``, the rows of ``x`` that the nodes read scaled to norm at
        most 1 (:func:`_unit_rows`) after they are gathered, not all of them before.
        """
        x = x.to(self.weight.dtype)
        if rows is None:
            with torch.autocast(x.device.type, enabled=False):  # sparse products have no bfloat16 backward
                n = self.n_nodes
                return _FixedSparseMatmul.apply(
                    x,
                    _csr(self.crow, self.col, self.weight, n),
                    _csr(self.crow_t, self.col_t, self.weight_t, n),
                )
        start = self.crow[rows]
        counts = self.crow[rows + 1] - start
        seg = torch.repeat_interleave(torch.arange(rows.numel(), device=x.device), counts)
        offset = torch.arange(int(counts.sum()), device=x.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        edges = start[seg] + offset
        sources = x[self.col[edges]]
        messages = (_unit_rows(sources) if unit else sources) * self.weight[edges].unsqueeze(1)
        return x.new_zeros(rows.numel(), x.shape[1]).index_add_(0, seg, messages)

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of all nodes, or of the nodes ``rows`` (same values, less work)."""
        if rows is not None and self.n_layers == 1 and self.gnn != "gat":
            # one propagation to a few nodes (a batch's perturbed genes): only their neighbours' rows of
            # the table are normalized, not all of them (same values)
            return self.lins[0](self.propagate(self.embedding, rows, unit=True))
        h = _unit_rows(self.embedding)
        last = self.n_layers - 1
        if self.gnn == "gat":
            for i, conv in enumerate(self.convs):
                h = conv(h, self.edge_index)
                h = F.relu(h) if i < last else h
            return h if rows is None else h[rows]
        if self.gnn == "sgc":
            for i in range(self.n_layers):
                h = self.propagate(h, rows if i == last else None)
            return self.lins[0](h)
        for i, lin in enumerate(self.lins):
            h = lin(self.propagate(h, rows if i == last else None))
            h = F.relu(h) if i < last else h
        return h


class LearnedEncoder(nn.Module):
    """A learned embedding per node, without a graph: the ablation of a :class:`GraphEncoder`.

    ``forward(rows=None)`` returns the rows of the embedding table, each scaled to norm at most 1
    (as the graph encoders' input). A node never seen in training keeps its random initial
    embedding, so the model cannot predict it.
    """

    def __init__(self, n_nodes: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n_nodes, dim))

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of all nodes, or of the nodes ``rows``."""
        return _unit_rows(self.embedding if rows is None else self.embedding[rows])


class PretrainedGeneEncoder(nn.Module):
    """Gene embeddings from a fixed matrix: ``h_gene = unit(E) W + b`` (``K x d``).

    Replaces the co-expression :class:`GraphEncoder` of the measured genes (same call:
    ``forward(rows=None)``), e.g. with GeneCompass gene embeddings (Yang et al. 2024, Fig. 5a).
    ``E`` holds one row per measured gene, each scaled to unit norm. With ``freeze=True`` it is a
    buffer and only the projection ``W, b`` is trained; otherwise ``E`` is a parameter and is
    fine-tuned too. Genes without a pre-trained embedding (rows with a ``NaN``) get a learned
    embedding of their own (``own``, ``n_missing x d``) in place of the projection.

    Parameters
    ----------
    embeddings
        ``K x D`` matrix, ``NaN`` rows for genes without an embedding.
    dim
        Output size ``d``.
    freeze
        Keep ``E`` fixed.
    """

    def __init__(self, embeddings: torch.Tensor, dim: int, freeze: bool = True):
        super().__init__()
        e = torch.as_tensor(embeddings, dtype=torch.float32)
        missing = ~torch.isfinite(e).all(1)
        e = torch.where(missing[:, None], 0.0, e)
        norm = e.norm(dim=1, keepdim=True)
        e = e / torch.where(norm > 0, norm, 1.0)
        if freeze:  # the matrix is saved with the model's init parameters: no copy in the state dict
            self.register_buffer("pretrained", e, persistent=False)
        else:
            self.pretrained = nn.Parameter(e)
        self.freeze = freeze
        self.register_buffer("missing", torch.nonzero(missing).squeeze(1), persistent=False)
        self.proj = nn.Linear(e.shape[1], dim)
        self.own = nn.Parameter(torch.randn(int(missing.sum()), dim) / dim**0.5)

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of all genes, or of the genes ``rows``."""
        h = self.proj(self.pretrained)
        if self.own.numel():
            h = h.index_put((self.missing,), self.own)
        return h if rows is None else h[rows]


class GEARSModule(BaseModuleClass):
    """The GEARS network and its loss.

    Every quantity that does not depend on the cell is computed once per step: the gene embeddings
    ``h_gene`` (GNN over the co-expression graph on the ``K`` gene nodes, or, with
    ``gene_embeddings``, the projection ``unit(E) W + b`` of given embeddings, see
    :class:`PretrainedGeneEncoder`) and the perturbation embeddings ``h_pert`` (GNN over the GO
    graph, all its nodes). Per cell:

    - ``h_P = MLP(sum_i h_pert[P_i])`` (no term for an empty set, i.e. a control cell);
    - ``h_post_u = MLP(ReLU(BN(h_gene_u + h_P)))``;
    - ``z_u = w_u . h_post_u + b_u``; ``h_cg = MLP(z)``; ``zhat_u = w_cg_u . [z_u || h_cg] + b_cg_u``;
    - optional uncertainty ``s_u = log sigma_u^2 = w_unc_u . h_post_u + b_unc_u``.

    The prediction of a cell is ``zhat + g_ctrl`` for a control cell ``g_ctrl``; ``zhat`` depends only
    on the perturbation set.

    Parameters
    ----------
    n_genes
        Number of measured genes ``K``.
    n_pert_nodes
        Number of nodes of the GO graph (genes that can be perturbed).
    gene_edge_index, gene_edge_weight
        Co-expression graph over the ``K`` genes (``2 x E`` source/target rows, ``E`` weights);
        unused (may be ``None``) with ``gene_embeddings``.
    pert_edge_index, pert_edge_weight
        GO graph over the perturbable genes.
    hidden_dim
        Embedding size ``d``.
    gnn
        GNN kind, ``'sgc'``, ``'gcn'`` or ``'gat'``.
    n_gene_gnn_layers, n_go_gnn_layers
        GNN layers over the co-expression and the GO graph.
    uncertainty
        Add the uncertainty head.
    gamma
        Autofocus exponent: the error enters as ``|g - g_hat|^(2 + gamma)``.
    direction_lambda
        Weight of the direction term.
    direction
        ``'sign'`` (default): the published ``(sign(g - c) - sign(g_hat - c))^2``, whose gradient is
        zero; ``'tanh'``: differentiable surrogate ``(sign(g - c) - tanh((g_hat - c) / tau))^2``.
    direction_tau
        Temperature of the ``tanh`` surrogate (expression units).
    uncertainty_reg
        Weight of the uncertainty term ``exp(-s) |g - g_hat|^(2 + gamma) + s``.
    gene_embeddings
        ``K x D`` pre-trained gene embeddings (``NaN`` rows: genes without one): the gene encoder
        is then a :class:`PretrainedGeneEncoder` instead of the co-expression :class:`GraphEncoder`
        (``n_gene_gnn_layers`` and the co-expression graph are unused).
    freeze_gene_embeddings
        Keep ``gene_embeddings`` fixed (train the projection only); ``False`` fine-tunes them.
    anchor
        ``None`` (the paper's GEARS): the network predicts the change ``zhat``. Otherwise the network
        predicts a residual ``r`` over an anchor ``a(P)`` computed from the training data
        (:meth:`set_anchor`), and ``zhat = a(P) + r``: ``'additive'``: the sum of the training
        single-gene changes when every gene of the set was seen as a training single, else the
        training mean change; ``'train_mean'``: the training mean change for every set.
        Controls have ``a = 0``.
    anchor_reg
        Weight of the penalty ``mean(r^2)`` (per set, mean over genes; mean over the sets of a
        batch) that pulls the residual toward zero, i.e. the prediction toward the anchor.
    n_contexts
        Number of cell contexts (``0``: none, the paper's network). Each context gets a learned
        vector ``e_c`` (``d``) added to the perturbation embedding of every set in it,
        ``h_post_u = MLP(ReLU(BN(h_gene_u + h_P + e_c)))``, and its own mean control expression
        ``context_control_mean[c]`` as the reference of the direction term.
    use_go_graph
        ``False`` (ablation): each perturbable gene gets a learned embedding (:class:`LearnedEncoder`)
        instead of the GNN over the GO graph, so genes not perturbed in training cannot be predicted.
    use_coexpression_graph
        ``False`` (ablation): each measured gene gets a learned embedding instead of the GNN over the
        co-expression graph (which is then unused).
    cross_gene
        ``False`` (ablation): no cross-gene MLP; ``zhat_u = w_cg_u z_u + b_cg_u``.
    loss
        ``'autofocus'`` (the paper's ``|g - g_hat|^(2 + gamma)`` plus the direction term) or
        ``'mse'`` (ablation: ``(g - g_hat)^2``, no direction term; ``gamma`` and
        ``direction_lambda`` are unused).
    """

    #: whether the first post-perturbation block trains folded (:class:`_PostBlockTrain`, the default) or
    #: through the plain layers (``False``): the same maths, other float rounding; equally accurate over
    #: 24 paired seeds with set batches and 5 with cell batches (``benchmarks/results/compare_precision.md``)
    fold_training_block: bool = True

    def __init__(
        self,
        n_genes: int,
        n_pert_nodes: int,
        gene_edge_index: torch.Tensor | None,
        gene_edge_weight: torch.Tensor | None,
        pert_edge_index: torch.Tensor,
        pert_edge_weight: torch.Tensor,
        *,
        hidden_dim: int = 64,
        gnn: Literal["sgc", "gcn", "gat"] = "sgc",
        n_gene_gnn_layers: int = 1,
        n_go_gnn_layers: int = 1,
        uncertainty: bool = False,
        gamma: float = 2.0,
        direction_lambda: float = 0.1,
        direction: Literal["tanh", "sign"] = "sign",
        direction_tau: float = 0.1,
        uncertainty_reg: float = 1.0,
        gene_embeddings: torch.Tensor | None = None,
        freeze_gene_embeddings: bool = True,
        anchor: Literal["additive", "train_mean"] | None = None,
        anchor_reg: float = 10.0,
        n_contexts: int = 0,
        use_go_graph: bool = True,
        use_coexpression_graph: bool = True,
        cross_gene: bool = True,
        loss: Literal["autofocus", "mse"] = "autofocus",
    ):
        super().__init__()
        if anchor is not None and anchor not in ANCHOR_KINDS:
            raise ValueError(f"`anchor` must be None or one of {ANCHOR_KINDS}, got {anchor!r}.")
        if loss not in LOSS_KINDS:
            raise ValueError(f"`loss` must be one of {LOSS_KINDS}, got {loss!r}.")
        self.use_go_graph, self.use_coexpression_graph = bool(use_go_graph), bool(use_coexpression_graph)
        self.use_cross_gene, self.loss_kind = bool(cross_gene), loss
        if gnn not in GNN_KINDS:
            raise ValueError(f"`gnn` must be one of {GNN_KINDS}, got {gnn!r}.")
        if direction not in DIRECTION_KINDS:
            raise ValueError(f"`direction` must be one of {DIRECTION_KINDS}, got {direction!r}.")
        d = hidden_dim
        self.n_genes, self.n_pert_nodes, self.hidden_dim = n_genes, n_pert_nodes, d
        self.uncertainty = uncertainty
        self.gamma, self.direction_lambda, self.direction, self.direction_tau = (
            gamma,
            direction_lambda,
            direction,
            direction_tau,
        )
        self.uncertainty_reg = uncertainty_reg

        # mean control expression (reference of the direction term) and training uncertainty statistics
        self.register_buffer("control_mean", torch.zeros(n_genes))
        self.register_buffer("uncertainty_stats", torch.tensor([0.0, 1.0]))
        # the anchor (baseline-anchored GEARS): row of each GO node in anchor_deltas (-1: not seen as a
        # training single), the training single-gene changes and the training mean change; sized by
        # set_anchor and saved in the state dict (resized on load)
        # (the paper's GEARS, anchor=None, has none of these: its state dict is unchanged)
        self.anchor, self.anchor_reg = anchor, float(anchor_reg)
        if anchor is not None:
            self.register_buffer("anchor_row", torch.full((n_pert_nodes,), -1, dtype=torch.long))
            self.register_buffer("anchor_deltas", torch.zeros(0, n_genes))
            self.register_buffer("anchor_mean", torch.zeros(n_genes))
            # added to h_P: which anchor a set has (training mean / additive)
            self.anchor_kind = nn.Parameter(torch.zeros(2, d))

        if gene_embeddings is not None:
            if gene_embeddings.ndim != 2 or gene_embeddings.shape[0] != n_genes:
                raise ValueError(
                    f"gene_embeddings must be n_genes x D ({n_genes} rows), got shape {tuple(gene_embeddings.shape)}."
                )
            self.gene_encoder = PretrainedGeneEncoder(gene_embeddings, d, freeze_gene_embeddings)
        elif not use_coexpression_graph:
            self.gene_encoder = LearnedEncoder(n_genes, d)
        elif gene_edge_index is None or gene_edge_weight is None:
            raise ValueError(
                "Give the co-expression graph (gene_edge_index, gene_edge_weight) or gene_embeddings."
            )
        else:
            self.gene_encoder = GraphEncoder(
                n_genes, d, n_gene_gnn_layers, gnn, gene_edge_index, gene_edge_weight
            )
        self.pert_encoder = (
            GraphEncoder(n_pert_nodes, d, n_go_gnn_layers, gnn, pert_edge_index, pert_edge_weight)
            if use_go_graph
            else LearnedEncoder(n_pert_nodes, d)
        )
        self.gene_mlp = MLP([d, d, d])
        self.pert_fuse = MLP([d, d, d])
        self.bn_post = nn.BatchNorm1d(d)
        self.post_mlp = MLP([d, 2 * d, d])
        # gene-specific decoders; Xavier-normal scales of the published parameter shapes
        self.w1 = nn.Parameter(torch.randn(n_genes, d, 1) * (2.0 / (n_genes + d)) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(n_genes, 1, 1))
        self.cross_gene = MLP([n_genes, d, d]) if cross_gene else None
        d2 = d + 1 if cross_gene else 1
        self.w2 = nn.Parameter(torch.randn(n_genes, d2) * (2.0 / ((n_genes + 1) * d2)) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(n_genes, 1))
        if anchor is not None:  # the residual starts at zero: an untrained anchored model is its anchor
            nn.init.zeros_(self.w2)
        if uncertainty:
            self.w_unc = nn.Parameter(torch.randn(n_genes, d, 1) * (2.0 / (n_genes + d)) ** 0.5)
            self.b_unc = nn.Parameter(torch.zeros(n_genes, 1, 1))
        # cell contexts (none: the paper's network, unchanged): a learned vector per context added to the
        # perturbation embedding of every set, and the mean control expression of each context
        self.n_contexts = int(n_contexts)
        if self.n_contexts > 0:
            self.context_embedding = nn.Parameter(torch.randn(self.n_contexts, d) / d**0.5)
            self.register_buffer("context_control_mean", torch.zeros(self.n_contexts, n_genes))

    # --- the anchor ---------------------------------------------------------------------------------
    def set_anchor(self, nodes: torch.Tensor, deltas: torch.Tensor, mean: torch.Tensor) -> None:
        """Store the anchor computed from the training data.

        ``nodes``: GO-node indices of the training singles; ``deltas``: their changes
        (``len(nodes) x K``); ``mean``: the training mean change (``K``).
        """
        if self.anchor is None:
            raise ValueError("This GEARS has no anchor (anchor=None).")
        dev = self.anchor_mean.device
        row = torch.full((self.n_pert_nodes,), -1, dtype=torch.long, device=dev)
        row[torch.as_tensor(nodes, dtype=torch.long, device=dev)] = torch.arange(len(nodes), device=dev)
        self.anchor_row = row
        self.anchor_deltas = torch.as_tensor(deltas, dtype=torch.float32, device=dev).reshape(
            -1, self.n_genes
        )
        self.anchor_mean = torch.as_tensor(mean, dtype=torch.float32, device=dev).reshape(self.n_genes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the anchor's size is set by the training data: take the saved one
        key = prefix + "anchor_deltas"
        if key in state_dict and self.anchor is not None:
            self.anchor_deltas = torch.empty_like(state_dict[key], device=self.anchor_mean.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _anchor(self, pert_idx: torch.Tensor, own_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The anchor ``a(P)`` (``n x K``) and whether it is additive (``n``), see :meth:`anchor_delta`."""
        n = pert_idx.shape[0]
        out = self.control_mean.new_zeros(n, self.n_genes)
        all_seen = torch.zeros(n, dtype=torch.bool, device=pert_idx.device)
        if self.anchor is None:
            return out, all_seen
        valid = pert_idx >= 0
        perturbed = valid.any(1)
        out[perturbed] = self.anchor_mean
        if self.anchor == "additive" and self.anchor_deltas.shape[0]:
            rows = torch.where(valid, self.anchor_row[pert_idx.clamp(min=0)], -1)
            all_seen = ((rows >= 0) | ~valid).all(1) & perturbed
            if own_out:
                all_seen &= valid.sum(1) > 1
            if all_seen.any():
                r = rows[all_seen]
                out[all_seen] = (self.anchor_deltas[r.clamp(min=0)] * (r >= 0).unsqueeze(-1)).sum(1)
        return out, all_seen

    def anchor_delta(self, pert_idx: torch.Tensor, *, own_out: bool = False) -> torch.Tensor:
        """The anchor ``a(P)`` of a batch of sets (``n x K``; zero for controls and without an anchor).

        ``own_out=True`` (training): a set of one gene is its own training single, so its anchor
        is the training mean, as for a single held out: the residual then learns how a single
        departs from the mean, which is what an unseen single needs. The network is told which
        kind of anchor a set has (a learned vector added to ``h_P``), so that what it learns
        over the mean (from singles) and over the additive prediction (from doubles) stay apart.
        """
        return self._anchor(pert_idx, own_out)[0]

    # --- scvi-tools module interface: inference = encoders, generative = decoders -----------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        """The distinct perturbation sets of the batch (``zhat`` depends on the set only)."""
        pert_idx = tensors[K.PERT_IDX]
        if K.GROUP in tensors:
            _, inverse = torch.unique(tensors[K.GROUP], return_inverse=True)
            first = torch.empty(int(inverse.max()) + 1, dtype=torch.long, device=inverse.device)
            first.scatter_(0, inverse, torch.arange(inverse.numel(), device=inverse.device))
            pert_idx = pert_idx[first]
        if self.n_contexts > 0:
            context = tensors[K.CONTEXT]
            return {"pert_idx": pert_idx, "context": context[first] if K.GROUP in tensors else context}
        return {"pert_idx": pert_idx}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {"h_post": inference_outputs["h_post"], "moments": inference_outputs.get("post_moments")}

    def _set_embeddings(
        self, pert_idx: torch.Tensor, like: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``h_P = MLP(sum_i h_pert[P_i])`` of each set (``n x d``; zero for the empty set), plus anchor / context terms."""
        n, d = pert_idx.shape[0], self.hidden_dim
        valid = pert_idx >= 0
        h_p = like.new_zeros(n, d)
        if valid.any():
            nodes, node_of = torch.unique(pert_idx[valid], return_inverse=True)
            h_nodes = self.pert_encoder(rows=nodes)
            summed = like.new_zeros(n, d).index_add(
                0, torch.nonzero(valid)[:, 0], h_nodes[node_of].to(like.dtype)
            )
            perturbed = torch.nonzero(valid.any(1)).squeeze(1)
            h_p = h_p.index_copy(0, perturbed, self.pert_fuse(summed[perturbed]).to(like.dtype))
            if self.anchor is not None:
                additive = self._anchor(pert_idx, own_out=self.training)[1]
                h_p = h_p.index_add(0, perturbed, self.anchor_kind[additive[perturbed].long()].to(h_p.dtype))
        if self.n_contexts > 0:
            if context is None:
                raise ValueError("This GEARS module has contexts: give the context of every set.")
            h_p = h_p + self.context_embedding[context]
        return h_p

    def inference(
        self, pert_idx: torch.Tensor, context: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Post-perturbation gene embeddings of a batch of perturbation sets.

        Parameters
        ----------
        pert_idx
            ``n x max_set`` GO-graph node indices, ``-1`` for padding (all ``-1``: control).
        context
            Context index of each set (a model with ``n_contexts > 0``): its context vector is added
            to the set's perturbation embedding, ``h_P + e_c`` (control sets get ``e_c`` alone).

        Returns
        -------
        ``h_gene`` (``K x d``, computed once and shared by every set), ``h_post``
        (``K x n x d``, gene-major so that the gene-specific decoders are batched matrix products) and
        ``h_terms``, the gene and set terms ``(g, q)`` (``K x d``, ``n x d``) of the input of
        ``post_mlp``, ``ReLU(BN(h_gene + h_P)) = grid_relu(g, q)`` (``K x n x d``, not built in training).
        """
        h_gene = self.gene_mlp(self.gene_encoder())
        n, k, d = pert_idx.shape[0], self.n_genes, self.hidden_dim
        h_p = self._set_embeddings(pert_idx, h_gene, context)
        # BN(h_gene_u + h_P) over the K x n grid: its moments are sums of those of the two terms, so the
        # normalization folds into the K + n embeddings before they are broadcast (same values as
        # self.bn_post on the K * n rows, without a pass over them)
        bn = self.bn_post
        mean, var = _bn_moments(
            bn,
            h_gene.mean(0) + h_p.mean(0),
            _column_var(h_gene) + _column_var(h_p),
            k * n,
        )
        scale = bn.weight / torch.sqrt(var + bn.eps)
        g, q = (h_gene - mean) * scale + bn.bias, h_p * scale
        out = {"h_gene": h_gene, "h_terms": (g, q)}
        if self.training and self.fold_training_block and not torch.is_autocast_enabled(g.device.type):
            # the grid in chunks, never whole; the batch norm folded into the first linear layer, with
            # the moments of the last batch norm
            h_post, colsum, sumsq = _post_mlp_train(self.post_mlp, g, q)
            out["post_moments"] = (colsum, sumsq)
        else:  # eval (running statistics), or under autocast: the plain layers
            h_post = self.post_mlp(grid_relu(g, q).reshape(k * n, d), last_norm=False)
        out["h_post"] = h_post.view(k, n, d)
        return out

    def _gene_linear(
        self, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ):
        """``w_u . BN(y)_u + b_u`` per gene, the batch norm folded into the weights (``K x n``)."""
        w_eff = (w * scale.unsqueeze(1)).squeeze(-1)
        b_eff = b.view(-1, 1) + (shift.unsqueeze(1) * w).sum(1)
        return _GeneDot.apply(y, w_eff) + b_eff

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """``zhat`` (``n x K``) from the gene-specific effects ``z`` (``K x n``), through the cross-gene state."""
        if self.cross_gene is None:  # ablation: gene-specific decoder on z_u alone
            return (z * self.w2 + self.b2).T
        h_cg = self.cross_gene(z.T)  # n x d
        return (z * self.w2[:, :1] + self.w2[:, 1:] @ h_cg.T + self.b2).T

    def generative(
        self, h_post: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Gene-specific effects ``z`` and predicted change ``zhat`` (``n x K``), log-variance ``s`` (or ``None``).

        ``h_post`` is the post-perturbation embedding before the last batch norm of ``post_mlp``,
        which is applied here folded into the gene-specific linear maps (same values, one pass less).
        ``moments``: the column sums and sums of squares of ``h_post`` over its ``K n`` rows, where
        :meth:`inference` has them (training mode); otherwise computed here.
        """
        k, n, d = h_post.shape
        bn = self.post_mlp[-1]
        mean = var = None
        if bn.training:  # column sums are much faster than torch.var_mean over dim 0 on CPU
            if moments is None:
                flat = h_post.reshape(k * n, d)
                moments = flat.sum(0), (flat * flat).sum(0)
            mean = moments[0] / (k * n)
            var = (moments[1] / (k * n) - mean * mean).clamp(min=0.0)
        mean, var = _bn_moments(bn, mean, var, k * n)
        scale = bn.weight / torch.sqrt(var + bn.eps)
        shift = bn.bias - mean * scale
        z = self._gene_linear(h_post, self.w1, self.b1, shift, scale)  # K x n
        zhat = self._decode(z)
        logvar = (
            self._gene_linear(h_post, self.w_unc, self.b_unc, shift, scale).T if self.uncertainty else None
        )
        return {"z": z.T, "zhat": zhat, "logvar": logvar}

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict) -> LossOutput:
        """Autofocus + direction (+ uncertainty) loss, averaged as in the published code.

        Per perturbation, mean over its cells and over the genes expressed in its cells; then mean over
        the distinct perturbations of the batch.
        """
        x, mask = tensors[K.X], tensors[K.MASK].to(tensors[K.X].dtype)
        _, inverse, counts = torch.unique(tensors[K.GROUP], return_inverse=True, return_counts=True)
        zhat = generative_outputs["zhat"]
        if self.anchor is not None:
            pert_idx = self._get_inference_input(tensors)["pert_idx"]
            zhat = zhat + self.anchor_delta(pert_idx, own_out=self.training)
        exponent = 2.0 if self.loss_kind == "mse" else 2.0 + self.gamma
        if (
            x.shape[0] >= SET_MOMENT_MIN_CELLS * counts.numel()
            and exponent == round(exponent)
            and int(exponent) % 2 == 0
            and (self.loss_kind == "mse" or self.direction == "sign" or not torch.is_grad_enabled())
        ):
            return self._set_moment_loss(tensors, zhat, generative_outputs, inverse, counts, int(exponent))
        pred = zhat[inverse] + tensors[K.X_CTRL]
        c = self.control_mean if self.n_contexts == 0 else self.context_control_mean[tensors[K.CONTEXT]]
        mse = self.loss_kind == "mse"
        err = (pred - x) ** 2 if mse else (pred - x).abs() ** (2.0 + self.gamma)
        pred_dir = (
            torch.sign(pred - c) if self.direction == "sign" else torch.tanh((pred - c) / self.direction_tau)
        )
        dirn = (torch.sign(x - c) - pred_dir) ** 2
        weight = mask / (
            mask.sum(1, keepdim=True).clamp(min=1.0) * counts[inverse].unsqueeze(1) * counts.numel()
        )
        autofocus = (err * weight).sum()
        direction = (dirn * weight).sum()
        total = autofocus if mse else autofocus + self.direction_lambda * direction
        extra = {"autofocus": autofocus.detach(), "direction": direction.detach()}
        if self.anchor is not None:
            residual = (generative_outputs["zhat"] ** 2).mean()
            total = total + self.anchor_reg * residual
            extra["residual"] = residual.detach()
        if self.uncertainty:
            # bounded log-variance, and only where the weight is non-zero: exp(-s) * err overflows to inf
            # for a runaway s (then inf * 0 = NaN), which a constant learning rate reaches in a few epochs
            s = generative_outputs["logvar"][inverse].clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
            unc = (torch.where(weight > 0, torch.exp(-s) * err + s, 0.0) * weight).sum()
            total = total + self.uncertainty_reg * unc
            extra["uncertainty"] = unc.detach()
        return LossOutput(loss=total, n_obs_minibatch=x.shape[0], extra_metrics=extra)

    def _set_moment_loss(
        self,
        tensors: dict,
        zhat: torch.Tensor,
        generative_outputs: dict,
        inverse: torch.Tensor,
        counts: torch.Tensor,
        p: int,
    ) -> LossOutput:
        """:meth:`loss` from per-set moments of the cells' changes: the same value, no per-cell autograd.

        With ``d_i = x_i - x_ctrl_i`` a cell's error is ``zhat_s - d_i = u - r_i`` (``u = zhat_s - m_s``,
        ``m_s`` the set's mean change, ``r_i = d_i - m_s``), so a set's summed error
        ``sum_i (u - r_i)^p = sum_k C(p, k) (-1)^k u^(p-k) R_k`` (``p`` even, ``R_k = sum_i r_i^k``):
        the per-cell work is data only (central moments, computed once per batch without a graph), and
        the loss and its gradient live on the sets x genes grid. The direction term has no gradient
        (``sign``) or does not enter the loss (``mse``): its value is computed per cell without one.
        """
        x, x_ctrl = tensors[K.X], tensors[K.X_CTRL]
        n_sets, k_genes = counts.numel(), x.shape[1]
        first = torch.empty(n_sets, dtype=torch.long, device=x.device)
        first.scatter_(0, inverse, torch.arange(inverse.numel(), device=x.device))
        mask = tensors[K.MASK][first].to(x.dtype)
        n = counts.to(x.dtype).unsqueeze(1)
        weight = mask / (mask.sum(1, keepdim=True).clamp(min=1.0) * n * n_sets)  # per set, as per cell
        with torch.no_grad():
            r = x - x_ctrl
            mean = x.new_zeros(n_sets, k_genes).index_add_(0, inverse, r).div_(n)
            r.sub_(mean[inverse])
            moments, rk = [], r
            for k in range(1, p + 1):
                if k > 1:
                    rk = rk * r
                moments.append(x.new_zeros(n_sets, k_genes).index_add_(0, inverse, rk))
            c = self.control_mean if self.n_contexts == 0 else self.context_control_mean[tensors[K.CONTEXT]]
            pred = zhat.detach()[inverse].to(x.dtype) + x_ctrl
            pred_dir = (
                torch.sign(pred - c)
                if self.direction == "sign"
                else torch.tanh((pred - c) / self.direction_tau)
            )
            dirn = (torch.sign(x - c) - pred_dir).square_()
            direction = (x.new_zeros(n_sets, k_genes).index_add_(0, inverse, dirn) * weight).sum()
        u = zhat - mean
        err = n * u**p
        for k, moment in enumerate(moments, start=1):
            err = err + (math.comb(p, k) * (-1) ** k) * moment * u ** (p - k)
        autofocus = (err * weight).sum()
        mse = self.loss_kind == "mse"
        total = autofocus if mse else autofocus + self.direction_lambda * direction
        extra = {"autofocus": autofocus.detach(), "direction": direction}
        if self.anchor is not None:
            residual = (generative_outputs["zhat"] ** 2).mean()
            total = total + self.anchor_reg * residual
            extra["residual"] = residual.detach()
        if self.uncertainty:
            s = generative_outputs["logvar"].clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
            unc = (torch.where(weight > 0, torch.exp(-s) * err + n * s, 0.0) * weight).sum()
            total = total + self.uncertainty_reg * unc
            extra["uncertainty"] = unc.detach()
        return LossOutput(loss=total, n_obs_minibatch=x.shape[0], extra_metrics=extra)

    def control_reference(self, context: torch.Tensor | None = None) -> torch.Tensor:
        """Mean control expression the change of each set is relative to: ``K``, or ``n x K`` per context."""
        return self.control_mean if self.n_contexts == 0 else self.context_control_mean[context]

    def sample(self, *args, **kwargs):
        """GEARS is not a generative model of cells; use :meth:`pertpy_gnn.gears.GEARS.predict`."""
        raise NotImplementedError("GEARS does not sample cells; use GEARS.predict.")

    def gene_states(self) -> torch.Tensor:
        """``h_gene = MLP(GNN(genes))`` (``K x d``): shared by every set, computed once per prediction."""
        return self.gene_mlp(self.gene_encoder())

    def predict_delta(
        self,
        pert_idx: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        h_gene: torch.Tensor | None = None,
        block_rows: int = 8192,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``zhat`` (anchor + residual with an anchor) and log-variance of a batch of sets (``n x K`` each).

        In eval mode the network runs folded and blocked: the batch norms (running statistics) are
        folded into the adjacent linear layers and the ``K x n`` grid of post-perturbation
        embeddings is computed a block of genes at a time (about ``block_rows`` rows), straight
        into the gene-specific decoders, so it is never held whole. Same values as
        ``generative(inference(pert_idx))`` up to float rounding (tested). ``h_gene`` may be passed
        from :meth:`gene_states` to share it between batches. In training mode: the plain path.
        """
        if self.training:
            inf = self.inference(pert_idx) if self.n_contexts == 0 else self.inference(pert_idx, context)
            out = self.generative(**self._get_generative_input({}, inf))
            zhat, logvar = out["zhat"], out["logvar"]
        else:
            # in float32 also under autocast (validation of a bf16-mixed run), the shared gene states
            # included: the folded weights and the preallocated output are float32, and evaluation is
            # a small part of an epoch
            with torch.autocast(self.control_mean.device.type, enabled=False):
                h = self.gene_states() if h_gene is None else h_gene
                zhat, logvar = self._predict_folded(pert_idx, h.float(), block_rows, context)
        return (zhat if self.anchor is None else zhat + self.anchor_delta(pert_idx)), logvar

    def _predict_folded(
        self, pert_idx: torch.Tensor, h_gene: torch.Tensor, block_rows: int, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        k, n, d = self.n_genes, pert_idx.shape[0], self.hidden_dim
        h_p = self._set_embeddings(pert_idx, h_gene, context)
        bn = self.bn_post
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        g = (h_gene - bn.running_mean) * scale + bn.bias  # K x d
        hp = h_p * scale  # n x d
        lin1, bn1, _, lin2, bn_last = self.post_mlp
        s1 = bn1.weight / torch.sqrt(bn1.running_var + bn1.eps)
        w1 = lin1.weight * s1[:, None]
        b1 = (lin1.bias - bn1.running_mean) * s1 + bn1.bias
        s_last = bn_last.weight / torch.sqrt(bn_last.running_var + bn_last.eps)
        shift = bn_last.bias - bn_last.running_mean * s_last
        heads = [(self.w1, self.b1)] + ([(self.w_unc, self.b_unc)] if self.uncertainty else [])
        # the last batch norm and the second linear layer (no activation in between) fold into the
        # gene-specific heads: w_u . (W2 h + b2) = (W2^T w_u) . h + w_u . b2, half the matrix products
        w_heads, b_heads = [], []
        for w, b in heads:
            w_bn = w * s_last.unsqueeze(1)  # K x d x 1
            b_bn = b + (shift.unsqueeze(1) * w).sum(1, keepdim=True)
            w_heads.append(torch.matmul(lin2.weight.T, w_bn))
            b_heads.append(b_bn + (lin2.bias.view(1, -1, 1) * w_bn).sum(1, keepdim=True))
        w_all, b_all = torch.cat(w_heads, dim=2), torch.cat(b_heads, dim=2)  # K x d1 x H, K x 1 x H
        out = h_gene.new_empty(k, n, len(heads))
        step = max(1, int(block_rows) // max(n, 1))
        for lo in range(0, k, step):
            hi = min(k, lo + step)
            h = grid_relu(g[lo:hi], hp).reshape(-1, d)
            h = F.linear(h, w1, b1).relu_().reshape(hi - lo, n, -1)
            torch.baddbmm(b_all[lo:hi], h, w_all[lo:hi], out=out[lo:hi])
        return self._decode(out[..., 0]), (out[..., 1].T if self.uncertainty else None)
