"""How the laptop planner learns: validation plan_success per epoch, on the same examples, for
LoRA on the local base, LoRA on a base that read only the prompts (the earlier recipe), full
fine-tuning, and the untuned base; with CPU seconds per epoch.

    python bench/planner_learning.py [--seed 0] [--epochs N] [--val 100]
        [--runs untuned,lora,lora-prompts-only,full,lora-embeddings] [--templates instruct,concat,chat]
        [--set KEY=VALUE ...] [--build JSON] [--architecture JSON]

Each run is the planner's own trainer (trainers/planner.py: PlannerTrainer, the epoch loop every
trial runs) in this process, one CPU thread, with the local preset's trainer settings unless a
flag says otherwise; `full` swaps the LoRA adapter for full fine-tuning of the same base.
Bases are built (or taken from --cache) as the search builds them. The figures are on the first
--val validation examples of the default generated data, scored with TinyAgent's rule.
`--build '{"snake_case_task": false}'` builds the base without its identifier task, and
`lora-embeddings` trains the embeddings beside the adapter: the two measurements behind the
base's recipe (README, "The laptop base"). Each run prints every epoch as it ends; with the
defaults the whole bench takes about an hour on 2 cores, the base build included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from trainers import metric_names as names  # noqa: E402
from trainers import planner, planner_base, synthetic  # noqa: E402
from trainers.data import load_dataset_dir, message_plan_split  # noqa: E402
from trainers.epoch_loop import WorkerSession, run_epochs  # noqa: E402

LOCAL_PRESET = PROJECT / "search_spaces" / "presets" / "planner" / "local.yaml"
TARGETS = {"plan_success": {"value": 0.78, "tolerance": 0.03}}


class CollectingSession(WorkerSession):
    """One CPU worker in this process that keeps every epoch's report."""

    def __init__(self, name: str):
        self.name, self.reports = name, []

    def get_checkpoint(self):
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(metrics)
        print(f"  {self.name}, epoch {int(metrics[names.EPOCH])}: plan_success {metrics[names.PLAN_SUCCESS]:.3f}, "
              f"parse {metrics[names.PLAN_PARSE_RATE]:.2f}, loss {metrics[names.TRAIN_LOSS]:.3f}, "
              f"{metrics[names.CPU_SECONDS]:.0f} CPU s so far", flush=True)


class LoRAWithEmbeddings(planner.PlannerTrainer):
    """LoRA plus trainable token embeddings (tied to the output layer here): not the paper's
    recipe; it shows how much of what LoRA cannot learn sits in the embeddings."""

    def build(self, resumed_model) -> None:
        model = planner.build_lora_model(self.config)
        for name, parameter in model.named_parameters():
            if "embed_tokens" in name:
                parameter.requires_grad_(True)
        super().build(model)


class FullFineTuning(planner.PlannerTrainer):
    """The planner trainer with every weight trained instead of a LoRA adapter."""

    def build(self, resumed_model) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.config.model_path, dtype=torch.float32)
        super().build(model)


def run(name: str, trainer_class, trainer_settings: dict[str, Any], data: dict[str, Any]) -> list[dict[str, Any]]:
    config = planner.PlannerConfig.model_validate(trainer_settings)
    session = CollectingSession(name)
    run_epochs(trainer_class(config), {"trainer": config.model_dump(), "data": data, "data_fingerprint": "bench"},
               session)
    return session.reports


