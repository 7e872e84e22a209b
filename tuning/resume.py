"""Resuming a search after its driver stopped (a crash, a SIGKILL, a lost head node).

The search side of resuming lives here:
- `search_to_resume` and `check_same_search` decide whether `--resume` may continue the
  latest search of an experiment, and refuse with one line otherwise;
- each ended trial's final result is written beside its Train run, so a trial that ended just
  before the driver stopped is replayed instead of trained again;
- `restored_tuner` continues the interrupted Tune run with this driver's callbacks.

Two parts live where their state is: the tracker rebuilds every trial's record from MLflow
(`SearchTracker.reattach`), and a restarted worker group goes on from its last checkpoint
(`trainers/epoch_loop.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuning.config import UserError
from tuning.cluster import tuner_run_config
from tuning.storage import storage_join, train_run_name, tune_run_path
from tuning.mlflow_store import latest_search, redact_uri, sqlite_path

# The parent-run tag naming the search's Tune run (its folder under STORAGE/tune).
TUNE_RUN_TAG = "tune_run_name"
# Tune's saved state names the trainable by module and function. When they move, a search saved
# by an earlier version cannot be restored: this version, on the parent run, says which can.
# 2: the trainables live in tuning/trainables.py and take a TrialContext.
STATE_VERSION_TAG, STATE_VERSION = "search_state_version", "2"
# Beside each trial's Train run: its final result, written by the driver when the trial ends.
# A resumed search replays it instead of training a finished trial again.
FINAL_RESULT_FILE = "final_result.json"


def tune_run_name(run) -> str:
    """The Tune run a parent run drove."""
    return run.data.tags.get(TUNE_RUN_TAG, "")


def _final_result_file(train_storage_path: str, run_name: str):
    """(pyarrow filesystem, path) of a trial's final-result file, on local or cloud storage."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(train_storage_path)
    return filesystem, f"{root}/{run_name}/{FINAL_RESULT_FILE}"


def read_final_result(train_storage_path: str, run_name: str) -> dict[str, Any] | None:
    from pyarrow import fs

    filesystem, path = _final_result_file(train_storage_path, run_name)
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def write_final_result(train_storage_path: str, run_name: str, result: dict[str, Any]) -> None:
    from ray.tune.result import AUTO_RESULT_KEYS

    filesystem, path = _final_result_file(train_storage_path, run_name)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    kept = {k: v for k, v in result.items()
            if k not in AUTO_RESULT_KEYS and k != "done" and isinstance(v, (int, float, str, bool))}
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(kept).encode())


def final_result_recorder(tune_run_name: str, train_storage_path: str):
    """A Tune callback that writes each ended trial's last result beside its Train run (see
    FINAL_RESULT_FILE): trials that finished or that ASHA stopped."""
    from ray import tune

    class _FinalResults(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if trial.last_result:
                write_final_result(train_storage_path, train_run_name(tune_run_name, trial.trial_id),
                                   trial.last_result)

    return _FinalResults()


def restored_tuner(request, trainable, callbacks: list[Any], budget):
    """The interrupted Tune run, to continue: the searcher (with Optuna's study), the scheduler
    and every trial's state come back from its saved state; ended trials stay as they ended."""
    from ray import tune

    tuner = tune.Tuner.restore(tune_run_path(request.storage_path, request.tune_run_name), trainable, resume_unfinished=True, resume_errored=False)
    # Callbacks and stoppers are pickled with the original run, bound to the dead driver's
    # tracker; this driver's take their place.
    run_config = tuner_run_config(tuner)
    run_config.callbacks, run_config.stop = callbacks, budget.stopper
    run_config.verbose = 1 if request.verbose else 0
    print(f"[search] resuming {request.tune_run_name} from {tune_run_path(request.storage_path, request.tune_run_name)}", flush=True)
    return tuner


# Options a resumed search may change; every other parent param must match the interrupted one.
# The data may move: its fingerprint must still match.
RESUME_MAY_CHANGE = {"max_failed_trials", "data_source"}


def driver_alive(tags: dict[str, str]) -> int | None:
    """The pid of the search's driver when it still runs on this machine."""
    import socket

    pid = tags.get("driver_pid", "")
    if tags.get("driver_host") != socket.gethostname() or not pid.isdigit():
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return int(pid) if b"search" in command else None


def search_to_resume(mlflow_experiment: str, tracking_uri: str, storage: str):
    """The interrupted search `--resume` continues (its MLflow parent run), checked to be
    resumable: not finished, not still running, same storage."""
    sqlite_file = sqlite_path(tracking_uri)
    if sqlite_file is not None and not sqlite_file.exists():
        raise UserError(f"--resume: there is no search to resume: {sqlite_file} does not exist "
                        "(pass the --results-dir or --tracking-uri the search used)")
    run = latest_search(tracking_uri, mlflow_experiment)
    if run is None:
        raise UserError(f"--resume: experiment {mlflow_experiment} in {redact_uri(tracking_uri)} has no search to resume")
    name, tags = run.info.run_name, run.data.tags
    if run.info.status == "FINISHED":
        raise UserError(f"--resume: the last search of experiment {mlflow_experiment} ({name}) finished; "
                        "run without --resume to start a new one")
    pid = driver_alive(tags) if run.info.status == "RUNNING" else None
    if pid is not None:
        raise UserError(f"--resume: the search {name} is still running (pid {pid}); stop it before resuming")
    if TUNE_RUN_TAG not in tags or tags.get(STATE_VERSION_TAG) != STATE_VERSION:
        # Tune state that names modules and a trainable this version no longer has: Tune
        # cannot restore it.
        raise UserError(f"--resume: the search {name} was started by an earlier version of this project, whose "
                        "saved state this version cannot restore; run without --resume to start a new one")
    if tags.get("storage") != redact_uri(storage):
        raise UserError(f"--resume: the search {name} kept its state in --storage {tags.get('storage')}, "
                        f"not {redact_uri(storage)}; pass the same --storage")
    return run


def check_same_search(run, params: dict[str, Any], storage: str) -> None:
    """Tune resumes the search it saved: a command that asks for another one is refused, and so
    is a search that stopped before Tune saved anything."""
    from ray.tune import Tuner

    changed = [f"{key} (was {run.data.params.get(key)!r:.80}, now {str(value)!r:.80})" for key, value in params.items()
               if key not in RESUME_MAY_CHANGE and run.data.params.get(key) != str(value)[:6000]]
    if changed:
        raise UserError(f"--resume: this command differs from the interrupted search {run.info.run_name} in "
                        f"{'; '.join(changed)}; resume with the options it was started with")
    tune_path = storage_join(storage, "tune", tune_run_name(run))
    if not tune_run_name(run) or not Tuner.can_restore(tune_path):
        raise UserError(f"--resume: no saved search state at {tune_path} (the search stopped before Tune "
                        "saved any); run without --resume to start a new one")
