"""The test split, scored once per trial after the search, on the trial's best checkpoint.

Trials never receive the test split: per-epoch figures, the best epoch, ASHA, Optuna's objective
and the closest-to-paper ranking all use validation. Were any of them to look at test, its
intervals would no longer say whether the paper's figure is consistent with the trial, because
the trial was picked for landing near it. So each trial's best checkpoint (chosen on validation)
is scored on test exactly once, here, ASHA-stopped trials included, as Ray tasks with the
resources of one Train worker.
"""

from __future__ import annotations

from typing import Any

from trainers import metric_names as names
from trainers.registry import MODELS, ModelSpec
from tuning.tracking import SearchTracker
from tuning.trial_records import TrialRecord


def _checkpoint(checkpoint_path: str, storage_path: str):
    """A Train checkpoint from the path a trial reported. On cloud storage Train reports the
    path without its scheme (`bucket/...`), so the filesystem comes from --storage."""
    from pyarrow import fs
    from ray.train import Checkpoint

    if "://" in storage_path and "://" not in checkpoint_path:
        return Checkpoint(checkpoint_path, filesystem=fs.FileSystem.from_uri(storage_path)[0])
    return Checkpoint(checkpoint_path)


def _task_device(cpus: float):
    """In a scoring task: torch's threads set to the task's CPUs, and its device."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def _score_one(model_name: str, checkpoint_path: str, storage_path: str, split_data: Any, *, cpus: float):
    """Runs in a Ray task: fetch the checkpoint (local folder or cloud storage) and score it."""
    device = _task_device(cpus)
    with _checkpoint(checkpoint_path, storage_path).as_directory() as directory:
        return MODELS[model_name].score_checkpoint(directory, split_data, device)


def describe(spec: ModelSpec, metrics: dict[str, float]) -> str:
    """One line of test figures with their intervals."""
    parts = []
    for name in spec.headline:
        low, high = names.interval(name)
        parts.append(f"{name} {metrics[name]:.3f} [{metrics[low]:.3f}, {metrics[high]:.3f}]")
    return (", ".join(parts) + f", distance {metrics[names.PAPER_DISTANCE]:.2f}, "
            f"{int(metrics[names.EVAL_EXAMPLES])} examples")


def score_trials_on_test(tracker: SearchTracker, spec: ModelSpec, split_data: Any, storage_path: str,
                         *, cpus_per_task: float, gpus_per_task: float, verbose: bool = True) -> list[TrialRecord]:
    """Score every trial that has a best checkpoint and no test figures yet (a resumed search
    skips those already scored); log `test_*` on each trial's run. Returns the trials scored."""
    import ray

    pending = [r for r in tracker.trials.values() if r.checkpoint_path and r.test is None]
    if not pending:
        return []
    print(f"[test] scoring the best checkpoint (chosen on validation) of {len(pending)} trials on the test split, "
          "once each", flush=True)
    task = ray.remote(_score_one).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task)
    data_ref = ray.put(split_data)
    futures = {task.remote(spec.name, r.checkpoint_path, storage_path, data_ref, cpus=cpus_per_task): r for r in pending}
    scored = []
    while futures:
        ready, _ = ray.wait(list(futures), num_returns=1)
        record = futures.pop(ready[0])
        try:
            metrics, samples = ray.get(ready[0])
        except ray.exceptions.RayTaskError as error:
            # A checkpoint that cannot be read costs that trial its test figure, not the search
            # its other trials'; the reason stays on the run.
            print(f"[test] trial {record.trial_id}: scoring failed: {str(error).splitlines()[-1]}", flush=True)
            tracker.record_test_error(record.trial_id, str(error))
            continue
        outcomes = metrics.pop(names.PER_EXAMPLE_SUCCESS, None)
        tracker.record_test(record.trial_id, metrics, samples, outcomes)
        scored.append(record)
        if verbose:  # quiet, the closing table shows every trial's test figures
            print(f"[test] trial {record.trial_id}: {describe(spec, metrics)}", flush=True)
    if not verbose:
        print(f"[test] {len(scored)} of {len(pending)} trials scored on the test split", flush=True)
    return scored


def _score_untuned(model_name: str, trainer_settings: dict[str, Any], split_data: Any, cpus: float):
    """Runs in a Ray task: the base model, no adapter, on one split."""
    return MODELS[model_name].score_untuned(trainer_settings, split_data, _task_device(cpus))


def score_untuned_base(tracker: SearchTracker, spec: ModelSpec, trainer_settings: dict[str, Any],
                       splits: dict[str, Any], *, cpus_per_task: float, gpus_per_task: float) -> None:
    """The paper's untuned row: the base before any fine-tuning, on the validation and test
    examples the trials are scored on, one Ray task per split; logged on the parent run. Skipped
    when the model has no such base, or the parent run has the row already (a resumed search)."""
    import ray

    if spec.score_untuned is None or tracker.untuned is not None:
        return
    print(f"[untuned] scoring the base before any fine-tuning on {' and '.join(splits)}, once", flush=True)
    task = ray.remote(_score_untuned).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task)
    futures = {split: task.remote(spec.name, trainer_settings, data, cpus_per_task) for split, data in splits.items()}
    try:
        scored = {split: ray.get(future) for split, future in futures.items()}
    except ray.exceptions.RayTaskError as error:  # the trials' own figures stand without it
        print(f"[untuned] scoring the base failed: {str(error).splitlines()[-1]}", flush=True)
        return
    tracker.record_untuned({split: metrics for split, (metrics, _) in scored.items()},
                           {split: samples for split, (_, samples) in scored.items()})
