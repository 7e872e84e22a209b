"""Pieces both transformer trainers' workers share: packed token storage, length-grouped
batches that keep DDP ranks in step, cross-worker sums, and bf16 autocast on GPUs only. (The
epoch loop itself, with seeding and resuming, is trainers/epoch_loop.py.)"""

from __future__ import annotations

import torch


def pack_sequences(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token id lists as one flat tensor plus offsets: loads from disk ~10x faster than lists."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, dim=0)
    flat = torch.tensor([token for s in sequences for token in s], dtype=torch.int32)
    return {"flat": flat, "offsets": offsets}


def length_grouped_batches(lengths: list[int], batch_size: int, epoch: int, seed: int, *, rank: int, world: int,
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
