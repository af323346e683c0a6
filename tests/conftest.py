"""Shared fixtures: Ray is started once per test run; tiny models are built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/ holds the helper modules (_background, _demo_run, ...) the hooks below import.
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS/OpenMP thread in every process the suite starts (pipelines, job drivers, Ray workers inherit
# it): the background runs work beside the tests on the same 2 cores, and two torch processes with 2
# threads each on 2 cores slow each other down more than tenfold (measured). Code that sets its own
# thread count (torch.set_num_threads: the stages, the recipe, the benchmarks) still does.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Tests start their own local Ray (or a cluster they build themselves); they never join one named by
# the caller's environment or by a ray_current_cluster file another Ray left behind.
os.environ.pop("RAY_ADDRESS", None)


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _asks(item) -> set[str]:
    return set(getattr(item, "fixturenames", ())) | {getattr(item, "originalname", item.name)}


def pytest_collection_modifyitems(config, items):
    # Tests that collect a background run's result (tests/_background.py) go last, in their order, so the
    # other tests run while those runs wait on Ray instead of the suite waiting on them.
    from _background import NEEDS

    askers = set().union(*NEEDS.values())
    items[:] = [i for i in items if not _asks(i) & askers] + [i for i in items if _asks(i) & askers]
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the end-to-end cluster runs the selected tests need (tests/_background.py)."""
    if session.config.option.collectonly or not session.items:
        return
    import _background

    asked: set[str] = set()
    for item in session.items:
        if not item.get_closest_marker("skip"):
            asked |= _asks(item)
    _background.start(asked)


def pytest_runtest_setup(item):
    bg = sys.modules.get("_background")
    if bg is not None and "asker tests" not in bg._marks and _asks(item) & set().union(*bg.NEEDS.values()):
        bg.mark("asker tests")  # the other tests are done: from here on the suite collects the runs


def pytest_terminal_summary(terminalreporter):
    bg = sys.modules.get("_background")
    line = bg.timeline() if bg is not None else ""
    if line:
        terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    bg = sys.modules.get("_background")
    if bg is not None:
        bg.abort()


@pytest.fixture(scope="session")
def ray_session():
    """One fresh local Ray for the whole test run (2 CPUs, no dashboard), shut down at the end.
    address="local": never the cluster a stale $RAY_TMPDIR/ray/ray_current_cluster names."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny Stable Diffusion (meddap.diffusion.base.build_tiny_sd), built once per test run:
    a normal diffusers folder (~4 MB) for `from_pretrained`, `load_pipeline` and `load_components`."""
    from meddap.diffusion.base import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def phantom_base_dir(tmp_path_factory):
    """A base-model folder as `python -m meddap pretrain-base OUT --quick` writes it (diffusers folder,
    judge/ beside it, meddap_pretrain.json), built once per test run (measured 20-60 s on the busy shared
    2-core box, imports included; the build alone about 7 s of CPU).
    It stands in for builtin:phantom in the recipe's tests: same files, same loaders, a
    few training steps. Returns (folder, the record pretrain_base returned)."""
    import torch

    from meddap.diffusion.pretrain import pretrain_base, settings_from

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("models") / "phantom-quick"
    try:
        record = pretrain_base(out, settings_from(quick=True), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)  # pretrain_base sets the recipe's thread count for the process
    return out, record
