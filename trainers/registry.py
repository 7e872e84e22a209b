"""Every model the search can train, one entry each, with every fact the search needs about it.

`tuning/` iterates this registry and names no model. Adding one means a trainer module (a
config class, `train_fn_per_worker`, `score_checkpoint`), one entry here, and its presets and
search spaces in YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from trainers import metric_names as names
from trainers import pipeline, planner, planner_base, toolrag, toolrag_linear
from trainers.data import message_plan_split, query_label_split
from trainers.planner_prompts import PLANNER_TEMPLATES


@dataclass(frozen=True)
class ModelSpec:
    # The registry key, and the `model:` a search space names.
    name: str
    # What `--model` selects and which paper figures (targets.yaml) apply: models of one task
    # are compared with each other.
    task: str
    # How the model is built; presets choose it (`family:`), the default is "transformer".
    family: str
    config_class: type[BaseModel]
    # (loop config, session=None): one trial's training, in a Ray Train worker or in-process.
    train_fn_per_worker: Callable[..., None]
    # (checkpoint folder, split, device, max_examples) -> (metrics, sample outputs)
    score_checkpoint: Callable[..., tuple[dict[str, float], list[dict[str, Any]]]]
    # A split's examples as the trainer reads them (what a trial's payload holds).
    split_payload: Callable[[list], Any]
    # The values of the config's `prompt_template`.
    templates: tuple[str, ...]
    # The figures of targets.yaml its config takes, and those the closing table puts first.
    target_metrics: tuple[str, ...]
    headline: tuple[str, ...]
    extra_columns: tuple[str, ...]
    # What ASHA minimises (lower is better), reported every epoch.
    scheduler_metric: str
    registered_model: str
    # The two figures `--objective pareto` trades (the first up, the second down), if any.
    pareto: tuple[str, str] | None = None
    # Whether the preset names a pretrained model (`model.name_or_path`); a linear model has none.
    needs_model_source: bool = True
    # When the preset may build the base model itself (`model.build_base`): the folder it goes
    # to, (cache root, data split fingerprint, architecture, settings) -> Path, and the builder,
    # (folder, training examples, architecture, settings, progress) -> Path.
    base_folder: Callable[..., Path] | None = None
    base_builder: Callable[..., Path] | None = None
    # (model folder, templates the search uses) -> why that folder cannot serve, or None.
    check_model_folder: Callable[[Path, set[str]], str | None] | None = None
    # The config key naming which target paper_distance measures from, when there is a choice.
    paper_target_key: str | None = None
    # The role its checkpoints play in the pipeline evaluation (trainers/pipeline.py), if it is
    # the model whose prompts another model builds there: `--evaluate-with-toolrag` applies.
    pipeline_role: str | None = None
    # (trainer settings, split, device) -> (metrics, sample outputs): the base before any
    # fine-tuning on held-out examples, the paper's untuned row; None where there is no such base.
    score_untuned: Callable[..., tuple[dict[str, float], list[dict[str, Any]]]] | None = None

    @property
    def builds_base(self) -> bool:
        return self.base_builder is not None

    def paper_figures(self, targets: dict[str, dict[str, Any]], trainer_settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """{headline figure: the target it is compared with ({"value", "tolerance"[, "relative_to"]},
        see trainers/stats.py: target_value)}."""
        if self.paper_target_key is None:
            return {metric: targets[metric] for metric in self.headline}
        chosen = trainer_settings.get(self.paper_target_key,
                                      self.config_class.model_fields[self.paper_target_key].default)
        return {self.headline[0]: targets[chosen]}


_TOOLRAG_COMMON = dict(
    task="toolrag", split_payload=query_label_split, templates=tuple(toolrag.TOOLRAG_TEMPLATES),
    target_metrics=(names.TOOL_RECALL, names.TOOL_COUNT), headline=(names.TOOL_RECALL, names.TOOL_COUNT),
    extra_columns=(), scheduler_metric=names.BEST_PAPER_DISTANCE, pareto=(names.TOOL_RECALL, names.TOOL_COUNT),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec(name="toolrag", family="transformer", config_class=toolrag.ToolRAGConfig,
              train_fn_per_worker=toolrag.train_fn_per_worker, score_checkpoint=toolrag.score_checkpoint,
              registered_model="tinyagent-toolrag", **_TOOLRAG_COMMON),
    ModelSpec(name="toolrag-linear", family="linear", config_class=toolrag_linear.LinearToolRAGConfig,
              train_fn_per_worker=toolrag_linear.train_fn_per_worker,
              score_checkpoint=toolrag_linear.score_checkpoint, registered_model="tinyagent-toolrag-linear",
              needs_model_source=False, **_TOOLRAG_COMMON),
    ModelSpec(name="planner", task="planner", family="transformer", config_class=planner.PlannerConfig,
              train_fn_per_worker=planner.train_fn_per_worker, score_checkpoint=planner.score_checkpoint,
              score_untuned=planner.score_untuned_base,
              split_payload=message_plan_split, templates=PLANNER_TEMPLATES,
              target_metrics=(names.PLAN_SUCCESS, names.PLAN_SUCCESS_WITH_TOOLRAG), headline=(names.PLAN_SUCCESS,),
              extra_columns=(names.TOOL_SET_ACCURACY, names.PLAN_PARSE_RATE, names.EVAL_EXAMPLES),
              scheduler_metric=names.BEST_EARLY_STOP_SCORE, registered_model="tinyagent-planner",
              base_folder=planner_base.base_cache_dir, base_builder=planner_base.build_base_from_examples,
              check_model_folder=planner.check_model_folder, paper_target_key="paper_target",
              pipeline_role=pipeline.PLANNER),
)}

TASKS: tuple[str, ...] = tuple(dict.fromkeys(spec.task for spec in MODELS.values()))
DEFAULT_FAMILY = "transformer"


def spec_for(task: str, family: str = DEFAULT_FAMILY) -> ModelSpec:
    """The model of `task` built as `family`; KeyError naming the families there are."""
    for spec in MODELS.values():
        if spec.task == task and spec.family == family:
            return spec
    known = sorted(spec.family for spec in MODELS.values() if spec.task == task)
    raise KeyError(f"no {family!r} model for {task!r} (known: {', '.join(known) or 'none'})")


def families(task: str) -> list[str]:
    return [spec.family for spec in MODELS.values() if spec.task == task]
