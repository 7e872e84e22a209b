"""The laptop planner's base model: a small Llama built the way TinyLlama was, from other text.

TinyLlama had read English and code, function calls among it, and had been instruction-tuned
in the `### Instruction:` format, before anyone applied LoRA to it for TinyAgent. LoRA adapts
what a base can already do, so a base that has never written a plan leaves it nothing to adapt
(a base that read only the prompts wrote no correct plan after LoRA). The local preset builds
its base once per (data, settings), before any trial starts, in three steps:

1. a byte-level BPE tokenizer trained on everything the base reads (below), with a chat
   template so all three prompt templates can be searched;
2. pre-training, all weights, as a plain LM on:
   - requests and plans of another domain (trainers/errand_domain.py: payments, travel,
     dining, home; 19 tools of its own), in the same plan syntax TinyAgent's plans use, as
     TinyLlama read code before it met TinyAgent's tools;
   - the training split's questions, without their plans;
   - the tool reference of both domains (each tool's name, signature and description);
3. instruction tuning in the `instruct` format (`### Instruction:` / `### Input:` /
   `### Response:`, TinyLlama-1.1B-32k-Instruct's), loss on the response only:
   - "plan the question" on the other domain's requests, with the compact planner prompt;
   - "repeat the question" on the training split's questions, a general task over the
     request language.

No plan that uses TinyAgent's 16 tools is in any of it: not the target plans, and not the
dataset's system prompts either, whose in-context examples are such plans
(tests/test_planner_base.py checks every document with the scorer's own parser).

The result is an ordinary model folder (config, weights, tokenizer) in the cache, written
atomically, which trials load like any local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.errand_domain import ERRAND_TOOLS, ErrandRequest, errand_requests
from trainers.models import MANIFEST, write_model_folder
from trainers.planner_prompts import IGNORE_INDEX, render_prompt, training_target
from trainers.tools import END_OF_PLAN, JOIN_TOOL, TOOLS

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# The layout of TinyLlama's chat models (Zephyr's); `</s>` is the tokenizer's EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Bumped whenever the same settings would build another base: part of the cache key.
BASE_RECIPE_VERSION = 3
# Copies of the tool reference in the pre-training corpus: a reference read a few times, as a
# documentation page is, next to thousands of requests.
TOOL_REFERENCE_REPEATS = 8
# The format the base is instruction-tuned in: TinyLlama-1.1B-32k-Instruct's.
INSTRUCTION_TEMPLATE = "instruct"
REPEAT_INSTRUCTION = "Repeat the question word for word."
SNAKE_CASE_INSTRUCTION = "Write the question's words as one snake_case identifier."
_WORD = re.compile(r"[a-z0-9]+")


def compact_system_prompt() -> str:
    """A short planner prompt stating the plan rules, for CPU-sized models.

    The dataset's system prompt (tool signatures, guidelines, examples) is 1,000 to 2,000
    tokens and the same for every record; training on it costs most of a laptop trial and teaches nothing
    per example.
    """
    return (f"Plan the question as numbered tool calls. Refer to an earlier call's result as $id. "
            f"End with {JOIN_TOOL}(){END_OF_PLAN}")


class BaseBuildSettings(BaseModel):
    """How the local base is built; part of the cache key."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(2048, ge=300, le=65536, description="BPE vocabulary, special tokens included.")
    errand_requests: int = Field(4000, ge=0, description="Requests with plans of the other domain it reads.")
    pretrain_epochs: int = Field(2, ge=0, description="Plain-LM epochs; 0 with instruction_epochs 0 keeps the "
                                                      "random weights (tests).")
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    instruction_epochs: int = Field(1, ge=0, description="Instruction-tuning epochs, in the instruct format.")
    instruction_learning_rate: float = Field(1e-3, gt=0, lt=1)
    snake_case_task: bool = Field(True, description="Instruct it to write questions as snake_case identifiers; "
                                                    "off only to measure what that brings.")
    batch_size: int = Field(16, ge=1)
    sequence_length: int = Field(256, ge=16, description="Documents are packed into sequences this long.")
    seed: int = 0


def tool_reference() -> str:
    """Both domains' tools, one per unnumbered line (a numbered list would parse as a plan)."""
    own = [f"- {tool.name}{tool.signature}: {tool.description}" for tool in TOOLS]
    other = [f"- {name}{signature}" for name, signature in ERRAND_TOOLS.items()]
    return "Tools:\n" + "\n".join(own + other)


