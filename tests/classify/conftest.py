"""Fixtures for the classifier tests (helpers in _classify_helpers.py)."""

from __future__ import annotations

import pytest
import torch

from _classify_helpers import write_tiny_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    return write_tiny_run(tmp_path_factory.mktemp("classify-run"))
