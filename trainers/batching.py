"""Pieces both trainers' workers share: packed token storage, length-grouped batches that
keep DDP ranks in step, cross-worker sums, bf16 autocast on GPUs only, and the optimiser
state a checkpoint carries so a restarted worker group goes on from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

TRAINER_STATE_FILE = "trainer_state.pt"


def pack_sequences(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token id lists as one flat tensor plus offsets: loads from disk ~10x faster than lists."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, dim=0)
    flat = torch.tensor([token for s in sequences for token in s], dtype=torch.int32)
    return {"flat": flat, "offsets": offsets}


def length_grouped_batches(lengths: list[int], batch_size: int, epoch: int, seed: int, rank: int, world: int,
                           group: int = 16) -> list[list[int]]:
    """This worker's batches for one epoch: shuffled, then sorted by length within windows of
    `group` batches, so a batch holds inputs of similar length and pads little.

    Every worker gets the same number of batches (DDP's all-reduce would wait forever for a
    worker that has one batch fewer): the shuffled order is padded by repeating its start
    until it divides evenly, as DistributedSampler does.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order += order[: (-len(order)) % world]
    mine = order[rank::world]
    batches = []
    for start in range(0, len(mine), batch_size * group):
        window = sorted(mine[start : start + batch_size * group], key=lengths.__getitem__)
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: weight init, LoRA init and dropout follow `seed`. (Data
    order follows it too, through `length_grouped_batches`' own generator.)"""
    import random

    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduced = tensor.clone()
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        return reduced
    return tensor


class PaddedBatches:
    """Collate function over packed sequences: pads each batch to its longest sequence and
    counts pad tokens. `split` holds "flat", "offsets" and per-sequence "labels" (one row each);
    a subclass can pad per-token labels instead (see `labels_for`)."""

    def __init__(self, split: dict[str, torch.Tensor], pad_id: int):
        self.flat, self.offsets, self.labels, self.pad_id = split["flat"], split["offsets"], split["labels"], pad_id
        self.pad_tokens = 0
        self.total_tokens = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @staticmethod
    def padded(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, longest: int, fill: int) -> torch.Tensor:
        """Rows values[start:end], right-padded with `fill` to `longest`."""
        out = torch.full((len(starts), longest), fill, dtype=torch.long)
        for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
            out[row, : end - start] = values[start:end]
        return out

    def labels_for(self, indices: list[int], starts: torch.Tensor, ends: torch.Tensor, longest: int) -> torch.Tensor:
        return self.labels[indices]

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        starts, ends = self.offsets[indices], self.offsets[[i + 1 for i in indices]]
        longest = int((ends - starts).max())
        input_ids = self.padded(self.flat, starts, ends, longest, self.pad_id)
        attention_mask = (torch.arange(longest).unsqueeze(0) < (ends - starts).unsqueeze(1)).long()
        self.total_tokens += input_ids.numel()
        self.pad_tokens += input_ids.numel() - int(attention_mask.sum())
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": self.labels_for(indices, starts, ends, longest)}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (what prepare_model returns with 2+ workers)."""
    return model.module if hasattr(model, "module") else model


def uses_bf16(device: torch.device, enabled: bool) -> bool:
    """bf16 autocast on GPUs only: CPU bf16 kernels are slower than fp32 on most laptops."""
    return enabled and device.type == "cuda"


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, enabled))


def save_trainer_state(directory: str, epoch: int, optimizer, scheduler, **extra: Any) -> None:
    """What resuming needs beyond the weights: the epoch, optimiser and schedule, trainer extras."""
    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **extra},
               Path(directory) / TRAINER_STATE_FILE)


def load_trainer_state(directory: str) -> dict[str, Any] | None:
    path = Path(directory) / TRAINER_STATE_FILE
    return torch.load(path, weights_only=True) if path.exists() else None


def from_last_checkpoint(load_model: Callable[[str], torch.nn.Module]):
    """(model, trainer state, checkpoint) from the run's last checkpoint, or (None, None, None).

    Train hands a worker group the last registered checkpoint when it restarts it (a lost node)
    and when a resumed search fits the trial's run again. A checkpoint without trainer state
    cannot be resumed: the trainer then starts over.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, None, None
    with checkpoint.as_directory() as directory:
        state = load_trainer_state(directory)
        return (load_model(directory) if state else None), state, checkpoint


def first_epoch(state: dict[str, Any] | None, optimizer, scheduler) -> int:
    """The epoch to train first: 1, or the one after the checkpoint's, with its optimiser and
    schedule restored."""
    if state is None:
        return 1
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1


def report_again_if_ended(state: dict[str, Any] | None, checkpoint, epochs: int) -> bool:
    """Whether the run being resumed had already trained its last epoch; if so, report that
    epoch's metrics (kept in the trainer state) again, with the checkpoint's path.

    That happens when the search's driver stopped after the last checkpoint was registered but
    before the report reached it: without this the resumed trial would end with no result.
    """
    if state is None or state["epoch"] < epochs or "metrics" not in state:
        return False
    import ray.train

    ray.train.report({**state["metrics"], "resumed_from_epoch": state["epoch"], "checkpoint_path": checkpoint.path})
    return True
