"""The committed tutorials carry their outputs, made on the real data by the current package version.

The docs render the notebooks as committed (no execution on Read the Docs), so their outputs must be
current: re-execute them with `make tutorials` after a version change.
"""

import json
import re
from pathlib import Path

import pytest

import pertpy_gnn as pg

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def _output_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append("".join(out.get("text", "")))
        elif "data" in out:
            parts.append("".join(out["data"].get("text/plain", "")))
    return "".join(parts)


def test_there_are_tutorials():
    assert {p.name for p in NOTEBOOKS} >= {"gears_norman.ipynb", "genecompass.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_tutorial_outputs_are_current_and_real(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    not_run = [i for i, c in enumerate(code) if not c.get("execution_count")]
    assert not not_run, f"{path.name}: code cells {not_run} have no outputs recorded; run `make tutorials`."
    text = "\n".join(_output_text(c) for c in code)
    found = re.search(r"pertpy-gnn (\S+)", text)
    assert found, (
        f"{path.name} records no version: print('pertpy-gnn', pg.__version__) in its first code cell."
    )
    assert found.group(1) == pg.__version__, (
        f"{path.name} was executed with pertpy-gnn {found.group(1)}, the package is {pg.__version__}: "
        "re-execute the tutorials with `make tutorials` and commit them."
    )
    assert "not found: using" not in text, f"{path.name} was executed without the real data (../shared/data)."
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} holds an error output."
    assert path.stat().st_size < 5_000_000, (
        f"{path.name} is over 5 MB: keep results and figures only, never data."
    )
