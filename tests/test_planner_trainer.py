"""The planner trainer's parts with real models: base building, LoRA, batched generation, scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_in_process
from trainers.data import load_dataset_dir
from trainers.plan_generation import generate_plans, plan_metrics, score_plans
from trainers.planner import (
    CausalLMBatches, PlannerConfig, build_lora_model, encode_train_split, planner_messages, prompt_ids,
    score_checkpoint,
)
from trainers.planner_base import BaseBuildSettings, build_base_from_examples, compact_system_prompt
from trainers.planner_prompts import IGNORE_INDEX
from trainers.tools import END_OF_PLAN

TARGETS = {"plan_success": {"value": 0.78, "tolerance": 0.03}}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512,
              "tie_word_embeddings": True}
# TinyLlama-1.1B's published architecture (TinyLlama/TinyLlama-1.1B and the 32k-Instruct fine-tune).
TINYLLAMA_1_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def dataset(small_data_dir):
    return load_dataset_dir(small_data_dir)


@pytest.fixture(scope="module")
def built_base(dataset, tmp_path_factory) -> Path:
    settings = BaseBuildSettings(vocab_size=1024, errand_requests=300, pretrain_epochs=2, instruction_epochs=1,
                                 learning_rate=1e-2, instruction_learning_rate=1e-2, batch_size=16,
                                 sequence_length=128)
    return build_base_from_examples(tmp_path_factory.mktemp("bases") / "tiny", dataset.train, TINY_LLAMA, settings,
                                    progress=lambda line: None)


def _config(model_path: Path, **overrides) -> PlannerConfig:
    settings = {"model_path": str(model_path), "system_prompt": "compact", "max_length": 256, "max_new_tokens": 40,
                "targets": TARGETS, **overrides}
    return PlannerConfig.model_validate(settings)


def _examples(dataset, split: str, count: int) -> list[dict]:
    return [{"messages": [list(m) for m in e.messages], "plan": e.plan} for e in getattr(dataset, split)[:count]]


@pytest.mark.parametrize("max_length, system_prompt", [(1024, "compact"), (96, "compact"), (160, "dataset")],
                         ids=["fits", "compact-prompt-cut", "dataset-prompt-cut"])
def test_generation_prompt_is_the_training_prompt(built_base, dataset, max_length, system_prompt):
    """Evaluation must show the model exactly the prefix it was trained to continue, also when
    the prompt is too long for max_length and loses its beginning."""
    from trainers.planner import load_tokenizer

    tokenizer = load_tokenizer(str(built_base))
    for template in ("concat", "instruct", "chat"):
        config = _config(built_base, prompt_template=template, max_length=max_length, system_prompt=system_prompt)
        example = _examples(dataset, "train", 1)[0]
        split = encode_train_split(tokenizer, [example], config)
        labels = split["labels"].tolist()
        prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert split["flat"][:prompt_length].tolist() == prompt_ids(tokenizer, example["messages"], config)
        assert int(split["over_max_length"]) == (max_length != 1024), "cut examples are counted"
        if max_length != 1024:
            assert prompt_length == max_length - config.max_new_tokens  # the prompt's budget, BOS included
            assert len(split["flat"]) <= max_length


def test_compact_system_prompt_replaces_only_the_system_message(dataset):
    messages = dataset.train[0].messages
    compact = planner_messages(messages, "compact")
    assert compact[0] == ("system", compact_system_prompt())
    assert compact[1:] == [m for m in messages if m[0] != "system"]
    assert planner_messages(messages, "dataset") == list(messages)


def test_batches_pad_labels_with_the_ignore_index():
    split = {"flat": torch.tensor([5, 6, 7, 8, 9], dtype=torch.int32), "offsets": torch.tensor([0, 3, 5]),
             "labels": torch.tensor([IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9])}
    collate = CausalLMBatches(split, pad_id=0)
    batch = collate([0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert (collate.pad_tokens, collate.total_tokens) == (1, 6)


def test_batched_kv_cache_generation_matches_one_prompt_at_a_time(built_base, dataset):
    """Left padding and the cache must not change a single greedy token."""
    from transformers import AutoModelForCausalLM

    from trainers.planner import load_tokenizer

    tokenizer = load_tokenizer(str(built_base))
    model = AutoModelForCausalLM.from_pretrained(str(built_base)).eval()
    config = _config(built_base, prompt_template="instruct")
    prompts = [prompt_ids(tokenizer, e["messages"], config) for e in _examples(dataset, "test", 7)]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    device = torch.device("cpu")
    batched = generate_plans(model, tokenizer, prompts, 24, batch_size=7, device=device)
    single = [generate_plans(model, tokenizer, [p], 24, batch_size=1, device=device)[0] for p in prompts]
    assert batched == single


def test_a_trained_planner_stops_at_end_of_plan_and_scores_as_a_success(built_base, dataset):
    """Fit LoRA on two short examples until it writes them back; generation must stop at the
    marker, though the model could go on (max_new_tokens leaves room for much more)."""
    from trainers.planner import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(built_base))
    config = _config(built_base, prompt_template="instruct", lora_r=16, lora_alpha=32, lora_dropout=0.0)
    examples = sorted(_examples(dataset, "train", 300), key=lambda e: len(e["plan"]))[:2]
    model = build_lora_model(config)
    collate = CausalLMBatches(encode_train_split(tokenizer, examples, config), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first_loss = None
    for _ in range(200):
        loss = model(**collate([0, 1])).loss
        first_loss = first_loss if first_loss is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first_loss / 10
    model.eval()
    prompts = [prompt_ids(tokenizer, e["messages"], config) for e in examples]
    plans = generate_plans(model, tokenizer, prompts, 120, batch_size=2, device=torch.device("cpu"))
    for plan, example in zip(plans, examples):
        assert plan == example["plan"] + END_OF_PLAN  # nothing after the marker
    metrics = plan_metrics(score_plans(plans, [e["plan"] for e in examples]))
    assert metrics["plan_success"] == 1.0 and metrics["tool_set_accuracy"] == 1.0


def test_plan_metrics_count_successes_and_give_a_wilson_interval():
    target = '1. get_phone_number("Sid")\n2. send_sms(["$1"], "hi")\n3. join()'
    wrong_edge = '1. get_phone_number("Sid")\n2. send_sms(["Sid"], "hi")\n3. join()'
    sums = score_plans([target + END_OF_PLAN, wrong_edge + END_OF_PLAN, "", "garbage"], [target] * 4)
    metrics = plan_metrics(sums)
    assert metrics["plan_success"] == 0.25 and metrics["tool_set_accuracy"] == 0.5
    assert metrics["plan_parse_rate"] == 0.5 and metrics["empty_output_rate"] == 0.25
    assert metrics["strict_plan_success"] == 0.25
    assert metrics["plan_success_ci_low"] < 0.25 < metrics["plan_success_ci_high"]


def test_planner_config_rejects_unknown_templates_and_missing_targets(tmp_path):
    with pytest.raises(ValueError, match="prompt_template"):
        _config(tmp_path, prompt_template="alpaca")
    with pytest.raises(ValueError, match="paper_target"):
        _config(tmp_path, paper_target="plan_success_with_toolrag")
    with pytest.raises(ValueError, match="extra"):
        _config(tmp_path, lora_rank=8)
    with pytest.raises(ValueError, match="base_template"):
        _config(tmp_path, base_template="alpaca")


@pytest.mark.parametrize("base_template", [None, "chat"])
def test_the_untuned_row_reads_the_dataset_prompt_in_the_base_s_own_format(built_base, base_template):
    """Whatever template a trial searched, the untuned base is scored in its own format (the
    preset's base_template: instruct unless said), with the dataset's prompt and its whole context."""
    from trainers.planner import untuned_config

    trial = _config(built_base, prompt_template="concat", max_length=256).model_dump()
    if base_template is not None:
        trial["base_template"] = base_template
    config = untuned_config(trial)
    assert config.prompt_template == (base_template or "instruct")
    assert config.system_prompt == "dataset" and config.max_length == TINY_LLAMA["max_position_embeddings"]


def _expected_lora_parameters(architecture: dict, r: int, modules: list[str]) -> int:
    """r x (in + out) per adapted projection per layer, from the architecture's own sizes."""
    hidden, inter = architecture["hidden_size"], architecture["intermediate_size"]
    kv = hidden // architecture["num_attention_heads"] * architecture["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return architecture["num_hidden_layers"] * sum(r * sum(shapes[m]) for m in modules)


@pytest.mark.parametrize("modules", [["q_proj", "v_proj"], None])
def test_lora_trains_exactly_the_configured_projections(built_base, modules):
    extra = {"lora_target_modules": modules} if modules else {}
    config = _config(built_base, lora_r=4, **extra)
    model = build_lora_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == _expected_lora_parameters(TINY_LLAMA, 4, config.lora_target_modules)


@pytest.mark.slow
def test_tinyllama_1_1b_architecture_takes_lora_and_one_training_step_on_cpu(tmp_path):
    """The paper's planner at full size, random weights, no download: LoRA r=16 on all seven
    projections trains 12.6M of 1.1B parameters, and one step changes only the adapters."""
    from transformers import AutoModelForCausalLM

    from trainers.models import config_from_dict

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config_from_dict(TINYLLAMA_1_1B))
    total = sum(p.numel() for p in base.parameters())
    assert 1.0e9 < total < 1.2e9
    config = _config(tmp_path, lora_r=16, lora_alpha=16, lora_dropout=0.1)
    model = build_lora_model(config, base=base)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = _expected_lora_parameters(TINYLLAMA_1_1B, 16, config.lora_target_modules)
    assert sum(p.numel() for p in trainable.values()) == expected == 12_615_680
    assert all("lora_" in name for name in trainable)
    frozen_before = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    adapter_before = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n}
    input_ids = torch.randint(0, 32000, (2, 32))
    labels = input_ids.clone()
    labels[:, :16] = IGNORE_INDEX
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    torch.optim.AdamW(trainable.values(), lr=1e-3).step()
    assert torch.isfinite(loss)
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, frozen_before)
    assert any(not torch.equal(trainable[n], before) for n, before in adapter_before.items())


