"""Batches of a corpus: the one loader that training, the benchmark and the tests use.

A batch is a (B, T) LongTensor from `pad_batch`: [BOS] ids [EOS], padded to the longest molecule
of the batch. Only molecules that fit the model's context are batched (`fitting`). Training
batches come in the order `ResumableSampler` draws from (seed, epoch) and the steps already
taken, so a resumed run trains on exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from chemscale.lm.corpus import TokenCorpus
from chemscale.lm.tokenizer import BOS_ID, EOS_ID, PAD_ID

VAL_BATCH_SIZE = 256  # validation batches at least this big: no gradients, so memory allows it


def pad_batch(seqs: list[np.ndarray]) -> torch.Tensor:
    """(B, T) LongTensor: [BOS] ids [EOS] then [PAD] up to the longest molecule in the batch."""
    T = max(len(s) for s in seqs) + 2
    out = np.full((len(seqs), T), PAD_ID, dtype=np.int64)
    out[:, 0] = BOS_ID
    for i, s in enumerate(seqs):
        out[i, 1: len(s) + 1] = s
        out[i, len(s) + 1] = EOS_ID
    return torch.from_numpy(out)


def fitting(corpus: TokenCorpus, n_positions: int) -> np.ndarray:
    """Indices of the molecules whose [BOS] ids [EOS] fits in n_positions (the others are left out)."""
    lengths = np.diff(np.asarray(corpus.offsets)) + 2
    return np.flatnonzero(lengths <= n_positions)


class Molecules(torch.utils.data.Dataset):
    """Token ids of the molecules at `index` of a TokenCorpus (e.g. the ones that fit the context)."""

    def __init__(self, corpus: TokenCorpus, index: np.ndarray):
        self.corpus, self.index = corpus, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.corpus[int(self.index[i])]


class ResumableSampler(torch.utils.data.Sampler):
    """This process's share of shuffled passes over `n` items, in an order a restarted run repeats.

    Pass e is the permutation seeded by (seed, e) alone, and each pass starts where training
    stands: `steps_done()` (optimizer steps taken, which a resumed trainer restores from its
    checkpoint) gives the epoch and how many of its batches are done, so a run resumed mid-epoch
    trains on exactly the batches the uninterrupted run would have. It assumes one optimizer step
    per batch, and a pass yields whole batches only (the items left over are in other epochs'
    shuffles), or one short batch when a process's share is smaller than a batch. Under DDP each
    process takes every world_size-th item of the permutation (the rank is read when a pass starts,
    after Lightning has set up the process group; the Trainer is told not to replace this sampler).
    """

    def __init__(self, n: int, batch_size: int, seed: int, steps_done):
        self.n, self.batch_size, self.seed, self.steps_done = n, batch_size, seed, steps_done

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

    def __len__(self) -> int:
        share = self.n // self._rank_world()[1]
        return share if share < self.batch_size else share - share % self.batch_size

    def __iter__(self):
        rank, world = self._rank_world()
        batches = max(1, len(self) // self.batch_size)
        epoch, done = divmod(int(self.steps_done()), batches)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)[rank::world][: len(self)]
        return iter(order[done * self.batch_size:].tolist())


def train_loader(corpus: TokenCorpus, index: np.ndarray, batch_size: int, seed: int,
                 steps_done: Callable[[], int]) -> torch.utils.data.DataLoader:
    """Training batches of the molecules at `index`, in `ResumableSampler`'s order from (seed, steps_done()).

    Whole batches (one short batch when there are fewer molecules than a batch). The loader's own
    generator gives each iterator its base seed, so starting one (each epoch) leaves the global RNG alone.
    """
    sampler = ResumableSampler(len(index), batch_size, seed, steps_done)
    return torch.utils.data.DataLoader(Molecules(corpus, index), batch_size=batch_size, sampler=sampler,
                                       collate_fn=pad_batch, generator=torch.Generator().manual_seed(seed))


def val_loader(corpus: TokenCorpus, index: np.ndarray, batch_size: int) -> torch.utils.data.DataLoader:
    """Validation batches of the molecules at `index`, in corpus order, at least VAL_BATCH_SIZE molecules each.

    Its own generator: starting an iterator at each validation leaves the global RNG alone."""
    return torch.utils.data.DataLoader(Molecules(corpus, index), batch_size=max(VAL_BATCH_SIZE, batch_size),
                                       collate_fn=pad_batch, generator=torch.Generator())
