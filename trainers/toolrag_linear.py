"""A linear ToolRAG: TF-IDF features and one logistic regression per tool.

The reproduction's hunch is that picking tools is mostly a matter of words: if "send email"
is in the query, send_email is needed. A linear classifier over word and character n-grams
tests that hunch at a fraction of the transformer's cost, and gives the transformer a floor
it has to beat.

It mirrors `trainers.toolrag` wherever the two can be compared: the same splits
({"queries", "labels"} with 16-float label rows in TOOL_NAMES order), the same prompt
templates, the same 0.5 threshold and metric names (`ToolRetrievalCounts`, `paper_distance`),
and the transformer's BCE `pos_weight` becomes the weight of the positive class of every
per-tool regression. `train_loss` is the positive-weighted cross-entropy averaged as
`BCEWithLogitsLoss` averages it, so the two trainers' losses sit on one scale.

Fitting is one pass of scikit-learn. In a search it runs on a Ray Train worker through the
same epoch loop as the transformer (`train_fn_per_worker`), as an epoch of one fit; the rest of
the module needs no Ray.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import FeatureUnion, Pipeline

from trainers import metric_names as names
from trainers.epoch_loop import EpochCost, EpochTrainer, Evaluation, WorkerSession, run_epochs
from trainers.stats import ToolRetrievalCounts, paper_distance
from trainers.toolrag import TOOLRAG_TEMPLATES, Target, render_inputs
from trainers.tools import NUM_TOOLS

CONFIG_FILE = "toolrag_linear.json"
PIPELINE_FILE = "pipeline.skops"

# Probabilities are kept this far from 0 and 1 before taking logs, so a tool the classifier
# is certain about (a tool never positive in training gets exactly 0) adds a finite loss.
PROBABILITY_CLIP = 1e-12

# Every type a saved pipeline may contain, as skops names them ("module.Class"). Listed from
# the skops schemas of pipelines fitted with and without character features, with and
# without `max_features`, with pos_weight 1 and 30, and with a tool that is never (or always)
# positive in training (scikit-learn 1.9, skops 0.16). A checkpoint holding any other type is
# refused before skops builds a single object: a checkpoint folder may come from anywhere
# (cloud storage, a colleague), and loading must not be a way to run someone else's code.
CHECKPOINT_TYPES: frozenset[str] = frozenset({
    "builtins.dict",
    "builtins.int",
    "builtins.list",
    "builtins.str",
    "builtins.tuple",
    "numpy.float64",
    "numpy.int64",
    "numpy.ndarray",
    "sklearn.feature_extraction.text.TfidfTransformer",
    "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.multiclass.OneVsRestClassifier",
    # What OneVsRestClassifier keeps for a tool whose training labels are all 0 (or all 1).
    "sklearn.multiclass._ConstantPredictor",
    "sklearn.pipeline.FeatureUnion",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._label.LabelBinarizer",
})


class LinearToolRAGConfig(BaseModel):
    """Everything one linear ToolRAG run needs; searched keys are fields here."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt_template: str = Field("query", description="Key of TOOLRAG_TEMPLATES; how the query is rendered "
                                                      "before it is cut into n-grams.")
    pos_weight: float = Field(1.0, gt=0, description="Weight of the positive class in every tool's regression, "
                                                     "as the transformer's BCE pos_weight: above 1 it trades "
                                                     "precision for recall.")
    C: float = Field(1.0, gt=0, description="Inverse L2 regularisation strength of each regression.")
    word_ngram_max: int = Field(2, ge=1, le=4, description="Word n-grams of length 1 to this.")
    char_ngram_min: int = Field(2, ge=1, le=8, description="Shortest character n-gram (within word boundaries).")
    char_ngram_max: int = Field(5, ge=0, le=8, description="Longest character n-gram; 0 drops character features.")
    max_features: int | None = Field(None, ge=1, description="Keep only the N most frequent n-grams, per vectorizer.")
    max_iter: int = Field(1000, ge=10, description="Solver iteration cap of each regression.")
    threshold: float = Field(0.5, gt=0, lt=1, description="A tool is retrieved when its probability is above this.")
    epochs: int = Field(1, ge=1, le=1, description="Always 1: a logistic regression is fitted in one pass. The field "
                                                   "exists so schedulers and reports that count epochs treat this "
                                                   "model like the transformer.")
    max_train_examples: int | None = Field(None, ge=1, description="Fit on the first N training examples only.")
    max_eval_examples: int | None = Field(None, ge=1, description="Cap on the validation examples scored, and on "
                                                                  "the test examples scored once.")
    seed: int = 0
    targets: dict[Literal["tool_recall", "tool_count"], Target]

    @model_validator(mode="after")
    def _check(self) -> "LinearToolRAGConfig":
        if self.prompt_template not in TOOLRAG_TEMPLATES:
            raise ValueError(f"prompt_template {self.prompt_template!r} is not one of {sorted(TOOLRAG_TEMPLATES)}")
        if self.char_ngram_max != 0 and self.char_ngram_max < self.char_ngram_min:
            raise ValueError(f"char_ngram_max ({self.char_ngram_max}) must be 0 (no character features) or at "
                             f"least char_ngram_min ({self.char_ngram_min})")
        return self


