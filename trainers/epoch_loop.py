"""The epoch loop every trainer runs on its Ray Train workers.

A trainer supplies what differs between models (an `EpochTrainer`: build, train one epoch,
evaluate); `run_epochs` does what they share:
- threads and seeding;
- resuming from the run's last checkpoint (a restarted worker group, a resumed search);
- cost accounting summed over workers;
- the per-epoch report, with a checkpoint attached when the epoch is the best so far.

Where the loop runs is a `WorkerSession`: a rank of a Ray Train worker group
(`RayTrainSession`, any number of workers, GPUs, clusters), or the calling process alone
(`InProcessSession`: one CPU worker, no worker group to start). Both keep checkpoints in a run
folder and hand the last one back to a restarted run. The loop knows nothing of Tune: the
in-process session is given the function that relays its reports.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainers import metric_names as names
from trainers import selection
from trainers.batching import all_reduce_sum

TRAINER_STATE_FILE = "trainer_state.pt"
# An in-process run's checkpoints: one folder per best-so-far epoch, written under a temporary
# name and renamed once complete, so a run killed mid-write resumes from the previous one.
IN_PROCESS_CHECKPOINT_PREFIX = "checkpoint_epoch_"
PARTIAL_CHECKPOINT_PREFIX = ".partial-"


class WorkerSession:
    """What the epoch loop needs from where it runs: rank, world size, device and CPUs; the
    run's last checkpoint; a way to report an epoch (with a checkpoint folder when the epoch is
    the best so far); and the model placed for training."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    cpus: float = 1.0

    @classmethod
    def alone(cls, device: torch.device | None = None) -> "WorkerSession":
        """One process scoring on its own (held-out scoring after the search): rank 0 of 1."""
        session = cls()
        session.device = device or torch.device("cpu")
        return session

    def get_checkpoint(self):
        """The run's last checkpoint (a `ray.train.Checkpoint`), or None."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        raise NotImplementedError

    def prepare_model(self, model):
        return model.to(self.device)


class RayTrainSession(WorkerSession):
    """A rank of a Ray Train worker group: Train saves the checkpoints and restores them to a
    restarted group; `prepare_model` wraps the model in DDP when there are several ranks."""

    def __init__(self):
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None)

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


class InProcessSession(WorkerSession):
    """The whole run in the calling process: one worker, on the CPU.

    Checkpoints go to `run_dir` (a local folder or cloud URI), keeping the last one, in the
    layout `get_checkpoint` reads back; each report is handed to `relay` with the checkpoint's
    path as `checkpoint_path`, as Train's report reaches a search.
    """

    def __init__(self, run_dir: str, relay: Callable[[dict[str, Any]], None], cpus: float = 1.0):
        from pyarrow import fs

        self.filesystem, self.root = fs.FileSystem.from_uri(run_dir)
        self.relay, self.cpus = relay, cpus

    def _folders(self, prefix: str) -> list[str]:
        from pyarrow import fs

        if self.filesystem.get_file_info(self.root).type == fs.FileType.NotFound:
            return []
        found = self.filesystem.get_file_info(fs.FileSelector(self.root))
        return sorted(info.base_name for info in found
                      if info.type == fs.FileType.Directory and info.base_name.startswith(prefix))

    def _complete_checkpoints(self) -> list[str]:
        return self._folders(IN_PROCESS_CHECKPOINT_PREFIX)

    def get_checkpoint(self):
        import ray.train

        complete = self._complete_checkpoints()
        if not complete:
            return None
        # Without its scheme on cloud storage, as Train reports checkpoint paths.
        return ray.train.Checkpoint(f"{self.root}/{complete[-1]}", filesystem=self.filesystem)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        from pyarrow import fs

        if checkpoint_dir:
            name = f"{IN_PROCESS_CHECKPOINT_PREFIX}{int(metrics[names.EPOCH]):04d}"
            partial = f"{self.root}/{PARTIAL_CHECKPOINT_PREFIX}{name}"
            older = self._complete_checkpoints()
            # Writes a killed run left unfinished, and a folder of this name from before.
            for leftover in [*self._folders(PARTIAL_CHECKPOINT_PREFIX), name if name in older else None]:
                if leftover:
                    self.filesystem.delete_dir(f"{self.root}/{leftover}")
            self.filesystem.create_dir(partial, recursive=True)
            fs.copy_files(checkpoint_dir, partial, destination_filesystem=self.filesystem)
            self.filesystem.move(partial, f"{self.root}/{name}")
            for stale in older:  # keep one, as Train's CheckpointConfig(num_to_keep=1) does
                if stale != name:
                    self.filesystem.delete_dir(f"{self.root}/{stale}")
            metrics = {**metrics, names.CHECKPOINT_PATH: f"{self.root}/{name}"}
        self.relay(metrics)


@dataclass
class EpochCost:
    """What one worker spent on one epoch of training."""

    loss_total: float = 0.0
    steps: int = 0
    pad_tokens: int = 0
    total_tokens: int = 0


@dataclass
class Evaluation:
    """One epoch's validation figures, with `paper_distance` and `best_paper_distance`; whether
    the epoch is the best so far (then it is checkpointed)."""

    metrics: dict[str, Any]
    improved: bool


class EpochTrainer:
    """What a model supplies to `run_epochs`. The worker's rank, world size and device come from its session, set
    before any hook runs; `optimizer` and `scheduler` (left None by a model fitted in one pass)
    are checkpointed and restored by the loop."""

    optimizer: Any = None
    scheduler: Any = None
    # Where the loop runs (rank, world size, device); `build` places the model through it
    # (DDP across Train ranks).
    session: WorkerSession = WorkerSession()

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world

    @property
    def device(self) -> torch.device:
        return self.session.device

    def __init__(self, config):
        self.config = config  # needs `epochs` and `seed`
        # The best epoch so far and its `selection.epoch_key`: what `best_epoch_so_far` compares with.
        self.best_key: tuple[float, ...] | None = None
        self.best_epoch = 0

    def best_epoch_so_far(self, epoch: int, metrics: dict[str, Any]) -> Evaluation:
        """An evaluation whose epoch is the best when `selection.improves` says so; adds
        `best_paper_distance`, `best_so_far` and `best_epoch` to the figures."""
        improved = selection.improves(selection.epoch_key(metrics), self.best_key)
        if improved:
            self.best_key, self.best_epoch = selection.epoch_key(metrics), epoch
        metrics.update({names.BEST_PAPER_DISTANCE: self.best_key[0], names.BEST_SO_FAR: float(improved),
                        names.BEST_EPOCH: self.best_epoch})
        return Evaluation(metrics, improved)

    def prepare_data(self, fetch: Callable[[], dict[str, Any]], data_fingerprint: str) -> None:
        """Make the train and validation splits ready; `fetch()` returns them raw."""
        raise NotImplementedError

    def load_model(self, directory: str):
        """The trained model in a checkpoint folder, ready to train on."""
        raise NotImplementedError

    def build(self, resumed_model) -> None:
        """Build the model (or take the resumed one), the optimiser and the schedule."""
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what `checkpoint_state` saved (the best epoch so far)."""
        self.best_key, self.best_epoch = tuple(state["best_key"]), int(state["best_epoch"])

    def train_epoch(self, epoch: int) -> EpochCost:
        raise NotImplementedError

    def evaluate(self, epoch: int) -> Evaluation:
        raise NotImplementedError

    def epoch_figures(self) -> dict[str, float]:
        """Figures of the training inputs reported with every epoch."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """Extras a resumed run needs beyond the weights and the optimiser."""
        return {"best_key": list(self.best_key), "best_epoch": self.best_epoch}

    def save(self, directory: str) -> None:
        """Write the model and its config into a checkpoint folder (rank 0 only)."""
        raise NotImplementedError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: weight init, LoRA init and dropout follow `seed`. (Data
    order follows it too, through `length_grouped_batches`' own generator.)"""
    import random

    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_trainer_state(directory: str, epoch: int, optimizer, scheduler, **extra: Any) -> None:
    """What resuming needs beyond the weights: the epoch, optimiser and schedule, trainer extras."""
    state = {"epoch": epoch, **extra}
    if optimizer is not None:
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    torch.save(state, Path(directory) / TRAINER_STATE_FILE)


