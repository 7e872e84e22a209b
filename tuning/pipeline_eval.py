"""The pipeline evaluation's plumbing: where the models come from (an MLflow model URI, a run's
artifacts, a local folder or a hub id), which data, the MLflow evaluation run, and what is
printed. The evaluation itself is trainers/pipeline.py."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers import pipeline
from trainers.data import Dataset, load_dataset_dir
from trainers.models import resolve_source
from tuning.config import UserError
from tuning.mlflow_store import DATA_SPLIT_TAG, default_tracking_uri, redact_uri

MLFLOW_SCHEMES = ("models:/", "runs:/")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
PLANNER, TOOLRAG, REFERENCE = pipeline.PLANNER, pipeline.TOOLRAG, pipeline.REFERENCE
EVALUATION_EXPERIMENT = "tinyagent-evaluation"


@dataclass
class ResolvedModel:
    """A model given on the command line, as a local folder, with where it came from."""

    given: str
    folder: Path
    kind: str
    registered_name: str | None = None
    registered_version: str | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        if self.registered_name:
            return f"{self.registered_name} v{self.registered_version}"
        return redact_uri(self.given)


def _mlflow_error(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def resolve_model(given: str, flag: str, tracking_uri: str, download_root: Path,
                  *, role: str) -> ResolvedModel:
    """A local checkpoint folder for `given`, to serve as `role` (trainers.pipeline.ROLE_KINDS);
    UserError (or SourceUnavailable for a hub id offline) with one line naming `flag` when it
    cannot be had or cannot serve."""
    kinds = pipeline.ROLE_KINDS[role]
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = version = run_id = None
    if given.startswith(MLFLOW_SCHEMES):
        client = MlflowClient(tracking_uri)
        match = MODEL_URI.match(given)
        try:
            if given.startswith("models:/"):
                if not match:
                    raise UserError(f"{flag} {given}: not a model URI; write models:/NAME@ALIAS or models:/NAME/VERSION")
                name = match["name"]
                found = (client.get_model_version_by_alias(name, match["alias"]) if match["alias"]
                         else client.get_model_version(name, match["version"]))
                version, run_id = str(found.version), found.run_id
                target = download_root / f"{name}-v{version}"
            else:
                run_id = given[len("runs:/"):].split("/", 1)[0]
                client.get_run(run_id)
                target = download_root / re.sub(r"[^A-Za-z0-9_.-]+", "-", given[len("runs:/"):]).strip("-")
            if not target.is_dir():  # downloaded once; a partial download is never used
                import shutil

                import mlflow

                staging = target.with_name(target.name + ".partial")
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                # download_artifacts reads models:/ URIs from the global registry, and a logged
                # model (what a search registers) from the global tracking store, not `tracking_uri`.
                mlflow.set_registry_uri(tracking_uri)
                mlflow.set_tracking_uri(tracking_uri)
                mlflow.artifacts.download_artifacts(artifact_uri=given, dst_path=str(staging),
                                                    tracking_uri=tracking_uri)
                # A models:/ URI lands as its files; a runs:/ID/PATH as a folder PATH inside.
                inner = list(staging.iterdir())
                single = inner[0] if len(inner) == 1 and inner[0].is_dir() else None
                (single if single and not pipeline.checkpoint_kind(staging) else staging).rename(target)
                shutil.rmtree(staging, ignore_errors=True)
            folder = target
        except MlflowException as error:
            raise UserError(f"{flag} {redact_uri(given)}: not found in {redact_uri(tracking_uri)} "
                            f"({_mlflow_error(error)})") from None
    else:
        local = Path(given).expanduser()
        if local.exists():
            folder = local.resolve()
        elif given.count("/") == 1 and not given.startswith((".", "/", "~")):
            folder = resolve_source(given, "model", flag)  # a hub id: fails fast offline, saying what to pass
        else:
            raise UserError(f"{flag} {given}: no such folder, and not an MLflow URI (models:/NAME@ALIAS, runs:/ID/PATH)")
    if not folder.is_dir():
        raise UserError(f"{flag} {given}: expected a checkpoint folder, found a file")
    kind = pipeline.checkpoint_kind(folder)
    if kind not in kinds:
        wanted = " or ".join(kinds)
        found = {"hf-model": "a Hugging Face model folder that is not one"}.get(kind, f"a {kind} checkpoint")
        raise UserError(f"{flag} {given}: {folder} is not a {wanted} checkpoint "
                        f"({'it is ' + found if kind else 'no planner.json, toolrag.json or config.json'})")
    return ResolvedModel(given, folder, kind, name, version, run_id)


def training_data(planner: ResolvedModel, tracking_uri: str) -> tuple[str | None, float | None, str | None]:
    """(data folder, validation fraction, data split fingerprint) the planner's search trained on,
    from its MLflow runs; Nones when the planner is not from this store."""
    if planner.run_id is None:
        return None, None, None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(planner.run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    params = client.get_run(parent_id).data.params if parent_id else {}
    fraction = params.get("val_fraction")
    return params.get("data_source"), float(fraction) if fraction else None, run.data.tags.get(DATA_SPLIT_TAG)


def load_data(args: argparse.Namespace, planner: ResolvedModel) -> tuple[Dataset, str | None]:
    """The evaluation's data and, when the planner's search recorded it, a warning if this is
    not the data it was trained on (its test examples might then have been trained on)."""
    source, fraction, split = training_data(planner, args.tracking_uri)
    folder = args.data or source
    if folder is None:
        raise UserError(f"--data: {planner.given} does not say what it was trained on; pass --data DIR, "
                        "the folder the planner's search used")
    if not Path(folder).expanduser().is_dir():
        raise UserError(f"--data {folder}: no such directory")
    dataset = load_dataset_dir(Path(folder).expanduser(), skip_invalid=args.skip_invalid,
                               val_fraction=args.val_fraction if args.val_fraction is not None else (fraction or 0.1))
    warning = None
    if split and dataset.split_fingerprint != split:
        warning = (f"[evaluate] warning: the planner was trained on another data split ({split}, this is "
                   f"{dataset.split_fingerprint}): some evaluated examples may have been in its training data")
    return dataset, warning


def record(tracking_uri: str, experiment: str, models: dict[str, ResolvedModel], params: dict[str, Any],
           *, figures: dict[str, float], rows: list[dict[str, Any]], artifact_location: str | None = None) -> str:
    """One MLflow run for the evaluation; the registered versions it names are tagged with its
    headline figures. Returns the run id."""
    import mlflow
    from mlflow import MlflowClient

    from tuning.mlflow_store import model_development_experiment

    client = MlflowClient(tracking_uri)
    experiment_id = model_development_experiment(client, experiment, artifact_location)
    run = client.create_run(experiment_id, run_name=f"pipeline-{models[PLANNER].label}".replace(" ", "-"),
                            tags={"evaluation": "pipeline"})
    run_id = run.info.run_id
    try:
        logged = dict(params)
        for role, model in models.items():
            logged[role] = redact_uri(model.given)
            if model.registered_name:
                logged[f"{role}_registered"] = f"{model.registered_name}/{model.registered_version}"
        for key, value in logged.items():
            client.log_param(run_id, key, value)
        for key, value in figures.items():
            client.log_metric(run_id, key, float(value))
        columns = {key: [json.dumps(row[key]) if isinstance(row[key], list) else row[key] for row in rows]
                   for key in rows[0]} if rows else {}
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.log_table(data=columns, artifact_file="per_example.json", run_id=run_id)
        headline = {name: f"{figures[name]:.4f} [{figures[name + '_ci_low']:.4f}, {figures[name + '_ci_high']:.4f}]"
                    for name in ("plan_success_full", "plan_success_with_toolrag")}
        headline |= {"mcnemar_full_vs_toolrag_p_value": f"{figures['mcnemar_full_vs_toolrag_p_value']:.4g}",
                     "toolrag_tool_recall": f"{figures['toolrag_tool_recall']:.4f}",
                     "prompt_token_ratio": f"{figures['prompt_token_ratio']:.3f}",
                     "examples": str(int(figures["examples"])), "run_id": run_id}
        for model in models.values():
            if model.registered_name:
                for key, value in headline.items():
                    client.set_model_version_tag(model.registered_name, model.registered_version,
                                                 f"evaluation_{key}", value)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _cell(figures: dict[str, float], name: str) -> str:
    return f"{figures[name]:.3f} [95% CI {figures[name + '_ci_low']:.3f}, {figures[name + '_ci_high']:.3f}]"


def _table(figures: dict[str, float], prefix: str, first: str, second: str, *, title: str) -> list[str]:
    cells = {cell: int(figures[f"{prefix}_{cell}"]) for cell in ("both", "first_only", "second_only", "neither")}
    return [f"  paired, {title}: both succeed {cells['both']}, only {first} {cells['first_only']}, "
            f"only {second} {cells['second_only']}, neither {cells['neither']}; "
            f"McNemar exact p = {figures[prefix + '_p_value']:.3g}"]


def format_figures(figures: dict[str, float], models: dict[str, ResolvedModel], split: str,
                   paper: dict[str, float] | None = None) -> str:
    """The evaluation's figures as printed; `paper` maps plan_success_full/_with_toolrag to the
    paper's value, shown beside them."""
    def beside(name: str) -> str:
        return f"   (paper {paper[name]:g})" if paper and name in paper else ""

    lines = [f"Pipeline evaluation on the {split} split ({int(figures['examples'])} examples): planner "
             f"{models[PLANNER].label}, ToolRAG {models[TOOLRAG].label}",
             f"  ToolRAG: tool recall {_cell(figures, 'toolrag_tool_recall')}, "
             f"{figures['toolrag_tool_count']:.2f} tools per query [{figures['toolrag_tool_count_ci_low']:.2f}, "
             f"{figures['toolrag_tool_count_ci_high']:.2f}] where the queries need {figures['toolrag_gold_tool_count']:.2f}",
             f"  plan success, full prompt:   {_cell(figures, 'plan_success_full')}{beside('plan_success_full')}",
             f"  plan success, with ToolRAG:  {_cell(figures, 'plan_success_with_toolrag')}"
             f"{beside('plan_success_with_toolrag')}"]
    lines += _table(figures, "mcnemar_full_vs_toolrag", "full prompt", "with ToolRAG",
                    title="full prompt vs with ToolRAG")
    lines.append(f"  prompt tokens per example: {figures['prompt_tokens_full']:.0f} as trained (full prompt), "
                 f"{figures['prompt_tokens_all_tools']:.0f} with all 16 tools and the dataset's examples, "
                 f"{figures['prompt_tokens_with_toolrag']:.0f} with ToolRAG "
                 f"({figures['in_context_examples']:.1f} in-context examples); all tools / ToolRAG = "
                 f"{figures['prompt_token_ratio']:.2f} (paper: 2762 / 1397 = 1.98)")
    if figures["prompts_cut_full"] or figures["prompts_cut_with_toolrag"]:
        lines.append(f"  prompts longer than the planner's max_length - max_new_tokens, cut from the start: "
                     f"{int(figures['prompts_cut_full'])} full, {int(figures['prompts_cut_with_toolrag'])} with ToolRAG")
    if "reference_plan_success_full" in figures:
        lines += [f"  reference planner {models[REFERENCE].label}:",
                  f"    plan success, full prompt:  {_cell(figures, 'reference_plan_success_full')}",
                  f"    plan success, with ToolRAG: {_cell(figures, 'reference_plan_success_with_toolrag')}"]
        for way, title in ((pipeline.FULL, "full prompt"), (pipeline.WITH_TOOLRAG, "with ToolRAG")):
            lines += ["  " + line for line in _table(figures, f"mcnemar_candidate_vs_reference_{way}", "candidate",
                                                       "reference", title=f"candidate vs reference, {title}")]
    lines.append(f"  {figures['seconds_per_100_examples']:.0f} s per 100 examples, every prompt and model included")
    return "\n".join(lines)


