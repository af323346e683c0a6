"""README.md is generated from docs/readme/*.md with the config table taken from the schema: keep it current."""

import subprocess
import sys
from pathlib import Path

from meddap.config import iter_keys

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_regenerated_from_fragments_and_schema():
    res = subprocess.run([sys.executable, "tools/build_readme.py", "--check"], cwd=ROOT)
    assert res.returncode == 0, "README.md is stale: run `python tools/build_readme.py` and commit it"


def test_every_config_key_is_documented():
    text = (ROOT / "README.md").read_text()
    missing = [key for key, *_ in iter_keys() if f"`{key}`" not in text]
    assert not missing, missing


def test_readme_opens_with_the_two_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in text                                   # the test command, install included
    assert "python -m meddap demo" in text.split("## ")[0]
