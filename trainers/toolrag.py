"""ToolRAG: a 16-way multi-label classifier over user queries, trained on Ray Train workers.

`train_fn_per_worker` is what a `TorchTrainer` runs on each worker. It knows Ray Train
(context, report, checkpoint) but nothing of Tune: the search driver wraps it.

Per epoch every worker trains on its shard, then scores its slice of the validation split;
the sums are all-reduced so each worker reports the metrics of the whole split. Rank 0 writes
a checkpoint only when the epoch is the best so far, and the run keeps one checkpoint. Workers
never see the test split: `score_checkpoint` scores a trial's best checkpoint on it once,
after the search.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers import metric_names as names
from trainers.batching import (
    PaddedBatches, all_reduce_sum, autocast, length_grouped_batches, pack_sequences, unwrap,
)
from trainers.epoch_loop import (
    EpochCost, EpochTrainer, Evaluation, WorkerSession, adamw_with_warmup, run_epochs, steps_per_epoch,
)
from trainers.stats import ToolRetrievalCounts, paper_distance
from trainers.models import config_from_dict
from trainers.tools import NUM_TOOLS, TOOL_NAMES

# How the query is shown to the encoder. `query` is the paper's input; `question` is the
# user message exactly as the planner receives it; `instruction` states the task, which
# gives a small pretrained encoder a cue that the inputs are requests for actions.
TOOLRAG_TEMPLATES: dict[str, str] = {
    "query": "{query}",
    "question": "Question: {query}",
    "instruction": "Which tools does this request need? {query}",
}


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float
    tolerance: float = Field(gt=0)
    relative_to: Literal["gold_tool_count"] | None = Field(
        None, description="Measure from this figure of the scored examples plus `value` (see "
                          "trainers/stats.py: target_value).")


class ToolRAGConfig(BaseModel):
    """Everything one ToolRAG training run needs; searched keys are fields here."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str = Field(description="Local folder with weights and tokenizer, or with the tokenizer only when `architecture` is set.")
    pooling: Literal["model", "mean"] = Field(
        "model", description="model: the checkpoint's own sequence-classification head (DeBERTa's CLS pooler, "
                             "as the paper and the released ToolRAG); mean: a linear head on mean-pooled tokens, "
                             "which suits encoders trained as sentence embedders (MiniLM).")
    architecture: dict[str, Any] | None = Field(None, description="Build this config with random weights instead of loading weights.")
    num_hidden_layers: int | None = Field(None, ge=1, description="Keep only the first N encoder layers (speed on CPU).")
    freeze_word_embeddings: bool = Field(
        False, description="Keep the pretrained token embeddings fixed: on CPU, AdamW's update of a 30k x 384 "
                           "table was half of every step, and a few thousand queries cannot improve it.")
    max_length: int = Field(512, ge=8, le=4096, description="Token cap per input; the paper uses 512.")
    prompt_template: str = "query"
    pos_weight: float = Field(1.0, gt=0, description="Weight of positive labels in BCEWithLogitsLoss, same for all 16.")
    learning_rate: float = Field(4e-5, gt=0, lt=1)
    batch_size: int = Field(128, ge=1, description="Global batch size, split across workers.")
    length_grouping: int = Field(16, ge=1, description="Batches whose inputs are sorted together by length, so a "
                                                      "batch pads little; 1 keeps the shuffled order.")
    epochs: int = Field(6, ge=1)
    warmup_ratio: float = Field(0.33, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)
    eval_batch_size: int = Field(128, ge=1)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1, description="Cap on the validation examples scored per "
                                                                  "epoch, and on the test examples scored once.")
    bf16: bool = Field(True, description="bf16 autocast; applies on GPU only.")
    seed: int = 0
    cache_dir: str = Field(description="Node-local folder for tokenized data, shared by the trials on a node.")
    targets: dict[Literal["tool_recall", "tool_count"], Target]

    @model_validator(mode="after")
    def _check(self) -> "ToolRAGConfig":
        if self.prompt_template not in TOOLRAG_TEMPLATES:
            raise ValueError(f"prompt_template {self.prompt_template!r} is not one of {sorted(TOOLRAG_TEMPLATES)}")
        return self


