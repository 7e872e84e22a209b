"""Presets, search spaces and targets: YAML files validated once, before Ray starts.

Every error names the file and the key, and becomes one line and exit code 2 in the CLI.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainers.gguf_base import PackagedGGUF
from trainers.planner_base import BaseBuildSettings
from trainers.registry import DEFAULT_FAMILY, MODELS, ModelSpec, families, spec_for

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
PRESETS_DIR = SPACES_DIR / "presets"
TARGETS_FILE = SPACES_DIR / "targets.yaml"
# Keys only the search sets, never a preset or a search space: where the model and caches
# live, and the seed (--seed, so that one flag decides it).
NOT_SEARCHABLE = {"model_path", "architecture", "cache_dir", "targets", "seed"}
# The setting whose values each model lists as its templates.
TEMPLATE_KEY = "prompt_template"


class UserError(ValueError):
    """Bad input the user can fix: printed as one line, exit code 2."""


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "<top level>"
    return f"{where}: {first['msg']}"


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TargetEntry(Strict):
    value: float
    tolerance: float = Field(gt=0)
    source: str
    relative_to: Literal["gold_tool_count"] | None = None


# The section of targets.yaml whose entries replace the paper's for generated data.
GENERATED_DATA_SECTION = "generated_data"


def shipped_presets(task: str) -> list[str]:
    """The preset names shipped for a task: the YAML files under search_spaces/presets/<task>/."""
    return sorted(path.stem for path in (PRESETS_DIR / task).glob("*.yaml"))


def load_targets(model: str, path: Path = TARGETS_FILE, generated_data: bool = False) -> dict[str, dict[str, Any]]:
    """{metric: {"value", "tolerance"[, "relative_to"]}} for a task, from the one targets file.

    With `generated_data`, the entries of the file's `generated_data.<model>` section replace
    the paper's: on data whose gold tool count is not the published data's, an absolute tool
    count would reward wrong tools (see the section's comment)."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or model not in raw:
        raise UserError(f"{path}: no targets for model {model!r}")
    sections = [(model, raw[model])]
    generated = raw.get(GENERATED_DATA_SECTION) or {}
    if not isinstance(generated, dict):
        raise UserError(f"{path}: {GENERATED_DATA_SECTION}: must map model names to targets")
    if generated_data and model in generated:
        sections.append((f"{GENERATED_DATA_SECTION}.{model}", generated[model]))
    entries = {}
    for where, section in sections:
        if not isinstance(section, dict):
            raise UserError(f"{path}: {where}: must map metric names to targets")
        for name, entry in section.items():
            if where != model and name not in entries:
                raise UserError(f"{path}: {where}.{name}: replaces no target of {model}")
            try:
                entries[name] = TargetEntry.model_validate(entry)
            except ValidationError as error:
                raise UserError(f"{path}: {where}.{name}.{_describe(error)}") from None
    return {name: {"value": e.value, "tolerance": e.tolerance,
                   **({"relative_to": e.relative_to} if e.relative_to else {})} for name, e in entries.items()}


def describe_target(name: str, target: dict[str, Any]) -> str:
    """How a target reads in a log line or on a run: '3.97', or 'gold_tool_count + 1'."""
    if target.get("relative_to"):
        return f"{target['relative_to']} + {target['value']:g}"
    return f"{target['value']:g}"


class ModelSource(Strict):
    name_or_path: str | None = Field(None, description="Hub id, local folder, or package:<module>/<folder>.")
    architecture: dict[str, Any] | None = Field(None, description="Random-init architecture; the folder then only supplies the tokenizer.")
    build_base: BaseBuildSettings | None = Field(
        None, description="Planner only: build the base here (tokenizer + pre-training on prompts) from `architecture`.")
    gguf: PackagedGGUF | None = Field(
        None, description="Planner only: a pretrained base in a GGUF file a package ships, converted once.")

    @model_validator(mode="after")
    def _check(self) -> "ModelSource":
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("architecture needs a model_type")
        if self.build_base is not None and self.architecture is None:
            raise ValueError("build_base needs an architecture to build")
        given = [name for name in ("name_or_path", "build_base", "gguf") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of name_or_path, build_base and gguf, not {' and '.join(given)}")
        if not given:
            raise ValueError("name_or_path is required (or build_base with an architecture, or gguf)")
        if self.gguf is not None and self.architecture is not None:
            raise ValueError("gguf: the file holds its architecture; drop architecture")
        return self


class SearchSettings(Strict):
    space: str = Field(description="Search-space file name under search_spaces/.")
    num_samples: int = Field(ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    # tpe: Optuna's TPE, seeded (the default); random: proposals that ignore earlier results.
    sampler: Literal["tpe", "random"] = "tpe"
    # How many proposals TPE draws at random before it models the results (Optuna's
    # n_startup_trials, 10 by default): in a 4-trial smoke search the default would leave TPE
    # nothing to do.
    startup_trials: int | None = Field(None, ge=1)
    # ASHA stops trials whose early epochs rank badly (grace_period, reduction_factor); off,
    # every trial trains all its epochs.
    early_stopping: bool = True


class SyntheticData(Strict):
    synthetic_train: int = Field(2000, ge=10)
    synthetic_test: int = Field(500, ge=10)


class Preset(Strict):
    # Which of the task's models the preset trains (trainers/registry.py).
    family: str = DEFAULT_FAMILY
    # Where the pretrained model comes from; a model trained from nothing (linear) has none.
    model: ModelSource | None = None
    trainer: dict[str, Any] = Field(default_factory=dict)
    search: SearchSettings
    data: SyntheticData = SyntheticData()


class Parameter(Strict):
    type: Literal["loguniform", "uniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Parameter":
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes 'values', not low/high")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in self.values
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def samples(self) -> list[Any]:
        """Values that must all be valid trainer settings: the ends of a range, every choice."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SearchSpace(Strict):
    # The registry name of the model the space is for: a linear model's space differs.
    model: str
    parameters: dict[str, Parameter] = Field(min_length=1)
    warm_start: list[dict[str, Any]] = Field(default_factory=list)


def _trainer_probe(spec: ModelSpec) -> dict[str, Any]:
    """Placeholders for the fields only the search knows, so a preset can be checked alone."""
    fields = spec.config_class.model_fields
    probe: dict[str, Any] = {"targets": {name: {"value": 0.5, "tolerance": 1.0} for name in spec.target_metrics}}
    probe.update({key: "." for key in ("model_path", "cache_dir") if key in fields})
    return probe


def check_trainer_settings(spec: ModelSpec, settings: dict[str, Any], source: str) -> None:
    """Raise UserError unless `settings` (plus the search's placeholders) make a valid trainer config."""
    forbidden = NOT_SEARCHABLE & settings.keys()
    if forbidden:
        raise UserError(f"{source}: {sorted(forbidden)[0]}: set by the search, not by a preset or search space")
    try:
        spec.config_class.model_validate({**_trainer_probe(spec), **settings})
    except ValidationError as error:
        raise UserError(f"{source}: {_describe(error)}") from None


def preset_path(task: str, preset: str) -> Path:
    """A shipped preset by name (see `shipped_presets`), or a YAML file of the same shape."""
    if preset.endswith((".yaml", ".yml")):
        return Path(preset).expanduser()
    shipped = shipped_presets(task)
    if preset in shipped:
        return PRESETS_DIR / task / f"{preset}.yaml"
    raise UserError(f"--preset {preset}: not one of {', '.join(shipped)} and not a .yaml file")


def load_preset(task: str, preset: str) -> tuple[Preset, ModelSpec]:
    """A preset, checked against the model it names, and that model's registry entry."""
    path = preset_path(task, preset)
    raw = _read_yaml(path)
    try:
        loaded = Preset.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{path}: {_describe(error)}") from None
    try:
        spec = spec_for(task, loaded.family)
    except KeyError:
        raise UserError(f"{path}: family: {loaded.family!r} is not a {task} model "
                        f"(known: {', '.join(families(task))})") from None
    check_trainer_settings(spec, loaded.trainer, f"{path}: trainer")
    source = loaded.model
    if spec.needs_model_source and source is None:
        raise UserError(f"{path}: model: required for the {spec.name} model (name_or_path, or build_base)")
    if not spec.needs_model_source and source is not None:
        raise UserError(f"{path}: model: the {spec.name} model is trained from nothing and takes no model source")
    if source is not None and not spec.builds_base and source.build_base is not None:
        raise UserError(f"{path}: model.build_base: the {spec.name} model does not build its own base")
    if source is not None and not spec.builds_base and source.gguf is not None:
        raise UserError(f"{path}: model.gguf: the {spec.name} model takes no GGUF base")
    if source is not None and spec.builds_base and source.architecture is not None and source.build_base is None:
        raise UserError(f"{path}: model.architecture: the {spec.name} model builds from an architecture only "
                        "with build_base")
    return loaded, spec


def load_search_space(spec: ModelSpec, path: Path, base_trainer: dict[str, Any]) -> SearchSpace:
    """Load and check a space: known keys, sane ranges, values the trainer accepts, warm starts inside."""
    raw = _read_yaml(path)
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{path}: {_describe(error)}") from None
    if space.model != spec.name:
        known = f" (models: {', '.join(MODELS)})" if space.model not in MODELS else ""
        raise UserError(f"{path}: model: this space is for {space.model!r}, not {spec.name!r}{known}")
    fields = spec.config_class.model_fields
    for key, parameter in space.parameters.items():
        if key not in fields or key in NOT_SEARCHABLE:
            searchable = sorted(set(fields) - NOT_SEARCHABLE)
            raise UserError(f"{path}: parameters.{key}: not a searchable {spec.name} setting "
                            f"(known: {', '.join(searchable)})")
        for value in parameter.samples():
            if key == TEMPLATE_KEY and value not in spec.templates:
                raise UserError(f"{path}: parameters.{key}: unknown template {value!r} "
                                f"(known: {', '.join(spec.templates)})")
            check_trainer_settings(spec, {**base_trainer, key: value}, f"{path}: parameters.{key}")
    for position, point in enumerate(space.warm_start):
        if set(point) != set(space.parameters):
            raise UserError(f"{path}: warm_start[{position}]: must set exactly the searched keys {sorted(space.parameters)}")
        for key, value in point.items():
            if not space.parameters[key].contains(value):
                raise UserError(f"{path}: warm_start[{position}].{key}: {value!r} is outside the searched range")
    return space


def layer_preset_over_space(preset_trainer: dict[str, Any], preset_file: Path, space: SearchSpace,
                            space_file: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the preset's fixed settings, the warm starts) once preset and space are layered.

    A preset value for a key the space searches is never dropped: the preset's values become
    the first warm start, completed with the space's own first warm start for the keys the
    preset leaves out. A value outside the searched range, or a partial point with no warm
    start to complete it, is refused naming both files. The fixed settings returned hold no
    searched key: those come from each trial's config.
    """
    searched_in_preset = {k: v for k, v in preset_trainer.items() if k in space.parameters}
    fixed = {k: v for k, v in preset_trainer.items() if k not in space.parameters}
    warm_start = [dict(point) for point in space.warm_start]
    if not searched_in_preset:
        return fixed, warm_start
    for key, value in searched_in_preset.items():
        if not space.parameters[key].contains(value):
            parameter = space.parameters[key]
            searched = (f"values {parameter.values}" if parameter.type == "choice"
                        else f"{parameter.low:g}..{parameter.high:g}")
            raise UserError(f"{preset_file}: trainer.{key} {value!r} is outside what {space_file} searches for it "
                            f"({searched}); change one of the two files")
    missing = sorted(set(space.parameters) - set(searched_in_preset))
    if missing and not warm_start:
        raise UserError(f"{preset_file}: trainer sets {', '.join(sorted(searched_in_preset))}, which {space_file} "
                        f"searches, but not {', '.join(missing)}; a warm start needs every searched key, so set "
                        "them in the preset or add a warm_start to the space")
    point = {**(warm_start[0] if missing else {}), **searched_in_preset}
    point = {key: point[key] for key in space.parameters}
    return fixed, [point] + [other for other in warm_start if other != point]
