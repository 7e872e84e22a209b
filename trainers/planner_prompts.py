"""The planner's prompts: the LLMCompiler system prompt TinyAgent's planner reads
(`planner_system_prompt`), how planner messages become model inputs, and which tokens the loss
sees.

The reproduction found the prompt format mattered more than any other setting: sent as plain
concatenation, TinyLlama-1.1B-32k-Instruct reached ~59% plan success; in the instruction
format it was tuned on, ~76%. Training and evaluation must use the same template, so both
go through `render_prompt`.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

from trainers.tools import END_OF_PLAN, TOOLS, Tool

PLANNER_TEMPLATES = ("concat", "instruct", "chat")
IGNORE_INDEX = -100  # label value torch's cross-entropy skips
# The date the generated data lives on: its requests' times count from it, and the planner
# prompt states it, as TinyAgent's states the user's.
TODAY = dt.datetime(2024, 5, 1, 9, 0)  # a Wednesday


def planner_system_prompt(examples: list[tuple[str, str]], tools: tuple[Tool, ...] = TOOLS) -> str:
    """An LLMCompiler-style planner prompt: tool list, guidelines, in-context examples.
    `tools` narrows the list, as TinyAgent does with the tools ToolRAG retrieves."""
    tool_lines = [f"{i}. {tool.name}{tool.signature}\n - {tool.description}" for i, tool in enumerate(tools, start=1)]
    tool_lines.append(f"{len(tools) + 1}. join():\n - Collects and combines results from prior actions.")
    example_text = "\n###\n".join(f"Question: {q}\n{p}{END_OF_PLAN}" for q, p in examples)
    return (
        "Given a user query, create a plan to solve it with the utmost parallelizability. "
        f"Each plan should comprise an action from the following {len(tools) + 1} types:\n"
        + "\n".join(tool_lines)
        + "\n\nGuidelines:\n"
        " - Each action described above contains input/output types and description.\n"
        " - Each action in the plan should strictly be one of the above types.\n"
        " - Each action MUST have a unique ID, which is strictly increasing.\n"
        " - Inputs for actions can either be constants or outputs from preceding actions, "
        "written as $id.\n"
        " - Always call join as the last action in the plan. Say '<END_OF_PLAN>' after you call join.\n"
        " - Never introduce new actions other than the ones provided.\n"
        f" - Today's date is {TODAY:%A %Y-%m-%d %H:%M}. Dates are 'YYYY-MM-DD HH:MM:SS'.\n"
        " - Before sending an email or an SMS, look up each recipient's address or number, unless "
        "the request gives it.\n\n"
        "Here are some examples:\n" + example_text
    )


JOIN_SYSTEM_PROMPT = (
    "Solve a question answering task. Read the plan's observations and decide whether the "
    "question is answered. Reply with a Thought and then Action: Finish(<answer>) or Replan(<reason>)."
)


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


def prompt_token_ids(tokenizer: Any, messages: list[tuple[str, str]], template: str, max_length: int,
                     *, max_new_tokens: int) -> tuple[list[int], bool]:
    """(`full_prompt_ids`, whether the prompt was cut): what the model reads before the plan, in
    training and in generation alike.

    The prompt keeps its last `max_length - max_new_tokens` tokens (a leading BOS counted, and
    kept), so the room left for the plan is the same `max_new_tokens` the model may generate. A
    cut prompt loses its beginning (the tool list), never the question.
    """
    return cut_prompt(tokenizer, full_prompt_ids(tokenizer, messages, template), max_length, max_new_tokens)


def full_prompt_ids(tokenizer: Any, messages: list[tuple[str, str]], template: str) -> list[int]:
    """The rendered prompt's ids behind the BOS token `opens_with_bos` allows, uncut: its length
    is the prompt's true token count."""
    ids = tokenizer(render_prompt(messages, template, tokenizer), add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if opens_with_bos(tokenizer, ids) else []) + ids


def bos_marks_turns(tokenizer: Any) -> bool:
    """Whether the tokenizer's BOS token is its chat format's turn marker rather than a
    document start: SmolLM2's BOS is ChatML's `<|im_start|>`, written before every message.
    Such a token before a `concat` or `instruct` prompt would open a turn that never closes."""
    bos, chat_template = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "chat_template", None)
    if bos is None or not chat_template:
        return False
    return _written_per_turn(bos, chat_template, tokenizer)


@functools.lru_cache(maxsize=8)
def _written_per_turn(bos: str, chat_template: str, tokenizer: Any) -> bool:
    # Keyed on the token and the template too: a tokenizer's template may be set after loading.
    two_turns = tokenizer.apply_chat_template([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
                                              tokenize=False)
    return two_turns.count(bos) >= 2


def opens_with_bos(tokenizer: Any, rendered_ids: list[int]) -> bool:
    """Whether BOS goes before a rendered prompt: only where the tokenizer has a document-start
    BOS, and the template did not already write it (a chat template that opens with
    `bos_token`), so no prompt carries a stray or a doubled one."""
    if tokenizer.bos_token_id is None or rendered_ids[:1] == [tokenizer.bos_token_id]:
        return False
    return not bos_marks_turns(tokenizer)


def cut_prompt(tokenizer: Any, ids: list[int], max_length: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """`full_prompt_ids` cut as `prompt_token_ids` describes: (ids, whether it was cut)."""
    bos = ids[:1] if ids[:1] == [tokenizer.bos_token_id] else []
    body = ids[len(bos):]
    room = max(1, max_length - max_new_tokens - len(bos))
    return bos + body[-room:], len(body) > room


def encode_example(tokenizer: Any, messages: list[tuple[str, str]], plan: str, template: str,
                   *, max_length: int, max_new_tokens: int) -> dict[str, Any]:
    """input_ids and labels for causal-LM training with the loss on the response only, and
    `over_max_length`: whether prompt plus target had to be cut to fit max_length.

    Prompt and response are tokenized apart so the boundary is exact; prompt positions get
    IGNORE_INDEX. The prompt is `prompt_token_ids`, exactly what generation is given; the
    response (plan, end marker, EOS) fills the rest of max_length and is cut at its end.
    """
    prompt, prompt_cut = prompt_token_ids(tokenizer, messages, template, max_length, max_new_tokens=max_new_tokens)
    response_ids = tokenizer(training_target(plan), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt)
    input_ids = prompt + response_ids[:room]
    labels = [IGNORE_INDEX] * len(prompt) + response_ids[:room]
    return {"input_ids": input_ids, "labels": labels, "over_max_length": prompt_cut or len(response_ids) > room}
