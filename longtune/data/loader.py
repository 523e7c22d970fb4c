"""The loader: packed sequences → micro-batches for one (data-parallel, sequence-parallel) rank.

Independent of ``torch.distributed``: the caller passes its ranks and sizes. The order of an
epoch depends only on ``(seed, epoch)``, so every rank computes the same permutation:

- data-parallel ranks take disjoint micro-batches of it (the permutation is padded by
  repeating its start when it does not divide by ``dp_size * micro_batch_size``, or truncated
  with ``drop_last``);
- all sequence-parallel ranks of a group take the *same* sequences and each keeps its
  contiguous slice ``[r·L/sp, (r+1)·L/sp)`` of ids, labels and positions, with the document
  boundaries of the whole micro-batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from longtune.data.packing import IGNORE_INDEX, PackedDataset


def pad_to_multiple(
    item: dict[str, np.ndarray], multiple: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Pad a packed sequence so its length divides by ``multiple`` (ignored labels).

    The padding joins the trailing padding segment if there is one, else it becomes a new
    segment; its positions continue that segment's (restarting at 0 for a new one).

    Args:
        item: a packed sequence from :class:`PackedDataset` (with ``num_docs``).
        multiple: e.g. the sequence-parallel degree.
        pad_id: token id for padding.

    Returns:
        The padded sequence (the input itself when no padding is needed).
    """
    length = len(item["input_ids"])
    extra = -length % multiple
    if extra == 0:
        return item
    cu = item["cu_seqlens"]
    has_pad_segment = len(cu) - 1 > int(item["num_docs"])
    start = int(cu[-2]) if has_pad_segment else length
    positions = np.arange(length - start, length - start + extra)
    new_cu = np.concatenate([cu[:-1] if has_pad_segment else cu, [length + extra]]).astype(np.int32)
    return {
        "input_ids": np.concatenate([item["input_ids"], np.full(extra, pad_id, np.int64)]),
        "labels": np.concatenate([item["labels"], np.full(extra, IGNORE_INDEX, np.int64)]),
        "position_ids": np.concatenate([item["position_ids"], positions]),
        "cu_seqlens": new_cu,
        "num_docs": item["num_docs"],
    }


