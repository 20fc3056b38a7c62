"""Packed next-token sequences and deterministic, resumable, rank-sliced batches.

The token stream is cut into sequences of ``seq_len + 1`` tokens that overlap by one token
(sequence i is ``tokens[i*T : i*T + T + 1]``), so every token is a label exactly once:
``inputs = seq[:-1]``, ``labels = seq[1:]``. The labels are already shifted: feed them to
``LlamaForCausalLM(inputs, labels, shift_labels=False)``.

Batch order: the global stream of sequence positions is visited epoch by epoch, each epoch in a
random permutation drawn from ``torch.Generator`` seeded by (seed, epoch). The batch of optimizer
step k, micro-batch m is therefore a pure function of (seed, k, m): resuming at step k reproduces an
uninterrupted run, and every DDP rank computes the same global batch and keeps its own slice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from fastgrad.data.corpus import load_text
from fastgrad.data.tokenizer import DEFAULT_VOCAB_SIZE, encode_cached, get_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]


def _num_sequences(tokens: torch.Tensor, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)


def _windows(tokens: torch.Tensor, seq_len: int, index: torch.Tensor) -> Batch:
    """Sequences ``index`` (B,) -> inputs, labels: (B, seq_len) long."""
    offsets = index[:, None] * seq_len + torch.arange(seq_len + 1)
    seqs = tokens[offsets].long()
    return seqs[:, :-1], seqs[:, 1:]


def split_tokens(
    tokens: torch.Tensor, seq_len: int, val_fraction: float = 0.02, min_val_sequences: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream (N,) into train (N - V,) and held-out validation (V,) streams.

    Validation is the tail of the stream: ``V = max(val_fraction * N, min_val_sequences * seq_len + 1)``
    tokens (none when ``val_fraction == 0``). The two never share a token.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    n = len(tokens)
    n_val = 0 if val_fraction == 0 else max(int(n * val_fraction), min_val_sequences * seq_len + 1)
    if n - n_val < seq_len + 1:
        raise ValueError(
            f"--data/data: the text has {n} tokens, too few for one training sequence of seq_len={seq_len} "
            f"after holding out {n_val} validation tokens; give more text or a smaller seq_len"
        )
    return tokens[: n - n_val], tokens[n - n_val :]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) so nearby seeds do not share epoch permutations (seed + epoch would).
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TokenBatches:
    """Shuffled training batches of packed sequences, a pure function of (seed, step, micro).

    Each optimizer step consumes ``grad_accum_steps`` micro-batches; each micro-batch is a global
    batch of ``world_size * batch_size`` sequences of which rank r gets rows ``[r*B, (r+1)*B)``.

    Args:
        tokens: (N,) integer token stream (the training split).
        seq_len: T, tokens per input sequence.
        batch_size: B, sequences per micro-batch on each rank.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or grad_accum_steps < 1 or seq_len < 1:
            raise ValueError("seq_len, batch_size and grad_accum_steps must be positive")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.num_sequences = _num_sequences(tokens, seq_len)
        if self.num_sequences == 0:
            raise ValueError(f"{len(tokens)} tokens are too few for one sequence of seq_len={seq_len}")
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def sequences_per_step(self) -> int:
        """Sequences of one optimizer step across all ranks and micro-batches."""
        return self.world_size * self.batch_size * self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs unless it is larger than one
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.num_sequences, generator=generator)
        return self._perms[epoch]

    def _batch(self, step: int, micro: int, first: int, count: int) -> Batch:
        if step < 0 or not 0 <= micro < self.grad_accum_steps:
            raise ValueError(f"step={step} must be >= 0 and micro={micro} in [0, {self.grad_accum_steps})")
        global_batch = self.world_size * self.batch_size
        positions = (step * self.grad_accum_steps + micro) * global_batch + first + torch.arange(count)
        epochs = positions // self.num_sequences
        index = torch.empty(count, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            index[mask] = self._permutation(epoch)[positions[mask] % self.num_sequences]
        return _windows(self.tokens, self.seq_len, index)

    def global_batch(self, step: int, micro: int = 0) -> Batch:
        """inputs, labels: (world_size * batch_size, seq_len) long, all ranks' rows."""
        return self._batch(step, micro, 0, self.world_size * self.batch_size)

    def get(self, step: int, micro: int = 0) -> Batch:
        """This rank's inputs, labels: (batch_size, seq_len) long, for optimizer step ``step``."""
        return self._batch(step, micro, self.rank * self.batch_size, self.batch_size)

    def epoch(self, step: int) -> float:
        """Passes over the training sequences completed before ``step``."""
        return step * self.sequences_per_step / self.num_sequences

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Endless ``(step, micro, inputs, labels)`` from ``start_step``, micro-batches in order."""
        step = start_step
        while True:
            for micro in range(self.grad_accum_steps):
                yield (step, micro, *self.get(step, micro))
            step += 1


def eval_batches(
    tokens: torch.Tensor, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[Batch]:
    """Every validation sequence once, in order: inputs, labels (<= batch_size, seq_len) long.

    Rank r takes sequences r, r + world_size, ...; trailing sequences that would leave ranks with
    unequal counts are dropped, so all ranks run the same number of batches of the same sizes.
    """
    per_rank = _num_sequences(tokens, seq_len) // world_size
    index = torch.arange(per_rank) * world_size + rank
    for start in range(0, per_rank, batch_size):
        yield _windows(tokens, seq_len, index[start : start + batch_size])


@dataclass
class PretrainData:
    """Tokenizer plus the train and validation token streams, (N_train,) and (N_val,) int32."""

    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    seq_len: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def train_batches(
        self, batch_size: int, *, seed: int = 0, grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1
    ) -> TokenBatches:
        return TokenBatches(
            self.train_tokens,
            self.seq_len,
            batch_size,
            seed=seed,
            grad_accum_steps=grad_accum_steps,
            rank=rank,
            world_size=world_size,
        )

    def val_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        return eval_batches(self.val_tokens, self.seq_len, batch_size, rank=rank, world_size=world_size)


def prepare_data(
    data: str | Path | None = None,
    seq_len: int = 256,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer_path: str | Path | None = None,
    val_fraction: float = 0.02,
) -> PretrainData:
    """Load text (:func:`load_text`), get its tokenizer, tokenize once (cached) and split train/val.

    With DDP, call it on rank 0 first and barrier, so the other ranks find the cache filled.
    """
    text = load_text(data)
    tokenizer = get_tokenizer(text, vocab_size, tokenizer_path)
    tokens = torch.from_numpy(encode_cached(tokenizer, text))
    train, val = split_tokens(tokens, seq_len, val_fraction)
    return PretrainData(tokenizer, train, val, seq_len)
