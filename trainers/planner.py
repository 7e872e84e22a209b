"""Planner: LoRA fine-tuning of a causal LM to write LLMCompiler plans, on Ray Train workers.

`train_fn_per_worker` is what a `TorchTrainer` runs on each worker; it knows Ray Train but
nothing of Tune.

Per epoch every worker trains on its shard (loss on the response tokens only), then
generates plans for its slice of a fixed subset of the validation split and scores them with
TinyAgent's rule (trainers/plans.py); the counts are all-reduced so every worker reports the
same figures. That subset is the early-stopping signal. After the last epoch the best epoch's
adapter is restored and the whole validation split is scored: that is the trial's
`plan_success`, with a 95% interval, on which trials are compared. Rank 0 checkpoints the
adapter (not the base) whenever an epoch is the best so far. Workers never see the test
split: `score_checkpoint` scores a trial's best checkpoint on it once, after the search.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers import metric_names as names
from trainers import selection
from trainers.batching import PaddedBatches, all_reduce_sum, autocast, length_grouped_batches, pack_sequences, unwrap
from trainers.epoch_loop import (
    EpochCost, EpochTrainer, Evaluation, WorkerSession, adamw_with_warmup, run_epochs, steps_per_epoch,
)
from trainers.stats import paper_distance
from trainers.planner_base import compact_system_prompt
from trainers.planner_prompts import IGNORE_INDEX, PLANNER_TEMPLATES, encode_example, prompt_token_ids
from trainers.plan_generation import generate_plans, plan_metrics, score_plans
from trainers.plans import plan_success
from trainers.tools import END_OF_PLAN

# The reproduction's LoRA targets: every attention and MLP projection of a Llama block.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float
    tolerance: float = Field(gt=0)


class PlannerConfig(BaseModel):
    """Everything one planner training run needs; searched keys are fields here."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str = Field(description="Local folder with the base model's weights and tokenizer.")
    prompt_template: str = Field("instruct", description="concat, instruct or chat (see planner_prompts).")
    base_template: str = Field("instruct", description="The base's own prompt format, the one it was "
                                                       "instruction-tuned in: the untuned row is scored in it.")
    system_prompt: Literal["dataset", "compact"] = Field(
        "dataset", description="dataset: each record's own planner prompt, as the paper; compact: one short "
                               "prompt with the plan rules, for CPU-sized models (the dataset's is ~1,000 tokens).")
    max_length: int = Field(4096, ge=16, le=32768, description="Token cap per example (prompt + plan). A prompt "
                                                               "keeps its last max_length - max_new_tokens tokens, "
                                                               "in training and generation alike.")
    max_new_tokens: int = Field(256, ge=8, le=4096, description="Generation cap per plan; also the room a "
                                                                 "training example keeps for its plan.")
    learning_rate: float = Field(7e-5, gt=0, lt=1)
    batch_size: int = Field(8, ge=1, description="Global batch per optimiser step, split across workers.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward pass on a worker; smaller means "
                                                        "gradient accumulation, for memory.")
    epochs: int = Field(3, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the adapter gradients' norm (as HF Trainer "
                                                               "does by default); None turns clipping off.")
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1)
    eval_subset_size: int = Field(64, ge=1, description="Validation examples scored after each epoch (the ASHA "
                                                        "signal).")
    eval_batch_size: int = Field(32, ge=1)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1, description="Examples scored at the end of a trial, of the "
                                                                  "validation split and later of the test split "
                                                                  "(default: all).")
    sample_plans: int = Field(8, ge=0, description="Generated plans saved beside their targets per evaluation.")
    bf16: bool = Field(True, description="bf16 autocast; applies on GPU only.")
    seed: int = 0
    paper_target: Literal["plan_success", "plan_success_with_toolrag"] = Field(
        "plan_success", description="Which paper figure paper_distance measures from: 0.78 (as cited by the "
                                    "reproduction) or 0.8006 (TinyAgent-1.1B with ToolRAG).")
    targets: dict[Literal["plan_success", "plan_success_with_toolrag"], Target]

    @model_validator(mode="after")
    def _check(self) -> "PlannerConfig":
        for field in ("prompt_template", "base_template"):
            if getattr(self, field) not in PLANNER_TEMPLATES:
                raise ValueError(f"{field} {getattr(self, field)!r} is not one of {list(PLANNER_TEMPLATES)}")
        if self.paper_target not in self.targets:
            raise ValueError(f"paper_target {self.paper_target!r} has no entry in the targets")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below max_length ({self.max_length}), "
                             "which holds the prompt as well")
        return self


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:  # Llama tokenizers ship without one; pads are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_folder(model_path: Path, templates: set[str]) -> str | None:
    """Why this base cannot serve the templates a search uses, or None: the `chat` template
    needs a tokenizer with a chat template. Said before any trial fails on it."""
    config_file = Path(model_path) / "tokenizer_config.json"
    if "chat" not in templates or not config_file.exists():
        return None
    has_template = (Path(model_path) / "chat_template.jinja").exists() or bool(
        json.loads(config_file.read_text()).get("chat_template"))
    if has_template:
        return None
    return (f"{model_path}: the tokenizer has no chat template, so prompt_template 'chat' cannot be used; "
            "remove 'chat' from the search space")


