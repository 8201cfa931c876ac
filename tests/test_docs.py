"""docs/ stays followable: every link between pages and every `docs/<page>.md#anchor` cited in code resolves."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ANCHOR = re.compile(r'<a id="([a-z0-9-]+)"></a>')
LINK = re.compile(r"\]\(([^)#\s]*\.md)?(?:#([^)\s]+))?\)")
CITED = re.compile(r"docs/([a-z]+\.md)#([a-z0-9-]+)")
SOURCES = ("*.py", "*.sh", "*.proto")


def _anchors() -> dict[str, set[str]]:
    return {p.name: set(ANCHOR.findall(p.read_text(encoding="utf-8"))) for p in DOCS.glob("*.md")}


def test_pages_exist_and_anchors_are_unique():
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"README.md", "architecture.md", "algorithms.md", "memory.md", "operator.md", "testing.md",
            "benchmarks.md"} <= names
    for page in DOCS.glob("*.md"):
        ids = ANCHOR.findall(page.read_text(encoding="utf-8"))
        assert len(ids) == len(set(ids)), f"{page.name}: duplicate anchors"


def test_links_between_pages_resolve():
    anchors, broken = _anchors(), []
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith("http"):
                continue
            path = (page.parent / target) if target else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and path.parent == DOCS and anchor not in anchors.get(path.name, set()):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert not broken, broken


def test_anchors_cited_in_code_exist():
    anchors, broken = _anchors(), []
    for pattern in SOURCES:
        for path in ROOT.rglob(pattern):
            if any(part in (".venv", ".git", "build") or part.endswith(".egg-info") for part in path.parts):
                continue
            for page, anchor in CITED.findall(path.read_text(encoding="utf-8", errors="replace")):
                if anchor not in anchors.get(page, set()):
                    broken.append(f"{path.relative_to(ROOT)}: docs/{page}#{anchor}")
    assert not broken, broken