def load_trainer_state(directory: str) -> dict[str, Any] | None:
    path = Path(directory) / TRAINER_STATE_FILE
    return torch.load(path, weights_only=True) if path.exists() else None


def from_last_checkpoint(load_model: Callable[[str], Any], session: WorkerSession):
    """(model, trainer state, checkpoint) from the run's last checkpoint, or (None, None, None).

    The session hands over the last checkpoint when a run starts again: a worker group Train
    restarted (a lost node), a retried trial, a trial a resumed search fits again. A checkpoint
    without trainer state cannot be resumed: the trainer then starts over.
    """
    checkpoint = session.get_checkpoint()
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
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1


def report_again_if_ended(state: dict[str, Any] | None, checkpoint, epochs: int, session: WorkerSession) -> bool:
    """Whether the run being resumed had already trained its last epoch; if so, report that
    epoch's metrics (kept in the trainer state) again, with the checkpoint's path.

    That happens when the search's driver stopped after the last checkpoint was registered but
    before the report reached it: without this the resumed trial would end with no result.
    """
    if state is None or state["epoch"] < epochs or "metrics" not in state:
        return False
    session.report({**state["metrics"], names.RESUMED_FROM_EPOCH: state["epoch"], names.CHECKPOINT_PATH: checkpoint.path})
    return True


