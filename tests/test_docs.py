"""The README is a short front door; the manual lives in docs/ (mkdocs.yml). Keep both honest:
links resolve, every page is in the nav, every config key is documented, the key table is current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from meddap.config import iter_keys

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _without_code(text: str) -> str:
    """Markdown outside fenced code blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    body = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6} (.+?)\s*$", body, flags=re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slug_matches_githubs_rule():
    assert _slug("What we do differently from the authors' public code (and why)") == \
        "what-we-do-differently-from-the-authors-public-code-and-why"
    assert _slug("FID, KID and memorisation (`python -m meddap fid`)") == "fid-kid-and-memorisation-python--m-meddap-fid"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_without_code(page.read_text())):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


def test_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md)\n")
    targets = _LINK.findall(page.read_text())
    assert targets == ["#title", "#nope", "missing.md"]
    assert "title" in _anchors(page) and "nope" not in _anchors(page)


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in text                                        # the test command, install included
    assert "python -m meddap demo" in text.split("## What the demo shows")[0]
    assert "](docs/index.md)" in text


def test_mkdocs_nav_lists_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def files(items):
        for item in items:
            for v in (item.values() if isinstance(item, dict) else [item]):
                yield from (files(v) if isinstance(v, list) else [v])

    listed = set(files(nav))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed == pages, f"only in nav: {sorted(listed - pages)}; not in nav: {sorted(pages - listed)}"


def test_config_table_is_current_and_every_key_documented():
    res = subprocess.run([sys.executable, "tools/build_docs.py", "--check"], cwd=ROOT)
    assert res.returncode == 0, "docs/configuration.md's key table is stale: run `python tools/build_docs.py`"
    text = (DOCS / "configuration.md").read_text()
    missing = [key for key, *_ in iter_keys() if f"`{key}`" not in text]
    assert not missing, missing
