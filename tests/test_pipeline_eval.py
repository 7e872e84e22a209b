"""ToolRAG and the planner together (trainers/pipeline.py, tuning/evaluate.py): the rebuilt
prompt, TinyAgent's example rule, paired statistics, refusals, and a whole run on checkpoints
the project writes, recorded in a real MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers import pipeline
from trainers.data import load_dataset_dir
from trainers.stats import mcnemar_exact
from trainers.tools import TOOL_NAMES

PROJECT = Path(__file__).resolve().parent.parent
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512,
              "tie_word_embeddings": True}
PLANNER_TARGETS = {"plan_success": {"value": 0.78, "tolerance": 0.03}}
MEMORISED = 2  # test examples the fixture planner learns by heart, on its own (compact) prompt
EVALUATED = 6  # the first test examples; the memorised ones are the two shortest plans among them


def _listed_tools(system_prompt: str) -> list[str]:
    """The tool names a planner prompt's numbered action list offers (join included)."""
    actions = system_prompt.split("Guidelines:")[0]
    return re.findall(r"^\d+\. (\w+)\(", actions, flags=re.MULTILINE)


def test_the_rebuilt_prompt_lists_exactly_the_retrieved_tools_and_keeps_the_question():
    retrieved = frozenset({"send_sms", "get_phone_number", "create_reminder"})
    example = pipeline.PoolExample("text Ann hi", '1. get_phone_number("Ann")\n2. send_sms(["$1"], "hi")\n3. join()',
                                   frozenset({"get_phone_number", "send_sms"}))
    messages = (("system", "the dataset's prompt, every tool"), ("user", "Question: remind me and text Bo"))
    rebuilt = pipeline.toolrag_messages(messages, retrieved, [example])
    assert [role for role, _ in rebuilt] == ["system", "user"]
    assert rebuilt[1] == ("user", "Question: remind me and text Bo")
    listed = _listed_tools(rebuilt[0][1])
    # In the 16 tools' order, then join; nothing that was not retrieved.
    assert listed == [name for name in TOOL_NAMES if name in retrieved] + ["join"]
    assert f"following {len(retrieved) + 1} types" in rebuilt[0][1]
    assert "Question: text Ann hi\n1. get_phone_number" in rebuilt[0][1]
    # Nothing retrieved: only join is offered.
    assert _listed_tools(pipeline.toolrag_messages(messages, frozenset(), [])[0][1]) == ["join"]


def test_examples_are_those_using_only_retrieved_tools_most_similar_first():
    def example(i: int, *tools: str) -> pipeline.PoolExample:
        return pipeline.PoolExample(f"q{i}", f"plan {i}", frozenset(tools))

    pool = [example(0, "send_sms"), example(1, "send_sms", "get_phone_number"), example(2, "create_note"),
            example(3, "get_phone_number"), example(4, "send_sms", "create_reminder"), example(5)]
    # Unit vectors along one axis each: example i's similarity to the query is query[i].
    vectors = torch.eye(6)
    query = torch.tensor([0.1, 0.9, 0.8, 0.3, 0.7, 0.2])
    tools = frozenset({"send_sms", "get_phone_number"})
    # Allowed: 0, 1, 3, 5 (an example without tools needs none); 2 and 4 use a tool not retrieved.
    assert pipeline.select_examples(query, vectors, pool, tools, k=2) == [1, 3]
    assert pipeline.select_examples(query, vectors, pool, tools, k=3) == [1, 3, 5]
    # k or fewer allowed: all of them, in pool order, as TinyAgent returns them.
    assert pipeline.select_examples(query, vectors, pool, tools, k=4) == [0, 1, 3, 5]
    assert pipeline.select_examples(query, vectors, pool, frozenset(), k=6) == [5]


def test_the_pool_comes_from_training_examples_one_per_distinct_query(small_data_dir):
    dataset = load_dataset_dir(small_data_dir)
    pool = pipeline.example_pool(dataset.train + dataset.train[:5])
    assert len(pool) == len(dataset.train)
    assert {p.query for p in pool}.isdisjoint({e.query for e in dataset.test})