def build_pipeline(config: LinearToolRAGConfig) -> Pipeline:
    """An unfitted TF-IDF + one-vs-rest logistic regression pipeline for this config."""
    vectorizers: list[tuple[str, TfidfVectorizer]] = [
        ("words", TfidfVectorizer(ngram_range=(1, config.word_ngram_max), sublinear_tf=True, lowercase=True,
                                  max_features=config.max_features)),
    ]
    if config.char_ngram_max != 0:
        # char_wb n-grams stop at word edges: they catch inflections ("email", "emailed") and
        # typos that whole-word features miss, without gluing neighbouring words together.
        vectorizers.append(
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(config.char_ngram_min, config.char_ngram_max),
                                      sublinear_tf=True, lowercase=True, max_features=config.max_features)))
    regression = LogisticRegression(C=config.C, class_weight={0: 1.0, 1: config.pos_weight}, max_iter=config.max_iter,
                                    solver="liblinear", random_state=config.seed)
    return Pipeline([("features", FeatureUnion(vectorizers)), ("classifier", OneVsRestClassifier(regression))])


def _label_matrix(labels: list[list[float]]) -> np.ndarray:
    """Label rows as an [n, 16] 0/1 integer matrix; refuses anything else by shape and value."""
    matrix = np.asarray(labels, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != NUM_TOOLS:
        raise ValueError(f"labels must be rows of {NUM_TOOLS} values, got shape {matrix.shape}")
    if not np.isin(matrix, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return matrix.astype(np.int64)


def weighted_cross_entropy(probabilities: np.ndarray, labels: np.ndarray, pos_weight: float) -> float:
    """Mean over examples and tools of -(pos_weight * y * log p + (1 - y) * log(1 - p)).

    The figure `torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((16,), pos_weight))` gives for
    logits log(p / (1 - p)), so it compares with the transformer trainer's train_loss.
    """
    clipped = np.clip(probabilities, PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    per_label = -(pos_weight * labels * np.log(clipped) + (1.0 - labels) * np.log1p(-clipped))
    return float(per_label.mean())


def fit(config: LinearToolRAGConfig, queries: list[str], labels: list[list[float]]) -> tuple[Pipeline, float]:
    """A fitted pipeline on the first `max_train_examples` queries, and its training loss."""
    queries, label_matrix = queries[: config.max_train_examples], _label_matrix(labels[: config.max_train_examples])
    if len(queries) != len(label_matrix):
        raise ValueError(f"{len(queries)} queries but {len(label_matrix)} label rows")
    inputs = render_inputs(queries, config.prompt_template)
    pipeline = build_pipeline(config)
    with warnings.catch_warnings():
        # Small or capped training sets often lack a tool altogether. OneVsRestClassifier then
        # keeps a constant predictor for it (probability 0, which is right) and warns once per
        # such tool; the warning says nothing the metrics do not, so only it is silenced.
        warnings.filterwarnings("ignore", message=r"Label .* is present in all training examples",
                                category=UserWarning)
        pipeline.fit(inputs, label_matrix)
    probabilities = _positive_probabilities(pipeline, inputs)
    return pipeline, weighted_cross_entropy(probabilities, label_matrix, config.pos_weight)


def _positive_probabilities(pipeline: Pipeline, inputs: list[str]) -> np.ndarray:
    if not inputs:  # scikit-learn refuses to predict on zero rows
        return np.zeros((0, NUM_TOOLS))
    probabilities = np.asarray(pipeline.predict_proba(inputs), dtype=np.float64)
    if probabilities.shape != (len(inputs), NUM_TOOLS):
        raise ValueError(f"pipeline gives probabilities of shape {probabilities.shape}, "
                         f"expected ({len(inputs)}, {NUM_TOOLS})")
    return probabilities


def predict_probabilities(pipeline: Pipeline, queries: list[str], template: str) -> np.ndarray:
    """[n, 16] probability that each tool is needed, columns in TOOL_NAMES order."""
    return _positive_probabilities(pipeline, render_inputs(queries, template))


def _score(pipeline: Pipeline, config: LinearToolRAGConfig, split: dict[str, list],
           limit: int | None, *, per_example: bool = False) -> dict[str, float]:
    queries, labels = split["queries"][:limit], split["labels"][:limit]
    probabilities = predict_probabilities(pipeline, queries, config.prompt_template)
    counts = ToolRetrievalCounts.zeros()
    if per_example:
        counts.hits = []
    counts.update(torch.from_numpy(probabilities),
                  torch.tensor(labels, dtype=torch.float32).reshape(-1, NUM_TOOLS), config.threshold)
    metrics = counts.metrics()
    metrics[names.PAPER_DISTANCE] = paper_distance(metrics, {k: t.model_dump() for k, t in config.targets.items()})
    if per_example:
        metrics[names.PER_EXAMPLE_SUCCESS] = counts.hits
    return metrics


def evaluate(pipeline: Pipeline, config: LinearToolRAGConfig, split: dict[str, list]) -> dict[str, float]:
    """The transformer's metrics (tool_recall, tool_count, CIs, precision, recall/<tool>,
    eval_examples, paper_distance) on the first `max_eval_examples` of {"queries", "labels"}."""
    return _score(pipeline, config, split, config.max_eval_examples)


def save_checkpoint(pipeline: Pipeline, config: LinearToolRAGConfig, directory: str | Path) -> None:
    """The fitted pipeline (skops format) and its config (JSON) in `directory`."""
    import skops.io

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    skops.io.dump(pipeline, folder / PIPELINE_FILE)
    (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2))


def _types_in_skops_file(path: Path) -> set[str]:
    """Every "module.Class" a skops file names, read from its schema without building anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a skops file ({error})") from None
    found: set[str] = set()
    pending: list[Any] = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if "__module__" in node and "__class__" in node:
                found.add(f"{node['__module__']}.{node['__class__']}")
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def load_checkpoint(directory: str | Path) -> tuple[Pipeline, LinearToolRAGConfig]:
    """A fitted pipeline and its config from a folder written by `save_checkpoint`.

    Raises ValueError, naming the types, when the pipeline file holds any type outside
    CHECKPOINT_TYPES.
    """
    import skops.io

    folder = Path(directory)
    config = LinearToolRAGConfig.model_validate_json((folder / CONFIG_FILE).read_text())
    pipeline_path = folder / PIPELINE_FILE
    unexpected = _types_in_skops_file(pipeline_path) - CHECKPOINT_TYPES
    if unexpected:
        raise ValueError(f"{pipeline_path}: refusing to load types a linear ToolRAG pipeline does not contain: "
                         f"{sorted(unexpected)}")
    # skops audits again, trusting its own safe defaults plus exactly this list.
    pipeline = skops.io.load(pipeline_path, trusted=sorted(CHECKPOINT_TYPES))
    if not isinstance(pipeline, Pipeline):
        raise ValueError(f"{pipeline_path}: holds a {type(pipeline).__name__}, not a Pipeline")
    return pipeline, config


def score_checkpoint(directory: str, split: dict[str, list], device: torch.device | None = None,
                     max_examples: int | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A checkpoint scored on held-out queries: (metrics, no samples), as
    `trainers.toolrag.score_checkpoint`. `device` is accepted for that shared signature and
    unused (scikit-learn runs on CPU); `max_examples` defaults to the checkpoint's
    max_eval_examples, so test is scored on as many examples as validation. Each query's recall
    hit is under PER_EXAMPLE_SUCCESS."""
    pipeline, config = load_checkpoint(directory)
    limit = max_examples if max_examples is not None else config.max_eval_examples
    return _score(pipeline, config, split, limit, per_example=True), []



class LinearToolRAGTrainer(EpochTrainer):
    """The linear ToolRAG's part of the epoch loop (trainers/epoch_loop.py): its one epoch is
    the fit. Running in the same loop as the transformer gives it the same reports, cost
    figures, checkpoints and resume, so the two compare row by row in MLflow. With several
    workers each fits the same pipeline (scikit-learn does not shard); rank 0 saves it."""

    def __init__(self, config: LinearToolRAGConfig):
        super().__init__(config)
        self.targets = {name: target.model_dump() for name, target in config.targets.items()}
        self.pipeline: Pipeline | None = None

    def prepare_data(self, fetch, data_fingerprint: str) -> None:
        self.data = fetch()

    def load_model(self, directory: str) -> Pipeline:
        return load_checkpoint(directory)[0]

    def build(self, resumed_model) -> None:
        self.pipeline = resumed_model

    def train_epoch(self, epoch: int) -> EpochCost:
        train = self.data["train"]
        self.pipeline, loss = fit(self.config, train["queries"], train["labels"])
        return EpochCost(loss_total=loss, steps=1)

    def evaluate(self, epoch: int) -> Evaluation:
        metrics = evaluate(self.pipeline, self.config, self.data["val"])
        return self.best_epoch_so_far(epoch, metrics)

    def save(self, directory: str) -> None:
        save_checkpoint(self.pipeline, self.config, directory)


def train_fn_per_worker(loop_config: dict[str, Any], session: WorkerSession | None = None) -> None:
    """Fit one linear ToolRAG configuration on a Ray Train worker and report its validation
    figures (the transformer's names), with the fitted pipeline as the checkpoint.

    loop_config: as `trainers.toolrag.train_fn_per_worker`'s, with LinearToolRAGConfig fields.
    """
    run_epochs(LinearToolRAGTrainer(LinearToolRAGConfig.model_validate(loop_config["trainer"])), loop_config, session)
