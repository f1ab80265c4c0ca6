"""Sphinx configuration for pertpy-gnn."""

import os
from datetime import date
from importlib.metadata import version as _version

project = "pertpy-gnn"
author = "pertpy-gnn developers"
copyright = f"{date.today():%Y}, {author}"
release = _version("pertpy-gnn")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "comma"
always_document_param_types = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
# Tutorials are executed on the project's machines, on the real data (`make tutorials`), and committed
# with their outputs; the docs (Read the Docs, `make docs`) render those outputs without re-running
# them (elsewhere the real data are absent and the notebooks would fall back to simulated data).
# PERTPY_GNN_DOCS_EXECUTE=cache (or force) executes them during the build instead.
nb_execution_mode = os.environ.get("PERTPY_GNN_DOCS_EXECUTE", "off")
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_execution_excludepatterns: list[str] = []
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
html_theme = "sphinx_book_theme"
html_title = "pertpy-gnn"
html_theme_options = {
    "repository_url": "https://github.com/pertpy-gnn/pertpy-gnn",
    "use_repository_button": True,
}
# intersphinx needs the internet: on Read the Docs only (this project's machines are offline)
if os.environ.get("READTHEDOCS"):
    extensions.append("sphinx.ext.intersphinx")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
}
# intersphinx inventories cannot be fetched offline; missing references must not fail -W
nitpicky = False
suppress_warnings = ["intersphinx", "config.cache", "mystnb.unknown_mime_type", "misc.highlighting_failure"]


# --- API pages: one per namespace, generated from each namespace's __all__ so they never go stale ---
_API_PAGES = {
    "pp": ("Preprocessing: `pg.pp`", "pertpy_gnn.pp"),
    "tl": ("Tools: `pg.tl`", "pertpy_gnn.tl"),
    "pl": ("Plotting: `pg.pl`", "pertpy_gnn.pl"),
    "datasets": ("Datasets: `pg.datasets`", "pertpy_gnn.datasets"),
    "models": ("Models", None),
}


def _write_api_pages() -> None:
    import importlib
    from pathlib import Path

    import shutil

    here = Path(__file__).parent / "api"
    shutil.rmtree(Path(__file__).parent / "generated", ignore_errors=True)  # no stale stubs
    for page, (title, module) in _API_PAGES.items():
        if module is None:
            entries = []
            for mod, cls in (
                ("pertpy_gnn.gears", "GEARS"),
                ("pertpy_gnn.gears", "ReferenceGEARS"),
                ("pertpy_gnn.compass", "GeneCompass"),
            ):
                try:
                    if hasattr(importlib.import_module(mod), cls):
                        entries.append(f"{mod}.{cls}")
                except ImportError:
                    pass
            current = ""
        else:
            names = sorted(importlib.import_module(module).__all__)
            entries = [f"{module}.{n}" for n in names]
            current = ""
        body = "\n".join(f"   {e}" for e in entries)
        text = f"# {title}\n\n```{{eval-rst}}\n.. autosummary::\n   :toctree: ../generated\n{current}\n{body}\n```\n"
        path = here / f"{page}.md"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


_write_api_pages()
