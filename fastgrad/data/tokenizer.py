"""Byte-level BPE tokenizer trained on the training text at first use, and cached.

The cache lives in ``$FASTGRAD_CACHE``, else ``$XDG_CACHE_HOME/fastgrad``, else ``~/.cache/fastgrad``.
A trained tokenizer is keyed by (sha256 of the text, vocab size, :data:`TOKENIZER_FORMAT`), so a
different corpus or size never reuses a stale file. Files are written to a temporary name and
moved into place with ``os.replace`` so a crash or a concurrent writer never leaves a partial file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fastgrad.data.corpus import EOT

DEFAULT_VOCAB_SIZE = 8192
# Bump when the tokenizer recipe changes, so caches built by older code are not reused.
TOKENIZER_FORMAT = 1

# Chunk boundaries for parallel encoding: right after a newline that sits between two printable
# ASCII characters. The byte-level pre-tokenizer always splits there, so encoding the chunks
# separately gives exactly the ids of encoding the whole text.
_SAFE_SPLIT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")
_CHUNK_CHARS = 1 << 16


def cache_dir() -> Path:
    """``$FASTGRAD_CACHE``, else ``$XDG_CACHE_HOME/fastgrad``, else ``~/.cache/fastgrad`` (created)."""
    if os.environ.get("FASTGRAD_CACHE"):
        root = Path(os.environ["FASTGRAD_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "fastgrad"
    else:
        root = Path.home() / ".cache" / "fastgrad"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def train_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style, no normalization) on ``text``; ``EOT`` is the special token 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 bytes up front: any input encodes, even bytes the corpus never contains.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer does not split out special tokens, so remove EOT from what it counts.
    tokenizer.train_from_iterator(text.split(EOT), trainer=trainer)
    return tokenizer


def tokenizer_cache_path(text: str, vocab_size: int) -> Path:
    """Where the tokenizer trained on ``text`` with ``vocab_size`` is cached."""
    key = hashlib.sha256(f"{TOKENIZER_FORMAT}|{vocab_size}|{text_sha256(text)}".encode()).hexdigest()[:24]
    return cache_dir() / f"tokenizer-bpe{vocab_size}-{key}.json"


def get_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE, path: str | Path | None = None) -> Tokenizer:
    """A tokenizer for ``text``: loaded from ``path`` (a tokenizer.json) if given, else from the cache,
    else trained on ``text`` (a few seconds for the default corpus) and cached.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"--tokenizer/path={str(path)!r}: no such tokenizer.json file")
        return Tokenizer.from_file(str(path))
    cached = tokenizer_cache_path(text, vocab_size)
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    tokenizer = train_tokenizer(text, vocab_size)
    atomic_write(cached, lambda f: f.write(tokenizer.to_str().encode("utf-8")))
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text``: (N,) int32. Special tokens in the text (``EOT``) map to their ids."""
    chunks, start = [], 0
    while start < len(text):
        match = _SAFE_SPLIT.search(text, start + _CHUNK_CHARS) if start + _CHUNK_CHARS < len(text) else None
        end = match.start() if match else len(text)
        chunks.append(text[start:end])
        start = end
    encodings = tokenizer.encode_batch_fast(chunks, add_special_tokens=False)
    if not encodings:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])


def decode(tokenizer: Tokenizer, ids: list[int] | np.ndarray) -> str:
    """Text of token ids (N,); special tokens are kept, so ``decode(encode(text)) == text``."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def encode_cached(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """:func:`encode`, cached next to the tokenizers, keyed by (text, tokenizer) hashes: (N,) int32."""
    tokenizer_sha = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
    key = hashlib.sha256(f"{TOKENIZER_FORMAT}|{tokenizer_sha}|{text_sha256(text)}".encode()).hexdigest()[:24]
    cached = cache_dir() / f"tokens-{key}.npy"
    if cached.is_file():
        return np.load(cached).astype(np.int32)
    ids = encode(tokenizer, text)
    # uint16 halves the file for vocabularies that fit, which covers the default 8192.
    stored = ids.astype(np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32)
    atomic_write(cached, lambda f: np.save(f, stored))
    return ids
