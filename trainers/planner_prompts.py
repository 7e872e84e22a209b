"""How planner messages become model inputs, and which tokens the loss sees.

The reproduction found the prompt format mattered more than any other setting: sent as plain
concatenation, TinyLlama-1.1B-32k-Instruct reached ~59% plan success; in the instruction
format it was tuned on, ~76%. Training and evaluation must use the same template, so both
go through `render_prompt`.
"""

from __future__ import annotations

from typing import Any

from trainers.tools import END_OF_PLAN

PLANNER_TEMPLATES = ("concat", "instruct", "chat")
IGNORE_INDEX = -100  # label value torch's cross-entropy skips


def render_prompt(messages: list[tuple[str, str]], template: str, tokenizer: Any | None = None) -> str:
    """The text the model reads before it writes the plan.

    messages: (role, content) pairs of a plan point (system prompt, then `Question: ...`).
    - concat: system prompt, blank line, user message: what a plain LM is sent at serving time;
    - instruct: the `### Instruction:` / `### Input:` / `### Response:` format of
      TinyLlama-1.1B-32k-Instruct;
    - chat: the tokenizer's own chat template (raises ValueError when it has none).
    """
    system = "\n\n".join(content for role, content in messages if role == "system")
    user = "\n\n".join(content for role, content in messages if role != "system")
    if template == "concat":
        return f"{system}\n\n{user}\n"
    if template == "instruct":
        return f"### Instruction:\n{system}\n\n### Input:\n{user}\n\n### Response:\n"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("the 'chat' template needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown planner template {template!r} (known: {', '.join(PLANNER_TEMPLATES)})")


def training_target(plan: str) -> str:
    """What the model learns to write: the plan text and the end marker."""
    return plan + END_OF_PLAN


def encode_example(tokenizer: Any, messages: list[tuple[str, str]], plan: str, template: str,
                   max_length: int) -> dict[str, list[int]]:
    """input_ids and labels for causal-LM training with the loss on the response only.

    Prompt and response are tokenized apart so the boundary is exact; prompt positions get
    IGNORE_INDEX. A prompt too long for max_length loses its beginning (the tool list), never
    the question or the response; a response longer than max_length is cut at the end.
    """
    prompt_ids = tokenizer(render_prompt(messages, template, tokenizer), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(training_target(plan), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    response_ids = response_ids[: max_length - len(bos)]
    room = max_length - len(bos) - len(response_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - room:] if room > 0 else []
    input_ids = bos + prompt_ids + response_ids
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + response_ids
    return {"input_ids": input_ids, "labels": labels}