def prompts_only_base(target: Path, dataset, architecture: dict[str, Any],
                      settings: planner_base.BaseBuildSettings) -> Path:
    """The earlier recipe: pre-trained on the dataset's system prompts and questions only (it
    read the prompts' in-context examples, and never wrote a plan)."""
    if (target / "config.json").exists():
        return target
    systems = sorted({c for e in dataset.train for r, c in e.messages if r == "system"}
                     | {planner_base.compact_system_prompt()})
    corpus = [s for s in systems for _ in range(24)] + planner_base.questions_of(dataset.train)
    tokenizer = planner_base.train_tokenizer(corpus, settings.vocab_size)
    model = planner_base.random_model(tokenizer, architecture, settings.seed)
    rows = planner_base.packed_rows(planner_base.document_pieces(tokenizer, corpus), settings.sequence_length,
                                    settings.seed)
    planner_base.train_causal_lm(model, *rows, settings.pretrain_epochs + settings.instruction_epochs,
                                 learning_rate=settings.learning_rate, batch_size=settings.batch_size,
                                 seed=settings.seed, stage="prompts-only pre-training")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: the local preset's")
    parser.add_argument("--train", type=int, default=None, help="training examples (default: the preset's)")
    parser.add_argument("--val", type=int, default=100, help="validation examples scored each epoch")
    parser.add_argument("--runs", default="untuned,lora,lora-prompts-only,full",
                        help="comma-separated: untuned, lora, lora-prompts-only, full, lora-embeddings")
    parser.add_argument("--templates", default="instruct", help="comma-separated prompt templates for lora")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trainer setting (YAML value), e.g. --set learning_rate=3e-3")
    parser.add_argument("--architecture", default=None, help="JSON of architecture fields to override")
    parser.add_argument("--build", default=None, help="JSON of build_base fields to override")
    parser.add_argument("--full-learning-rate", type=float, default=2e-3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "planner-learning-cache")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here too")
    args = parser.parse_args()

    preset = yaml.safe_load(LOCAL_PRESET.read_text())
    architecture = {**preset["model"]["architecture"], **json.loads(args.architecture or "{}")}
    settings = planner_base.BaseBuildSettings.model_validate({**preset["model"]["build_base"], "seed": args.seed,
                                                              **json.loads(args.build or "{}")})
    data_dir = args.cache / f"data-seed{args.seed}"
    if not synthetic.is_generated(data_dir):
        synthetic.write_dataset(data_dir, preset["data"]["synthetic_train"], preset["data"]["synthetic_test"],
                                args.seed)
    dataset = load_dataset_dir(data_dir)
    val = message_plan_split(dataset.val)[: args.val]
    data = {"train": message_plan_split(dataset.train), "val": val}
    trainer_settings = {**preset["trainer"], "targets": TARGETS, "seed": args.seed, "max_eval_examples": args.val,
                        "eval_subset_size": args.val, "sample_plans": 0}
    trainer_settings.update(yaml.safe_load(Path(PROJECT / "search_spaces" / "planner-local.yaml").read_text())
                            ["warm_start"][0])
    for override in args.set:
        key, value = override.split("=", 1)
        trainer_settings[key] = yaml.safe_load(value)
    if args.epochs:
        trainer_settings["epochs"] = args.epochs
    if args.train:
        trainer_settings["max_train_examples"] = args.train
    runs = args.runs.split(",")

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)  # the base is built on every core, as the search builds it
    base = planner_base.build_base_from_examples(
        planner_base.base_cache_dir(args.cache, dataset.split_fingerprint, architecture, settings), dataset.train,
        architecture, settings, progress=lambda line: print(line, flush=True))
    print(f"base: {base} ({time.perf_counter() - started:.0f} s here; build time in base.json: "
          f"{json.loads((base / 'base.json').read_text())['build_seconds']:.0f} s)", flush=True)
    torch.set_num_threads(1)  # each run trains on one core, as a trial does
    results: dict[str, Any] = {"architecture": architecture, "settings": settings.model_dump(),
                               "trainer": trainer_settings, "val_examples": len(val), "curves": {}}

    def curve(name: str, reports: list[dict[str, Any]]) -> None:
        cpu = [r[names.CPU_SECONDS] for r in reports]
        per_epoch = [b - a for a, b in zip([0.0] + cpu, cpu)]
        results["curves"][name] = {"plan_success": [r[names.PLAN_SUCCESS] for r in reports],
                                   "parse_rate": [r[names.PLAN_PARSE_RATE] for r in reports],
                                   "train_loss": [r[names.TRAIN_LOSS] for r in reports],
                                   "cpu_seconds_per_epoch": per_epoch}
        print(f"{name:32s} plan_success per epoch: "
              + " ".join(f"{r[names.PLAN_SUCCESS]:.3f}" for r in reports)
              + f" | parse {reports[-1][names.PLAN_PARSE_RATE]:.2f} | loss "
              + " ".join(f"{r[names.TRAIN_LOSS]:.3f}" for r in reports)
              + f" | CPU s/epoch median {statistics.median(per_epoch):.0f}", flush=True)

    if "untuned" in runs:  # as the search's untuned row scores it: the dataset's own prompt
        metrics, _ = planner.score_untuned_base({**trainer_settings, "model_path": str(base)}, val)
        results["curves"]["untuned base"] = {"plan_success": [metrics[names.PLAN_SUCCESS]],
                                             "parse_rate": [metrics[names.PLAN_PARSE_RATE]],
                                             "prompts_cut": metrics[names.PROMPTS_CUT]}
        print(f"{'untuned base (dataset prompt)':32s} plan_success {metrics[names.PLAN_SUCCESS]:.3f} "
              f"| parse {metrics[names.PLAN_PARSE_RATE]:.2f} | prompts cut to the context "
              f"{metrics[names.PROMPTS_CUT]:.0f} of {len(val)}", flush=True)
    if "lora" in runs:
        for template in args.templates.split(","):
            name = f"LoRA, local base, {template}"
            curve(name, run(name, planner.PlannerTrainer,
                            {**trainer_settings, "model_path": str(base), "prompt_template": template}, data))
    if "lora-embeddings" in runs:
        name = "LoRA + embeddings, local base"
        curve(name, run(name, LoRAWithEmbeddings, {**trainer_settings, "model_path": str(base)}, data))
    if "lora-prompts-only" in runs:
        old = prompts_only_base(args.cache / f"prompts-only-{base.name}", dataset, architecture, settings)
        name = "LoRA, prompts-only base"
        curve(name, run(name, planner.PlannerTrainer, {**trainer_settings, "model_path": str(old)}, data))
    if "full" in runs:
        name = "full fine-tuning, local base"
        curve(name, run(name, FullFineTuning, {**trainer_settings, "model_path": str(base),
                                               "learning_rate": args.full_learning_rate}, data))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