def build_lora_model(config: PlannerConfig, base: torch.nn.Module | None = None):
    """The base causal LM (loaded from model_path unless given) wrapped in PEFT LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if base is None:
        base = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def planner_messages(messages: list[tuple[str, str]] | tuple, system_prompt: str) -> list[tuple[str, str]]:
    """The messages the model sees: the record's own, or with the compact system prompt."""
    if system_prompt == "dataset":
        return [tuple(m) for m in messages]
    return [("system", compact_system_prompt())] + [tuple(m) for m in messages if m[0] != "system"]


def prompt_ids(tokenizer, messages, config: PlannerConfig) -> list[int]:
    """Token ids of the generation prompt: the very prefix training puts before the plan."""
    return prompt_token_ids(tokenizer, planner_messages(messages, config.system_prompt), config.prompt_template,
                            config.max_length, max_new_tokens=config.max_new_tokens)[0]


def encode_train_split(tokenizer, examples: list[dict[str, Any]], config: PlannerConfig) -> dict[str, torch.Tensor]:
    """Packed input ids and labels (IGNORE_INDEX on prompt tokens) of the training examples, and
    `over_max_length`: how many had prompt plus target cut to fit max_length."""
    encoded = [encode_example(tokenizer, planner_messages(e["messages"], config.system_prompt), e["plan"],
                              config.prompt_template, max_length=config.max_length, max_new_tokens=config.max_new_tokens) for e in examples]
    packed = pack_sequences([e["input_ids"] for e in encoded])
    packed["labels"] = torch.tensor([label for e in encoded for label in e["labels"]], dtype=torch.int64)
    packed["over_max_length"] = torch.tensor(sum(e["over_max_length"] for e in encoded))
    return packed


class CausalLMBatches(PaddedBatches):
    """PaddedBatches whose labels are per token: padded with IGNORE_INDEX, so the loss skips them."""

    def labels_for(self, indices, starts, ends, longest) -> torch.Tensor:
        return self.padded(self.labels, starts, ends, longest, IGNORE_INDEX)


def evaluate(model, tokenizer, examples: list[dict[str, Any]], config: PlannerConfig, *, session: WorkerSession,
             per_example: bool = False):
    """Generate and score this worker's slice of `examples`; returns (whole-set metrics, samples).

    Samples are rank 0's first few (prompt question, generated plan, target, success). The
    metrics include `prompts_cut`: how many prompts lost their beginning to max_length, and with
    per_example (one worker only) each plan's success under PER_EXAMPLE_SUCCESS.
    """
    device = session.device
    mine = examples[session.rank::session.world]
    built = [prompt_token_ids(tokenizer, planner_messages(e["messages"], config.system_prompt),
                              config.prompt_template, config.max_length, max_new_tokens=config.max_new_tokens)
             for e in mine]
    prompts = [ids for ids, _ in built]
    unwrapped = unwrap(model)
    unwrapped.eval()
    predicted = generate_plans(unwrapped, tokenizer, prompts, config.max_new_tokens, batch_size=config.eval_batch_size,
                               device=device, bf16=config.bf16)
    unwrapped.train()
    targets = [e["plan"] for e in mine]
    sums = all_reduce_sum(score_plans(predicted, targets).to(device)).cpu()
    prompts_cut = all_reduce_sum(torch.tensor([float(sum(cut for _, cut in built))], device=device)).item()
    samples = [{"question": next((c for r, c in e["messages"] if r == "user"), ""), "generated": text,
                "target": e["plan"] + END_OF_PLAN, "plan_success": plan_success(text, e["plan"])}
               for e, text in list(zip(mine, predicted))[: config.sample_plans]]
    metrics = {**plan_metrics(sums), names.PROMPTS_CUT: prompts_cut}
    if per_example:
        metrics[names.PER_EXAMPLE_SUCCESS] = [int(plan_success(text, target)) for text, target in zip(predicted, targets)]
    return metrics, samples


