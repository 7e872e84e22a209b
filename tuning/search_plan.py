"""The search as planned and as it ended: what `tuning.prepare` hands `tuning.execute`, and what
`execute` leaves for the closing table. Types only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.data import Dataset
from trainers.registry import ModelSpec
from tuning.config import Preset, SearchSpace
from tuning.ray_search import SearchRequest


@dataclass(frozen=True)
class Locations:
    """Where the search writes, checked to be writable."""

    results_dir: Path
    storage: str
    tracking_uri: str


@dataclass(frozen=True)
class Inputs:
    """Everything the search reads, loaded and checked."""

    spec: ModelSpec
    preset: Preset
    preset_name: str
    preset_file: Path
    space: SearchSpace
    space_file: Path
    targets: dict[str, dict[str, float]]
    mlflow_experiment: str
    # The preset's settings the space does not search, and the warm starts (see config.py).
    preset_fixed: dict[str, Any]
    warm_start: list[dict[str, Any]]
    # A local model folder, or where the base will be built (`builds_base`).
    model_path: Path | None
    model_source: str | None
    builds_base: bool
    dataset: Dataset
    # The parent run of the interrupted search `--resume` continues.
    resumed_run: Any = None
    # The ToolRAG model `--evaluate-with-toolrag` names (tuning.pipeline_eval.ResolvedModel).
    evaluation_toolrag: Any = None


@dataclass(frozen=True)
class PreparedSearch:
    spec: ModelSpec
    request: SearchRequest
    tracking_uri: str
    results_dir: Path
    mlflow_experiment: str
    # The parent run's name in MLflow; a new search's Tune run has the same name.
    parent_run_name: str
    preset_name: str
    targets: dict[str, dict[str, float]]
    dataset: Dataset
    files: list[Path]
    top_k: int
    # Logged on every trial's run beside its searched settings.
    trial_params: dict[str, Any]
    # Tags on every trial's run: which model, task and data, to compare across searches.
    trial_tags: dict[str, str]
    parent_params: dict[str, Any]
    parent_tags: dict[str, str]
    base_build: dict[str, Any] | None = None
    resume_parent_id: str | None = None
    # What the trials never see: scored once per trial, on its best checkpoint, after the search.
    test_data: Any = None
    # Figures about the data that could not be prevented, for the parent run.
    data_metrics: dict[str, float] = field(default_factory=dict)
    # With --evaluate-with-toolrag: the ToolRAG model the closest planner is evaluated with.
    evaluation_toolrag: Any = None


@dataclass
class Outcome:
    """What the search left: for the parent run, the closing table and the exit code."""

    status: str
    ranked: list
    totals: dict[str, float]
    front: list = field(default_factory=list)
    registered_version: str | None = None
    budget: Any = None
    # Trials found when resuming, by state (finished, failed, interrupted).
    resumed_counts: dict[str, int] | None = None
    family_bests: list = field(default_factory=list)
    # The comparisons the search answers (tuning/full_budget.py), as the closing table prints them.
    comparison_lines: list[str] = field(default_factory=list)
