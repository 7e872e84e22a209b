"""What Tune runs for one trial, on either runner (see tuning/ray_search.py's docstring):
`fit_trial` fits a TorchTrainer (ray-train), `train_in_process` is the worker itself
(in-process). Both receive the search's `TrialContext`, shipped once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tuning.storage import storage_join, train_run_name

# A trial's trainable only waits on its TorchTrainer. It asks for no CPU (a fraction such as 0.01
# would leave 1.98 of 2 CPUs, so the second trial's 1-CPU worker never fits) and a token of
# memory, because Tune needs a non-empty resource request. It runs on the head node, beside the
# search driver: a lost worker node then takes only Train workers, which restart from the
# trial's checkpoint, and never the trial itself.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024 * 1024, "node:__internal_head__": 0.001}


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one Tune run shares: the same for all its trials, fixed before the first."""

    # The model's training function, pickled by reference: a trial imports only its own trainer
    # module, not every model's (scikit-learn, PEFT) through the registry.
    train_fn_per_worker: Callable[..., None]
    # The Tune run's name: each trial's Train run is named after it (`train_run_name`).
    tune_run_name: str
    # The trainer config's fixed fields; a trial's searched values go on top.
    trainer_base: dict[str, Any]
    # The train and validation splits, in Ray's object store (or a dict, in tests).
    data: Any
    data_fingerprint: str
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    train_storage_path: str
    retries_per_trial: int


def scaling_config(workers: int, cpus_per_worker: float, gpus_per_worker: float):
    """Train workers for one trial; with GPUs, Train picks NCCL and each worker its own device."""
    from ray.train import ScalingConfig

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    return ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker), resources_per_worker=resources)


def _trial_run(config: dict[str, Any], context: TrialContext) -> tuple[str, dict[str, Any]] | None:
    """(the trial's Train run name, its loop config), or None when the trial had already ended.

    The driver may stop after a trial ended but before Tune saved that; the resumed search then
    restarts it. It reports the result it ended with instead of training again.
    """
    from ray import tune

    from tuning.resume import read_final_result

    run_name = train_run_name(context.tune_run_name, tune.get_context().get_trial_id())
    final = read_final_result(context.train_storage_path, run_name)
    if final is not None:
        tune.report({**final, "replayed_final_result": 1})
        return None
    return run_name, {"trainer": {**context.trainer_base, **config}, "data": context.data,
                      "data_fingerprint": context.data_fingerprint}


def fit_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable of the ray-train runner: one trial = one TorchTrainer fit with this config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = _trial_run(config, context)
    if trial is None:
        return
    run_name, loop_config = trial
    trainer = TorchTrainer(
        context.train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(context.workers_per_trial, context.cpus_per_worker, context.gpus_per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=context.train_storage_path,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # A lost worker or node restarts the worker group, which resumes from the trial's
            # last checkpoint (see the trainers' get_checkpoint), not from epoch 0. So does a
            # trial the search resumes after its driver stopped.
            failure_config=FailureConfig(max_failures=context.retries_per_trial),
        ),
    )
    trainer.fit()


def train_in_process(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable of the in-process runner: this trial is its one worker.

    Checkpoints go where the trial's Train run would keep them (STORAGE/train/<run name>), so
    a retried trial, or one a resumed search starts again, goes on from its last checkpoint.
    """
    from ray import tune

    from trainers.epoch_loop import InProcessSession

    trial = _trial_run(config, context)
    if trial is None:
        return
    run_name, loop_config = trial
    session = InProcessSession(storage_join(context.train_storage_path, run_name), relay=tune.report,
                               cpus=context.cpus_per_worker)
    context.train_fn_per_worker(loop_config, session=session)


def trial_trainable(trial_runner: str, context: TrialContext):
    """The Tune trainable for the search's runner, with its resources (the context's CPUs per worker)."""
    from ray import tune

    if trial_runner == "in-process":
        resources = {"cpu": context.cpus_per_worker}
        return tune.with_resources(tune.with_parameters(train_in_process, context=context), resources)
    return tune.with_resources(tune.with_parameters(fit_trial, context=context), TRIAL_RESOURCES)