@pytest.mark.ray
def test_two_workers_score_the_whole_validation_split_and_keep_one_adapter(ray_2_cpus, built_base, dataset, tmp_path):
    """DDP on 2 Ray Train workers: each generates for half the prompts and the counts are summed,
    so the last report scores every validation example; one adapter checkpoint is kept, and it
    is what the test split is scored with."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.planner import load_checkpoint, train_fn_per_worker

    settings = _config(built_base, epochs=2, batch_size=16, micro_batch_size=4, learning_rate=5e-3,
                       max_train_examples=64, eval_subset_size=10, max_eval_examples=25, sample_plans=3).model_dump()
    data = {"train": _examples(dataset, "train", 300), "val": _examples(dataset, "val", 100)}
    assert len(data["val"]) >= 25
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"trainer": settings, "data": data, "data_fingerprint": "test"},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="planner-two-workers", storage_path=str(tmp_path / "storage"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    last = result.metrics  # the per-epoch subset scores are checked through MLflow in the smoke search
    assert last["eval_examples"] == 25 and last["full_validation_set"] == 1.0 and last["epoch"] == 2
    assert last["world_size"] == 2 and math.isfinite(last["train_loss"])
    assert last["plan_success_ci_low"] <= last["plan_success"] <= last["plan_success_ci_high"]
    assert len(json.loads(last["sample_plans"])) == 3
    checkpoints = [p for p in (tmp_path / "storage" / "planner-two-workers").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 1
    assert (checkpoints[0] / "adapter_config.json").is_file()
    assert not list(checkpoints[0].glob("model.safetensors")), "the checkpoint holds the adapter, not the base"
    model, _, saved = load_checkpoint(str(checkpoints[0]))
    assert saved.model_path == str(built_base) and saved.micro_batch_size == 4
    assert not any(p.requires_grad for p in model.parameters())  # for use: frozen
    resumed, _, _ = load_checkpoint(str(checkpoints[0]), trainable=True)  # for a restarted trial
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {
        n for n, _ in resumed.named_parameters() if "lora_" in n}
    assert (checkpoints[0] / "trainer_state.pt").is_file()
    test = _examples(dataset, "test", 100)
    scored, samples = score_checkpoint(str(checkpoints[0]), test)
    assert scored["eval_examples"] == 25, "test is scored on as many examples as validation (max_eval_examples)"
    assert scored["prompts_cut"] == 0 and last["prompts_cut"] == 0  # compact prompts fit max_length 256
    long_question = [{"messages": [["user", "Question: " + "remind me to call Sid " * 80]], "plan": test[0]["plan"]}]
    cut, _ = score_checkpoint(str(checkpoints[0]), long_question * 2)
    assert cut["prompts_cut"] == 2 and cut["eval_examples"] == 2, "prompts too long for max_length are counted"
    assert scored["paper_distance"] == pytest.approx(abs(scored["plan_success"] - 0.78) / 0.03)
    assert len(samples) == 3 and {s["target"] for s in samples} <= {e["plan"] + END_OF_PLAN for e in test[:25]}


# A tiny planner trial's per-epoch figures, pinned like the ToolRAG trainer's (see
# test_toolrag_trainer.PINNED_SEED_0): the training loss to a tolerance, the validation counts
# to one example. Measured on this project's 2-core CPU machines with torch 2.13.0, 1 thread,
# seed 0, on the fixture's data from generator version 2. No plan succeeds yet at this size, but the
# parse rate moves with every change to training or generation. Epochs 1-2 score a 10-example validation subset, epoch 3 the best adapter on 20.
PLANNER_PINNED_SEED_0 = {
    "train_loss": [3.7163808345794678, 3.3317551215489707, 3.1413427591323853],
    "plan_success": [0.0, 0.0, 0.0],
    "tool_set_accuracy": [0.0, 0.0, 0.0],
    "plan_parse_rate": [0 / 10, 0 / 10, 0 / 20],
    "empty_output_rate": [0.0, 0.0, 0.0],
}


def _planner_per_epoch_figures(tmp_path, built_base, dataset, name: str, seed: int,
                               in_process: bool = False) -> list[dict]:
    """A tiny planner trial's reports: 1 Ray Train worker, or in-process (the two trial runners)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer

    from trainers.planner import train_fn_per_worker

    settings = _config(built_base, epochs=3, batch_size=8, micro_batch_size=8, learning_rate=5e-3,
                       max_train_examples=48, eval_subset_size=10, max_eval_examples=20, sample_plans=0,
                       seed=seed).model_dump()
    loop_config = {"trainer": settings, "data": {"train": _examples(dataset, "train", 300),
                                                 "val": _examples(dataset, "val", 100)},
                   "data_fingerprint": "pinned"}
    if in_process:
        return run_in_process(train_fn_per_worker, loop_config, tmp_path / "storage" / name)
    reports = tmp_path / f"{name}.jsonl"

    class Recorder(UserCallback):  # runs in the Train controller: every report, not only the last
        def after_report(self, run_context, metrics, checkpoint):
            with open(reports, "a") as out:
                out.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")

    TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(tmp_path / "storage"), callbacks=[Recorder()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    ).fit()
    return [json.loads(line) for line in reports.read_text().splitlines()]