def examples_limit(planner_folder: Path, requested: int | None) -> int | None:
    """As many examples as the search scored on test (the planner's max_eval_examples), unless asked."""
    if requested is not None:
        return requested
    from trainers.planner import PlannerConfig

    return PlannerConfig.model_validate_json((planner_folder / "planner.json").read_text()).max_eval_examples


def evaluate(planner: ResolvedModel, toolrag: ResolvedModel, dataset: Dataset, *, split: str, tracking_uri: str,
             experiment: str, reference: ResolvedModel | None = None, reference_template: str | None = None,
             max_examples: int | None = None, paper: dict[str, float] | None = None,
             results_dir: Path | None = None) -> dict[str, float]:
    """Run the pipeline evaluation on `split`, record it, print it; returns the figures."""
    encoder = resolve_source(pipeline.ENCODER_SOURCE, "model", "the sentence encoder")
    examples = getattr(dataset, split)[:examples_limit(planner.folder, max_examples)]
    if not examples:
        raise UserError(f"--split {split}: the data has no {split} examples")
    print(f"[evaluate] {len(examples)} {split} examples; in-context examples chosen from the {len(dataset.train)} "
          "training examples", flush=True)
    result = pipeline.evaluate_pipeline(planner.folder, toolrag.folder, examples, pipeline.example_pool(dataset.train),
                                        encoder_folder=encoder, reference_folder=reference.folder if reference else None,
                                        reference_template=reference_template,
                                        progress=lambda line: print(line, flush=True),
                                        cache_dir=results_dir / "cache" / "sentence-vectors" if results_dir else None)
    models = {PLANNER: planner, TOOLRAG: toolrag} | ({REFERENCE: reference} if reference else {})
    params = {"split": split, "examples": len(examples), "data_source": dataset.source,
              "data_split": dataset.split_fingerprint, "encoder": pipeline.ENCODER_SOURCE,
              "top_k_examples": pipeline.TOP_K_EXAMPLES, "retrieval_threshold": pipeline.RETRIEVAL_THRESHOLD,
              "reference_template": reference_template or "the planner's"}
    # Beside the search's artifacts with a sqlite store (MLflow's default is ./mlruns of the cwd).
    artifacts = (results_dir / "mlartifacts").as_uri() if results_dir and tracking_uri.startswith("sqlite:") else None
    run_id = record(tracking_uri, experiment, models, params, figures=result.figures, rows=result.rows,
                    artifact_location=artifacts)
    print(format_figures(result.figures, models, split, paper), flush=True)
    print(f"[mlflow] evaluation run {run_id} in {redact_uri(tracking_uri)} (experiment {experiment}); per-example "
          "table per_example.json", flush=True)
    return result.figures


def run_evaluation(args: argparse.Namespace) -> int:
    """tuning/evaluate.py: resolve both models (and the reference), load the data, evaluate."""
    if args.max_examples is not None and args.max_examples < 1:
        raise UserError(f"--max-examples {args.max_examples}: must be at least 1")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    tracking_uri = args.tracking_uri or default_tracking_uri(args.results_dir)
    args.tracking_uri = tracking_uri
    downloads = Path(args.results_dir).expanduser().resolve() / "cache" / "models"
    planner = resolve_model(args.planner, "--planner", tracking_uri, downloads, role=PLANNER)
    toolrag = resolve_model(args.toolrag, "--toolrag", tracking_uri, downloads, role=TOOLRAG)
    reference = (resolve_model(args.reference_planner, "--reference-planner", tracking_uri, downloads, role=REFERENCE)
                 if args.reference_planner else None)
    dataset, warning = load_data(args, planner)
    if warning:
        print(warning, flush=True)
    evaluate(planner, toolrag, dataset, split=args.split, tracking_uri=tracking_uri, experiment=args.experiment_name,
             reference=reference, reference_template=args.reference_template, max_examples=args.max_examples,
             results_dir=Path(args.results_dir).expanduser().resolve())
    return 0
