"""Every relative link in the README and docs/ resolves: the file exists, and a `#anchor` names a heading of the
target as GitHub slugs it (lower case; punctuation other than `-` and `_` dropped; each space a `-`)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors of ``path``'s headings (read once per file: many links point into one page)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return frozenset(slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#"))


def broken_links(files: list[Path]) -> list[str]:
    """`file: target (why)` for every relative link in ``files`` that does not resolve."""
    broken = []
    for path in files:
        for target in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked offline
                continue
            name, _, anchor = target.partition("#")
            linked = (path.parent / name) if name else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}: {target} (no heading with that anchor)")
    return broken


def test_slug_matches_github_for_the_study_s_headings():
    assert slug(" Scale (`--scale`): three DiT sizes, and equal compute at each") == \
        "scale---scale-three-dit-sizes-and-equal-compute-at-each"
    assert slug("The verdict in full") == "the-verdict-in-full"
    assert slug("Does SADM help? Measured on digits, paired seeds") == "does-sadm-help-measured-on-digits-paired-seeds"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) >= 5
    assert broken_links(files) == []


def test_a_missing_file_and_a_wrong_anchor_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A section (`--flag`)\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-section---flag) [self](#top) [web](https://example.com/x#y)\n"
                    "[gone](missing.md) [bad](other.md#a-section)\n\n# Top\n"
                    "```\n[in code](nowhere.md)\n```\n", encoding="utf-8")
    assert broken_links([page]) == ["page.md: missing.md (no such file)",
                                    "page.md: other.md#a-section (no heading with that anchor)"]
