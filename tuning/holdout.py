"""The test split, scored once per trial after the search, on the trial's best checkpoint.

Trials never receive the test split: per-epoch figures, the best epoch, ASHA, Optuna's objective
and the closest-to-paper ranking all use validation. Were any of them to look at test, its
intervals would no longer say whether the paper's figure is consistent with the trial, because
the trial was picked for landing near it. So each trial's best checkpoint (chosen on validation)
is scored on test exactly once, here, ASHA-stopped trials included, as Ray tasks with the
resources of one Train worker.
"""

from __future__ import annotations

from typing import Any, Callable

from tuning.tracking import SearchTracker, TrialRecord


def score_fn_for(model: str) -> Callable[..., tuple[dict[str, float], list[dict[str, Any]]]]:
    """The trainer's `score_checkpoint(directory, split_data, device)`."""
    if model == "toolrag":
        from trainers.toolrag import score_checkpoint

        return score_checkpoint
    if model == "planner":
        from trainers.planner import score_checkpoint

        return score_checkpoint
    raise ValueError(f"no test scoring for model {model!r}")


def _checkpoint(checkpoint_path: str, storage_path: str):
    """A Train checkpoint from the path a trial reported. On cloud storage Train reports the
    path without its scheme (`bucket/...`), so the filesystem comes from --storage."""
    from pyarrow import fs
    from ray.train import Checkpoint

    if "://" in storage_path and "://" not in checkpoint_path:
        return Checkpoint(checkpoint_path, filesystem=fs.FileSystem.from_uri(storage_path)[0])
    return Checkpoint(checkpoint_path)


def _score_one(model: str, checkpoint_path: str, storage_path: str, split_data: Any, cpus: float):
    """Runs in a Ray task: fetch the checkpoint (local folder or cloud storage) and score it."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    with _checkpoint(checkpoint_path, storage_path).as_directory() as directory:
        return score_fn_for(model)(directory, split_data, device)


def describe(model: str, metrics: dict[str, float]) -> str:
    """One line of test figures with their intervals."""
    names = ("tool_recall", "tool_count") if model == "toolrag" else ("plan_success",)
    parts = [f"{name} {metrics[name]:.3f} [{metrics[name + '_ci_low']:.3f}, {metrics[name + '_ci_high']:.3f}]"
             for name in names]
    return ", ".join(parts) + f", distance {metrics['paper_distance']:.2f}, {int(metrics['eval_examples'])} examples"


def score_trials_on_test(tracker: SearchTracker, model: str, split_data: Any, storage_path: str,
                         cpus_per_task: float, gpus_per_task: float) -> list[TrialRecord]:
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
    futures = {task.remote(model, r.checkpoint_path, storage_path, data_ref, cpus_per_task): r for r in pending}
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
        tracker.record_test(record.trial_id, metrics, samples)
        scored.append(record)
        print(f"[test] trial {record.trial_id}: {describe(model, metrics)}", flush=True)
    return scored
