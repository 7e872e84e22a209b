"""What a search shows on the console, and where everything else goes.

By default the console holds the phase lines (data, MLflow, Ray, base build), one progress
line per ended trial, and the closing table. Ray's, Tune's, Train's, MLflow's and Optuna's
own logs go to `RESULTS/logs/<run>/search.log`, and Ray's per-process logs (the Train
workers' output among them) stay in Ray's session folder, linked there as `ray-logs`.
`--verbose` brings Tune's trial table and the workers' output back to the console.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

# Libraries that install their own console handlers; quiet, their records go to the log file.
LIBRARY_LOGGERS = ("ray", "mlflow", "optuna", "alembic", "transformers", "torch", "filelock", "urllib3",
                   "py.warnings")
SEARCH_LOG = "search.log"
RAY_LOGS_LINK = "ray-logs"


def log_folder(results_dir: Path, run_name: str) -> Path:
    return results_dir / "logs" / run_name


class SearchLog(logging.Handler):
    """The search's log file, opened only once the search is accepted: records from before (Ray
    starting) wait in memory, so a search refused at that point leaves no file behind."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.waiting: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def open(self, log_file: Path) -> Path:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(log_file, encoding="utf-8")  # appends: a resumed search adds on
        self.file.setFormatter(self.formatter)
        for record in self.waiting:
            self.file.emit(record)
        self.waiting.clear()
        return log_file

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.waiting.append(record)
        else:
            self.file.emit(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def route_logs(verbose: bool) -> SearchLog:
    """Send the libraries' log records to the search's log file (and, verbose, to the console
    too); `SearchLog.open` names the file. Called before Ray starts, so Ray's own start-up
    lines land there."""
    handler = SearchLog()
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, SearchLog)]:
        root.removeHandler(previous)  # an earlier search in this process (tests) wrote its own file
        previous.close()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if verbose:
        return handler
    # Warnings (deprecations, tokenizer notices) become log records, not console lines.
    logging.captureWarnings(True)
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    return handler


def link_ray_logs(folder: Path) -> Path | None:
    """Link Ray's session log folder (every worker's stdout and stderr) beside search.log.

    On a cluster the link shows the head node's logs; each node keeps its own workers' logs.
    """
    from tuning.cluster import session_logs_dir

    target = session_logs_dir()
    if target is None:  # connected to a running cluster: its session folder is on the head node
        return None
    link = folder / RAY_LOGS_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _setting(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# How often the live status line of a terminal is redrawn.
LIVE_PERIOD_S = 1.0


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class SearchProgress(tune.Callback):
    """One line each time a trial ends: how many are done, running, stopped and failed out of
    the total, the closest trial so far (on validation), the time spent and an estimate of what
    is left. On a terminal the same status also stays live on the last line between trial ends
    (redrawn in place, so it adds no lines). It reads the tracker, whose callback runs before
    this one."""

    def __init__(self, tracker, total: int, max_concurrent: int, time_budget_s: float | None,
                 *, log_file: Path | None, started: float | None = None, out=None):
        self.tracker = tracker
        self.total = total
        self.max_concurrent = max(1, max_concurrent)
        self.time_budget_s = time_budget_s
        self.log_file = log_file
        self.started = started or time.time()
        # None: whatever sys.stdout is when a line is written. Tune pickles its callbacks with
        # the search's state, and a captured stream (pytest's) cannot be pickled.
        self.out = out
        self._running: set[str] = set()
        self._live_drawn_at = 0.0
        self._live_shown = False

    def on_trial_start(self, iteration, trials, trial, **info):
        self._running.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._running.discard(trial.trial_id)
        self._write(self.line())

    def on_trial_error(self, iteration, trials, trial, **info):
        self._running.discard(trial.trial_id)
        record = self.tracker.trials.get(trial.trial_id)
        reason = _last_line(record.error if record else None)
        where = getattr(trial, "error_file", None) or (str(self.log_file) if self.log_file else "the MLflow run")
        self._write(f"[trial {trial.trial_id}] failed: {reason} (full log: {where})")
        self._write(self.line())

    def on_step_end(self, iteration, trials, **info):
        out = self.out or sys.stdout
        if not _is_terminal(out) or time.time() - self._live_drawn_at < LIVE_PERIOD_S:
            return
        self._live_drawn_at = time.time()
        width = max(20, shutil.get_terminal_size().columns - 1)
        out.write("\r\033[K" + self.line()[:width])
        out.flush()
        self._live_shown = True

    def on_experiment_end(self, trials, **info):
        self._clear_live(self.out or sys.stdout)

    def _clear_live(self, out) -> None:
        if self._live_shown:  # the next line starts where the live one was
            out.write("\r\033[K")
            self._live_shown = False

    def _write(self, line: str) -> None:
        out = self.out or sys.stdout
        self._clear_live(out)
        out.write(line + "\n")
        out.flush()

    def counts(self) -> dict[str, int]:
        records = self.tracker.trials.values()
        ended = [r for r in records if r.status != "RUNNING"]
        return {"done": len(ended), "running": len(self._running),
                "stopped": sum(r.stopped_early for r in ended), "failed": sum(r.status == "FAILED" for r in ended)}

    def remaining_s(self, done: int, elapsed: float) -> float | None:
        """Trials left x the mean time per ended trial / trials at once, capped by the time budget."""
        estimate = None
        if done:
            # elapsed / done is the time per ended trial with trials running side by side.
            estimate = (self.total - done) * (elapsed / done)
        if self.time_budget_s is not None:
            budget_left = max(0.0, self.time_budget_s - elapsed)
            estimate = budget_left if estimate is None else min(estimate, budget_left)
        return estimate

    def line(self) -> str:
        counts, elapsed = self.counts(), time.time() - self.started
        text = (f"[search] {counts['done']}/{self.total} trials ended ({counts['stopped']} stopped early, "
                f"{counts['failed']} failed), {counts['running']} running")
        ranked = self.tracker.ranked()
        if ranked and math.isfinite(ranked[0].objective):
            best = ranked[0]
            settings = ", ".join(f"{k}={_setting(v)}" for k, v in sorted(best.params.items()))
            text += f" | closest so far: distance {best.objective:.3f}, trial {best.trial_id} ({settings})"
        remaining = self.remaining_s(counts["done"], elapsed)
        text += f" | {_duration(elapsed)} elapsed"
        if remaining is not None and counts["done"] < self.total:
            text += f", ~{_duration(remaining)} left"
        return text


def _last_line(error: str | None) -> str:
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error text recorded"
