"""Where a search keeps its state under --storage (a folder or a cloud URI): Tune's run, and one
Train run per trial. A leaf: the search, the trainables and resuming all name these paths."""

from __future__ import annotations


def storage_join(storage: str, *parts: str) -> str:
    """A path under --storage; string joining, because Path() would turn s3://b into s3:/b."""
    return "/".join([storage.rstrip("/"), *parts])


def tune_storage(storage: str) -> str:
    """Where Tune keeps every search's state: STORAGE/tune (one folder per Tune run)."""
    return storage_join(storage, "tune")


def tune_run_path(storage: str, tune_run_name: str) -> str:
    """Where Tune keeps one search's state: STORAGE/tune/<run name>."""
    return storage_join(tune_storage(storage), tune_run_name)


def train_storage(storage: str) -> str:
    """Where the trials' Train runs (checkpoints, final results) live: STORAGE/train."""
    return storage_join(storage, "train")


def train_run_name(tune_run_name: str, trial_id: str) -> str:
    # Stable per trial, so a retried or resumed trial finds its Train run (and checkpoint) again.
    return f"{tune_run_name}-{trial_id}"
