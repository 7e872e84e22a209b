"""Planner evaluation throughput and training-batch padding, against their baselines in one run.

    python bench/planner_generation.py [--prompts 64] [--repeats 3] [--model-path DIR] [--pipeline-examples 100]

1. Throughput: plans per second when the same model writes plans for the same test prompts
   - one at a time through a `transformers` text-generation pipeline (the baseline: how the
     public reproduction evaluated), and
   - in length-sorted, left-padded batches with the KV cache (`trainers.plan_generation.generate_plans`,
     what every trial runs).
   Both are greedy with the same stop rule, so they must write the same plans; the script
   checks that. Medians over --repeats runs, and their ratio.
3. The pipeline evaluation (tuning/evaluate.py): seconds per 100 test examples for ToolRAG,
   choosing in-context examples, and the planner writing every plan twice (full prompt and
   ToolRAG's), against the planner alone writing the same examples' plans on its full prompt
   (what the search's test scoring costs). A local-preset ToolRAG (pretrained MiniLM layers,
   untrained head) and the random planner above, saved as checkpoints.
2. Padding waste in training batches of the local preset's examples: pad tokens as a share of
   all tokens, with batches drawn at random against batches grouped by length
   (`trainers.batching.length_grouped_batches`), for the batch sizes the search tries.

Without --model-path the model is the local preset's architecture with random weights and a
tokenizer trained here: speed does not depend on what the weights learned, and a random
model writes to the token cap, the slowest case for both methods.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from trainers import synthetic  # noqa: E402
from trainers.batching import length_grouped_batches  # noqa: E402
from trainers.data import load_dataset_dir  # noqa: E402
from trainers.plan_generation import generate_plans  # noqa: E402
from trainers.planner import PlannerConfig, encode_train_split, load_tokenizer, prompt_ids  # noqa: E402
from trainers.planner_base import (  # noqa: E402
    BaseBuildSettings, base_documents, questions_of, random_model, train_tokenizer,
)
from trainers.tools import END_OF_PLAN  # noqa: E402

LOCAL_PRESET = PROJECT / "search_spaces" / "presets" / "planner" / "local.yaml"


def _model_and_tokenizer(model_path: str | None, dataset, architecture: dict, vocab_size: int, folder: Path):
    from transformers import AutoModelForCausalLM

    if model_path:
        return AutoModelForCausalLM.from_pretrained(model_path).eval(), load_tokenizer(model_path), model_path
    corpus, _ = base_documents(questions_of(dataset.train), BaseBuildSettings(vocab_size=vocab_size))
    tokenizer = train_tokenizer(corpus, vocab_size)
    model = random_model(tokenizer, architecture, seed=0).eval()
    tokenizer.save_pretrained(folder)
    return model, tokenizer, str(folder)


def _pipeline_plans(pipe, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    from transformers import StopStringCriteria, StoppingCriteriaList

    plans = []
    for text in texts:
        output = pipe(text, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False,
                      add_special_tokens=False,
                      stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, [END_OF_PLAN])]),
                      pad_token_id=tokenizer.pad_token_id)[0]["generated_text"]
        plans.append(output.split(END_OF_PLAN, 1)[0] + (END_OF_PLAN if END_OF_PLAN in output else ""))
    return plans


def throughput(args, dataset, preset, folder: Path) -> None:
    from transformers import pipeline

    trainer = preset["trainer"]
    model, tokenizer, path = _model_and_tokenizer(args.model_path, dataset, preset["model"]["architecture"],
                                                  preset["model"]["build_base"]["vocab_size"], folder)
    config = PlannerConfig.model_validate({**trainer, "model_path": path, "prompt_template": "instruct",
                                           "targets": {"plan_success": {"value": 0.78, "tolerance": 0.03}}})
    examples = dataset.test[: args.prompts]
    prompts = [prompt_ids(tokenizer, e.messages, config) for e in examples]
    # The pipeline takes text: the same ids decoded with their special tokens, which encode back
    # to the same ids (checked), and are passed without the tokenizer adding any.
    texts = [tokenizer.decode(p) for p in prompts]
    assert all(tokenizer(t, add_special_tokens=False)["input_ids"] == p for t, p in zip(texts, prompts))
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    device = torch.device("cpu")
    baseline_rates, batched_rates = [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        one_at_a_time = _pipeline_plans(pipe, tokenizer, texts, config.max_new_tokens)
        baseline_rates.append(len(texts) / (time.perf_counter() - started))
        started = time.perf_counter()
        batched = generate_plans(model, tokenizer, prompts, config.max_new_tokens, batch_size=config.eval_batch_size,
                                 device=device)
        batched_rates.append(len(prompts) / (time.perf_counter() - started))
        agree = sum(a == b for a, b in zip(one_at_a_time, batched))
        print(f"  run {repeat + 1}: pipeline {baseline_rates[-1]:.2f} plans/s, batched {batched_rates[-1]:.2f} "
              f"plans/s; identical plans {agree}/{len(prompts)}", flush=True)
    baseline, ours = statistics.median(baseline_rates), statistics.median(batched_rates)
    print(f"Evaluation throughput ({len(prompts)} test prompts, up to {config.max_new_tokens} new tokens, "
          f"batch {config.eval_batch_size}, {torch.get_num_threads()} threads):")
    print(f"  one at a time, transformers pipeline: median {baseline:.2f} plans/s")
    print(f"  batched with KV cache:                median {ours:.2f} plans/s")
    print(f"  ratio: {ours / baseline:.1f}x (target >= 5x)")


def padding(dataset, preset, folder: Path) -> None:
    trainer = preset["trainer"]
    tokenizer = load_tokenizer(str(folder))
    config = PlannerConfig.model_validate({**trainer, "model_path": str(folder), "prompt_template": "instruct",
                                           "targets": {"plan_success": {"value": 0.78, "tolerance": 0.03}}})
    examples = [{"messages": list(e.messages), "plan": e.plan} for e in dataset.train[: trainer["max_train_examples"]]]
    split = encode_train_split(tokenizer, examples, config)
    lengths = (split["offsets"][1:] - split["offsets"][:-1]).tolist()

    def waste(batches: list[list[int]]) -> float:
        total = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
        return 1 - sum(lengths) / total

    print(f"Padding waste in training batches ({len(lengths)} examples, {statistics.mean(lengths):.0f} tokens "
          f"on average, {min(lengths)}-{max(lengths)}):")
    for batch_size in (8, 16, 32):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
        random_batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        grouped = length_grouped_batches(lengths, batch_size, epoch=1, seed=0, rank=0, world=1)
        before, after = waste(random_batches), waste(grouped)
        print(f"  batch {batch_size:>2}: random batches {before:.1%}, grouped by length {after:.1%} "
              f"(ratio {after / before:.2f}; target <= 10%)")


def pipeline_time(args, dataset, preset, folder: Path) -> None:
    from trainers import pipeline, planner, toolrag
    from trainers.models import resolve_source

    model, tokenizer, path = _model_and_tokenizer(None, dataset, preset["model"]["architecture"],
                                                  preset["model"]["build_base"]["vocab_size"], folder / "base-tok")
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    config = PlannerConfig.model_validate({**preset["trainer"], "model_path": str(folder / "base"),
                                           "prompt_template": "instruct",
                                           "targets": {"plan_success": {"value": 0.78, "tolerance": 0.03}}})
    planner._save_checkpoint(planner.build_lora_model(config), tokenizer, config, str(folder / "planner"))
    toolrag_preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "toolrag" / "local.yaml").read_text())
    minilm = resolve_source(toolrag_preset["model"]["name_or_path"], "model", "--model-path")
    toolrag_config = toolrag.ToolRAGConfig.model_validate({
        **toolrag_preset["trainer"], "model_path": str(minilm), "cache_dir": str(folder / "cache"),
        "targets": {"tool_recall": {"value": 0.99, "tolerance": 0.01}, "tool_count": {"value": 3.97, "tolerance": 0.1}}})
    from transformers import AutoTokenizer

    toolrag._save_checkpoint(toolrag.build_classifier(toolrag_config), AutoTokenizer.from_pretrained(minilm),
                             toolrag_config, str(folder / "toolrag"))
    examples = dataset.test[: args.pipeline_examples]
    pool = pipeline.example_pool(dataset.train)
    alone_runs, pipeline_runs, parts = [], [], []
    for repeat in range(args.repeats):
        loaded = pipeline.load_planner(folder / "planner")
        started = time.perf_counter()
        prompts = [prompt_ids(loaded.tokenizer, e.messages, config) for e in examples]
        generate_plans(loaded.model, loaded.tokenizer, prompts, config.max_new_tokens, batch_size=config.eval_batch_size,
                       device=torch.device("cpu"))
        alone_runs.append(100 * (time.perf_counter() - started) / len(examples))
        started = time.perf_counter()
        result = pipeline.evaluate_pipeline(folder / "planner", folder / "toolrag", examples, pool, encoder_folder=minilm,
                                            progress=lambda line: None)
        pipeline_runs.append(100 * (time.perf_counter() - started) / len(examples))
        parts.append({k: 100 * v / len(examples) for k, v in result.seconds.items()})
        print(f"  run {repeat + 1}: planner alone {alone_runs[-1]:.1f} s/100, pipeline evaluation "
              f"{pipeline_runs[-1]:.1f} s/100", flush=True)
    alone, whole = statistics.median(alone_runs), statistics.median(pipeline_runs)
    print(f"Pipeline evaluation ({len(examples)} test examples, {len(pool)} training examples to choose from, "
          f"up to {config.max_new_tokens} new tokens, {torch.get_num_threads()} threads), seconds per 100 examples:")
    for name, label in (("toolrag", "ToolRAG"), ("examples", "encode the pool and choose examples"),
                        ("planner", "planner, both prompts")):
        print(f"  {label + ':':<40} median {statistics.median(p[name] for p in parts):.1f}")
    print(f"  {'whole evaluation (loading included):':<40} median {whole:.1f}")
    print(f"  {'baseline, planner alone on its prompt:':<40} median {alone:.1f}")
    print(f"  ratio: {whole / alone:.1f}x the planner alone (it writes every plan twice)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-path", help="a planner base folder (default: local architecture, random weights)")
    parser.add_argument("--pipeline-examples", type=int, default=100, help="test examples for section 3 (0 skips it)")
    args = parser.parse_args()
    preset = yaml.safe_load(LOCAL_PRESET.read_text())
    with tempfile.TemporaryDirectory() as temp:
        data_dir = Path(temp) / "data"
        synthetic.write_dataset(data_dir, preset["data"]["synthetic_train"], preset["data"]["synthetic_test"], 0)
        dataset = load_dataset_dir(data_dir)
        throughput(args, dataset, preset, Path(temp))
        padding(dataset, preset, Path(args.model_path) if args.model_path else Path(temp))
        if args.pipeline_examples:
            pipeline_time(args, dataset, preset, Path(temp))


if __name__ == "__main__":
    main()