class MeanPooledClassifier(torch.nn.Module):
    """Encoder + mean over non-pad tokens + one linear layer; the output has `.logits` like HF's.

    Saved as the encoder's own folder plus `tool_head.pt`, so `from_checkpoint` rebuilds it.
    """

    HEAD_FILE = "tool_head.pt"

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, NUM_TOOLS)
        self.config = encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))

    def save_pretrained(self, directory: str) -> None:
        self.encoder.save_pretrained(directory)
        torch.save(self.classifier.state_dict(), Path(directory) / self.HEAD_FILE)

    @classmethod
    def from_checkpoint(cls, directory: str) -> "MeanPooledClassifier":
        from transformers import AutoModel

        model = cls(AutoModel.from_pretrained(directory))
        model.classifier.load_state_dict(torch.load(Path(directory) / cls.HEAD_FILE, weights_only=True))
        return model


def build_classifier(config: ToolRAGConfig) -> torch.nn.Module:
    """A classifier with 16 sigmoid outputs in TOOL_NAMES order, from weights or from config."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    labels = {"num_labels": NUM_TOOLS, "problem_type": "multi_label_classification",
              "id2label": dict(enumerate(TOOL_NAMES)), "label2id": {n: i for i, n in enumerate(TOOL_NAMES)}}
    auto_class = AutoModelForSequenceClassification if config.pooling == "model" else AutoModel
    if config.architecture is not None:
        model = auto_class.from_config(config_from_dict({**config.architecture, **labels}))
    else:
        overrides = dict(labels)
        if config.num_hidden_layers is not None:
            overrides["num_hidden_layers"] = config.num_hidden_layers
        model_config = AutoConfig.from_pretrained(config.model_path, **overrides)
        model = auto_class.from_pretrained(config.model_path, config=model_config)
    return model if config.pooling == "model" else MeanPooledClassifier(model)


def apply_freezing(model: torch.nn.Module, config: ToolRAGConfig) -> torch.nn.Module:
    """Fix the token embeddings when the config says so (a new model or one resumed from a
    checkpoint alike, so a resumed optimizer finds the parameters it was saved with)."""
    if config.freeze_word_embeddings:
        encoder = model.encoder if isinstance(model, MeanPooledClassifier) else model
        encoder.get_input_embeddings().weight.requires_grad_(False)
    return model


def load_checkpoint(directory: str) -> tuple[torch.nn.Module, ToolRAGConfig]:
    """A trained classifier and its config from a checkpoint folder written by a trial."""
    from transformers import AutoModelForSequenceClassification

    config = ToolRAGConfig.model_validate_json(Path(directory, "toolrag.json").read_text())
    if config.pooling == "mean":
        return MeanPooledClassifier.from_checkpoint(directory), config
    return AutoModelForSequenceClassification.from_pretrained(directory), config


def render_inputs(queries: list[str], template: str) -> list[str]:
    return [TOOLRAG_TEMPLATES[template].format(query=query) for query in queries]


def _token_cache_path(config: ToolRAGConfig, data_fingerprint: str) -> Path:
    key = "|".join([data_fingerprint, os.path.abspath(config.model_path), config.prompt_template,
                    str(config.max_length), str(config.max_train_examples), str(config.max_eval_examples)])
    return Path(config.cache_dir) / f"toolrag-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def load_cached_tokens(config: ToolRAGConfig, data_fingerprint: str) -> dict[str, Any] | None:
    """The cached token ids for this (data, tokenizer, template, cap), or None on a miss."""
    cache_path = _token_cache_path(config, data_fingerprint)
    return torch.load(cache_path, weights_only=True) if cache_path.exists() else None


def tokenize_splits(config: ToolRAGConfig, data: dict[str, Any], data_fingerprint: str) -> dict[str, Any]:
    """Token ids per split, computed once per (data, tokenizer, template, cap) and cached on disk.

    Returns {"pad_id": Tensor, "train": {"flat", "offsets", "labels"}, "val": {...}}.
    Concurrent trials may both miss the cache; each writes a temp file and renames it, so a
    reader never sees half a file.
    """
    cached = load_cached_tokens(config, data_fingerprint)
    if cached is not None:
        return cached
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    limits = {"train": config.max_train_examples, "val": config.max_eval_examples}
    encoded: dict[str, Any] = {"pad_id": torch.tensor(int(tokenizer.pad_token_id or 0))}
    for split in ("train", "val"):
        encoded[split] = _encode(tokenizer, data[split], config, limits[split])
    cache_path = _token_cache_path(config, data_fingerprint)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
    os.close(handle)
    torch.save(encoded, temp_name)
    os.replace(temp_name, cache_path)
    return encoded


def _encode(tokenizer, split: dict[str, list], config: ToolRAGConfig, limit: int | None) -> dict[str, torch.Tensor]:
    """Packed token ids and label rows of one split's first `limit` queries."""
    queries, labels = split["queries"][:limit], split["labels"][:limit]
    ids = tokenizer(render_inputs(queries, config.prompt_template), truncation=True,
                    max_length=config.max_length)["input_ids"]
    return {**pack_sequences(ids), "labels": torch.tensor(labels, dtype=torch.float32).reshape(-1, NUM_TOOLS)}


