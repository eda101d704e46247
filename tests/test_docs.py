"""The documentation: README.md stays the front door, docs/contract.md is the shared contract
byte for byte, and every relative link in README.md, docs/ and client/README.md reaches a file
(and, for a ``#fragment`` into Markdown, a heading) of this repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONTRACT = DOCS / "contract.md"
SHARED_CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
DOCUMENTS = [README, *sorted(DOCS.glob("*.md")), ROOT / "client" / "README.md"]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def prose(markdown: str) -> str:
    """The text links can live in: no fenced blocks, comments or code spans."""
    without_blocks = _COMMENT.sub("", _FENCE.sub("", markdown))
    return _CODE_SPAN.sub(lambda m: "code" if "](" in m.group() else m.group(), without_blocks)


def links(path: Path) -> list[str]:
    return _LINK.findall(prose(path.read_text()))


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of a Markdown file's headings; a repeated one is numbered, as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        n = seen.get(slug(heading), 0)
        seen[slug(heading)] = n + 1
        found.add(slug(heading) if n == 0 else f"{slug(heading)}-{n}")
    return found


def test_slugs_follow_github() -> None:
    assert slug("The `tokens` CLI") == "the-tokens-cli"
    assert slug("Settings: .env") == "settings-env"
    assert slug("The embedded default's round trip (load 1.0\N{EN DASH}2.4)") == (
        "the-embedded-defaults-round-trip-load-1024"
    )


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 250
    # The two commands, and where to go next.
    text = "\n".join(lines)
    assert "make run" in text and "make test" in text
    for doc in ("producers.md", "operators.md", "design.md", "measured.md", "contract.md"):
        assert f"(docs/{doc})" in text, doc


def test_the_contract_in_the_repo_is_the_shared_one() -> None:
    if not SHARED_CONTRACT.exists():
        pytest.skip(f"no {SHARED_CONTRACT} beside the clone")
    assert CONTRACT.read_bytes() == SHARED_CONTRACT.read_bytes()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_in_the_repo(document: Path) -> None:
    broken = []
    for target in links(document):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a URL: http:, mailto:
            assert document != README, f"README links outside the repo: {target}"
            continue
        path, _, fragment = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        missing = not resolved.is_relative_to(ROOT) or not resolved.exists()
        if missing or (fragment and resolved.suffix == ".md" and fragment not in anchors(resolved)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_compiles(document: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", document.read_text(), re.S | re.M)
    for block in blocks:
        compile(block, f"{document.name} example", "exec")


def test_every_doc_is_reachable_from_the_readme() -> None:
    index = DOCS / "README.md"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    linked |= {(index.parent / t.partition("#")[0]).resolve() for t in links(index)}
    assert set(DOCS.glob("*.md")) - {index} <= linked
