"""No file is ever unpickled (issue 13 part 6): no pickle/cloudpickle/dill/joblib/pandas pickle loads,
no torch.load without weights_only=True, no numpy allow_pickle, no yaml.load without a safe loader.

A pickled checkpoint, model or cache runs arbitrary code when loaded; meddap's files (Ray Train and
Tune checkpoints included) hold tensors and plain data, so weights_only=True always suffices. The scan
reads every Python file of the repository with `ast`, so a call hidden in a comment or string does not
count and a renamed import (`from torch import load`) still does.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
# (file, what): uses that load no file. Ray moves exceptions between processes by pickling them, so
# tests check that meddap's exception types survive that round trip in memory.
_ALLOWED = {("tests/data/test_decode.py", "pickle.loads")}


def _python_files() -> list[Path]:
    skip = {".git", ".venv", "venv", "build", "dist", "__pycache__", "node_modules"}
    return sorted(p for p in ROOT.rglob("*.py") if not (set(p.relative_to(ROOT).parts) & skip))


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, key: str):
    for k in call.keywords:
        if k.arg == key:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) of every unsafe load in `source`."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> module.function it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    # Loader classes defined here on top of a safe one (config.py's duplicate-key loader).
    safe_loaders = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                    and any("Safe" in _name(b) for b in n.bases)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        module, _, func = full.rpartition(".")
        if module.split(".")[0] in _PICKLERS and func in ("load", "loads", "Unpickler", "open"):
            found.append((node.lineno, f"{module}.{func}"))
        elif full == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif full in ("pandas.read_pickle", "pd.read_pickle") or func == "read_pickle":
            found.append((node.lineno, "read_pickle"))
        elif full in ("numpy.load", "np.load") and _is_true(_kw(node, "allow_pickle")):
            found.append((node.lineno, "numpy.load with allow_pickle=True"))
        elif full == "yaml.load" and not ("Safe" in (loader := _name(_kw(node, "Loader") or ast.Constant(None)))
                                          or loader in safe_loaders):
            found.append((node.lineno, "yaml.load without a safe Loader"))
        elif full in ("torch.serialization.load",):
            found.append((node.lineno, full))
    return found


def test_scanner_finds_each_unsafe_form():
    src = """
import pickle, torch, yaml, numpy as np, pandas as pd
from torch import load as tl
import cloudpickle as cp
pickle.loads(b"")
cp.load(f)
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
tl("x.pt")
np.load("x.npy", allow_pickle=True)
pd.read_pickle("x.pkl")
yaml.load(text)
torch.load("ok.pt", weights_only=True)
np.load("ok.npy")
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
class Mine(yaml.SafeLoader): pass
yaml.load(text, Loader=Mine)
"""
    assert [line for line, _ in unsafe_calls(src)] == [5, 6, 7, 8, 9, 10, 11, 12]


def test_no_unsafe_loading_anywhere():
    problems = []
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, what in unsafe_calls(path.read_text(encoding="utf-8")):
            if (rel, what) not in _ALLOWED:
                problems.append(f"{rel}:{line}: {what}")
    assert not problems, "unsafe loading (use weights_only=True, safetensors, Parquet or JSON):\n" + "\n".join(problems)


def test_training_checkpoints_load_with_weights_only(tiny_sd_dir, tmp_path):
    """The states meddap writes into Ray Train and Tune checkpoints load with weights_only=True."""
    import torch

    from meddap.classify.data import TrialSpec, TrialTensors, EvalSet
    from meddap.classify.trial import train_trial
    from meddap.config import load_config
    from meddap.diffusion.base import load_components
    from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner

    from meddap.data.phantom import write_phantom

    write_phantom(str(tmp_path / "ph"), per_class=1, size=64, seed=0)
    paths = sorted(str(p) for p in (tmp_path / "ph").rglob("*.png") if "_mask" not in p.name)[:2]
    ft = LoraFinetuner(load_components(str(tiny_sd_dir)), [Example(p, "ultrasound image") for p in paths],
                       FinetuneSettings(resolution=64, epochs=1, lr=1e-3))
    ft.fit()
    torch.save(ft.state_dict(), tmp_path / "lora_state.pt")
    again = LoraFinetuner(load_components(str(tiny_sd_dir)), [Example(p, "ultrasound image") for p in paths],
                          FinetuneSettings(resolution=64, epochs=1, lr=1e-3))
    again.load_state_dict(torch.load(tmp_path / "lora_state.pt", weights_only=True))
    assert again.step == ft.step

    cfg = load_config("demo", ["classify.epochs=2", "classify.per_model={}", "classify.checkpoint_seconds=0", "classify.batch_size=4"])
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 255, (6, 1, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ev = EvalSet("val", imgs, labels, [str(i) for i in range(6)])
    tensors = TrialTensors(imgs, labels, 6, 0, {"val": ev, "test": EvalSet("test", imgs, labels, ev.image_ids)})
    states = []
    train_trial(TrialSpec("squeezenet1_1", 0), tensors, cfg.classify, cfg.data.classes, torch.device("cpu"),
                report=lambda epoch, metrics, state: states.append(state))
    torch.save(states[0], tmp_path / "trial_state.pt")  # epoch 1's (the last epoch reports none)
    loaded = torch.load(tmp_path / "trial_state.pt", weights_only=True)
    assert loaded["epoch"] == 1 and set(loaded) >= {"model", "optimizer", "rng", "best_state"}
