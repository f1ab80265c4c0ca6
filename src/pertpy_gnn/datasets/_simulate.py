"""A seeded simulator of a CRISPR screen with a known gene regulatory network and known interactions."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.sparse.csgraph import connected_components
from scipy.special import gammaln, roots_genlaguerre
from scipy.stats import norm, qmc

from .._constants import CONTROL, DELIM, GO_ANNOTATIONS_KEY, SIMULATION_KEY
from .._utils import logger

#: designed genetic-interaction types of the simulated doubles (Norman et al. 2019 subtypes plus additive)
GI_TYPES = ("synergy", "suppression", "neomorphism", "redundant", "epistasis", "additive")
#: default share of each designed type among the doubles
DEFAULT_INTERACTION_FRACTIONS = {
    "synergy": 0.2,
    "suppression": 0.15,
    "neomorphism": 0.15,
    "redundant": 0.1,
    "epistasis": 0.15,
    "additive": 0.25,
}
_MECHANISM = {
    "synergy": "two weak activators of the same program: each alone stays below the program's threshold",
    "suppression": "the two regulators partially inhibit each other's activity",
    "neomorphism": "an AND-gate program driven only by both regulators together switches on new genes",
    "redundant": "two strong regulators of the same program: one alone already saturates it",
    "epistasis": "the dominant regulator silences the other one's activity",
    "additive": "regulators of unrelated programs (no shared downstream program)",
}
_NORMALIZE_TO = 1e4  # counts per cell after normalization, as in sc.pp.normalize_total(target_sum=1e4)
_LIBRARY_SD = 0.35  # log-sd of library sizes
_HILL_MODULE, _HILL_GATE = 3.0, 6.0  # cooperativity of module programs and AND-gate programs
_INHIBIT_EPISTASIS = 5.0  # exp(-5) ~ 0.007: the dominant gene silences the other
_PROGRAM_BASE = (1.0, 1.5)  # mean and sd of the base log expression of program genes (others: 0, 2)
_NOISE_DRAWS = 2048  # quasi-Monte Carlo draws of the program noise for the expected expression
_CELL_BLOCK = 1 << 20  # entries (cells x genes) generated at once


def _hill(u: np.ndarray, n: float | np.ndarray) -> np.ndarray:
    """Signed Hill function with threshold 1: ``sign(u) |u|^n / (1 + |u|^n)``, in (-1, 1)."""
    p = np.abs(u) ** n
    return np.sign(u) * p / (1.0 + p)


def _program_activity(r_eff: np.ndarray, w: np.ndarray, a_dag: np.ndarray, hill_n: np.ndarray) -> np.ndarray:
    """Activity of every program (columns) for every perturbation (rows), programs in topological order."""
    act = np.zeros((r_eff.shape[0], w.shape[1]))
    u0 = r_eff @ w
    for k in range(w.shape[1]):  # loop over programs (tens), vectorized over perturbations
        act[:, k] = _hill(u0[:, k] + act @ a_dag[:, k], hill_n[k])
    return act


def _nb_table(library_size: float, dispersion: float, n_grid: int = 400):
    """Expected ``log1p(1e4 k / L)`` for ``k ~ NB(L m / 1e4, dispersion)`` over log-normal library sizes ``L``.

    Returns the grid of ``log m`` (``m`` = expected normalized expression per 1e4) and the table.
    """
    log_m = np.linspace(np.log(1e-7), np.log(2e4), n_grid)
    xi, wi = np.polynomial.hermite_e.hermegauss(16)
    wi = wi / wi.sum()
    lib = library_size * np.exp(_LIBRARY_SD * xi)
    mu = np.exp(log_m)[:, None] * lib[None, :] / _NORMALIZE_TO  # (grid, lib nodes)
    c = (_NORMALIZE_TO / lib)[None, :] * np.ones_like(mu)
    theta = float(dispersion)
    out = np.empty_like(mu)
    small = mu <= 150
    # exact sum over the NB support where the mean is small
    ms, cs = mu[small], c[small]
    var = ms + ms**2 / theta
    k_max = int(np.ceil(ms.max() + 12 * np.sqrt(var.max()) + 20)) if ms.size else 0
    k = np.arange(k_max + 1)
    logpmf = (
        gammaln(k[None, :] + theta)
        - gammaln(theta)
        - gammaln(k[None, :] + 1)
        + theta * np.log(theta / (theta + ms[:, None]))
        + k[None, :] * np.log(ms[:, None] / (theta + ms[:, None]))
    )
    out[small] = (np.exp(logpmf) * np.log1p(cs[:, None] * k[None, :])).sum(axis=1)
    # large means: Gauss-Laguerre over the Gamma rate, second-order delta method for the Poisson part
    x, wx = roots_genlaguerre(48, theta - 1)
    lam = mu[~small][:, None] * (x / theta)[None, :]
    cl = c[~small][:, None]
    out[~small] = (np.log1p(cl * lam) - cl**2 * lam / (2 * (1 + cl * lam) ** 2)) @ (wx / wx.sum())
    return log_m, out @ wi


def _log_total_moments(
    eta: np.ndarray, noise_load: np.ndarray, n_draws: int, seed: np.random.SeedSequence
) -> tuple:
    """Moments of the log total ``log Z = log sum_g exp(eta_g + (z @ noise_load)_g)`` over ``z ~ N(0, I)``.

    Quasi-Monte Carlo over the programs' noise (scrambled Sobol points, the same for every row of
    ``eta``): ``Z`` of all rows and draws is one matrix product. Returns, per row, the mean and
    variance of ``log Z`` and ``Cov(z, log Z)`` (rows x programs).
    """
    z = norm.ppf(qmc.Sobol(noise_load.shape[0], seed=np.random.default_rng(seed)).random(n_draws))
    shift = eta.max(axis=1, keepdims=True)
    w = np.exp(eta - shift)
    log_z = np.empty((eta.shape[0], n_draws))
    chunk = max(1, _CELL_BLOCK // eta.shape[1])
    for start in range(0, n_draws, chunk):  # blocks of draws
        e = z[start : start + chunk] @ noise_load
        top = e.max(axis=1, keepdims=True)
        log_z[:, start : start + chunk] = np.log(w @ np.exp(e - top).T) + top.T
    log_z += shift
    mean = log_z.mean(axis=1)
    log_z -= mean[:, None]
    return mean, (log_z**2).mean(axis=1), log_z @ z / n_draws


def _expected_lognorm(
    eta: np.ndarray,
    noise_load: np.ndarray,
    library_size: float,
    dispersion: float,
    seed: np.random.SeedSequence,
) -> np.ndarray:
    """Expected log-normalized expression of every perturbation (rows) and gene (columns).

    ``eta`` is the noise-free log expression and ``noise_load`` (programs x genes) maps the cells'
    standard-normal program activity noise ``z`` to log expression. The log share of a gene,
    ``eta_g + n_g z - log Z``, is taken as normal with its exact mean and variance
    (``s_g^2 - 2 n_g Cov(z, log Z) + Var(log Z)``, moments of ``log Z`` by quasi-Monte Carlo); this
    normal, the log-normal library sizes and the NB counts are integrated numerically.
    """
    log_m_grid, table = _nb_table(library_size, dispersion)
    xi, wi = np.polynomial.hermite_e.hermegauss(9)
    wi = wi / wi.sum()
    mean_log_z, var_log_z, cov = _log_total_moments(eta, noise_load, _NOISE_DRAWS, seed)
    var = (noise_load**2).sum(axis=0)[None, :] - 2 * cov @ noise_load + var_log_z[:, None]
    noise_sd = np.sqrt(np.maximum(var, 0))
    log_m = eta - mean_log_z[:, None] + np.log(_NORMALIZE_TO)
    out = np.zeros(eta.shape)
    step = log_m_grid[1] - log_m_grid[0]
    for x, w in zip(xi, wi, strict=True):  # 9 quadrature nodes; linear interpolation on the uniform grid
        pos = np.clip((log_m + x * noise_sd - log_m_grid[0]) / step, 0, log_m_grid.size - 1 - 1e-9)
        i = pos.astype(np.int64)
        out += w * (table[i] + (pos - i) * (table[i + 1] - table[i]))
    return out


def _nb_sparse_block(mu: np.ndarray, dispersion: float, rng: np.random.Generator, cap: float = 4.0):
    """Sample NB counts of a dense block of means; returns flat indices and counts of the non-zeros.

    Zeros are decided with one uniform per entry (``u > P(0)``); the non-zero entries with a small mean
    continue by inverse CDF on the same uniform, those with a large mean are drawn as Gamma-Poisson.
    """
    theta = np.float32(dispersion)
    mu = mu.astype(np.float32, copy=False)
    p0 = np.log(1 + mu / theta)
    p0 *= -theta
    np.exp(p0, out=p0)
    u = rng.random(mu.shape, dtype=np.float32)
    flat = np.flatnonzero((u > p0) | (mu > cap))
    m, uu, pk = mu.ravel()[flat], u.ravel()[flat], p0.ravel()[flat]
    counts = np.empty(flat.size, dtype=np.int32)
    big = m > cap
    counts[big] = rng.poisson(rng.gamma(float(theta), m[big].astype(np.float64) / float(theta)))
    small = ~big
    ms, uu, pk = m[small], uu[small], pk[small]
    q = ms / (ms + theta)
    cdf = pk.copy()
    k = np.zeros(ms.size, dtype=np.int32)
    idx = np.arange(ms.size)
    for j in range(200):  # inverse CDF: k = min{k : F(k) >= u}; the active set shrinks geometrically
        pk *= np.float32((j + theta) / (j + 1))
        pk *= q
        cdf += pk
        k[idx] += 1
        keep = np.flatnonzero((uu > cdf) & (pk > 1e-9))  # stop where float32 cdf can no longer grow
        if keep.size == 0:
            break
        idx, uu, pk, cdf, q = idx[keep], uu[keep], pk[keep], cdf[keep], q[keep]
    counts[small] = k
    keep = counts > 0
    return flat[keep], counts[keep]


def _sample_cells(codes, seed, *, eta, noise_load, library_size, dispersion, counts_layer):
    """Cells of one block: CSR parts (indices, log-normalized data, counts, nnz per row, total counts)."""
    rng = np.random.default_rng(seed)
    n_genes = eta.shape[1]
    e = eta[codes] + rng.standard_normal((codes.size, noise_load.shape[0]), dtype=np.float32) @ noise_load
    e -= e.max(axis=1, keepdims=True)
    np.exp(e, out=e)
    lib = library_size * np.exp(_LIBRARY_SD * rng.standard_normal(codes.size))
    e *= (lib / e.sum(axis=1)).astype(np.float32)[:, None]
    flat, cnt = _nb_sparse_block(e, dispersion, rng)
    del e
    rows = flat // n_genes
    per_row = np.bincount(rows, minlength=codes.size)
    total = np.bincount(rows, weights=cnt, minlength=codes.size)
    counts = cnt.astype(np.float32)
    data = counts * (_NORMALIZE_TO / np.maximum(total, 1)).astype(np.float32)[rows]
    np.log1p(data, out=data)
    return (flat % n_genes).astype(np.int32), data, counts if counts_layer else None, per_row, total


def _largest_remainder(fractions: Mapping[str, float], total: int) -> dict[str, int]:
    keys = list(fractions)
    f = np.array([fractions[k] for k in keys], dtype=float)
    raw = f / f.sum() * total
    n = np.floor(raw).astype(int)
    n[np.argsort(-(raw - n), kind="stable")[: total - n.sum()]] += 1
    return dict(zip(keys, n.tolist(), strict=True))


def _design_doubles(rng, reg_module, reg_weak, reg_sign, reach, n_doubles, fractions):
    """Choose the pairs of regulators of each designed interaction type.

    ``reach`` (regulators x programs, bool) marks the module programs each regulator reaches
    through the network; pairs of different types obey the constraints of their mechanism.
    """
    n = reg_module.size
    ii, jj = np.triu_indices(n, 1)
    same = reg_module[ii] == reg_module[jj]
    same_sign = reg_sign[ii] == reg_sign[jj]
    disjoint = ~(reach[ii] & reach[jj]).any(axis=1)
    weak_i, weak_j = reg_weak[ii], reg_weak[jj]
    candidates = {
        "synergy": same & same_sign & weak_i & weak_j,
        "redundant": same & same_sign & ~weak_i & ~weak_j,
        "epistasis": ~same & disjoint & (~weak_i | ~weak_j),
        "neomorphism": ~same & disjoint,
        "suppression": ~same & disjoint,
        "additive": ~same & disjoint,
    }
    wanted = _largest_remainder(fractions, n_doubles)
    used = np.zeros(ii.size, dtype=bool)
    usage = np.zeros(n)
    pairs: list[tuple[int, int, str]] = []

    def take(kind: str) -> bool:
        idx = np.flatnonzero(candidates[kind] & ~used)
        if idx.size == 0:
            return False
        score = usage[ii[idx]] + usage[jj[idx]] + rng.random(idx.size)  # spread doubles over regulators
        p = idx[np.argmin(score)]
        used[p] = True
        usage[[ii[p], jj[p]]] += 1
        pairs.append((int(ii[p]), int(jj[p]), kind))
        return True

    pair_specific = ("neomorphism", "suppression", "epistasis")  # inhibition / AND gate: any pair works
    for kind in pair_specific:
        candidates[f"{kind} "] = np.ones(ii.size, dtype=bool)
    short = dict.fromkeys(wanted, 0)
    for kind in ("synergy", "redundant", "epistasis", "neomorphism", "suppression", "additive"):
        for _ in range(wanted.get(kind, 0)):
            short[kind] += not (take(kind) or (kind in pair_specific and take(f"{kind} ")))
    missing = sum(short.values())
    if missing:
        logger.warning(
            "Not enough pairs for the interaction types %s; %d doubles were given other types.",
            [k for k, v in short.items() if v],
            missing,
        )
    kinds = [k for k in wanted if wanted[k] > 0]
    options = kinds + [f"{k} " for k in pair_specific if k in kinds]
    for m in range(missing):  # fill with the other types in turn
        if not any(take(k) for k in options[m % len(options) :] + options[: m % len(options)]):
            raise ValueError(
                f"Cannot design {n_doubles} doubles of the types {kinds} from {n} singles in "
                f"{reg_module.max() + 1} modules; use fewer `n_doubles`, more `n_singles` or `n_modules`, or "
                "allow the neomorphism, suppression or epistasis types in `interaction_fractions`."
            )
    return [(i, j, kind.strip()) for i, j, kind in pairs]


def _go_annotations(rng, module, n_modules, family, reg_idx, reg_programs, gene_names):
    """GO-like annotations: genes of a module share its terms; related modules share family terms."""
    n_genes = module.size
    terms_per_module = 5
    rows_g, rows_t = [], []
    # module terms: each gene gets each term of its module with probability 0.6, at least one
    has = rng.random((n_genes, terms_per_module)) < 0.6
    has[np.arange(n_genes), rng.integers(terms_per_module, size=n_genes)] = True
    g, j = np.nonzero(has)
    rows_g.append(g)
    rows_t.append(module[g] * terms_per_module + j)
    offset = n_modules * terms_per_module
    # family terms (modules connected in the program network), 2 per family, probability 0.3
    fam = rng.random((n_genes, 2)) < 0.3
    g, j = np.nonzero(fam)
    rows_g.append(g)
    rows_t.append(offset + family[module[g]] * 2 + j)
    offset += (family.max() + 1) * 2
    # regulator terms: 'regulates program k', shared by the regulators of a program
    r, k = np.nonzero(reg_programs)
    rows_g.append(reg_idx[r])
    rows_t.append(offset + k)
    offset += reg_programs.shape[1]
    # noise terms shared at random across modules
    n_noise = max(10, n_genes // 20)
    n_per = rng.poisson(1.5, size=n_genes)
    rows_g.append(np.repeat(np.arange(n_genes), n_per))
    rows_t.append(offset + rng.integers(n_noise, size=int(n_per.sum())))
    g, t = np.concatenate(rows_g), np.concatenate(rows_t)
    df = pd.DataFrame({"gene": np.asarray(gene_names)[g], "go_id": [f"GO:{9000001 + i:07d}" for i in t]})
    return df.drop_duplicates().sort_values(["gene", "go_id"]).reset_index(drop=True)


def _gi_quantities(a: np.ndarray, b: np.ndarray, ab: np.ndarray) -> dict[str, np.ndarray]:
    """Norman-style GI quantities of true deltas (rows = doubles), by least squares ``ab ~ c_a a + c_b b``."""
    c = np.empty((a.shape[0], 2))
    for i in range(a.shape[0]):  # one 2-column least-squares problem per double
        c[i] = np.linalg.lstsq(np.stack([a[i], b[i]], axis=1), ab[i], rcond=None)[0]
    fit = c[:, :1] * a + c[:, 1:] * b
    fc, abc = fit - fit.mean(1, keepdims=True), ab - ab.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        model_fit = (fc * abc).sum(1) / np.sqrt((fc**2).sum(1) * (abc**2).sum(1))
        dominance = np.abs(np.log10(np.abs(c[:, 0] / c[:, 1])))
        add_dev = np.linalg.norm(ab - a - b, axis=1) / np.linalg.norm(a + b, axis=1)
    return {
        "c_a": c[:, 0],
        "c_b": c[:, 1],
        "magnitude": np.sqrt((c**2).sum(1)),
        "model_fit": model_fit,
        "dominance": dominance,
        "additive_deviation": add_dev,
    }


def _simulate_contexts(
    seq,
    n_contexts: int,
    eta: np.ndarray,
    r_eff: np.ndarray,
    act: np.ndarray,
    loading: np.ndarray,
    noise_load: np.ndarray,
    library_size: float,
    dispersion: float,
    truth_seq,
    true_mean: np.ndarray,
    *,
    baseline_sd: float,
    response_sd: float,
    program_fraction: float,
) -> list[dict]:
    """Noise-free log expression and expected expression of every context (see ``simulate_perturbseq``).

    The first context is the reference (``eta`` itself); the others shift the base expression, scale
    each program's loadings and add a program of their own. Draws come from ``seq`` only.
    """
    out = [
        {
            "name": "C1",
            "eta": eta,
            "true_mean": true_mean,
            "base_shift": np.zeros(eta.shape[1]),
            "response_scale": np.ones(act.shape[1]),
            "program": np.zeros(eta.shape[0]),
            "program_loading": np.zeros(eta.shape[1]),
        }
    ]
    if n_contexts == 1:
        return out
    rng = np.random.default_rng(seq)
    n_sets, n_genes = eta.shape
    n_reg = r_eff.shape[1]
    for c in range(1, n_contexts):
        shift = rng.normal(0.0, baseline_sd, n_genes)
        scale = np.exp(rng.normal(0.0, response_sd, act.shape[1]))
        feeders = rng.random(n_reg) < program_fraction
        v = np.where(feeders, rng.choice([-1.0, 1.0], n_reg) * rng.uniform(0.8, 1.5, n_reg), 0.0)
        program = _hill(r_eff @ v, _HILL_MODULE)
        targets = rng.random(n_genes) < 0.05
        own = np.where(targets, rng.choice([-1.0, 1.0], n_genes) * rng.uniform(0.5, 1.2, n_genes), 0.0)
        eta_c = eta + shift[None, :] + (act * (scale - 1.0)[None, :]) @ loading + np.outer(program, own)
        out.append(
            {
                "name": f"C{c + 1}",
                "eta": eta_c,
                "base_shift": shift,
                "response_scale": scale,
                "program": program,
                "program_loading": own,
            }
        )
    for c in out[1:]:  # expected expression of every context with the same quasi-Monte Carlo points
        c["true_mean"] = _expected_lognorm(c["eta"], noise_load, library_size, dispersion, truth_seq)
    return out


def simulate_perturbseq(
    *,
    n_genes: int = 500,
    n_singles: int = 40,
    n_doubles: int = 60,
    n_cells_per_perturbation: int = 50,
    n_control: int = 1000,
    n_modules: int | None = None,
    interaction_fractions: Mapping[str, float] | None = None,
    library_size: float | None = None,
    dispersion: float = 10.0,
    direct_effect: float = 2.0,
    program_noise: float = 1.0,
    counts_layer: bool = True,
    n_contexts: int = 1,
    context_baseline_sd: float = 0.5,
    context_response_sd: float = 0.4,
    context_program_fraction: float = 0.25,
    n_jobs: int | None = None,
    seed: int = 0,
) -> AnnData:
    r"""Simulate a CRISPR-activation Perturb-seq screen of single and double perturbations.

    The default is small enough for GEARS to train on it in minutes on a laptop CPU; the same
    function makes a Norman-shaped screen (90,000 cells x 5,000 genes, 105 singles, 131 doubles)
    in about 35 s of CPU time, well under a minute on two free cores (about 3.2 GB peak memory
    with the counts layer; see ``benchmarks/simulate_norman_scale.py``), generating sparse counts
    block by block.

    **Generative model.** Genes are split at random into ``n_modules`` modules. Each module has a
    *program*, whose activity is carried by a hub gene. Programs form a sparse random DAG (each
    program has an upstream program with probability 0.4, edge weight :math:`\pm 0.8..1.6`).
    The ``n_singles`` perturbed genes are *regulators*, spread over the modules; each feeds its
    module's program with weight :math:`s \cdot w` (sign :math:`s`, positive with probability 0.8;
    *weak* regulators :math:`w \in [0.5, 0.7]`, *strong* ones :math:`w \in [1.5, 3]`), sometimes
    (probability 0.2) also another program weakly, and directly regulates 3 to 8 private target
    genes. For a perturbation set :math:`P` (indicator :math:`x`):

    1. regulator activity :math:`r_j = x_j \exp(-\sum_i Q_{ij} x_i)`, where :math:`Q` holds the
       pair-specific inhibitions of the designed doubles;
    2. program activity, in topological order,
       :math:`a_k = h(\sum_j W_{jk} r_j + \sum_l A_{lk} a_l)` with the thresholded, saturating
       Hill function :math:`h(u) = \mathrm{sign}(u)|u|^n / (1 + |u|^n)` (:math:`n = 3`; AND-gate
       programs :math:`n = 6`);
    3. log expression :math:`\eta_g = \beta_g + \sum_k L_{kg} a_k + \sum_j D_{jg} r_j +
       \delta\,[g \in P]` (program loadings :math:`L` on about 70% of the module's genes and 5%
       cross-module targets, private targets :math:`D`, ``direct_effect`` :math:`\delta` on the
       perturbed genes themselves; base :math:`\beta_g \sim N(1, 1.5^2)` for the genes of module
       programs, which are expressed like real programs' genes, :math:`N(0, 2^2)` for the others).

    The nonlinearity makes doubles non-additive, and the doubles are designed (``gi_type``) so that
    each Norman et al. (2019) interaction kind arises from a mechanism: **synergy** (two weak
    regulators of one program, each below its threshold), **redundant** (two strong regulators of
    one program, which one alone already saturates), **suppression** (mutual partial inhibition,
    :math:`Q = 0.7..1.2` both ways), **epistasis** (the dominant, strong regulator silences the
    other, :math:`Q = 5`), **neomorphism** (an extra AND-gate program fed by both with weight 0.6,
    which neither activates alone, switches on new targets) and **additive** (regulators whose
    reachable programs are disjoint).

    Cells: the activity of each module program varies between cells (a cell state), by
    :math:`\sigma z_{ck}`, :math:`z_c \sim N(0, I)` (``program_noise`` :math:`\sigma`; AND-gate
    programs do not vary), which adds :math:`\epsilon_c = \sigma \sum_k z_{ck} L_{k\cdot}` to the log
    expression: the genes of a program are co-expressed across cells, as in real data. With the
    defaults, GEARS' co-expression graph (Pearson :math:`r > 0.4` over the training cells) links
    about half of the program genes (44% of the default screen's, 57% at Norman's scale, about
    30,000 edges), over 90% of its edges within a module. Each cell also gets a library size
    :math:`\ell_c` (log-normal, median ``library_size``, log-sd 0.35), and counts
    :math:`k_{cg} \sim NB(\ell_c \mathrm{softmax}_g(\eta + \epsilon_c), \theta)` (``dispersion``
    :math:`\theta`). ``X`` is :math:`\log(1 + 10^4 k_{cg} / \sum_g k_{cg})`, as
    ``sc.pp.normalize_total(target_sum=1e4)`` then ``sc.pp.log1p`` would give.

    GO-like annotations: each module has 5 terms (each of its genes gets each with probability 0.6,
    at least one), modules connected in the program DAG share 2 family terms (probability 0.3),
    regulators of a program share a "regulates program k" term, and every gene gets Poisson(1.5)
    noise terms from a shared pool. A Jaccard GO graph so links genes with similar effects.

    **Contexts.** With ``n_contexts > 1`` the same perturbations are screened in several contexts
    (named ``C1``, ``C2``, ...; ``obs['context']``). The contexts share the network (:math:`W`,
    :math:`A`, :math:`Q`, private targets :math:`D`, the direct effect and the program activities
    :math:`a_k`), and differ in three ways: a context-specific base expression
    :math:`\beta_{cg} = \beta_g + b_{cg}`; a context-specific response scaling of every
    program's loadings, :math:`L_{ck\cdot} = s_{ck} L_{k\cdot}`; and a context-specific program
    :math:`a^{(c)} = h(\sum_j V_{cj} r_j)` fed by a random ``context_program_fraction`` of the
    regulators (weights :math:`\pm 0.8..1.5`) and loading on about 5% of the genes (its own
    hub-less targets, :math:`\pm 0.5..1.2`). The first context ``C1`` is the *reference*: no base
    shift, :math:`s = 1`, no own program, so it is exactly the single-context screen of the same
    seed. Part of every perturbation's change is thus shared across contexts (same programs, same
    direction), part is context-specific (the scale of each program's response and the context's
    own program), and the control means differ. Cell-state noise loads on the shared
    :math:`L`.

    Parameters
    ----------
    n_genes
        Number of measured genes (named ``G0001``, ``G0002``, ...).
    n_singles
        Number of perturbed genes (regulators); every one is measured as a single perturbation.
    n_doubles
        Number of double perturbations, pairs of the singles.
    n_cells_per_perturbation
        Cells of each single and double perturbation.
    n_control
        Control cells.
    n_modules
        Number of gene modules / programs; default ``max(2, round(n_singles / 5))``.
    interaction_fractions
        Share of each designed interaction type among the doubles, keys from ``synergy``,
        ``suppression``, ``neomorphism``, ``redundant``, ``epistasis``, ``additive``; default
        0.2 / 0.15 / 0.15 / 0.1 / 0.15 / 0.25. Types without enough candidate pairs are filled with
        other types (with a warning).
    library_size
        Median total counts per cell over the simulated genes; default ``2 * n_genes`` (10,000 for
        5,000 genes).
    dispersion
        Negative-binomial dispersion :math:`\theta` (variance :math:`\mu + \mu^2/\theta`).
    direct_effect
        Change of log expression of a perturbed gene itself (positive: CRISPRa, negative: CRISPRi).
    program_noise
        Standard deviation of the cell-to-cell variation of module program activities (in units of
        the activity, which perturbations move within :math:`(-1, 1)`); it makes a module's genes
        co-expressed. ``0`` gives cells that differ only by library size and counting noise.
    counts_layer
        Also store the raw counts in ``layers['counts']``.
    n_contexts
        Number of cell contexts (cell lines, donors, conditions) screened with the same
        perturbations; each context has ``n_control`` control cells and ``n_cells_per_perturbation``
        cells of every perturbation. ``1`` (default) gives exactly the single-context screen. See
        *Contexts* above.
    context_baseline_sd
        Standard deviation of a context's shift of every gene's base log expression
        (:math:`\beta_{cg} = \beta_g + b_{cg}`, :math:`b_{cg} \sim N(0, \mathrm{sd}^2)`).
    context_response_sd
        Log-sd of a context's scaling of each program's loadings
        (:math:`L_{ck\cdot} = s_{ck} L_{k\cdot}`, :math:`\log s_{ck} \sim N(0, \mathrm{sd}^2)`).
    context_program_fraction
        Fraction of the regulators that also drive a context's own program (its own targets).
    n_jobs
        Threads sampling the counts (default: up to 4 available cores). The result does not depend
        on it.
    seed
        Random seed. The network depends only on the seed and the network arguments (genes,
        singles, doubles, modules, fractions), not on the cell numbers.

    Returns
    -------
    AnnData with

    ``X``
        Log-normalized expression, CSR float32, cells shuffled.
    ``layers['counts']``
        Raw counts, CSR float32 (when ``counts_layer``).
    ``obs['condition']``
        ``control``, ``A`` or ``A+B`` (genes sorted), categorical.
    ``obs['total_counts']``
        Total counts of the cell.
    ``obs['context']``
        Context of the cell (``C1``, ``C2``, ...), categorical; only with ``n_contexts > 1``.
    ``var['module']``, ``var['role']``
        Module of each gene and its role: ``regulator`` (perturbed), ``hub`` (carries a module
        program), ``gate`` (carries an AND-gate program), ``target`` (loads on a program),
        ``other``.
    ``uns['pg_go_annotations']``
        DataFrame with columns ``gene``, ``go_id``: GO-like terms of every gene.
    ``uns['simulation']``
        The ground truth, a dict:

        ``params``
            Every argument that shapes the data (all but ``n_jobs``), with the derived
            ``library_size``, ``n_modules`` and ``n_programs``.
        ``genes``
            DataFrame indexed by gene: ``module``, ``role``, ``base_log_expression``
            (:math:`\beta_g`), ``regulator_strength`` (:math:`w`, 0 for non-regulators),
            ``regulator_class`` (``weak`` / ``strong`` / ``""``), ``regulator_sign``.
        ``programs``
            DataFrame indexed by program (``P01``, ...; ``AND01``, ... for AND gates): ``hub``
            gene, ``kind`` (``module`` / ``and_gate``), ``hill_n``.
        ``grn``
            Gene-level network, DataFrame with columns ``source``, ``target``, ``weight``, ``kind``:
            ``regulator_program`` (regulator -> hub, :math:`W`), ``program_program`` (hub -> hub,
            :math:`A`), ``program_target`` (hub -> gene, :math:`L`; a hub's own loading is
            included), ``regulator_target`` (regulator -> gene, :math:`D`), ``inhibition``
            (regulator -| regulator, weight :math:`-Q`).
        ``program_activity``
            DataFrame perturbations x programs, :math:`a_k` (control row included).
        ``true_control_mean``
            Expected log-normalized expression of control cells, float32 array over ``var_names``.
        ``true_delta``
            DataFrame perturbations x genes: expected log-normalized expression minus that of
            control: what infinitely many cells would show. Integrated numerically over the cell
            states, library sizes and NB counts (a gene's log share of the cell's total taken as
            normal, its mean and variance from quasi-Monte Carlo over the cell states); the mean of
            simulated cells agrees with it within sampling error.
        ``interactions``
            DataFrame indexed by double (``A+B``): ``gene_a``, ``gene_b``, designed ``gi_type``,
            ``mechanism``, ``dominant`` gene (epistasis, else ``""``), and, from ``true_delta``
            (:math:`a, b, ab`), least-squares ``c_a``, ``c_b`` of :math:`ab \approx c_a a + c_b b`,
            ``magnitude`` :math:`\sqrt{c_a^2 + c_b^2}`, ``model_fit`` (Pearson of the fit with
            :math:`ab`), ``dominance`` :math:`|\log_{10}(c_a / c_b)|` and
            ``additive_deviation`` :math:`\|ab - a - b\| / \|a + b\|`.
        ``contexts``
            Only with ``n_contexts > 1``: the ground truth of every context, a dict
            ``context -> {'true_control_mean', 'true_delta', 'base_shift', 'response_scale',
            'context_program'}``: the first two as above for that context (the top-level
            ``true_control_mean``, ``true_delta``, ``program_activity`` and ``interactions`` are those
            of the reference context ``C1``); ``base_shift`` (:math:`b_{c\cdot}`, array over genes),
            ``response_scale`` (:math:`s_{c\cdot}`, array over programs) and ``context_program``
            (DataFrame ``perturbation x {activity}`` of the context's own program; all zero for
            ``C1``), and ``context_program_loading`` (array over genes).

    Examples
    --------
    >>> import pertpy_gnn as pg
    >>> adata = pg.datasets.simulate_perturbseq(seed=0)
    >>> pg.pp.parse_perturbations(adata, perturbation_key="condition")
    >>> adata.uns["simulation"]["interactions"]["gi_type"].value_counts()  # doctest: +SKIP
    """
    fractions = dict(
        DEFAULT_INTERACTION_FRACTIONS if interaction_fractions is None else interaction_fractions
    )
    bad = sorted(set(fractions) - set(GI_TYPES))
    if bad:
        raise ValueError(
            f"Unknown interaction types {bad} in `interaction_fractions`; use keys from {list(GI_TYPES)}."
        )
    if any(v < 0 for v in fractions.values()) or (n_doubles > 0 and sum(fractions.values()) <= 0):
        raise ValueError("`interaction_fractions` must be non-negative with a positive sum.")
    n_modules = max(2, round(n_singles / 5)) if n_modules is None else int(n_modules)
    for name, value, low in [
        ("n_singles", n_singles, 1),
        ("n_doubles", n_doubles, 0),
        ("n_cells_per_perturbation", n_cells_per_perturbation, 1),
        ("n_control", n_control, 1),
        ("n_modules", n_modules, 1),
        ("n_contexts", n_contexts, 1),
    ]:
        if int(value) < low:
            raise ValueError(f"`{name}` must be at least {low}, got {value}.")
    if n_doubles > n_singles * (n_singles - 1) // 2:
        raise ValueError(
            f"{n_singles} singles make only {n_singles * (n_singles - 1) // 2} pairs; lower `n_doubles`."
        )
    n_special = n_singles + n_modules + n_doubles  # regulators, hubs, at most one gate per double
    if n_genes < n_special + 5 * n_modules:
        raise ValueError(
            f"n_genes={n_genes} is too small for {n_singles} singles, {n_doubles} doubles and {n_modules} "
            f"modules; use at least {n_special + 5 * n_modules} genes."
        )
    library_size = 2.0 * n_genes if library_size is None else float(library_size)
    if library_size <= 0 or dispersion <= 0 or program_noise < 0:
        raise ValueError("`library_size` and `dispersion` must be positive and `program_noise` non-negative.")
    if context_baseline_sd < 0 or context_response_sd < 0 or not 0 <= context_program_fraction <= 1:
        raise ValueError(
            "`context_baseline_sd` and `context_response_sd` must be non-negative and `context_program_fraction` "
            "in [0, 1]."
        )
    n_contexts = int(n_contexts)

    net_seq, go_seq, cell_seq, truth_seq = np.random.SeedSequence(seed).spawn(4)
    rng = np.random.default_rng(net_seq)
    width = max(4, len(str(n_genes)))
    genes = np.array([f"G{i + 1:0{width}d}" for i in range(n_genes)], dtype=object)

    # modules, hubs and regulators
    module = np.empty(n_genes, dtype=np.int64)
    members = np.array_split(rng.permutation(n_genes), n_modules)
    for m, idx in enumerate(members):
        module[idx] = m
    role = np.full(n_genes, "other", dtype=object)
    hubs = np.array([idx[0] for idx in members])
    role[hubs] = "hub"
    reg_module = rng.permutation(np.arange(n_singles) % n_modules)
    reg_idx = np.empty(n_singles, dtype=np.int64)
    for m in range(n_modules):  # loop over modules
        slots = np.flatnonzero(reg_module == m)
        reg_idx[slots] = rng.choice(members[m][1:], size=slots.size, replace=False)
    order = np.argsort(genes[reg_idx])  # regulators sorted by name
    reg_idx, reg_module = reg_idx[order], reg_module[order]
    role[reg_idx] = "regulator"
    reg_weak = np.zeros(n_singles, dtype=bool)
    for m in range(n_modules):  # about 60% of each module's regulators are weak
        slots = rng.permutation(np.flatnonzero(reg_module == m))
        reg_weak[slots[: int(np.ceil(0.6 * slots.size))]] = True
    reg_strength = np.where(reg_weak, rng.uniform(0.5, 0.7, n_singles), rng.uniform(1.5, 3.0, n_singles))
    module_sign = np.where(rng.random(n_modules) < 0.8, 1.0, -1.0)  # activating or repressing program
    reg_sign = module_sign[reg_module] * np.where(rng.random(n_singles) < 0.1, -1.0, 1.0)

    # module program network: W (regulator -> program), A (program -> program, a DAG)
    w_mod = np.zeros((n_singles, n_modules))
    w_mod[np.arange(n_singles), reg_module] = reg_sign * reg_strength
    second = rng.random(n_singles) < 0.2
    other = (reg_module + rng.integers(1, n_modules, n_singles)) % n_modules if n_modules > 1 else reg_module
    second &= other != reg_module
    w_mod[np.flatnonzero(second), other[second]] = rng.choice([-1.0, 1.0], second.sum()) * rng.uniform(
        0.2, 0.4, second.sum()
    )
    a_mod = np.zeros((n_modules, n_modules))
    for k in range(1, n_modules):
        if rng.random() < 0.4:
            a_mod[rng.integers(k), k] = rng.choice([-1.0, 1.0], p=[0.3, 0.7]) * rng.uniform(0.8, 1.6)
    reach = w_mod != 0  # programs reachable from each regulator (transitive closure of the DAG)
    for k in range(n_modules):  # topological order
        reach[:, k] |= (reach[:, :k] & (a_mod[:k, k] != 0)[None, :]).any(axis=1)
    family = connected_components(sp.csr_matrix(a_mod != 0), directed=False)[1]  # related modules

    # designed doubles
    pairs = (
        _design_doubles(rng, reg_module, reg_weak, reg_sign, reach, n_doubles, fractions) if n_doubles else []
    )
    q = np.zeros((n_singles, n_singles))
    dominant = {}
    neo = [(i, j) for i, j, kind in pairs if kind == "neomorphism"]
    for i, j, kind in pairs:
        if kind == "suppression":
            q[i, j], q[j, i] = rng.uniform(0.7, 1.2, 2)
        elif kind == "epistasis":
            # the strong regulator dominates (a random one when both are strong)
            dom = (i if not reg_weak[i] else j) if reg_weak[i] != reg_weak[j] else (i, j)[rng.integers(2)]
            q[dom, j if dom == i else i] = _INHIBIT_EPISTASIS
            dominant[(i, j)] = genes[reg_idx[dom]]
    n_gates = len(neo)
    n_prog = n_modules + n_gates
    free = np.flatnonzero(role == "other")
    gates = rng.choice(free, size=n_gates, replace=False)
    role[gates] = "gate"
    w = np.zeros((n_singles, n_prog))
    w[:, :n_modules] = w_mod
    for g, (i, j) in enumerate(neo):
        w[[i, j], n_modules + g] = 0.6
    a_dag = np.zeros((n_prog, n_prog))
    a_dag[:n_modules, :n_modules] = a_mod
    hill_n = np.r_[np.full(n_modules, _HILL_MODULE), np.full(n_gates, _HILL_GATE)]
    prog_hub = np.r_[hubs, gates].astype(np.int64)

    # loadings: programs -> genes (L), regulators -> private targets (D)
    loading = np.zeros((n_prog, n_genes))
    targetable = np.isin(role, ["other"])
    mean_size = n_genes / n_modules
    for m in range(n_modules):  # loop over modules
        own = members[m][targetable[members[m]]]
        own = own[rng.random(own.size) < 0.7]
        cross_pool = np.flatnonzero(targetable & (module != m))
        cross = rng.choice(cross_pool, size=min(cross_pool.size, round(0.05 * mean_size)), replace=False)
        tg = np.r_[own, cross]
        loading[m, tg] = rng.choice([-1.0, 1.0], tg.size, p=[0.3, 0.7]) * rng.uniform(0.4, 1.2, tg.size)
    for g, (i, j) in enumerate(neo):  # AND gates switch on genes outside both regulators' modules
        pool = np.flatnonzero(targetable & ~np.isin(module, [reg_module[i], reg_module[j]]))
        tg = rng.choice(pool, size=min(pool.size, max(10, round(0.3 * mean_size))), replace=False)
        loading[n_modules + g, tg] = rng.choice([-1.0, 1.0], tg.size, p=[0.3, 0.7]) * rng.uniform(
            0.6, 1.5, tg.size
        )
    loading[np.arange(n_prog), prog_hub] = 1.5
    private = np.zeros((n_singles, n_genes))
    n_private = rng.integers(3, 9, n_singles)
    non_reg = np.flatnonzero(role != "regulator")
    for r in range(n_singles):  # loop over regulators
        tg = rng.choice(non_reg, size=n_private[r], replace=False)
        private[r, tg] = rng.choice([-1.0, 1.0], tg.size) * rng.uniform(0.3, 0.8, tg.size)
    role[(role == "other") & ((loading != 0).any(axis=0) | (private != 0).any(axis=0))] = "target"
    base = rng.normal(0.0, 2.0, n_genes)
    # genes of module programs are expressed higher and less spread: N(1, 1.5^2) from the same draw
    program_gene = (loading[:n_modules] != 0).any(axis=0)
    base[program_gene] = _PROGRAM_BASE[0] + _PROGRAM_BASE[1] / 2.0 * base[program_gene]

    # perturbations and their noise-free log expression
    singles = [(i,) for i in range(n_singles)]
    doubles = [
        (i, j) for i, j, _ in sorted(pairs, key=lambda p: (genes[reg_idx[p[0]]], genes[reg_idx[p[1]]]))
    ]
    sets = [(), *singles, *doubles]
    names = [CONTROL] + [DELIM.join(sorted(genes[reg_idx[list(s)]])) for s in sets[1:]]
    x = np.zeros((len(sets), n_singles))
    for p, s in enumerate(sets):
        x[p, list(s)] = 1.0
    r_eff = x * np.exp(-(x @ q))
    act = _program_activity(r_eff, w, a_dag, hill_n)
    eta = base[None, :] + act @ loading + r_eff @ private
    eta[:, reg_idx] += direct_effect * x
    noise_load = program_noise * loading[:n_modules]  # cell-level activity of module programs (not AND gates)
    true_mean = _expected_lognorm(eta, noise_load, library_size, dispersion, truth_seq)
    contexts = _simulate_contexts(
        np.random.SeedSequence(seed).spawn(5)[4] if n_contexts > 1 else None,
        n_contexts,
        eta,
        r_eff,
        act,
        loading,
        noise_load,
        library_size,
        dispersion,
        truth_seq,
        true_mean,
        baseline_sd=context_baseline_sd,
        response_sd=context_response_sd,
        program_fraction=context_program_fraction,
    )
    eta_all = eta if n_contexts == 1 else np.vstack([c["eta"] for c in contexts])
    noise_load = sp.csr_array(noise_load.astype(np.float32))  # sparse: no multi-threaded BLAS per block

    # cells, block by block (blocks have their own seeds: the result does not depend on n_jobs)
    crng = np.random.default_rng(cell_seq)
    n_per = np.tile(np.r_[n_control, np.full(len(sets) - 1, n_cells_per_perturbation)], n_contexts)
    codes = crng.permutation(np.repeat(np.arange(len(sets) * n_contexts), n_per))
    n_cells = codes.size
    block = max(1, _CELL_BLOCK // n_genes)
    starts = range(0, n_cells, block)
    sample = partial(
        _sample_cells,
        eta=eta_all.astype(np.float32),
        noise_load=noise_load,
        library_size=library_size,
        dispersion=dispersion,
        counts_layer=counts_layer,
    )
    jobs = zip((codes[i : i + block] for i in starts), cell_seq.spawn(len(starts)), strict=True)
    if n_jobs is None:
        n_jobs = min(
            4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    # block results are merged 32 at a time: large arrays return to the OS when freed
    pending, stored = [], []

    def flush():
        if pending:
            stored.append([None if a[0] is None else np.concatenate(a) for a in zip(*pending, strict=True)])
            pending.clear()

    with ThreadPoolExecutor(max(1, int(n_jobs))) as pool:  # numpy releases the GIL in the sampling kernels
        for part in pool.map(lambda a: sample(*a), jobs):
            pending.append(part)
            if len(pending) == 32:
                flush()
    flush()
    nnz = np.cumsum([0] + [part[0].size for part in stored])
    idx_dtype = np.int32 if nnz[-1] < np.iinfo(np.int32).max else np.int64
    indptr = np.r_[0, np.cumsum(np.concatenate([part[3] for part in stored]))].astype(idx_dtype)
    total = np.concatenate([part[4] for part in stored])
    arrays = {}
    for j, dtype in enumerate([idx_dtype, np.float32, np.float32][: 3 if counts_layer else 2]):
        arrays[j] = np.empty(nnz[-1], dtype=dtype)
        for b, part in enumerate(stored):  # fill and free piece by piece
            arrays[j][nnz[b] : nnz[b + 1]] = part[j]
            part[j] = None
    stored.clear()
    X = sp.csr_matrix((arrays[1], arrays[0], indptr), shape=(n_cells, n_genes))
    layers = {}
    if counts_layer:
        layers["counts"] = sp.csr_matrix(
            (arrays[2], arrays[0].copy(), indptr.copy()), shape=(n_cells, n_genes)
        )
    del arrays

    obs = pd.DataFrame(
        {
            "condition": pd.Categorical.from_codes(codes % len(sets), categories=names),
            "total_counts": total.astype(np.float32),
        },
        index="cell" + pd.Index(np.arange(n_cells)).astype(str).str.zfill(len(str(n_cells))),
    )
    if n_contexts > 1:
        obs["context"] = pd.Categorical.from_codes(
            codes // len(sets), categories=[c["name"] for c in contexts]
        )
    var = pd.DataFrame({"module": module, "role": pd.Categorical(role)}, index=pd.Index(genes.astype(str)))
    adata = AnnData(X=X, obs=obs, var=var, layers=layers)

    # ground truth
    prog_names = [f"P{k + 1:02d}" for k in range(n_modules)] + [f"AND{g + 1:02d}" for g in range(n_gates)]
    gstr = genes.astype(str)
    strength = np.zeros(n_genes)
    strength[reg_idx] = reg_strength
    reg_class = np.full(n_genes, "", dtype=object)
    reg_class[reg_idx] = np.where(reg_weak, "weak", "strong")
    sign = np.zeros(n_genes)
    sign[reg_idx] = reg_sign
    gene_df = pd.DataFrame(
        {
            "module": module,
            "role": role.astype(str),
            "base_log_expression": base,
            "regulator_strength": strength,
            "regulator_class": reg_class.astype(str),
            "regulator_sign": sign,
        },
        index=pd.Index(gstr),
    )

    def edges(mat, src, tgt, kind):
        s, t = np.nonzero(mat)
        return pd.DataFrame({"source": src[s], "target": tgt[t], "weight": mat[s, t], "kind": kind})

    hub_names = gstr[prog_hub]
    grn = pd.concat(
        [
            edges(w, gstr[reg_idx], hub_names, "regulator_program"),
            edges(a_dag, hub_names, hub_names, "program_program"),
            edges(loading, hub_names, gstr, "program_target"),
            edges(private, gstr[reg_idx], gstr, "regulator_target"),
            edges(-q, gstr[reg_idx], gstr[reg_idx], "inhibition"),
        ],
        ignore_index=True,
    )
    true_delta = pd.DataFrame(
        (true_mean[1:] - true_mean[0]).astype(np.float32), index=names[1:], columns=gstr
    )
    pos = {n: p for p, n in enumerate(names)}
    kinds = {(min(i, j), max(i, j)): kind for i, j, kind in pairs}
    inter = pd.DataFrame(index=pd.Index(names[1 + n_singles :], dtype=object))
    if doubles:
        ga = [names[1 + i] for i, _ in doubles]
        gb = [names[1 + j] for _, j in doubles]
        tm = true_mean - true_mean[0]
        gi = _gi_quantities(
            tm[[pos[a] for a in ga]], tm[[pos[b] for b in gb]], tm[[pos[n] for n in inter.index]]
        )
        inter["gene_a"], inter["gene_b"] = ga, gb
        inter["gi_type"] = [kinds[(min(i, j), max(i, j))] for i, j in doubles]
        inter["mechanism"] = inter["gi_type"].map(_MECHANISM)
        inter["dominant"] = [str(dominant.get((min(i, j), max(i, j)), "")) for i, j in doubles]
        for k, v in gi.items():
            inter[k] = v
    else:
        for col in ("gene_a", "gene_b", "gi_type", "mechanism", "dominant"):
            inter[col] = pd.Series(dtype=str)
    params = {
        "n_genes": n_genes,
        "n_singles": n_singles,
        "n_doubles": n_doubles,
        "n_cells_per_perturbation": n_cells_per_perturbation,
        "n_control": n_control,
        "n_modules": n_modules,
        "n_programs": n_prog,
        "interaction_fractions": {k: float(v) for k, v in fractions.items()},
        "library_size": float(library_size),
        "library_log_sd": _LIBRARY_SD,
        "dispersion": float(dispersion),
        "direct_effect": float(direct_effect),
        "program_noise": float(program_noise),
        "counts_layer": bool(counts_layer),
        "seed": int(seed),
    }
    if n_contexts > 1:
        params.update(
            n_contexts=n_contexts,
            context_baseline_sd=float(context_baseline_sd),
            context_response_sd=float(context_response_sd),
            context_program_fraction=float(context_program_fraction),
        )
    adata.uns[SIMULATION_KEY] = {
        "params": params,
        "genes": gene_df,
        "programs": pd.DataFrame(
            {"hub": hub_names, "kind": ["module"] * n_modules + ["and_gate"] * n_gates, "hill_n": hill_n},
            index=pd.Index(prog_names),
        ),
        "grn": grn,
        "program_activity": pd.DataFrame(act.astype(np.float32), index=names, columns=prog_names),
        "true_control_mean": true_mean[0].astype(np.float32),
        "true_delta": true_delta,
        "interactions": inter,
    }
    if n_contexts > 1:
        adata.uns[SIMULATION_KEY]["contexts"] = {
            c["name"]: {
                "true_control_mean": c["true_mean"][0].astype(np.float32),
                "true_delta": pd.DataFrame(
                    (c["true_mean"][1:] - c["true_mean"][0]).astype(np.float32), index=names[1:], columns=gstr
                ),
                "base_shift": c["base_shift"].astype(np.float32),
                "response_scale": c["response_scale"].astype(np.float32),
                "context_program": pd.DataFrame(
                    {"activity": c["program"].astype(np.float32)}, index=pd.Index(names)
                ),
                "context_program_loading": c["program_loading"].astype(np.float32),
            }
            for c in contexts
        }
    adata.uns[GO_ANNOTATIONS_KEY] = _go_annotations(
        np.random.default_rng(go_seq), module, n_modules, family, reg_idx, w_mod != 0, gstr
    )
    logger.info(
        "Simulated %d cells x %d genes: %d singles, %d doubles, %d control cells per context.",
        n_cells,
        n_genes,
        n_singles,
        len(doubles),
        n_control,
    )
    return adata
