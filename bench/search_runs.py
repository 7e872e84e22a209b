"""What the benches share: run the real search CLI into a folder, and read its trials back from
the MLflow store it wrote (durations, time in training, lanes)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


@dataclass
class Search:
    """One finished search: its trials (MLflow runs, by start time) and its end-to-end wall time."""

    trials: list
    wall_seconds: float
    stdout: str

    @property
    def span_seconds(self) -> float:
        """From the first trial's start to the last trial's end: the time trials had the lanes."""
        return (max(r.info.end_time for r in self.trials) - min(r.info.start_time for r in self.trials)) / 1000

    def train_seconds(self) -> list[float]:
        """Each trial's time inside its training function (its last report's)."""
        return [r.data.metrics.get("train_fn_seconds", 0.0) for r in self.trials]

    def overheads(self) -> list[float]:
        """Per trial: its wall time (driver's view, start to end) minus its time in training."""
        return [r.data.metrics["trial_wall_seconds"] - r.data.metrics["train_fn_seconds"]
                for r in self.trials if "train_fn_seconds" in r.data.metrics]

    def lane_utilisation(self, lanes: int) -> float:
        """Σ time in training / (span × concurrent trials): 1 when every lane trains all the time."""
        return sum(self.train_seconds()) / (self.span_seconds * lanes)

    def trials_per_hour(self) -> float:
        return len(self.trials) * 3600 / self.span_seconds

    def warm_trials_per_hour(self, lanes: int) -> float:
        """Trials per hour once each lane's first trial (a new process importing torch while
        Ray and the driver start up) has ended: the trials ending after the lanes-th end."""
        ends = sorted(r.info.end_time for r in self.trials)
        if len(ends) <= lanes:  # no trial ran on a warm lane
            return float("nan")
        return (len(ends) - lanes) * 3600 / ((ends[-1] - ends[lanes - 1]) / 1000)

    def best(self, metric: str = "best_paper_distance") -> float:
        return min(r.data.metrics.get(metric, float("inf")) for r in self.trials)


def run_search(root: Path, arguments: list[str], experiment: str = "bench", env: dict[str, str] | None = None) -> Search:
    """`python tuning/search.py ARGUMENTS` with its results in ROOT; exits with the search's
    output tail if it fails."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    command = [sys.executable, "tuning/search.py", *arguments, "--results-dir", str(root), "--tracking-uri", uri,
               "--experiment-name", experiment]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=PROJECT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"search failed: {' '.join(command)}\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}")
    client = MlflowClient(uri)
    return Search(trial_runs(client, client.get_experiment_by_name(experiment).experiment_id), wall, completed.stdout)


def trial_runs(client, experiment_id: str) -> list:
    """A search's trial runs, by start time."""
    trials = client.search_runs([experiment_id], "tags.search = 'trial'", max_results=1000)
    return sorted(trials, key=lambda run: run.info.start_time)


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")
