"""Every § citation and every relative Markdown link in the repository points to a document that is in it, and a
§ citation to a section that document has (docs/README.md: how sections are numbered)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCANNED = (".py", ".md", ".toml", ".cfg", ".txt", ".sh")
SKIPPED_DIRS = {".git", ".venv", "results", "node_modules", "__pycache__", "build", "dist"}
# "docs/protocol.md §1.5", "[dcp.md](dcp.md) §6.4", "methods/README.md §8, §9" (the first file named before the §s)
CITATION = re.compile(
    r"(?:\[[^\]\n]*\]\((?P<link>[^)\s#]+\.md)\)|(?P<path>[\w./-]*\w\.md))[ \t`*,]*"
    r"(?P<sections>§ ?\d+(?:\.\d+)*(?:(?:,\s*|\s*[–/-]\s*|\s+and\s+)§ ?\d+(?:\.\d+)*)*)"
)
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?:#[^)\s]*)?\)")
HEADING = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def repo_files() -> list[Path]:
    """Tracked (and new, not ignored) files; a walk of the tree where git is not available."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        files = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.is_file() and (p.suffix in SCANNED or p.name in ("Makefile", "run")))


def resolve(cited: str, where: Path) -> Path | None:
    """The document a citation in `where` means: relative to its folder, else to the repository root."""
    for base in (where.parent, ROOT):
        path = (base / cited).resolve()
        if path.is_file() and ROOT in path.parents:
            return path
    return None


def sections(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def citations() -> list[tuple[Path, int, str, list[str]]]:
    found = []
    for path in repo_files():
        if path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((path, line, m["link"] or m["path"], re.findall(r"\d+(?:\.\d+)*", m["sections"])))
    return found


def test_every_section_citation_names_a_document_and_a_section_it_has() -> None:
    found = citations()
    assert len(found) >= 50, "the citation pattern no longer finds the code's citations"
    problems = []
    for path, line, cited, numbers in found:
        where = f"{path.relative_to(ROOT)}:{line}"
        doc = resolve(cited, path)
        if doc is None:
            problems.append(f"{where}: cites {cited}, which is not in the repository")
            continue
        missing = [n for n in numbers if n not in sections(doc)]
        if missing:
            problems.append(f"{where}: {cited} has no section {', '.join('§' + n for n in missing)}")
    assert not problems, "\n".join(problems)


def test_relative_markdown_links_resolve() -> None:
    problems = []
    for path in repo_files():
        if path.suffix != ".md":
            continue
        for m in LINK.finditer(path.read_text(encoding="utf-8")):
            target = m["target"]
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                problems.append(f"{path.relative_to(ROOT)}: link to {target} does not resolve")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("see docs/protocol.md §1.5", True),
        ("see docs/protocol.md §9.9", False),  # no such section
        ("see protocol.md §1.5", False),  # not a document of the repository (from the repository root)
        ("[dcp](docs/methods/dcp.md) §6.4, §6.9", False),
    ],
)
def test_the_check_itself_catches_bad_citations(text: str, ok: bool, tmp_path: Path) -> None:
    (m,) = list(CITATION.finditer(text))
    doc = resolve(m["link"] or m["path"], ROOT / "CONTRIBUTING.md")
    numbers = re.findall(r"\d+(?:\.\d+)*", m["sections"])
    assert (doc is not None and all(n in sections(doc) for n in numbers)) == ok
