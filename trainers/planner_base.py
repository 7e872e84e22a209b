"""The laptop planner's base model: a small Llama that has read the prompts, never the plans.

TinyLlama had never seen TinyAgent's plans before LoRA fine-tuning; it knew English and code.
A random-init model would not be a fair stand-in: LoRA would have to teach it language and
plans at once. So the local preset builds its own base, once per (data, settings), before
any trial starts:

1. a byte-level BPE tokenizer trained on the training split's prompts (system prompts and
   questions), with a chat template so all three prompt templates can be searched;
2. a Llama-architecture model built from config and pre-trained, all weights, as a plain LM
   on the same prompts. Target plans are never in its corpus; the only plans it reads are the
   system prompt's in-context examples, as a real base model reads code and examples.

The result is an ordinary model folder (config, weights, tokenizer) in the cache, written
atomically, which trials load like any local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.tools import END_OF_PLAN, JOIN_TOOL

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# The layout of TinyLlama's chat models (Zephyr's); `</s>` is the tokenizer's EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Repeats of each distinct system prompt in the corpus: enough for a small model to learn the
# tool descriptions and example format, few enough that questions dominate.
SYSTEM_PROMPT_REPEATS = 24


def compact_system_prompt() -> str:
    """A short planner prompt stating the plan rules, for CPU-sized models.

    The dataset's system prompt (tool signatures, guidelines, examples) is ~1,000 tokens and
    the same for every record; training on it costs most of a laptop trial and teaches nothing
    per example.
    """
    return (f"Plan the question as numbered tool calls. Refer to an earlier call's result as $id. "
            f"End with {JOIN_TOOL}(){END_OF_PLAN}")


class BaseBuildSettings(BaseModel):
    """How the local base is built; part of the cache key."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(2048, ge=300, le=65536, description="BPE vocabulary, special tokens included.")
    pretrain_epochs: int = Field(2, ge=0, description="0 keeps the random weights (tests).")
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    batch_size: int = Field(16, ge=1)
    sequence_length: int = Field(256, ge=16, description="Corpus documents are packed into sequences this long.")
    seed: int = 0


def pretraining_corpus(system_prompts: list[str], questions: list[str]) -> list[str]:
    """Documents a base model reads: distinct system prompts (repeated), the compact prompt,
    and every question. Takes no plans, so target plans cannot leak in."""
    distinct = sorted(set(system_prompts) | {compact_system_prompt()})
    return [prompt for prompt in distinct for _ in range(SYSTEM_PROMPT_REPEATS)] + list(questions)


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


def _packed_sequences(tokenizer, corpus: list[str], sequence_length: int, seed: int) -> torch.Tensor:
    """The shuffled corpus as BOS doc EOS BOS doc EOS ..., cut into rows of sequence_length."""
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = tokenizer([corpus[i] for i in order], add_special_tokens=False)["input_ids"]
    stream = [token for ids in encoded for token in [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]]
    rows = len(stream) // sequence_length
    return torch.tensor(stream[: rows * sequence_length], dtype=torch.long).view(rows, sequence_length)


def pretrain(model, sequences: torch.Tensor, settings: BaseBuildSettings,
             progress: Callable[[str], None] = print) -> list[float]:
    """Full-parameter causal-LM training on packed sequences; returns the mean loss per epoch."""
    from transformers import get_cosine_schedule_with_warmup

    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(sequences) / settings.batch_size)
    total = max(1, steps_per_epoch * settings.pretrain_epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total // 20), total)
    model.train()
    losses = []
    for epoch in range(1, settings.pretrain_epochs + 1):
        started, total_loss = time.perf_counter(), 0.0
        order = torch.randperm(len(sequences), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            batch = sequences[order[start : start + settings.batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
        losses.append(total_loss / steps_per_epoch)
        progress(f"[base] pre-training epoch {epoch}/{settings.pretrain_epochs}: loss {losses[-1]:.3f} "
                 f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    return losses


def base_cache_dir(cache_root: Path, data_fingerprint: str, architecture: dict[str, Any],
                   settings: BaseBuildSettings) -> Path:
    key = json.dumps({"data": data_fingerprint, "architecture": architecture, "settings": settings.model_dump(),
                      "prompt": compact_system_prompt(), "repeats": SYSTEM_PROMPT_REPEATS}, sort_keys=True)
    return cache_root / f"planner-base-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def build_base(target: Path, system_prompts: list[str], questions: list[str], architecture: dict[str, Any],
               settings: BaseBuildSettings, progress: Callable[[str], None] = print) -> Path:
    """Build the base into `target` unless it is there already; returns `target`.

    The folder appears complete or not at all: it is written beside `target` and renamed.
    """
    from transformers import AutoModelForCausalLM

    from trainers.models import config_from_dict

    if (target / "base.json").exists():
        return target
    started = time.perf_counter()
    corpus = pretraining_corpus(system_prompts, questions)
    tokenizer = train_tokenizer(corpus, settings.vocab_size)
    torch.manual_seed(settings.seed)
    config = config_from_dict({**architecture, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    model = AutoModelForCausalLM.from_config(config)
    sequences = _packed_sequences(tokenizer, corpus, settings.sequence_length, settings.seed)
    parameters = sum(p.numel() for p in model.parameters())
    progress(f"[base] building the local planner base in {target}: {parameters / 1e6:.1f}M parameters, "
             f"{len(tokenizer)} tokens in the vocabulary, {sequences.numel():,} corpus tokens, no target plans")
    losses = pretrain(model, sequences, settings, progress) if settings.pretrain_epochs else []
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "base.json").write_text(json.dumps({
            "settings": settings.model_dump(), "architecture": architecture, "pretrain_losses": losses,
            "corpus_documents": len(corpus), "corpus_tokens": int(sequences.numel()),
            "build_seconds": time.perf_counter() - started,
        }, indent=2))
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "base.json").exists():  # not a lost race with another builder
            raise
    progress(f"[base] built in {time.perf_counter() - started:.0f} s")
    return target


def build_base_from_examples(target: Path, examples: list, architecture: dict[str, Any],
                             settings: BaseBuildSettings, progress: Callable[[str], None] = print) -> Path:
    """`build_base` from a training split's records: their system prompts and their questions
    (never their target plans, which the fine-tuning must teach)."""
    system_prompts = [content for e in examples for role, content in e.messages if role == "system"]
    questions = [content for e in examples for role, content in e.messages if role != "system"]
    return build_base(target, system_prompts, questions, architecture, settings, progress)
