"""What happens when the input is wrong: one row per kind of bad input, run here, documented in
docs/bad_input.md.

Every case must stop early with a clear error (a ValueError, KeyError, TypeError, FileNotFoundError
or RuntimeError naming the problem), and docs/bad_input.md must show the message it really gives.
Regenerate the page after changing a message or adding a case:

    PYTHONPATH=src python -m tests.test_bad_input
"""

from __future__ import annotations

import sys
import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pertpy_gnn as pg
from pertpy_gnn._checkpoint import CheckpointError
from pertpy_gnn.gears import GEARS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_input.md"
MAX_CHARS = 400
CLEAR = (ValueError, KeyError, TypeError, FileNotFoundError, RuntimeError, CheckpointError)


class Ctx:
    """Small inputs, built on first use: a raw toy screen, a prepared one, a trained model, a saved one."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def raw(self):
        from .test_gears import _toy

        return _toy()

    def parsed(self):
        a = self.raw()
        pg.pp.parse_perturbations(a, perturbation_key="condition")
        return a

    def prepared(self):
        from .test_gears import _prepare

        return _prepare(self.raw())

    @cached_property
    def trained(self):
        a = self.prepared()
        return a, pg.tl.train_gears(a, max_epochs=1, hidden_dim=16, progress_bar=False)

    @cached_property
    def compass(self):
        """A small AnnData and an untrained tiny GeneCompass over its genes."""
        import anndata as ad

        from pertpy_gnn.compass import GeneCompass

        genes = [f"G{i}" for i in range(12)]
        x = np.random.default_rng(0).poisson(5.0, (16, 12)).astype(np.float32)
        a = ad.AnnData(x, var=pd.DataFrame(index=genes))
        vocab = pg.pp.compass_vocab(human_genes=genes)
        return a, GeneCompass(vocab=vocab, seq_len=9, n_layers=1, d_model=16, n_heads=2)

    @cached_property
    def compass_midepoch(self) -> tuple:
        """A corpus and a checkpoint written part-way through an epoch by an older pertpy-gnn
        (no train loader position): an epoch-end checkpoint with its loop state set back one batch."""
        import torch

        a, model = self.compass
        corpus = pg.pp.compass_tokenize(
            a, self.tmp / "corpus", model.vocab, species="human", max_len=8, progress_bar=False
        )
        model.train(corpus, batch_size=8, ckpt_dir=self.tmp / "ckpt", accelerator="cpu", progress_bar=False)
        ckpt = torch.load(self.tmp / "ckpt" / "last.ckpt", weights_only=True)
        loop = ckpt["loops"]["fit_loop"]
        loop["epoch_loop.batch_progress"]["current"]["processed"] = 1
        loop["epoch_loop.batch_progress"]["is_last_batch"] = False
        loop["state_dict"].pop("combined_loader", None)
        torch.save(ckpt, self.tmp / "old_mid_epoch.ckpt")
        return corpus, self.tmp / "old_mid_epoch.ckpt"

    @cached_property
    def saved(self) -> Path:
        path = self.tmp / "model"
        self.trained[1].save(path, overwrite=True)
        return path


def _with_x(a, x):
    a.X = x
    return a


def _dup_genes(a):
    a.var_names = [a.var_names[0], a.var_names[0], *a.var_names[2:]]
    return a


def _unknown_gene(a):
    a.obs["condition"] = a.obs["condition"].astype(str)
    a.obs.iloc[-1, a.obs.columns.get_loc("condition")] = "NOTAGENE"
    return a


def _missing_label(a):
    a.obs["condition"] = a.obs["condition"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("condition")] = None
    return a


def _truncated(c: Ctx) -> Path:
    d = c.tmp / "cut"
    d.mkdir(exist_ok=True)
    (d / "model.pt").write_bytes((c.saved / "model.pt").read_bytes()[:2000])
    return d


def _html(c: Ctx) -> Path:
    d = c.tmp / "html"
    d.mkdir(exist_ok=True)
    (d / "model.pt").write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")
    return d


def _no_go_node_for_test_genes(c: Ctx):
    """GEARS trained on a GO graph without G007, evaluated on the test perturbations, which all hold G007."""
    a = c.raw()
    pg.pp.parse_perturbations(a, perturbation_key="condition")
    perts = [p for p in a.obs["pg_perturbation"].cat.categories if p != "control"]
    assign = {
        p: "test" if "G007" in p.split("+") else "val" if p in ("G000+G001", "G005") else "train"
        for p in perts
    }
    pg.pp.split_perturbations(a, kind="custom", assignment=assign)
    pg.pp.rank_de_genes(a)
    ann = a.uns["pg_go_annotations"]
    pg.pp.go_graph(a, annotations=ann[ann["gene"] != "G007"])
    pg.pp.coexpression_graph(a)
    model = pg.tl.train_gears(a, max_epochs=1, hidden_dim=16, progress_bar=False)
    return pg.tl.evaluate(a, {"GEARS": model, "no_change": pg.tl.fit_baseline(a, "no_change")})


def _other_genes_graph(c: Ctx):
    a = c.prepared()
    g = dict(a.uns["pg_coexpression_graph"])
    g["genes"] = np.asarray(g["genes"])[::-1]
    a.uns["pg_coexpression_graph"] = g
    GEARS.setup_anndata(a)
    return GEARS(a)


def _gears_setup(a):
    GEARS.setup_anndata(a)
    return GEARS(a)


def _no_go(c: Ctx):
    a = c.prepared()
    del a.uns["pg_go_graph"]
    return _gears_setup(a)


def _untrained(c: Ctx):
    return _gears_setup(c.prepared()).predict("G000")


#: (section, what the user did, the call) -- the call must raise a clear error
CASES: list[tuple[str, str, object]] = [
    # reading and parsing
    (
        "data",
        "read an h5ad that does not exist",
        lambda c: pg.datasets.read_perturbation_h5ad("no/such/file.h5ad"),
    ),
    ("data", "read a folder as an h5ad", lambda c: pg.datasets.read_perturbation_h5ad(ROOT / "docs")),
    (
        "data",
        "parse with a perturbation column that does not exist",
        lambda c: pg.pp.parse_perturbations(c.raw(), perturbation_key="guide"),
    ),
    (
        "data",
        "parse data with duplicated gene names",
        lambda c: pg.pp.parse_perturbations(_dup_genes(c.raw()), perturbation_key="condition"),
    ),
    (
        "data",
        "parse data where no label is a control label",
        lambda c: pg.pp.parse_perturbations(c.raw(), perturbation_key="condition", control_label="DMSO"),
    ),
    (
        "data",
        "parse data with a perturbed gene that is not measured",
        lambda c: pg.pp.parse_perturbations(_unknown_gene(c.raw()), perturbation_key="condition"),
    ),
    (
        "data",
        "parse data with a cell without a label",
        lambda c: pg.pp.parse_perturbations(_missing_label(c.raw()), perturbation_key="condition"),
    ),
    (
        "data",
        "parse data with NaN expression",
        lambda c: pg.pp.parse_perturbations(
            _with_x(c.raw(), np.full(c.raw().shape, np.nan, dtype=np.float32)), perturbation_key="condition"
        ),
    ),
    (
        "data",
        "parse raw counts instead of log-normalized data",
        lambda c: pg.pp.parse_perturbations(
            _with_x(
                c.raw(), sp.csr_matrix(np.random.default_rng(0).poisson(30, c.raw().shape).astype(np.float32))
            ),
            perturbation_key="condition",
        ),
    ),
    (
        "data",
        "parse the same AnnData a second time",
        lambda c: pg.pp.parse_perturbations(c.parsed(), perturbation_key="condition"),
    ),
    (
        "data",
        "parse with a layer that does not exist",
        lambda c: pg.pp.parse_perturbations(c.raw(), perturbation_key="condition", layer="counts"),
    ),
    # pipeline order
    ("order", "split before parsing", lambda c: pg.pp.split_perturbations(c.raw())),
    ("order", "rank DE genes before parsing", lambda c: pg.pp.rank_de_genes(c.raw())),
    ("order", "set up GEARS before splitting", lambda c: GEARS.setup_anndata(c.parsed())),
    ("order", "build GEARS without a GO graph", _no_go),
    ("order", "build GEARS with a co-expression graph of other genes (or another order)", _other_genes_graph),
    ("order", "fit a baseline before splitting", lambda c: pg.tl.fit_baseline(c.parsed(), "train_mean")),
    (
        "order",
        "evaluate before splitting",
        lambda c: pg.tl.evaluate(c.parsed(), {"x": pg.tl.fit_baseline(c.prepared(), "no_change")}),
    ),
    ("order", "predict with a model that is not trained", _untrained),
    # options
    ("options", "split with an unknown kind", lambda c: pg.pp.split_perturbations(c.parsed(), kind="random")),
    ("options", "fit an unknown baseline", lambda c: pg.tl.fit_baseline(c.prepared(), "mean")),
    (
        "options",
        "train GEARS for 0 epochs",
        lambda c: pg.tl.train_gears(c.prepared(), max_epochs=0, progress_bar=False),
    ),
    (
        "options",
        "train GEARS a second time into the same key",
        lambda c: pg.tl.train_gears(c.trained[0], max_epochs=1, progress_bar=False),
    ),
    (
        "options",
        "give gene embeddings of the wrong shape",
        lambda c: pg.tl.train_gears(c.prepared(), gene_embeddings=np.zeros((3, 4)), progress_bar=False),
    ),
    ("options", "evaluate with no model", lambda c: pg.tl.evaluate(c.trained[0], {}, overwrite=True)),
    (
        "options",
        "evaluate a model that is not a predictor",
        lambda c: pg.tl.evaluate(c.trained[0], {"m": 3}, overwrite=True),
    ),
    (
        "options",
        "evaluate a split that does not exist",
        lambda c: pg.tl.evaluate(c.trained[0], {"m": c.trained[1]}, subset="holdout", overwrite=True),
    ),
    (
        "options",
        "evaluate a GEARS that can predict none of the test perturbations (their genes have no GO-graph node; "
        "when only some lack one, those are left out of every model's metrics with a warning)",
        _no_go_node_for_test_genes,
    ),
    (
        "options",
        "summarize a frame that is not an evaluation",
        lambda c: pg.tl.summarize_evaluation(pd.DataFrame({"a": [1]})),
    ),
    (
        "options",
        "fit a baseline on a split column that does not exist",
        lambda c: pg.tl.fit_baseline(c.prepared(), "no_change", split_key="my_split"),
    ),
    # prediction
    ("predict", "predict None", lambda c: c.trained[1].predict(None)),
    (
        "predict",
        "predict a gene GEARS cannot embed (not in the GO graph)",
        lambda c: c.trained[1].predict("NOT_A_GENE"),
    ),
    ("predict", "predict a set with no gene", lambda c: c.trained[1].predict("ctrl")),
    ("predict", "predict over 0 control cells", lambda c: c.trained[1].predict("G000", n_control=0)),
    (
        "predict",
        "predict cells of data with other genes",
        lambda c: c.trained[1].predict_cells("G000", adata=c.trained[0][:, ::-1].copy()),
    ),
    (
        "predict",
        "predict one set per cell with the wrong number of sets",
        lambda c: c.trained[1].predict_cells(["G000", "G001"], cells=[0, 1, 2], overwrite=True),
    ),
    # genetic interactions
    ("gi", "draw a GI map of one gene", lambda c: pg.tl.gi_map(c.trained[1], ["G000"], progress_bar=False)),
    (
        "gi",
        "draw a GI map of a string instead of a list",
        lambda c: pg.tl.gi_map(c.trained[1], "G000", progress_bar=False),
    ),
    (
        "gi",
        "draw a GI map with something that does not predict",
        lambda c: pg.tl.gi_map(object(), ["G000", "G001"], progress_bar=False),
    ),
    (
        "gi",
        "draw a GI map with a gene the model cannot perturb",
        lambda c: pg.tl.gi_map(c.trained[1], ["G000", "NOT_A_GENE"], progress_bar=False),
    ),
    (
        "gi",
        "give both uncertainty filters to the GI map",
        lambda c: pg.tl.gi_map(
            c.trained[1],
            ["G000", "G001"],
            uncertainty_threshold=0.4,
            uncertainty_quantile=0.5,
            progress_bar=False,
        ),
    ),
    (
        "gi",
        "ask for an unknown GI model fit",
        lambda c: pg.tl.gi_map(c.trained[1], ["G000", "G001"], model_fit="spearman", progress_bar=False),
    ),
    (
        "gi",
        "compare GI tables with no double in common",
        lambda c: pg.tl.evaluate_gi(
            pd.DataFrame({"magnitude": [1.0]}, index=["A+B"]),
            pd.DataFrame({"magnitude": [1.0]}, index=["C+D"]),
        ),
    ),
    # model files
    (
        "files",
        "load a model from a folder without one",
        lambda c: GEARS.load(c.tmp / "nothing", adata=c.trained[0]),
    ),
    ("files", "load a truncated model file", lambda c: GEARS.load(_truncated(c), adata=c.trained[0])),
    ("files", "load an HTML page saved as a model file", lambda c: GEARS.load(_html(c), adata=c.trained[0])),
    (
        "files",
        "load a model onto data with the genes reordered",
        lambda c: GEARS.load(c.saved, adata=c.trained[0][:, ::-1].copy()),
    ),
    ("files", "save a model into a folder that exists", lambda c: c.trained[1].save(c.saved)),
    (
        "compass",
        "overexpress with an unknown level unit",
        lambda c: pg.tl.in_silico(*c.compass, "G1", mode="overexpress", level=2, level_unit="percent"),
    ),
    (
        "compass",
        "overexpress by a fold change below 1",
        lambda c: pg.tl.in_silico(*c.compass, "G1", mode="overexpress", level=0.5),
    ),
    (
        "compass",
        "knock down by a factor of 1 or more",
        lambda c: pg.tl.in_silico(*c.compass, "G1", mode="knockdown", factor=2),
    ),
    (
        "compass",
        "resume pre-training from a part-way checkpoint without the loader's position",
        lambda c: c.compass[1].train(
            c.compass_midepoch[0], batch_size=8, resume_from=c.compass_midepoch[1], progress_bar=False
        ),
    ),
]

SECTIONS = {
    "data": "Reading and parsing data",
    "order": "Steps run in the wrong order",
    "options": "Options out of range",
    "predict": "Prediction",
    "gi": "Genetic interactions",
    "files": "Model files",
    "compass": "GeneCompass",
}


def outcome(case, ctx: Ctx) -> tuple[str, str]:
    """Run a case; return the exception's type name and its message (paths of the run replaced)."""
    _, _, call = case
    try:
        call(ctx)
    except Exception as err:  # noqa: BLE001 - every outcome is recorded
        msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        msg = msg.replace(str(ctx.tmp), "<dir>").replace(str(ROOT), "<repo>")
        msg = " ".join(msg.split())
        if len(msg) > MAX_CHARS:  # long lists (genes, options) cut at a word
            msg = msg[:MAX_CHARS].rsplit(" ", 1)[0] + " …"
        return type(err).__name__, msg
    return "no error", ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(results: list[tuple[str, str]]) -> str:
    lines = [
        "# What happens when the input is wrong",
        "",
        "Every kind of bad input below was run by the test suite (`tests/test_bad_input.py`, which checks "
        "that this page shows the message each one really gives today). Each stops early, before any "
        "long computation, with an error that names the problem and the fix. Your data is never changed "
        "by a call that fails. Regenerate this page with `PYTHONPATH=src python -m tests.test_bad_input`.",
        "",
        f"{len(CASES)} kinds of bad input:",
    ]
    for key, title in SECTIONS.items():
        lines += ["", f"## {title}", "", "| what you did | what you get |", "|---|---|"]
        for (section, what, _), (kind, msg) in zip(CASES, results, strict=True):
            if section == key:
                lines.append(f"| {_cell(what)} | `{kind}`: {_cell(msg)} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(tmp_path_factory.mktemp("bad_input"))


@pytest.fixture(scope="module")
def results(ctx):
    return [outcome(case, ctx) for case in CASES]


def test_at_least_40_kinds():
    assert len(CASES) >= 40 and len({what for _, what, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[what for _, what, _ in CASES])
def test_each_bad_input_gets_a_clear_early_error(results, i):
    kind, msg = results[i]
    assert kind != "no error", CASES[i][1]
    assert kind in {c.__name__ for c in CLEAR} | {"InvalidDownloadError"}, (kind, msg)
    assert len(msg) > 25, msg


def test_doc_page_shows_the_real_messages(results):
    assert DOC.read_text() == render(results), "regenerate: PYTHONPATH=src python -m tests.test_bad_input"


def main() -> None:  # pragma: no cover - regenerates the page
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(Path(tmp))
        DOC.write_text(render([outcome(case, ctx) for case in CASES]))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
