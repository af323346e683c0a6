"""Assemble README.md from docs/readme/*.md fragments, with the config-key table generated from the schema.

    python tools/build_readme.py          # rewrite README.md
    python tools/build_readme.py --check  # exit 1 if README.md is stale (used by tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meddap.config import iter_keys  # noqa: E402


def config_table() -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, help_ in iter_keys():
        d = repr(default) if isinstance(default, str) else str(default)
        rows.append(f"| `{key}` | {tp.replace('|', '&#124;')} | `{d}` | {help_.replace('|', '&#124;')} |")
    return "\n".join(rows)


def build() -> str:
    parts = []
    for frag in sorted((ROOT / "docs" / "readme").glob("*.md")):
        text = frag.read_text().rstrip() + "\n"
        parts.append(text.replace("<!-- CONFIG_TABLE -->", config_table()))
    return "\n".join(parts)


if __name__ == "__main__":
    text = build()
    readme = ROOT / "README.md"
    if "--check" in sys.argv:
        sys.exit(0 if readme.exists() and readme.read_text() == text else 1)
    readme.write_text(text)
    print(f"wrote {readme} ({len(text.splitlines())} lines)")
