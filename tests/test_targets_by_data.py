"""Which figures a search measures closeness from: the paper's on published data, the
data-relative tool count on generated data; printed, and recorded on the parent run."""

from __future__ import annotations

import json
import shutil

from trainers import synthetic
from tuning.search import parse_args


def _prepare(data_dir, results_dir, capsys):
    from tuning.prepare import prepare

    prepared = prepare(parse_args(["--model", "toolrag", "--smoke", "--data", str(data_dir),
                                   "--results-dir", str(results_dir)]))
    return prepared, capsys.readouterr().out


def test_generated_data_is_measured_relative_to_its_gold_tool_count_and_published_data_absolutely(
        small_data_dir, tmp_path, capsys):
    generated, printed = _prepare(small_data_dir, tmp_path / "a", capsys)
    assert generated.targets["tool_count"] == {"value": 1.0, "tolerance": 0.1, "relative_to": "gold_tool_count"}
    assert "[targets] generated data" in printed and "gold + 1" in printed
    assert generated.parent_params["generated_data"] is True
    assert json.loads(generated.parent_params["paper_targets"]) == generated.targets
    # Every trial measures from it: the trainer config carries the relative target.
    assert generated.request.trainer_base["targets"]["tool_count"]["relative_to"] == "gold_tool_count"

    # The same records without the generator's marker read as published data: the paper's 3.97.
    published_dir = tmp_path / "published"
    published_dir.mkdir()
    for name in ("training_data.json", "testing_data.json"):
        shutil.copy(small_data_dir / name, published_dir / name)
    assert synthetic.is_generated(small_data_dir) and not synthetic.is_generated(published_dir)
    published, printed = _prepare(published_dir, tmp_path / "b", capsys)
    assert published.targets["tool_count"] == {"value": 3.97, "tolerance": 0.1}
    assert "[targets] the paper's figures: tool_recall 0.99, tool_count 3.97" in printed
    assert published.parent_params["generated_data"] is False
    assert published.request.trainer_base["targets"]["tool_count"].get("relative_to") is None
