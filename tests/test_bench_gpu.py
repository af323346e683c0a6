"""`python -m meddap bench gpu --smoke`: the GPU check's whole code path on the CPU at toy sizes, in a
process where Ray, pandas, pyarrow and scipy cannot be imported (the check must run on a GPU box that
has only torch, diffusers, transformers, peft and accelerate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "pandas", "pyarrow", "scipy")


def test_bench_gpu_smoke_runs_without_ray_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu-smoke.md"
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # `import name` now fails, as where it is not installed\n"
        "from meddap.cli import main\n"
        f"rc = main(['bench', 'gpu', '--smoke', '--out', {str(out)!r}])\n"
        f"leaked = [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r} and sys.modules[m] is not None]\n"
        "assert not leaked, leaked\n"
        "sys.exit(rc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    text = out.read_text()
    assert "SMOKE" in text and "| what | value | baseline | x baseline |" in text
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["section"]: [] for r in data["rows"]}
    for r in data["rows"]:
        rows[r["section"]].append(r)
    assert set(rows) == {"lora", "generate", "classify"}
    assert data["meta"]["peak_flops"] > 0
    lora = rows["lora"][0]
    assert lora["unit"] == "s/step" and lora["value"] > 0 and lora["flops"] > 0 and "vs_paper_time" in lora
    single, *batched = rows["generate"]
    assert single["vs_baseline"] == 1.0 and batched and all(r["vs_baseline"] > 0 for r in batched)
    nets = {r["what"].split(", ")[1] for r in rows["classify"]}
    assert nets == {"resnet34", "densenet121", "squeezenet1_1"}
    assert all(r["value"] > 0 and r["limit_fraction"] > 0 for r in rows["classify"])


def test_bench_gpu_without_a_gpu_says_figures_are_pending(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full check would run")
    from meddap.cli import main

    assert main(["bench", "gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