def pretraining_corpus(questions: list[str], errands: list[ErrandRequest]) -> list[str]:
    """Plain-LM documents: the other domain's requests with their plans, the training questions
    (no plans), the tool reference and the compact prompt. `questions` are user messages
    (`Question: ...`); no TinyAgent plan is taken, so none can leak in."""
    return ([f"Question: {r.question}\n{training_target(r.plan)}" for r in errands] + list(questions)
            + [tool_reference()] * TOOL_REFERENCE_REPEATS + [compact_system_prompt()])


def snake_case(text: str) -> str:
    """'Email Sid the slides!' -> 'email_sid_the_slides'."""
    return "_".join(_WORD.findall(text.lower()))


def instruction_examples(questions: list[str], errands: list[ErrandRequest],
                         snake_case_task: bool = True) -> list[tuple[str, str]]:
    """(prompt, response) pairs in the instruct format:
    - the other domain's requests planned under the compact prompt;
    - general tasks over the request language, on the training questions and the other
      domain's: repeat the question, and write its words as a snake_case identifier. The second
      is what reading code teaches a real base: the request's words as pieces of identifiers,
      the form a tool name takes (`get_email_address`), which a base that has seen words only
      after a space cannot write; LoRA leaves the embeddings as they are, so it could not teach
      them either (measured: bench/planner_learning.py)."""
    plan = [(render_prompt([("system", compact_system_prompt()), ("user", f"Question: {r.question}")],
                           INSTRUCTION_TEMPLATE), training_target(r.plan)) for r in errands]
    own = [q.removeprefix("Question: ") for q in questions]
    repeat = [(render_prompt([("system", REPEAT_INSTRUCTION), ("user", f"Question: {text}")], INSTRUCTION_TEMPLATE),
               text) for text in own]
    snake = [(render_prompt([("system", SNAKE_CASE_INSTRUCTION), ("user", f"Question: {text}")],
                            INSTRUCTION_TEMPLATE), snake_case(text))
             for text in own + [r.question for r in errands]] if snake_case_task else []
    return plan + repeat + snake


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `corpus`; any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def packed_rows(pieces: list[tuple[list[int], list[int]]], sequence_length: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of the shuffled pieces laid end to end and cut into rows of
    sequence_length. A piece is (ids, labels); IGNORE_INDEX labels are not learned."""
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [token for i in order for token in pieces[i][0]]
    labels = [label for i in order for label in pieces[i][1]]
    rows = len(ids) // sequence_length
    shape = (rows, sequence_length)
    return (torch.tensor(ids[: rows * sequence_length], dtype=torch.long).view(shape),
            torch.tensor(labels[: rows * sequence_length], dtype=torch.long).view(shape))


def document_pieces(tokenizer, corpus: list[str]) -> list[tuple[list[int], list[int]]]:
    """BOS doc EOS, every token learned."""
    encoded = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    pieces = []
    for ids in encoded:
        row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        pieces.append((row, row))
    return pieces


def instruction_pieces(tokenizer, examples: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """BOS prompt response EOS, the loss on response and EOS only (as the fine-tuning does)."""
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in examples], add_special_tokens=False)["input_ids"]
    pieces = []
    for prompt, response in zip(prompts, responses):
        head, tail = [tokenizer.bos_token_id, *prompt], [*response, tokenizer.eos_token_id]
        pieces.append((head + tail, [IGNORE_INDEX] * len(head) + tail))
    return pieces


def train_causal_lm(model, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, *, learning_rate: float,
                    batch_size: int, seed: int, stage: str, progress: Callable[[str], None] = print,
                    trace: list[float] | None = None) -> list[float]:
    """Full-parameter causal-LM training on packed rows; returns the mean loss per epoch. With
    `trace`, the mean loss of every twentieth of an epoch is appended to it: a spike or a
    plateau that an epoch's mean hides shows there."""
    from transformers import get_cosine_schedule_with_warmup

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    total = max(1, steps_per_epoch * epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total // 20), total)
    model.train()
    losses = []
    for epoch in range(1, epochs + 1):
        started, total_loss, window = time.perf_counter(), 0.0, []
        window_steps = max(1, steps_per_epoch // 20)
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = model(input_ids=inputs[rows], labels=labels[rows]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            window.append(loss.item())
            if len(window) == window_steps or start + batch_size >= len(order):
                if trace is not None:
                    trace.append(round(sum(window) / len(window), 4))
                window = []
        losses.append(total_loss / steps_per_epoch)
        progress(f"[base] {stage} epoch {epoch}/{epochs}: loss {losses[-1]:.3f} "
                 f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    return losses


def random_model(tokenizer, architecture: dict[str, Any], seed: int):
    """A causal LM of `architecture` with random weights (seeded) sized to `tokenizer`'s vocabulary
    and special tokens."""
    from transformers import AutoModelForCausalLM

    from trainers.models import config_from_dict

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config_from_dict({
        **architecture, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))


def base_cache_dir(cache_root: Path, data_fingerprint: str, architecture: dict[str, Any],
                   settings: BaseBuildSettings) -> Path:
    key = json.dumps({"data": data_fingerprint, "architecture": architecture, "settings": settings.model_dump(),
                      "prompt": compact_system_prompt(), "recipe": BASE_RECIPE_VERSION}, sort_keys=True)
    return cache_root / f"planner-base-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def base_documents(questions: list[str], settings: BaseBuildSettings) -> tuple[list[str], list[tuple[str, str]]]:
    """(pre-training corpus, instruction examples) of a base: everything it reads."""
    errands = errand_requests(settings.errand_requests, settings.seed)
    return pretraining_corpus(questions, errands), instruction_examples(questions, errands, settings.snake_case_task)


def build_base(target: Path, questions: list[str], architecture: dict[str, Any], settings: BaseBuildSettings,
               *, progress: Callable[[str], None] = print) -> Path:
    """Build the base into `target` unless it is there already; returns `target`.

    questions: the training split's user messages (`Question: ...`), never their plans.
    The folder appears complete or not at all: it is written beside `target` and renamed.
    """
    if (target / MANIFEST).exists():
        return target
    started = time.perf_counter()
    corpus, instructions = base_documents(questions, settings)
    tokenizer = train_tokenizer(corpus + [text for pair in instructions for text in pair], settings.vocab_size)
    model = random_model(tokenizer, architecture, settings.seed)
    documents = packed_rows(document_pieces(tokenizer, corpus), settings.sequence_length, settings.seed)
    tuning = packed_rows(instruction_pieces(tokenizer, instructions), settings.sequence_length, settings.seed + 1)
    parameters = sum(p.numel() for p in model.parameters())
    progress(f"[base] building the local planner base in {target}: {parameters / 1e6:.1f}M parameters, "
             f"{len(tokenizer)} tokens in the vocabulary; it reads {documents[0].numel():,} tokens of "
             f"{len(corpus):,} documents, then {tuning[0].numel():,} tokens of {len(instructions):,} instructions; "
             f"no TinyAgent plan")
    pretrain_trace, instruction_trace = [], []
    pretrain_losses = train_causal_lm(model, *documents, settings.pretrain_epochs, learning_rate=settings.learning_rate,
                                      batch_size=settings.batch_size, seed=settings.seed, stage="pre-training",
                                      progress=progress, trace=pretrain_trace)
    instruction_losses = train_causal_lm(model, *tuning, settings.instruction_epochs,
                                         learning_rate=settings.instruction_learning_rate,
                                         batch_size=settings.batch_size, seed=settings.seed + 1,
                                         stage="instruction tuning", progress=progress, trace=instruction_trace)
    write_model_folder(target, model, tokenizer, {
        "settings": settings.model_dump(), "architecture": architecture, "recipe": BASE_RECIPE_VERSION,
        "pretrain_losses": pretrain_losses, "instruction_losses": instruction_losses,
        "pretrain_loss_trace": pretrain_trace, "instruction_loss_trace": instruction_trace,
        "corpus_documents": len(corpus), "corpus_tokens": int(documents[0].numel()),
        "instruction_examples": len(instructions), "instruction_tokens": int(tuning[0].numel()),
        "build_seconds": time.perf_counter() - started,
    })
    progress(f"[base] built in {time.perf_counter() - started:.0f} s")
    return target


def questions_of(examples: list) -> list[str]:
    """What a base may read of a training split's records: their questions (user messages).
    Never their target plans, which the fine-tuning must teach, nor their system prompts, whose
    in-context examples are plans of the same tools."""
    return [content for e in examples for role, content in e.messages if role == "user"]


def build_base_from_examples(target: Path, examples: list, architecture: dict[str, Any],
                             settings: BaseBuildSettings, *, progress: Callable[[str], None] = print) -> Path:
    """`build_base` from a training split's records, reading only `questions_of` them."""
    return build_base(target, questions_of(examples), architecture, settings, progress=progress)
