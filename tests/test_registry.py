"""The model registry: every per-model fact lives in trainers/registry.py, and tuning/ names no model."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from trainers import metric_names
from trainers.registry import MODELS, TASKS, spec_for

TUNING = Path(__file__).resolve().parent.parent / "tuning"
MODEL_WORDS = set(TASKS) | set(MODELS)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal in a module, docstrings and f-string parts included."""
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


@pytest.mark.parametrize("module", sorted(TUNING.glob("*.py")), ids=lambda p: p.name)
def test_tuning_names_no_model_except_in_cli_help(module):
    """Adding a model must need no edit in tuning/: no string there may be a model's name. The
    one exception is the CLI's help text, which tells a person which presets exist."""
    named = [(line, text) for line, text in _string_constants(module) if text.strip() in MODEL_WORDS]
    assert not named, f"{module.name} names a model at {named}"
    if module.name != "search.py":
        return
    tree = ast.parse(module.read_text())
    help_texts = {id(keyword.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for keyword in node.keywords if keyword.arg in ("help", "description")}
    docstring = tree.body[0].value if ast.get_docstring(tree) else None  # usage examples, for people
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node is not docstring:
            words = set(node.value.replace("(", " ").replace(")", " ").replace(":", " ").replace(",", " ").split())
            if words & MODEL_WORDS:
                assert id(node) in help_texts, f"search.py line {node.lineno} names a model outside help text"


def test_every_model_has_every_fact_and_its_metric_names_are_known():
    known = {value for name, value in vars(metric_names).items() if name.isupper()}
    for spec in MODELS.values():
        assert spec.task in TASKS and spec_for(spec.task, spec.family) is spec
        assert set(spec.headline) <= set(spec.target_metrics) | known
        assert spec.scheduler_metric in known and set(spec.extra_columns) <= known
        assert spec.templates and "prompt_template" in spec.config_class.model_fields
        assert "epochs" in spec.config_class.model_fields and "seed" in spec.config_class.model_fields
        # One signature for scoring a checkpoint on test, whatever the model.
        assert list(inspect.signature(spec.score_checkpoint).parameters)[:4] == [
            "directory", "split", "device", "max_examples"]
    assert len({spec.registered_model for spec in MODELS.values()}) == len(MODELS)


def test_an_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(KeyError, match="linear, transformer|transformer, linear"):
        spec_for("toolrag", "forest")