def _evaluate(model, split: dict[str, Any], pad_id: int, config: ToolRAGConfig, *, session: WorkerSession,
              per_example: bool = False):
    """Score this worker's slice of the held-out set and all-reduce the sums; with per_example
    (one worker only), also each example's recall hit under PER_EXAMPLE_SUCCESS."""
    device = session.device
    collate = PaddedBatches(split, pad_id)
    mine = list(range(session.rank, len(collate), session.world))
    counts = ToolRetrievalCounts.zeros()
    if per_example:
        counts.hits = []
    model.eval()
    with torch.no_grad(), autocast(device, config.bf16):
        for start in range(0, len(mine), config.eval_batch_size):
            batch = collate(mine[start : start + config.eval_batch_size])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            counts.update(torch.sigmoid(logits.float()), batch["labels"], config.threshold)
    model.train()
    counts.sums = all_reduce_sum(counts.sums.to(device)).cpu()
    metrics = counts.metrics()
    if per_example:
        metrics[names.PER_EXAMPLE_SUCCESS] = counts.hits
    return metrics


def _save_checkpoint(model, tokenizer, config: ToolRAGConfig, directory: str) -> None:
    unwrap(model).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Path(directory, "toolrag.json").write_text(config.model_dump_json(indent=2))


class ToolRAGTrainer(EpochTrainer):
    """The transformer ToolRAG's part of the epoch loop (trainers/epoch_loop.py)."""

    def __init__(self, config: ToolRAGConfig):
        super().__init__(config)
        self.targets = {name: target.model_dump() for name, target in config.targets.items()}
        self.checkpoint_tokenizer = None

    def prepare_data(self, fetch, data_fingerprint: str) -> None:
        # On a cache hit the raw queries are not even fetched from the object store.
        encoded = load_cached_tokens(self.config, data_fingerprint)
        self.encoded = encoded if encoded is not None else tokenize_splits(self.config, fetch(), data_fingerprint)
        self.pad_id = int(self.encoded["pad_id"])
        self.collate = PaddedBatches(self.encoded["train"], self.pad_id)
        offsets = self.encoded["train"]["offsets"]
        self.lengths = (offsets[1:] - offsets[:-1]).tolist()

    def load_model(self, directory: str):
        return load_checkpoint(directory)[0]

    def build(self, resumed_model) -> None:
        config = self.config
        self.model = self.session.prepare_model(apply_freezing(resumed_model or build_classifier(config), config))
        self.per_worker_batch = max(1, config.batch_size // self.world)
        steps = steps_per_epoch(len(self.lengths), self.world, self.per_worker_batch)
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer, self.scheduler = adamw_with_warmup(trainable, config.learning_rate,
                                                           config.weight_decay, config.warmup_ratio,
                                                           total_steps=steps * config.epochs)
        self.loss_fn = torch.nn.BCEWithLogitsLoss(
            pos_weight=torch.full((NUM_TOOLS,), config.pos_weight, device=self.device))

    def train_epoch(self, epoch: int) -> EpochCost:
        cost = EpochCost()
        self.collate.pad_tokens = self.collate.total_tokens = 0
        for indices in length_grouped_batches(self.lengths, self.per_worker_batch, epoch, self.config.seed,
                                              rank=self.rank, world=self.world, group=self.config.length_grouping):
            batch = self.collate(indices)
            with autocast(self.device, self.config.bf16):
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).logits
            loss = self.loss_fn(logits.float(), batch["labels"].to(self.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}, batch {cost.steps}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            cost.loss_total += loss.item()
            cost.steps += 1
        cost.pad_tokens, cost.total_tokens = self.collate.pad_tokens, self.collate.total_tokens
        return cost

    def evaluate(self, epoch: int) -> Evaluation:
        metrics = _evaluate(self.model, self.encoded["val"], self.pad_id, self.config, session=self.session)
        metrics[names.PAPER_DISTANCE] = paper_distance(metrics, self.targets)
        return self.best_epoch_so_far(epoch, metrics)

    def epoch_figures(self) -> dict[str, float]:
        return {names.MEAN_INPUT_TOKENS: self.encoded["train"]["flat"].numel() / max(len(self.collate), 1)}

    def save(self, directory: str) -> None:
        if self.checkpoint_tokenizer is None:  # loaded once, and only by the rank that saves
            from transformers import AutoTokenizer

            self.checkpoint_tokenizer = AutoTokenizer.from_pretrained(self.config.model_path)
        _save_checkpoint(self.model, self.checkpoint_tokenizer, self.config, directory)


def train_fn_per_worker(loop_config: dict[str, Any], session: WorkerSession | None = None) -> None:
    """Train one ToolRAG configuration; runs on every Ray Train worker.

    loop_config: {"trainer": ToolRAGConfig fields, "data": ObjectRef or dict of
    {"train"/"val": {"queries": [...], "labels": [[16 floats]]}}, "data_fingerprint": str}.
    Reports per epoch, on the validation split: tool_recall, tool_count (with 95% CIs),
    precision, per-tool recall, paper_distance, best_paper_distance and cost figures; rank 0
    attaches a checkpoint when the epoch is the best so far.
    """
    run_epochs(ToolRAGTrainer(ToolRAGConfig.model_validate(loop_config["trainer"])), loop_config, session)


def score_checkpoint(directory: str, split: dict[str, list], device: torch.device | None = None,
                     max_examples: int | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A trial's checkpoint scored on held-out queries (the test split, once per trial, after the
    search): (metrics, no samples). `split` is {"queries", "labels"}; metrics are those of an
    epoch plus `paper_distance` from the checkpoint's own targets, and each query's recall hit
    (PER_EXAMPLE_SUCCESS). `max_examples` defaults to
    the checkpoint's max_eval_examples, so test is scored on as many examples as validation."""
    from transformers import AutoTokenizer

    device = device or torch.device("cpu")
    model, config = load_checkpoint(directory)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    limit = max_examples if max_examples is not None else config.max_eval_examples
    encoded = _encode(tokenizer, split, config, limit)
    metrics = _evaluate(model, encoded, int(tokenizer.pad_token_id or 0), config, session=WorkerSession.alone(device),
                        per_example=True)
    metrics[names.PAPER_DISTANCE] = paper_distance(metrics, {k: t.model_dump() for k, t in config.targets.items()})
    return metrics, []


def predict_probabilities(directory: str, queries: list[str], device: torch.device | None = None,
                          batch_size: int = 64) -> torch.Tensor:
    """[n, 16] probability that each tool is needed (columns in TOOL_NAMES order), from a
    checkpoint folder, for queries rendered by the checkpoint's own template."""
    from transformers import AutoTokenizer

    device = device or torch.device("cpu")
    model, config = load_checkpoint(directory)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = render_inputs(queries, config.prompt_template)
    chunks = []
    with torch.no_grad(), autocast(device, config.bf16):
        for start in range(0, len(inputs), batch_size):
            batch = tokenizer(inputs[start : start + batch_size], truncation=True, max_length=config.max_length,
                              padding=True, return_tensors="pt")
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            chunks.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(chunks) if chunks else torch.zeros((0, NUM_TOOLS))