@pytest.mark.ray
def test_a_tiny_planner_trial_is_reproducible_from_its_seed_and_its_figures_are_pinned(ray_2_cpus, built_base,
                                                                                       dataset, tmp_path):
    first = _planner_per_epoch_figures(tmp_path, built_base, dataset, "seed0-a", seed=0)
    # The same seed again, through the other trial runner: both give the same epochs.
    second = _planner_per_epoch_figures(tmp_path, built_base, dataset, "seed0-b", seed=0, in_process=True)
    keys = ("train_loss", "plan_success", "tool_set_accuracy", "best_early_stop_score", "paper_distance",
            "plan_parse_rate", "empty_output_rate", "eval_examples", "padding_waste")
    assert [e["epoch"] for e in first] == [1, 2, 3]
    assert [e["full_validation_set"] for e in first] == [0.0, 0.0, 1.0]
    assert [e["eval_examples"] for e in first] == [10, 10, 20]
    assert [[e[k] for k in keys] for e in first] == [[e[k] for k in keys] for e in second], "one seed, one result"
    torch.testing.assert_close([e["train_loss"] for e in first], PLANNER_PINNED_SEED_0["train_loss"], rtol=1e-4,
                               atol=1e-6)
    for key in ("plan_success", "tool_set_accuracy", "plan_parse_rate", "empty_output_rate"):
        figures = [e[key] for e in first]
        # Counts of examples: allow one example's worth of difference from a kernel's rounding.
        torch.testing.assert_close(figures, PLANNER_PINNED_SEED_0[key], rtol=0,
                                   atol=1.0 / min(e["eval_examples"] for e in first))