def test_mcnemar_table_and_exact_p_value_on_a_hand_counted_case():
    # 10 examples: both succeed on 2, only the first on 1, only the second on 6, neither on 1.
    first = [True, True, True, False, False, False, False, False, False, False]
    second = [True, True, False, True, True, True, True, True, True, False]
    table = mcnemar_exact(first, second)
    assert (table["both"], table["first_only"], table["second_only"], table["neither"]) == (2, 1, 6, 1)
    # Exact: two-sided binomial on the 7 discordant pairs, 2 * P(X <= 1 | 7, 1/2) = 2 * 8 / 128.
    assert table["p_value"] == pytest.approx(0.125)
    assert mcnemar_exact(first, first)["p_value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="length"):
        mcnemar_exact(first, second[:-1])


# ----- a whole evaluation on checkpoints the project writes -----------------------------------
def _memorise(model, tokenizer, config, examples) -> None:
    from trainers.planner import CausalLMBatches, encode_train_split

    collate = CausalLMBatches(encode_train_split(tokenizer, examples, config), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(200):
        loss = model(**collate(list(range(len(examples))))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def checkpoints(small_data_dir, toolrag_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A planner that knows the first MEMORISED test plans by heart (on its compact prompt), the
    same planner before training (LoRA starts as the identity), and an untrained ToolRAG."""
    from trainers import planner
    from trainers.planner_base import BaseBuildSettings, build_base_from_examples

    dataset = load_dataset_dir(small_data_dir)
    root = tmp_path_factory.mktemp("checkpoints")
    base = build_base_from_examples(root / "base", dataset.train, TINY_LLAMA,
                                    BaseBuildSettings(vocab_size=1024, errand_requests=200, pretrain_epochs=0,
                                                      instruction_epochs=0), progress=lambda line: None)
    config = planner.PlannerConfig(model_path=str(base), system_prompt="compact", prompt_template="instruct",
                                   max_length=320, max_new_tokens=120, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                                   max_eval_examples=EVALUATED, eval_batch_size=4, targets=PLANNER_TARGETS)
    tokenizer = planner.load_tokenizer(str(base))
    torch.manual_seed(0)
    untrained = planner.build_lora_model(config)
    planner._save_checkpoint(untrained, tokenizer, config, str(root / "planner-untrained"))
    memorised = planner.build_lora_model(config)
    shortest = sorted(dataset.test[:EVALUATED], key=lambda e: len(e.plan))[:MEMORISED]
    _memorise(memorised, tokenizer, config, [{"messages": [list(m) for m in e.messages], "plan": e.plan} for e in shortest])
    planner._save_checkpoint(memorised, tokenizer, config, str(root / "planner-memorised"))

    return {"memorised": root / "planner-memorised", "untrained": root / "planner-untrained",
            "toolrag": toolrag_checkpoint, "data": small_data_dir, "memorised_keys": sorted(e.key for e in shortest)}


def _register(tracking_uri: str, folder: Path, name: str) -> str:
    """Register a checkpoint folder as a search does: a logged model of the closest trial's run,
    registered with alias closest-to-paper (SearchTracker.mark_closest)."""
    from tuning.tracking import SearchTracker

    tracker = SearchTracker(tracking_uri, "searches", max_epochs=1, artifact_location=(folder.parent / "artifacts").as_uri())
    tracker.start_parent("search", {}, {}, [])
    tracker.trial_started("t1", {}, {})
    tracker.trial_result("t1", {"epoch": 1, "paper_distance": 0.0, "checkpoint_path": str(folder)})
    tracker.trial_ended("t1", "FINISHED")
    return tracker.mark_closest(1, name)


def _evaluate(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tuning/evaluate.py", "--results-dir", str(tmp_path / "results"), *args],
                          cwd=PROJECT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_one_command_scores_both_ways_against_a_reference_and_records_it(checkpoints, tmp_path):
    from mlflow import MlflowClient

    from trainers import toolrag

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = _register(tracking_uri, checkpoints["memorised"], "tinyagent-planner")
    completed = _evaluate(["--planner", "models:/tinyagent-planner@closest-to-paper",
                           "--toolrag", str(checkpoints["toolrag"]), "--reference-planner", str(checkpoints["untrained"]),
                           "--data", str(checkpoints["data"]), "--tracking-uri", tracking_uri], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "plan success, with ToolRAG:" in completed.stdout and "McNemar exact p" in completed.stdout

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tinyagent-evaluation").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    figures, params = run.data.metrics, run.data.params
    assert params["planner_registered"] == f"tinyagent-planner/{version}"
    assert figures["examples"] == EVALUATED
    # The memorised plans come back on the prompt they were learned with: the planner learns.
    assert figures["plan_success_full"] == pytest.approx(MEMORISED / EVALUATED)
    # Paired tables account for every example; the untrained reference writes no plan right.
    cells = ("both", "first_only", "second_only", "neither")
    for prefix in ("mcnemar_full_vs_toolrag", "mcnemar_candidate_vs_reference_full",
                   "mcnemar_candidate_vs_reference_toolrag"):
        assert sum(figures[f"{prefix}_{cell}"] for cell in cells) == EVALUATED
    assert figures["reference_plan_success_full"] == 0.0
    assert figures["mcnemar_candidate_vs_reference_full_first_only"] == MEMORISED
    assert figures["mcnemar_full_vs_toolrag_both"] + figures["mcnemar_full_vs_toolrag_first_only"] == MEMORISED
    # ToolRAG's figures are the search's own scorer's on the same examples.
    dataset = load_dataset_dir(checkpoints["data"])
    test = dataset.test[:EVALUATED]
    scored, _ = toolrag.score_checkpoint(str(checkpoints["toolrag"]), {"queries": [e.query for e in test],
                                                                        "labels": [e.label_vector for e in test]})
    assert figures["toolrag_tool_recall"] == pytest.approx(scored["tool_recall"])
    assert figures["toolrag_tool_count"] == pytest.approx(scored["tool_count"])
    assert figures["prompt_token_ratio"] == pytest.approx(
        figures["prompt_tokens_all_tools"] / figures["prompt_tokens_with_toolrag"])

    # The per-example table: every example, its outcomes matching the figures.
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_example.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["key"] for row in rows] == [e.key for e in test]
    assert sorted(row["key"] for row in rows if row["success_full"]) == checkpoints["memorised_keys"]
    assert sum(row["success_with_toolrag"] for row in rows) == figures["plan_success_with_toolrag"] * EVALUATED
    probabilities = pipeline.tool_probabilities(checkpoints["toolrag"], [e.query for e in test], torch.device("cpu"))
    assert [json.loads(row["retrieved_tools"]) for row in rows] == [sorted(t) for t in pipeline.retrieved_tools(probabilities)]
    for row in rows:
        assert {"query", "gold_tools", "plan_full", "plan_with_toolrag", "reference_plan_with_toolrag"} <= set(row)

    # The registered version carries the headline figures and the run that measured them.
    tags = client.get_model_version("tinyagent-planner", version).tags
    assert tags["evaluation_run_id"] == run.info.run_id
    assert tags["evaluation_plan_success_full"].startswith(f"{MEMORISED / EVALUATED:.4f} [")


REFUSALS = {
    "missing planner folder": (["--planner", "{tmp}/no-such-planner"], "--planner"),
    "a ToolRAG checkpoint as the planner": (["--planner", "{toolrag}"], "not a planner checkpoint"),
    "a model URI without a version or alias": (["--planner", "models:/tinyagent-planner"], "not a model URI"),
    "a registered model that does not exist": (["--planner", "models:/no-such-model@closest-to-paper"],
                                               "not found"),
    "a hub id offline": (["--reference-planner", "squeeze-ai-lab/TinyAgent-1.1B"], "--reference-planner"),
    "no data and a planner from a folder": (["--data", ""], "--data"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_models_and_uris_get_one_line_and_exit_2(case, checkpoints, tmp_path):
    extra, expected = REFUSALS[case]
    given = {"--planner": str(checkpoints["memorised"]), "--toolrag": str(checkpoints["toolrag"]),
             "--data": str(checkpoints["data"])}
    for flag, value in zip(extra[::2], extra[1::2]):
        given[flag] = value.format(tmp=tmp_path, toolrag=checkpoints["toolrag"])
    args = [item for flag, value in given.items() if value for item in (flag, value)]
    completed = _evaluate([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    assert completed.returncode == 2, completed.stderr[-2000:]
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert "Traceback" not in completed.stderr
    assert len(lines) == 1 and expected in lines[0], lines
    if case == "a hub id offline":
        assert "squeeze-ai-lab/TinyAgent-1.1B" in lines[0]