def lora_state(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable (adapter) weights: what 'the best epoch' restores."""
    return {name: p.detach().clone() for name, p in unwrap(model).named_parameters() if p.requires_grad}


def _restore_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in unwrap(model).named_parameters():
            if name in state:
                parameter.copy_(state[name])


def _save_checkpoint(model, tokenizer, config: PlannerConfig, directory: str) -> None:
    """The adapter only, its tokenizer, and the config that names the base."""
    unwrap(model).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Path(directory, "planner.json").write_text(config.model_dump_json(indent=2))


def load_checkpoint(directory: str, trainable: bool = False):
    """(base + trained adapter, tokenizer, config) from a checkpoint folder written by a trial;
    `trainable` keeps the adapter trainable, to resume the trial."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = PlannerConfig.model_validate_json(Path(directory, "planner.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, directory, is_trainable=trainable), load_tokenizer(directory), config


class PlannerTrainer(EpochTrainer):
    """The planner's part of the epoch loop (trainers/epoch_loop.py): LoRA steps with gradient
    accumulation, generation on a validation subset per epoch, and the whole validation split
    scored with the best epoch's adapter after the last."""

    def __init__(self, config: PlannerConfig):
        super().__init__(config)
        self.targets = {config.paper_target: config.targets[config.paper_target].model_dump()}
        # The best epoch's adapter weights, restored for the whole-split score after the last epoch.
        self.best_state = None

    def prepare_data(self, fetch, data_fingerprint: str) -> None:
        config = self.config
        data = fetch()
        self.val_examples = data["val"][: config.max_eval_examples]
        self.subset = self.val_examples[: config.eval_subset_size]
        self.tokenizer = load_tokenizer(config.model_path)
        self.train_split = encode_train_split(self.tokenizer, data["train"][: config.max_train_examples], config)
        self.collate = CausalLMBatches(self.train_split, self.tokenizer.pad_token_id)
        offsets = self.train_split["offsets"]
        self.lengths = (offsets[1:] - offsets[:-1]).tolist()

    def load_model(self, directory: str):
        return load_checkpoint(directory, trainable=True)[0]

    def build(self, resumed_model) -> None:
        config = self.config
        self.model = self.session.prepare_model(resumed_model or build_lora_model(config))
        self.per_worker_batch = max(1, config.batch_size // self.world)
        self.micro = min(config.micro_batch_size, self.per_worker_batch)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        steps = steps_per_epoch(len(self.lengths), self.world, self.per_worker_batch)
        self.optimizer, self.scheduler = adamw_with_warmup(self.trainable, config.learning_rate,
                                                           config.weight_decay, config.warmup_ratio,
                                                           total_steps=steps * config.epochs)

    def restore(self, state: dict[str, Any]) -> None:
        # The checkpoint is the best epoch so far: its adapter is the best state.
        super().restore(state)
        self.best_state = lora_state(self.model)

    def train_epoch(self, epoch: int) -> EpochCost:
        model, cost = self.model, EpochCost()
        self.collate.pad_tokens = self.collate.total_tokens = 0
        for indices in length_grouped_batches(self.lengths, self.per_worker_batch, epoch, self.config.seed,
                                              rank=self.rank, world=self.world):
            self.optimizer.zero_grad(set_to_none=True)
            chunks = [indices[i : i + self.micro] for i in range(0, len(indices), self.micro)]
            for position, chunk in enumerate(chunks):
                batch = {k: v.to(self.device) for k, v in self.collate(chunk).items()}
                # Only the last micro-batch of a step all-reduces gradients across workers.
                last = position == len(chunks) - 1
                sync = model.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
                with sync, autocast(self.device, self.config.bf16):
                    loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}, step {cost.steps}")
                (loss * len(chunk) / len(indices)).backward()
                cost.loss_total += loss.item() * len(chunk) / len(indices)
            if self.config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            cost.steps += 1
        cost.pad_tokens, cost.total_tokens = self.collate.pad_tokens, self.collate.total_tokens
        return cost

    def _distance(self, metrics: dict[str, float]) -> float:
        return paper_distance({self.config.paper_target: metrics[names.PLAN_SUCCESS]}, self.targets)

    def evaluate(self, epoch: int) -> Evaluation:
        config = self.config
        metrics, samples = evaluate(self.model, self.tokenizer, self.subset, config, session=self.session)
        metrics[names.PAPER_DISTANCE] = self._distance(metrics)
        evaluation = self.best_epoch_so_far(epoch, metrics)  # on the subset: steers early stopping
        if evaluation.improved:
            self.best_state = lora_state(self.model)
        full_validation_set = epoch == config.epochs
        if full_validation_set:  # the trial's figure: the best epoch's adapter on all of validation
            if not evaluation.improved:
                _restore_lora_state(self.model, self.best_state)
            metrics, samples = evaluate(self.model, self.tokenizer, self.val_examples, config, session=self.session)
            metrics[names.PAPER_DISTANCE] = self._distance(metrics)
            self.best_key = selection.epoch_key(metrics)
            # These are the best epoch's figures, now on the whole split: the trial's own.
            metrics.update({names.BEST_PAPER_DISTANCE: self.best_key[0], names.BEST_SO_FAR: 1.0,
                            names.BEST_EPOCH: self.best_epoch})
        metrics.update({
            names.FULL_VALIDATION_SET: float(full_validation_set),
            # ASHA's signal: the best distance, ties broken by tool-set accuracy and parse rate.
            # Early on every trial scores 0 successes on the subset, and a flat signal would make
            # early stopping a coin toss; the tie-break moves the distance by 0.002 at most, less
            # than one success on the subset does.
            names.BEST_EARLY_STOP_SCORE: self.best_key[0] + 1e-3 * (self.best_key[1] + self.best_key[2]),
            names.SAMPLE_PLANS: json.dumps(samples, indent=1),
        })
        return Evaluation(metrics, evaluation.improved)

    def epoch_figures(self) -> dict[str, float]:
        return {names.EXAMPLES_OVER_MAX_LENGTH: float(self.train_split["over_max_length"]),
                names.MEAN_INPUT_TOKENS: self.train_split["flat"].numel() / max(len(self.collate), 1)}

    def save(self, directory: str) -> None:
        _save_checkpoint(self.model, self.tokenizer, self.config, directory)


