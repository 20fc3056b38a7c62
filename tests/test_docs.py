"""Citations of the project's algorithm document, docs/algorithms.md.

Docstrings, comments, the README and the output of ``fastgrad memory`` cite sections of it as
"docs/algorithms.md §N" or "§N.M". Every cited section must exist as a numbered heading of the
document, and nothing may cite the internal specification the document replaced (which is not part
of the repository). The checker is a function of a text, so it is also tested on bad texts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastgrad.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC_NAME = "docs/algorithms.md"
DOC = ROOT / DOC_NAME
SUFFIXES = (".py", ".md", ".h", ".cpp", ".cu")
SKIP_DIRS = {"build", "dist", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules", "runs"}
# Built from parts so that this file does not cite it itself.
INTERNAL_SPEC = "ALGORITHMS" + ".md"

CITATION = re.compile(re.escape(DOC_NAME) + r"\s*§\s*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?=\s|$)", re.MULTILINE)
# The document's own cross-references ("see §8.1"); "GaLore §5.5" is a section of the GaLore paper.
INNER_REFERENCE = re.compile(r"(?<!GaLore )§\s*(\d+(?:\.\d+)*)")


def doc_sections(text: str) -> set[str]:
    """The section numbers of a markdown text's numbered headings ("## 2. GaLore" -> "2")."""
    return set(HEADING.findall(text))


def citation_problems(text: str, sections: set[str]) -> list[str]:
    """What is wrong with the citations in ``text``: each citation of a section of docs/algorithms.md
    that is not in ``sections``, and each mention of the internal specification."""
    problems = [f"{DOC_NAME} §{num}: no such section" for num in CITATION.findall(text) if num not in sections]
    if INTERNAL_SPEC in text:
        problems.append(f"cites {INTERNAL_SPEC}, which is not in the repository (cite {DOC_NAME})")
    return problems


def repository_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.suffix in SUFFIXES and path.is_file() and not SKIP_DIRS.intersection(rel.parts[:-1]):
            files.append(path)
    return sorted(files)


@pytest.fixture(scope="module")
def sections() -> set[str]:
    assert DOC.is_file(), f"{DOC_NAME} is missing"
    return doc_sections(DOC.read_text(encoding="utf-8"))


def test_docs_sections_exist(sections):
    """The sections the code relies on, numbered as the document's table of contents says."""
    for num in ("1", "1.4", "2", "2.4", "2.5", "3", "3.4", "3.5", "4", "5", "6", "6.4", "7", "8", "9", "9.1"):
        assert num in sections, num
    assert len(sections) == len(HEADING.findall(DOC.read_text(encoding="utf-8"))), "a section number is repeated"


def test_docs_checker_rejects_bad_citations(sections):
    """The checker catches a section that does not exist and the internal specification."""
    good = f"see {DOC_NAME} §3.4 and {DOC_NAME} §9"
    assert citation_problems(good, sections) == []
    assert citation_problems(f"see {DOC_NAME} §42", sections) == [f"{DOC_NAME} §42: no such section"]
    assert citation_problems(f"({DOC_NAME} §3.99)", sections) == [f"{DOC_NAME} §3.99: no such section"]
    assert len(citation_problems(f"as quoted in {INTERNAL_SPEC} §12", sections)) == 1
    assert doc_sections("## 1. A\n### 1.2 B\nnot a heading 3.4\n#### 10.11\n") == {"1", "1.2", "10.11"}


def test_docs_citations_in_repository(sections):
    """Every .py/.md/.h/.cpp/.cu file of the repository (build directories excluded)."""
    files = repository_files()
    assert any(p.name == "report.py" for p in files)  # the scan reaches the code that prints citations
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in citation_problems(text, sections)]
    assert problems == []


# Labels of the reference implementations' quirks ("GaLore-6", "QG-4", "Fira-1", "AP-2").
QUIRK_LABEL = re.compile(r"(?<![\w-])(GaLore|QG|Fira|AP)-(\d+)\b")


def undefined_labels(text: str, doc_text: str) -> set[str]:
    """The quirk labels ``text`` uses that the document does not define (as a bold "**LABEL —")."""
    used = {f"{name}-{num}" for name, num in QUIRK_LABEL.findall(text)}
    return {label for label in used if f"**{label} —" not in doc_text}


def test_docs_quirk_labels_defined():
    """Every quirk label the code, tests or README use is defined in the document, with that label."""
    doc_text = DOC.read_text(encoding="utf-8")
    bad = "GaLore-" + "99"  # built from parts so that this file does not use it itself
    assert undefined_labels(f"as galore-torch does ({bad}; QG-4)", doc_text) == {bad}
    problems = {}
    for path in repository_files():
        if path != DOC:
            missing = undefined_labels(path.read_text(encoding="utf-8", errors="replace"), doc_text)
            if missing:
                problems[str(path.relative_to(ROOT))] = sorted(missing)
    assert problems == {}


def test_docs_inner_references(sections):
    """The document's references to its own sections."""
    text = DOC.read_text(encoding="utf-8")
    missing = sorted({num for num in INNER_REFERENCE.findall(text) if num not in sections})
    assert missing == []


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "7b", "--optim", "q-galore8bit", "--rank", "1024", "--layerwise", "--layerwise-streaming"],
        ["--model", "60m", "--optim", "frugal"],  # no published figure: says so, citing the document
    ],
)
def test_docs_citations_in_memory_command_output(capsys, sections, args):
    assert main(["memory", *args, "--batch-size", "1", "--seq-len", "256", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert CITATION.search(out), out
    assert citation_problems(out, sections) == []
