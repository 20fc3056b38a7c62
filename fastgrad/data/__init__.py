"""Text, tokenizer and batches for ``fastgrad pretrain``."""

from fastgrad.data.corpus import EOT, default_corpus_files, load_default_corpus, load_text
from fastgrad.data.dataset import PretrainData, TokenBatches, eval_batches, prepare_data, split_tokens
from fastgrad.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    cache_dir,
    decode,
    encode,
    encode_cached,
    get_tokenizer,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EOT",
    "PretrainData",
    "TokenBatches",
    "cache_dir",
    "decode",
    "default_corpus_files",
    "encode",
    "encode_cached",
    "eval_batches",
    "get_tokenizer",
    "load_default_corpus",
    "load_text",
    "prepare_data",
    "split_tokens",
    "train_tokenizer",
]
