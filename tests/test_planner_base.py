"""The laptop planner base: what it reads, that its build repeats, and that LoRA learns on it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trainers.data import load_dataset_dir, message_plan_split
from trainers.errand_domain import ERRAND_TOOLS, errand_requests
from trainers.planner_base import (
    BaseBuildSettings, base_documents, build_base, build_base_from_examples, questions_of, train_tokenizer,
)
from trainers.plans import called_tools, parse_plan
from trainers.tools import END_OF_PLAN, JOIN_TOOL, TOOL_NAMES

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512,
              "tie_word_embeddings": True}
QUIET = {"progress": lambda line: None}


@pytest.fixture(scope="module")
def dataset(small_data_dir):
    return load_dataset_dir(small_data_dir)


def _questions(dataset) -> list[str]:
    return questions_of(dataset.train)  # what build_base_from_examples reads of the records


def test_no_plan_of_the_16_tools_is_in_what_the_base_reads(dataset):
    corpus, instructions = base_documents(_questions(dataset), BaseBuildSettings(errand_requests=2000))
    texts = corpus + [text for pair in instructions for text in pair]
    assert all(not (called_tools(text) & set(TOOL_NAMES)) for text in texts)
    # The other domain's plans are there, and read as plans by the same parser...
    assert set(ERRAND_TOOLS) <= set().union(*(called_tools(text) for text in texts))
    # ...which finds the 16 tools where they are: in the dataset's own system prompt (its
    # in-context examples), which is why the base never reads it.
    system_prompt = next(c for r, c in dataset.train[0].messages if r == "system")
    assert called_tools(system_prompt) & set(TOOL_NAMES)
    assert not any(e.plan in text for e in dataset.train + dataset.val + dataset.test for text in texts)


def test_the_other_domain_writes_plans_the_scorer_reads():
    requests = errand_requests(300, seed=3)
    assert len({r.question for r in requests}) == 300 and requests == errand_requests(300, seed=3)
    shapes = {"list of references": False, "reference in text": False, "thought": False}
    for request in requests:
        assert request.plan.endswith(f"{JOIN_TOOL}()") and END_OF_PLAN not in request.plan
        assert called_tools(request.plan) <= set(ERRAND_TOOLS) | {JOIN_TOOL}
        shapes["list of references"] |= '["$' in request.plan
        shapes["reference in text"] |= any(f' ${k}"' in request.plan for k in range(1, 9))
        shapes["thought"] |= "\nThought: " in request.plan
    assert all(shapes.values()), shapes  # the shapes TinyAgent's plans have
    assert parse_plan(requests[0].plan) == []  # none of the 16 tools: the scorer keeps no step


def test_the_tokenizer_round_trips_plans_and_has_a_chat_template(dataset):
    corpus, _ = base_documents(_questions(dataset), BaseBuildSettings(errand_requests=300))
    tokenizer = train_tokenizer(corpus, 600)
    for example in dataset.test[:20]:
        text = example.plan + END_OF_PLAN
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.chat_template and tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "base.json"}


def test_the_build_repeats_exactly_for_a_seed_and_is_reused(dataset, tmp_path):
    settings = BaseBuildSettings(vocab_size=500, errand_requests=150, pretrain_epochs=1, instruction_epochs=1,
                                 learning_rate=1e-2, instruction_learning_rate=1e-2, sequence_length=64)
    first = build_base(tmp_path / "first", _questions(dataset), TINY_LLAMA, settings, **QUIET)
    second = build_base(tmp_path / "second", _questions(dataset), TINY_LLAMA, settings, **QUIET)
    assert _folder_digest(first) == _folder_digest(second)  # weights and tokenizer, byte for byte
    other_seed = build_base(tmp_path / "other", _questions(dataset), TINY_LLAMA,
                            settings.model_copy(update={"seed": 1}), **QUIET)
    assert _folder_digest(other_seed)["model.safetensors"] != _folder_digest(first)["model.safetensors"]
    info = json.loads((first / "base.json").read_text())
    assert info["pretrain_losses"] and info["instruction_losses"] and info["instruction_examples"] > 150
    # The trace: the mean loss of each twentieth of an epoch (each step, in an epoch this short);
    # an epoch's mean lies within its windows' range.
    for stage in ("pretrain", "instruction"):
        trace, (epoch_loss,) = info[f"{stage}_loss_trace"], info[f"{stage}_losses"]
        assert len(trace) >= 2 and min(trace) <= epoch_loss <= max(trace) and trace[-1] < trace[0]
    before = (first / "base.json").stat().st_mtime_ns
    assert build_base(first, [], TINY_LLAMA, BaseBuildSettings(), **QUIET) == first
    assert (first / "base.json").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


LEARNING_EXAMPLES = 64
LEARNING_EPOCHS = 12
SCORED_SHAPES = 12
LEARNING_LLAMA = {**TINY_LLAMA, "hidden_size": 96, "intermediate_size": 256}


@pytest.mark.slow
def test_lora_learns_plans_on_a_tiny_built_base_and_not_on_a_random_one(dataset, tmp_path):
    """The same LoRA steps on two bases with one tokenizer: the built one (other domain's plans,
    instructions) comes to write the training plans it is shown; the random one does not."""
    from conftest import run_in_process
    from trainers import planner

    settings = BaseBuildSettings(vocab_size=800, errand_requests=800, pretrain_epochs=2, instruction_epochs=2,
                                 learning_rate=1e-2, instruction_learning_rate=1e-2, sequence_length=128)
    built = build_base_from_examples(tmp_path / "built", dataset.train, LEARNING_LLAMA, settings, **QUIET)
    random = build_base_from_examples(tmp_path / "random", dataset.train, LEARNING_LLAMA,
                                      settings.model_copy(update={"pretrain_epochs": 0, "instruction_epochs": 0}),
                                      **QUIET)
    shortest = sorted(message_plan_split(dataset.train), key=lambda e: len(e["plan"]))[:LEARNING_EXAMPLES]
    # Scored on plans of distinct tool sequences, so one plan written for every question (what a
    # model that learned nothing but the commonest answer writes) succeeds once at most.
    by_shape = {tuple(step.tool for step in parse_plan(e["plan"])): e for e in reversed(shortest)}
    scored = list(by_shape.values())[:SCORED_SHAPES]
    outcomes = {}
    for name, base in (("built", built), ("random", random)):
        trainer = {"model_path": str(base), "system_prompt": "compact", "prompt_template": "instruct",
                   "max_length": 192, "max_new_tokens": 96, "learning_rate": 1e-2, "batch_size": 8,
                   "epochs": LEARNING_EPOCHS, "warmup_ratio": 0.0, "lora_r": 16, "lora_alpha": 16,
                   "lora_dropout": 0.0, "eval_subset_size": SCORED_SHAPES, "max_eval_examples": SCORED_SHAPES,
                   "eval_batch_size": SCORED_SHAPES,
                   "sample_plans": 0, "targets": {"plan_success": {"value": 0.78, "tolerance": 0.03}}}
        reports = run_in_process(planner.train_fn_per_worker,
                                 {"trainer": trainer, "data": {"train": shortest, "val": scored},
                                  "data_fingerprint": name}, tmp_path / f"run-{name}")
        outcomes[name] = reports
    built_reports, random_reports = outcomes["built"], outcomes["random"]
    assert len(scored) == SCORED_SHAPES
    assert built_reports[-1]["train_loss"] < 0.5 * built_reports[0]["train_loss"]
    # Seen here: the built base's plans succeed on 3 of the 12 from epoch 9 on and parse from
    # epoch 3 on; the random base's never parse, and succeed on none.
    assert max(r["plan_success"] for r in built_reports) >= 0.25, [r["plan_success"] for r in built_reports]
    assert built_reports[-1]["plan_parse_rate"] >= 0.5
    assert max(r["plan_success"] for r in random_reports) <= 1 / SCORED_SHAPES
    assert max(r["plan_parse_rate"] for r in random_reports) == 0.0
    assert built_reports[-1]["train_loss"] < random_reports[-1]["train_loss"]
