"""The documentation a user reads: every relative link resolves, the README stays a short guide, and the product
speaks of what it does, not of how it was made (no internal work-item references)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(p for p in {ROOT / "README.md", *ROOT.joinpath("docs").rglob("*.md"),
                          *ROOT.joinpath("checkpoints").rglob("*.md"), *ROOT.joinpath("benchmarks").rglob("*.md"),
                          *ROOT.joinpath("experiments").rglob("*.md")}
              if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))   # not fetched caches
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INTERNAL = re.compile(r"\bissue[- ]?#?\d+|\bissue's\b|\bthe issue\b|\bissue (?:bar|target)s?\b", re.IGNORECASE)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        path = target.split("#", 1)[0]
        if path and not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_a_short_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for must in ("make run", "make test", "edmsound generate", "edmsound train", "edmsound evaluate",
                 "edmsound index build", "checkpoints/README.md"):
        assert must in text, f"README lacks {must!r}"


def test_no_internal_work_item_words():
    files = [*DOCS, *ROOT.joinpath("edmsound").rglob("*.py"), *ROOT.joinpath("benchmarks").glob("*.py"), ROOT / "app.py",
             *ROOT.joinpath("experiments").rglob("*.sh")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) for m in [INTERNAL.search(line)] if m]
    assert not hits, "\n".join(hits)
