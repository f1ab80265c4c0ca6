"""Run a data-parallel training script in a fresh Python process (the DDP tests' launcher)."""

import os
import subprocess
import sys
from pathlib import Path

import pertpy_gnn


def run_script(script: str, tmp_path: Path, name: str) -> None:
    """Write ``script`` to ``tmp_path / name`` and run it with ``tmp_path`` as argument and working dir.

    Lightning's rank variables are removed from the environment so that the script launches its own
    processes, one torch thread each; the processes import the pertpy_gnn under test (a relative
    ``PYTHONPATH`` would not hold in ``tmp_path``). Fails with the script's stderr.
    """
    path = tmp_path / name
    path.write_text(script)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"}
    }
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    src = str(Path(pertpy_gnn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run(
        [sys.executable, str(path), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