class PackedLoader:
    """Deterministic, resumable micro-batches of packed sequences for one rank.

    Iterating yields micro-batches forever, epoch after epoch. Each is a dict:

    - ``input_ids``, ``labels``, ``position_ids``: LongTensor ``[B, L/sp]``, this rank's slice
      (``L`` is the context length padded to a multiple of ``sp_size``);
    - ``cu_seqlens``: int32 document offsets into the flattened full-length micro-batch
      (sequence ``b`` occupies ``[b·L, (b+1)·L)``); ``max_seqlen``: the longest segment;
    - ``num_supervised``: labels != -100 in the whole micro-batch (all slices);
    - ``sample_ids``: the packed sequence indices; ``epoch`` and ``step`` (within the epoch).

    Args:
        dataset: the packed dataset.
        micro_batch_size: sequences per micro-batch.
        dp_rank: this rank's data-parallel index.
        dp_size: number of data-parallel groups.
        sp_rank: this rank's index within its sequence-parallel group.
        sp_size: sequence-parallel degree.
        seed: shuffling seed; identical on every rank.
        drop_last: drop the tail of an epoch that does not fill every DP rank's micro-batch,
            instead of padding it with sequences from the start of the epoch.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        sp_rank: int,
        sp_size: int,
        seed: int,
        drop_last: bool = False,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if not (dp_size >= 1 and 0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if not (sp_size >= 1 and 0 <= sp_rank < sp_size):
            raise ValueError(f"sp_rank={sp_rank} must be in [0, sp_size={sp_size})")
        n = len(dataset)
        steps = _steps_per_epoch(n, dp_size * micro_batch_size, drop_last)
        if steps == 0:
            raise ValueError(
                f"{n} packed sequences cannot fill one step of dp_size={dp_size} x "
                f"micro_batch_size={micro_batch_size} with drop_last=True; use drop_last=False, "
                "a smaller batch or more data"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sp_rank, self.sp_size = sp_rank, sp_size
        self.seed = seed
        self.drop_last = drop_last
        self.steps_per_epoch = steps
        self.epoch = 0
        self.step = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sequence order of an epoch (all ranks), padded or truncated to whole steps."""
        if epoch != self._order_epoch:
            n = len(self.dataset)
            mixed = getattr(self.dataset, "epoch_order", None)  # a MixedDataset orders itself
            perm = (
                mixed(self.seed, epoch)
                if mixed is not None
                else np.random.default_rng([self.seed, epoch]).permutation(n)
            )
            total = self.steps_per_epoch * self.dp_size * self.micro_batch_size
            self._order = np.resize(perm, total)  # repeats from the start when total > n
            self._order_epoch = epoch
        return self._order

    def sample_ids(self, epoch: int, step: int) -> list[int]:
        """The packed sequences this rank's DP group reads at ``(epoch, step)``."""
        per_step = self.dp_size * self.micro_batch_size
        start = step * per_step + self.dp_rank * self.micro_batch_size
        return self.epoch_order(epoch)[start : start + self.micro_batch_size].tolist()

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        epoch, step = self.epoch, self.step
        batch = self.batch(epoch, step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def batch(self, epoch: int, step: int) -> dict[str, Any]:
        """Build this rank's micro-batch for ``(epoch, step)`` (pure; does not move the loader)."""
        ids = self.sample_ids(epoch, step)
        items = [pad_to_multiple(self.dataset[i], self.sp_size, self.dataset.pad_id) for i in ids]
        length = len(items[0]["input_ids"])
        local = length // self.sp_size
        lo, hi = self.sp_rank * local, (self.sp_rank + 1) * local
        cu = np.concatenate(
            [[0]]
            + [it["cu_seqlens"][1:].astype(np.int64) + b * length for b, it in enumerate(items)]
        )
        labels = np.stack([it["labels"] for it in items])
        return {
            "input_ids": torch.from_numpy(np.stack([it["input_ids"][lo:hi] for it in items])),
            "labels": torch.from_numpy(labels[:, lo:hi].copy()),
            "position_ids": torch.from_numpy(np.stack([it["position_ids"][lo:hi] for it in items])),
            "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
            "max_seqlen": int(np.diff(cu).max()),
            "num_supervised": int((labels != IGNORE_INDEX).sum()),
            "sample_ids": ids,
            "epoch": epoch,
            "step": step,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is (the next micro-batch) and the settings it depends on; JSON-able."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size,
            "drop_last": self.drop_last,
            "num_sequences": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; data, seed and micro-batch size must match.

        The data-parallel degree may differ (the sequence-parallel degree never matters here):
        the position is carried over as the number of sequences the epoch has consumed, which
        must fill whole steps at the new degree, and an epoch must hold the same number of
        sequence slots at both degrees (its padding or truncation to whole steps) — otherwise
        the run could not continue exactly and this raises, naming both layouts.

        Args:
            state: from :meth:`state_dict`.
        """
        self.epoch, self.step = self.resume_position(state)

    def resume_position(self, state: dict[str, Any]) -> tuple[int, int]:
        """The ``(epoch, step)`` this loader resumes at from ``state``; changes nothing.

        The trainer calls it before the model is loaded, so a run that cannot resume exactly
        is refused early. Raises as :meth:`load_state_dict` does.
        """
        mine = self.state_dict()
        for key in ("seed", "micro_batch_size", "drop_last", "num_sequences"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}; "
                    "resume with the same data, seed and micro-batch size"
                )
        old_dp, mbs = int(state["dp_size"]), self.micro_batch_size
        old_steps = _steps_per_epoch(len(self.dataset), old_dp * mbs, self.drop_last)
        if not 0 <= state["step"] < old_steps:
            raise ValueError(f"loader state step={state['step']} not in [0, {old_steps})")
        consumed = int(state["step"]) * old_dp * mbs
        per_step = self.dp_size * mbs
        slots_old, slots_new = old_steps * old_dp * mbs, self.steps_per_epoch * per_step
        if consumed % per_step or slots_old != slots_new:
            why = (
                f"{consumed} sequences of epoch {state['epoch']} are consumed, not a whole "
                f"number of steps of {per_step}"
                if consumed % per_step
                else f"an epoch of {len(self.dataset)} sequences fills {slots_old} slots at the "
                f"old layout and {slots_new} at the new one"
            )
            raise ValueError(
                f"cannot resume exactly: the checkpoint was written with data-parallel degree "
                f"{old_dp} (micro_batch_size {mbs}) and this run has {self.dp_size}; {why}. "
                f"Resume with parallel.dp={old_dp} (world size = dp x sp), or with a degree "
                "that divides both the consumed sequences and the epoch"
            )
        return int(state["epoch"]), consumed // per_step


def _steps_per_epoch(n: int, per_step: int, drop_last: bool) -> int:
    """Steps of ``per_step`` sequences in an epoch of ``n`` (the last one padded unless dropped)."""
    return n // per_step if drop_last else -(-n // per_step)
