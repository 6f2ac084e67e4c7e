"""Packing of token shards into training sequences, and a resumable deterministic sampler.

Packing
    The shards of a split are one logical token stream of ``N`` tokens (documents separated by
    ``<|eos|>``). Sequence ``i`` is the window ``stream[i*T : i*T + T + 1]`` with ``T = seq_len``:
    windows overlap by one token, so every token after the first is a target exactly once.
    ``input = window[:-1]``, ``target = window[1:]``; there are ``(N - 1) // T`` sequences and
    the remainder at the end is unused. Sequences cross document and shard boundaries freely.

Sampling
    :class:`DeterministicSampler` draws, for every epoch, a permutation of the sequence indices
    from ``numpy``'s PCG64 seeded with ``(seed, epoch)``. Global step ``s`` of an epoch takes
    ``perm[s*W*B : (s+1)*W*B]`` (``W`` ranks, ``B`` sequences per rank) and rank ``r`` gets the
    ``r``-th slice of ``B``: ranks never share a sequence within an epoch and together cover
    ``steps_per_epoch * W * B`` sequences; the ``N_seq mod (W*B)`` left over (different ones
    each epoch) are dropped so every rank takes the same number of steps. The sampler runs
    forever, epoch after epoch. Its position is ``(epoch, step)``; ``state_dict()`` stores it
    and ``load_state_dict()`` resumes exactly, also with another world size or batch size as
    long as the sequences consumed so far in the epoch split evenly into the new global batch.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch

from nanoseek.data.shards import open_shards
from nanoseek.data.sources import DataError

SAMPLER_STATE_VERSION = 1


class PackedDataset:
    """Fixed-length sequences of ``seq_len + 1`` tokens over a list of token arrays (shards)."""

    def __init__(
        self,
        shards: Sequence[np.ndarray] | str | os.PathLike,
        seq_len: int,
        split: str = "train",
    ) -> None:
        if isinstance(shards, (str, os.PathLike)):
            shards = open_shards(shards, split)
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shards = [np.asarray(s) if not isinstance(s, np.ndarray) else s for s in shards]
        for index, shard in enumerate(self.shards):
            if shard.ndim != 1:
                raise ValueError(f"shard {index} must be 1-D, got shape {shard.shape}")
        self.seq_len = int(seq_len)
        sizes = [int(s.size) for s in self.shards]
        self._starts = np.cumsum([0] + sizes)
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens < self.seq_len + 1:
            raise DataError(
                f"the {split} data has {self.n_tokens} tokens but seq_len={self.seq_len} needs at least "
                f"{self.seq_len + 1} tokens for one sequence; add data or lower seq_len"
            )
        self.n_sequences = (self.n_tokens - 1) // self.seq_len

    def __len__(self) -> int:
        return self.n_sequences

    def __getitem__(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sequence ``index`` as int64."""
        index = int(index)
        if index < 0:
            index += self.n_sequences
        if not 0 <= index < self.n_sequences:
            raise IndexError(f"sequence {index} out of range ({self.n_sequences} sequences)")
        start = index * self.seq_len
        stop = start + self.seq_len + 1
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while start < stop:
            local = start - int(self._starts[shard])
            take = min(stop - start, self.shards[shard].size - local)
            out[filled : filled + take] = self.shards[shard][local : local + take]
            filled += take
            start += take
            shard += 1
        return out

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, both ``torch.int64`` of shape ``[len(indices), seq_len]``."""
        rows = np.stack([self[i] for i in indices]) if len(indices) else np.empty((0, self.seq_len + 1), np.int64)
        windows = torch.from_numpy(rows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class DeterministicSampler:
    """Seeded per-epoch shuffling of sequence indices, partitioned over ranks, resumable."""

    def __init__(
        self,
        n_sequences: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        batch_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.n_sequences = int(n_sequences)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        global_batch = self.world_size * self.batch_size
        if self.n_sequences < global_batch:
            raise DataError(
                f"{self.n_sequences} sequences cannot fill one global batch of {global_batch} "
                f"({self.world_size} ranks x {self.batch_size}); add data or shrink the batch"
            )
        self.steps_per_epoch = self.n_sequences // global_batch
        self.epoch = 0
        self.step = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The global order of sequence indices for ``epoch`` (same on every rank)."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
                self._perm = rng.permutation(self.n_sequences)
            else:
                self._perm = np.arange(self.n_sequences)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> np.ndarray:
        """This rank's next ``batch_size`` sequence indices (int64); advances the position."""
        perm = self.permutation(self.epoch)
        begin = (self.step * self.world_size + self.rank) * self.batch_size
        batch = perm[begin : begin + self.batch_size].astype(np.int64)
        self.skip(1)
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def skip(self, n_batches: int) -> None:
        """Jump over ``n_batches`` global steps (e.g. a bad data window), crossing epochs."""
        if n_batches < 0:
            raise ValueError(f"cannot skip a negative number of batches ({n_batches})")
        total = self.step + int(n_batches)
        self.epoch += total // self.steps_per_epoch
        self.step = total % self.steps_per_epoch

    def state_dict(self) -> dict:
        """Position and identity of the stream (JSON-serialisable)."""
        return {
            "version": SAMPLER_STATE_VERSION,
            "n_sequences": self.n_sequences,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "consumed": self.step * self.world_size * self.batch_size,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position; raises :class:`DataError` if it is another stream."""
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise DataError(f"unsupported sampler state version {state.get('version')!r}")
        for key in ("n_sequences", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; the data or seed changed, so it cannot resume exactly"
                )
        consumed = int(state["consumed"])
        global_batch = self.world_size * self.batch_size
        if consumed % global_batch:
            raise DataError(
                f"cannot resume: {consumed} sequences of epoch {state['epoch']} were consumed, which is "
                f"not a whole number of global batches of {global_batch} "
                f"({self.world_size} ranks x {self.batch_size})"
            )
        self.epoch = int(state["epoch"])
        self.step = 0
        self.skip(consumed // global_batch)


def iterate_batches(
    dataset: PackedDataset, sampler: DeterministicSampler
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(inputs, targets)`` batches of ``dataset`` in ``sampler`` order."""
    for indices in sampler:
        yield dataset.get_batch(indices)