def train_fn_per_worker(loop_config: dict[str, Any], session: WorkerSession | None = None) -> None:
    """Train one planner configuration; runs on every Ray Train worker.

    loop_config: {"trainer": PlannerConfig fields, "data": ObjectRef or dict of
    {"train"/"val": [{"messages": [(role, content)], "plan": str}]}, "data_fingerprint": str}.
    Reports per epoch plan_success, tool_set_accuracy (on the validation subset, or on the
    whole validation split after the last epoch, where full_validation_set is 1),
    paper_distance, best_paper_distance, train_loss and cost figures, and `sample_plans` as
    JSON text.
    """
    run_epochs(PlannerTrainer(PlannerConfig.model_validate(loop_config["trainer"])), loop_config, session)


def untuned_config(trainer_settings: dict[str, Any]) -> PlannerConfig:
    """How the base is scored before any LoRA, as the paper's untuned row: the dataset's own
    system prompt (tool list and in-context examples), since a base that was never tuned on the
    task knows the tools only from there; the base's own format (`base_template`: `instruct` for
    TinyLlama-1.1B-32k-Instruct and the laptop base, `chat` for SmolLM2); and room for the whole
    prompt up to the base's context length."""
    from transformers import AutoConfig

    settings = {**trainer_settings, "system_prompt": "dataset"}
    settings["prompt_template"] = settings.get("base_template", PlannerConfig.model_fields["base_template"].default)
    context = getattr(AutoConfig.from_pretrained(settings["model_path"]), "max_position_embeddings", None)
    if context:
        settings["max_length"] = max(settings.get("max_length", 0), context)
    return PlannerConfig.model_validate(settings)


def score_untuned_base(trainer_settings: dict[str, Any], split: list[dict[str, Any]],
                       device: torch.device | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The base model, no adapter, scored on held-out examples under `untuned_config`:
    (metrics with PER_EXAMPLE_SUCCESS and paper_distance, sample plans)."""
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    config = untuned_config(trainer_settings)
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32).to(device).eval()
    metrics, samples = evaluate(model, load_tokenizer(config.model_path), split[: config.max_eval_examples], config,
                                session=WorkerSession.alone(device), per_example=True)
    target = {config.paper_target: config.targets[config.paper_target].model_dump()}
    metrics[names.PAPER_DISTANCE] = paper_distance({config.paper_target: metrics[names.PLAN_SUCCESS]}, target)
    return metrics, samples


def score_checkpoint(directory: str, split: list[dict[str, Any]], device: torch.device | None = None,
                     max_examples: int | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A trial's checkpoint scored on held-out examples (the test split, once per trial, after
    the search): (metrics, sample plans). Metrics are `plan_metrics` plus `paper_distance` from
    the checkpoint's own paper target and each plan's success (PER_EXAMPLE_SUCCESS); `max_examples` defaults to the checkpoint's
    max_eval_examples, so test is scored on as many examples as validation was."""
    device = device or torch.device("cpu")
    model, tokenizer, config = load_checkpoint(directory)
    model.to(device)
    limit = max_examples if max_examples is not None else config.max_eval_examples
    metrics, samples = evaluate(model, tokenizer, split[:limit], config, session=WorkerSession.alone(device),
                                per_example=True)
    target = {config.paper_target: config.targets[config.paper_target].model_dump()}
    metrics[names.PAPER_DISTANCE] = paper_distance({config.paper_target: metrics[names.PLAN_SUCCESS]}, target)
    return metrics, samples
