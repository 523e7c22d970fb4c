"""Several packed datasets mixed by weight (``data.mix``), deterministic and resumable.

Each dataset (one ``data.train`` entry: a file or a folder) is packed on its own. An epoch of
the mixture holds as many sequences as all of them together, ``N``; dataset ``i`` gives
``N · w_i / Σw`` of them (largest remainder, so the shares are exact to one sequence). Its
sequences come from an endless stream of passes over it, each pass a permutation seeded by
``(seed, i, pass)``: epoch ``e`` takes the stream's items ``[e · m_i, (e + 1) · m_i)``, so a
dataset with a large weight repeats its sequences (a new order each pass) and one with a small
weight shows different sequences each epoch, every one before any repeats. The epoch's items
are then shuffled together, seeded by ``(seed, epoch)``. Everything is a function of the seed,
the epoch and the datasets, so the loader's position (epoch, step) is all a resume needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longtune.data.packing import DatasetStats, PackedDataset


def mixture_shares(total: int, weights: Sequence[float]) -> list[int]:
    """Sequences per dataset in an epoch of ``total``: proportional to ``weights``, rounded by
    largest remainder (ties to the earlier dataset), summing to ``total``."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


class MixedDataset:
    """Packed datasets sampled by weight; ``ds[k]`` is sequence ``k`` of their concatenation.

    The loader asks :meth:`epoch_order` for an epoch's order instead of shuffling the indices
    itself.

    Args:
        datasets: the packed datasets (same context length and pad id).
        weights: one positive weight per dataset.
        names: what to call each dataset in the log (its path).
    """

    def __init__(
        self, datasets: list[PackedDataset], weights: Sequence[float], names: Sequence[str]
    ) -> None:
        if len(datasets) != len(weights) or len(datasets) != len(names):
            raise ValueError(
                f"{len(datasets)} datasets, {len(weights)} weights, {len(names)} names"
            )
        self.datasets = datasets
        self.weights = [float(w) for w in weights]
        self.names = list(names)
        self.starts = np.cumsum([0] + [len(d) for d in datasets])
        self.shares = mixture_shares(int(self.starts[-1]), self.weights)
        self.pad_id = datasets[0].pad_id
        self.context_length = datasets[0].context_length
        self.stats = _merged_stats([d.stats for d in datasets])
        self.stats.extra["mixture"] = self.describe()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, k: int) -> tuple[int, int]:
        if not 0 <= k < len(self):
            raise IndexError(f"sequence {k} out of range for {len(self)} packed sequences")
        d = int(np.searchsorted(self.starts, k, side="right")) - 1
        return d, k - int(self.starts[d])

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        d, i = self._locate(k)
        return self.datasets[d][i]

    def source(self, k: int) -> list[str]:
        d, i = self._locate(k)
        return self.datasets[d].source(i)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The ``len(self)`` sequences of ``epoch``, each dataset's share from its stream of
        seeded passes, shuffled together."""
        parts = []
        for d, (dataset, share) in enumerate(zip(self.datasets, self.shares, strict=True)):
            n = len(dataset)
            position = np.arange(epoch * share, (epoch + 1) * share, dtype=np.int64)
            passes = position // n
            taken = np.empty(share, dtype=np.int64)
            for p in np.unique(passes):
                perm = np.random.default_rng([seed, d, int(p)]).permutation(n)
                here = passes == p
                taken[here] = perm[position[here] % n]
            parts.append(taken + self.starts[d])
        return np.random.default_rng([seed, epoch]).permutation(np.concatenate(parts))

    def describe(self) -> str:
        """One line: each dataset's weight, sequences and share of an epoch."""
        return "; ".join(
            f"{Path(name).name}: weight {w:g}, {len(d)} sequences, {share} per epoch "
            f"({100 * share / len(self):.1f}%)"
            for name, w, d, share in zip(
                self.names, self.weights, self.datasets, self.shares, strict=True
            )
        )


def _merged_stats(parts: list[DatasetStats]) -> DatasetStats:
    sequences = sum(p.packed_sequences for p in parts)
    tokens = sum(p.tokens for p in parts)
    context = parts[0].context_length
    return DatasetStats(
        files=[f for p in parts for f in p.files],
        documents=sum(p.documents for p in parts),
        tokens=tokens,
        supervised_tokens=sum(p.supervised_tokens for p in parts),
        packed_sequences=sequences,
        padding_fraction=1.0 - tokens / max(sequences * context, 1),
        context_length=context,
        overlength=parts[0].overlength,
    )
