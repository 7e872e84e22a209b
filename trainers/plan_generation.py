"""Writing plans and counting how good they are: greedy batched generation with the KV cache,
and the per-set sums and figures of TinyAgent's rule (trainers/plans.py), beside the stricter
parser's. Shared by the planner's trials, the pipeline evaluation and the benches."""

from __future__ import annotations

import torch

from trainers import metric_names as names
from trainers.batching import autocast
from trainers.plans import PlanError, plan_success, strict_parse_plan, strict_plan_success, tool_set_match
from trainers.stats import wilson_interval
from trainers.tools import END_OF_PLAN


def generate_plans(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, *, batch_size: int,
                   device: torch.device, bf16: bool = False) -> list[str]:
    """Greedy plans for token-id prompts, batched with the KV cache; returned in input order.

    Prompts are sorted by length so a batch pads little, left-padded so every row's next token
    follows its own last prompt token, and a row stops at `<END_OF_PLAN>` or EOS. The text
    after the marker is dropped.
    """
    from transformers import StopStringCriteria, StoppingCriteriaList

    stop = StoppingCriteriaList([StopStringCriteria(tokenizer, [END_OF_PLAN])])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, index in enumerate(rows):
            input_ids[row, longest - len(prompts[index]):] = torch.tensor(prompts[index])
            attention_mask[row, longest - len(prompts[index]):] = 1
        with torch.no_grad(), autocast(device, bf16):
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       use_cache=True, stopping_criteria=stop, pad_token_id=pad_id,
                                       eos_token_id=tokenizer.eos_token_id)
        for row, index in enumerate(rows):
            text = tokenizer.decode(generated[row, longest:], skip_special_tokens=True)
            outputs[index] = text.split(END_OF_PLAN, 1)[0] + (END_OF_PLAN if END_OF_PLAN in text else "")
    return outputs


def _strictly_well_formed(text: str) -> bool:
    try:
        strict_parse_plan(text)
        return True
    except PlanError:
        return False


def score_plans(predicted: list[str], targets: list[str]) -> torch.Tensor:
    """Sums [examples, plan successes (TinyAgent's rule), tool-set matches, strictly well-formed
    outputs, empty outputs, strict successes]."""
    sums = torch.zeros(6, dtype=torch.float64)
    for text, target in zip(predicted, targets):
        sums += torch.tensor([1, plan_success(text, target), tool_set_match(text, target),
                              _strictly_well_formed(text), not text.replace(END_OF_PLAN, "").strip(),
                              strict_plan_success(text, target)], dtype=torch.float64)
    return sums


def plan_metrics(sums: torch.Tensor) -> dict[str, float]:
    """`plan_success` is TinyAgent's rule, the paper's figure. `plan_parse_rate` and
    `strict_plan_success` come from a stricter parser (every line a numbered call, join last):
    they say how clean the output is, and never decide success."""
    n, successes, tool_sets, parsed, empty, strict = (float(v) for v in sums)
    low, high = wilson_interval(successes, n)
    return {
        names.PLAN_SUCCESS: successes / n if n else 0.0,
        names.PLAN_SUCCESS + names.CI_LOW: low,
        names.PLAN_SUCCESS + names.CI_HIGH: high,
        names.TOOL_SET_ACCURACY: tool_sets / n if n else 0.0,
        names.PLAN_PARSE_RATE: parsed / n if n else 0.0,
        names.STRICT_PLAN_SUCCESS: strict / n if n else 0.0,
        names.EMPTY_OUTPUT_RATE: empty / n if n else 0.0,
        names.EVAL_EXAMPLES: n,
    }