def test_a_planner_trial_whose_epochs_tie_shows_tests_and_registers_one_epoch(built_base, dataset, tmp_path):
    """One rule for "best" (trainers/selection.py). A tiny planner's first epochs tie (no plan
    parses yet: see PLANNER_PINNED_SEED_0), and ASHA stops the trial after epoch 2, before the
    whole-split score. The trainer checkpoints the later of the tied epochs; the figures the
    closing table shows, the checkpoint the test split scores and the registered version must
    all be that epoch's."""
    from trainers.epoch_loop import load_trainer_state
    from trainers.planner import train_fn_per_worker
    from trainers.registry import MODELS
    from tuning.closing_table import format_table
    from tuning.tracking import SearchTracker

    settings = _config(built_base, epochs=3, batch_size=8, micro_batch_size=8, learning_rate=5e-3,
                       max_train_examples=48, eval_subset_size=10, max_eval_examples=20, sample_plans=0,
                       seed=0).model_dump()
    loop_config = {"trainer": settings, "data": {"train": _examples(dataset, "train", 300),
                                                 "val": _examples(dataset, "val", 100)}, "data_fingerprint": "tie"}
    reports = run_in_process(train_fn_per_worker, loop_config, tmp_path / "run", stop_after_epoch=2)
    keys = [(r["paper_distance"], r["tool_set_accuracy"], r["plan_parse_rate"]) for r in reports]
    assert len(reports) == 2 and keys[0] == keys[1], f"the epochs must tie for this test to mean anything: {keys}"
    assert [r["best_so_far"] for r in reports] == [1.0, 1.0] and reports[1]["best_epoch"] == 2

    tracker = SearchTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tie", max_epochs=3,
                            artifact_location=(tmp_path / "artifacts").as_uri())
    tracker.start_parent("parent", {}, {}, [])
    tracker.trial_started("t1", {"prompt_template": "instruct"}, {})
    for report in reports:
        tracker.trial_result("t1", report)
    tracker.trial_ended("t1", "FINISHED")
    record = tracker.trials["t1"]

    assert record.stopped_early and record.best_epoch == 2
    assert record.best == reports[1]
    # The checkpoint test scoring loads, and the registry copies, is the one epoch 2 wrote.
    assert load_trainer_state(record.checkpoint_path)["epoch"] == 2
    spec = MODELS["planner"]
    row = format_table([record], spec, spec.paper_figures(TARGETS, {}), "title").splitlines()[-1]
    assert row.split()[-2] == "2", row  # the epoch column, before the params
    version = tracker.mark_closest(1, "tie-planner")
    registered = tracker.client.get_model_version("tie-planner", version)
    assert registered.tags["epoch"] == "2"
    outputs = tracker.client.get_run(record.run_id).outputs.model_outputs
    assert [output.step for output in outputs] == [2]
