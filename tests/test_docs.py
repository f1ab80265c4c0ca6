"""The documentation builds without warnings (tutorial execution is left to `make docs` / Read the Docs)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("sphinx-build") is None and not (Path(sys.executable).parent / "sphinx-build").exists(),
    reason="sphinx not installed (pip install 'pertpy-gnn[doc]')",
)
def test_docs_build_without_warnings(tmp_path):
    sphinx = Path(sys.executable).parent / "sphinx-build"
    env = dict(os.environ, PERTPY_GNN_DOCS_EXECUTE="off")
    res = subprocess.run(
        [
            str(sphinx if sphinx.exists() else "sphinx-build"),
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(ROOT / "docs"),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    assert (tmp_path / "html" / "api" / "pp.html").exists()
    assert "parse_perturbations" in (tmp_path / "html" / "api" / "pp.html").read_text()