def _fetch(data):
    import ray

    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


def run_epochs(trainer: EpochTrainer, loop_config: dict[str, Any], session: WorkerSession | None = None) -> None:
    """Train `trainer` for its config's epochs in `session` (default: this Ray Train worker),
    reporting each epoch.

    loop_config: {"trainer": config fields, "data": ObjectRef or dict of {"train", "val"},
    "data_fingerprint": str}. Every report carries the validation figures `evaluate` returns
    plus the shared cost figures, summed over workers.
    """
    started = time.perf_counter()
    cpu_started = time.process_time()
    session = session or RayTrainSession()
    trainer.session = session
    # Ray does not set torch's thread count in its workers: left alone, torch starts one
    # thread per core in every worker, and two trials on two cores fight over four threads.
    torch.set_num_threads(max(1, int(session.cpus)))
    seed_everything(trainer.config.seed)

    trainer.prepare_data(lambda: _fetch(loop_config["data"]), loop_config["data_fingerprint"])
    data_prep_seconds = time.perf_counter() - started

    resumed_model, state, resumed = from_last_checkpoint(trainer.load_model, session)
    if report_again_if_ended(state, resumed, trainer.config.epochs, session):
        return
    trainer.build(resumed_model)
    start = first_epoch(state, trainer.optimizer, trainer.scheduler)
    if state is not None:
        trainer.restore(state)

    for epoch in range(start, trainer.config.epochs + 1):
        cost = trainer.train_epoch(epoch)
        evaluation = trainer.evaluate(epoch)
        summed = all_reduce_sum(torch.tensor(
            [time.process_time() - cpu_started, cost.pad_tokens, cost.total_tokens, cost.loss_total, cost.steps],
            dtype=torch.float64, device=trainer.device)).cpu().tolist()
        metrics = evaluation.metrics
        metrics.update(trainer.epoch_figures())
        metrics.update({
            names.EPOCH: epoch,
            names.TRAIN_LOSS: summed[3] / max(summed[4], 1),
            names.CPU_SECONDS: summed[0],
            names.GPU_SECONDS: (time.perf_counter() - started) * trainer.world if trainer.device.type == "cuda" else 0.0,
            names.PADDING_WASTE: summed[1] / max(summed[2], 1),
            names.DATA_PREP_SECONDS: data_prep_seconds,
            names.TRAIN_FN_SECONDS: time.perf_counter() - started,
            names.WORLD_SIZE: trainer.world,
            names.RESUMED_FROM_EPOCH: state["epoch"] if state else 0,
        })
        if not math.isfinite(metrics[names.TRAIN_LOSS]):
            raise FloatingPointError(f"the training loss became {metrics[names.TRAIN_LOSS]} at epoch {epoch}")
        if evaluation.improved and trainer.rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                trainer.save(directory)
                save_trainer_state(directory, epoch, trainer.optimizer, trainer.scheduler, metrics=metrics,
                                   **trainer.checkpoint_state())
                session.report(metrics, checkpoint_dir=directory)
        else:
            session.report(metrics)


def steps_per_epoch(examples: int, world: int, per_worker_batch: int) -> int:
    """Optimiser steps per epoch on each worker: each gets ceil(n / world) inputs (see
    `length_grouped_batches`), cut into batches."""
    return math.ceil(math.ceil(examples / world) / per_worker_batch)


def adamw_with_warmup(parameters, learning_rate: float, weight_decay: float, warmup_ratio: float,
                      *, total_steps: int):
    """AdamW and a linear schedule that warms up over the first `warmup_ratio` of the steps."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    total_steps = max(1, total_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)
