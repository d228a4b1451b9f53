"""`memray bench`: how fast memray scores and trains, each figure beside its baseline.

Owns the speed benchmark. Every figure is measured in one run next to a baseline measured
in the same run (the two interleaved where it is repeated), so that the ratio holds on a
busy machine even when the absolute numbers drift:

- **scoring**: memray's scorer (`memray.scoring.score_tokens`: one batched forward pass
  gives every attack's statistics, length-sorted batches, vocabulary statistics in
  float32 tiles) at the trial defaults and at a low-memory setting, against a naive scorer
  as existing MIA tools score (one sample per forward pass, full float32 logits, one pass
  per attack). Tokens/s, peak memory, on a GPU model-FLOPs utilization, and the largest
  difference between the two scorers' attack scores.
- **training**: tokens/s of memray's training loop (`memray.train.fit`) per method and,
  on a GPU, MFU, against a default `transformers.Trainer` set-up of the same model (fp32,
  random sampler, the standard causal-LM collator).
- **sweep**: N tiny trials through Ray Tune (`memray.sweep.run_sweep`) against the same
  trials run one after the other in this process (`memray.trial.run_trial`).
- **reference cache**: the reference model's statistics for N trials of a sweep, scored
  once and cached (`memray.scoring.reference_stats`), against scored once per trial.
- **attacks**: every registered attack's own cost per epoch beside the one scoring pass
  they share: the attacks that read that pass's statistics cost next to nothing; those
  with a pass of their own (`AttackSpec.extra_pass`: ReCaLL's prefixed forward,
  GradNorm's backward per sample) are timed on the same samples, and the set-up they build
  once per trial (`prepare`: ReCaLL's shots, DC-PDD's frequencies) apart. The random
  model trains every parameter, so GradNorm's row is that of full fine-tuning (a
  parameter-efficient method's backward reaches fewer weights). lira and rmia are left
  out: their cost is their reference models' training (the sweep's own trials).
- **dp**: one DP-SGD step's per-sample gradients (`train.dp`, `memray.dp`) per method (and
  its `bench_variants`: DoRA beside LoRA), by the engine the method's registry entry names and by torch.func, beside
  the same batch's plain backward pass (no per-sample gradients); and the largest difference
  between the two engines' per-sample gradients where both run.

Models: any alias, built-in or config (`--model`). The weights are random (speed does not
depend on them) and nothing is downloaded: the study aliases are built from their
published shapes (`memray.models.PUBLISHED_CONFIGS`), a hub id or local path from its config (local cache or
folder). Token ids are random, sample lengths uniform in [L/2, L] with L = 128 for the
built-ins (the trial default) and 512 for the rest (the studies' length); the built-in
tokenizer serves only to pad. memray's rows run the model as a trial loads it (GELU fused,
`memray.models.fuse_activations`), the baselines as transformers builds it.

Peak memory is the peak above what was in use when a part started: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the process's peak resident set size (Linux
`VmHWM`), reset through `/proc/self/clear_refs` after `malloc_trim` gives freed heap back,
so each part's peak is its own (None where that is not available).

MFU: `memray.flops` (the model FLOPs per token and the GPUs' peak rates; trials report
`perf/mfu` with the same).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.util
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PretrainedConfig,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from memray import attacks, dp, methods, models, scoring
from memray.config import BUILTIN_MODELS, AttackConfig, ConfigError, EvalConfig, MethodConfig, ModelConfig, TrainConfig
from memray.files import validate
from memray.flops import attention_flops, matmul_params, mean_context, mfu, peak_tflops, train_flops_per_token
from memray.scoring import TokenStats
from memray.train import TokenDataset, fit

SECTIONS = ("scoring", "training", "sweep", "reference_cache", "attacks", "dp")


def scored_attacks() -> tuple[str, ...]:
    """Attacks both scorers compute per sample from the target model's statistics alone:
    every registered one but those reading a reference model (`needs_reference`: its cost is
    the reference-cache section's subject), reference models trained like the target, or
    scored as a set (`score_set`: the attacks section measures them)."""
    return tuple(name for name in attacks.ATTACKS
                 if not attacks.ATTACKS[name].needs_reference and not attacks.ATTACKS[name].needs_reference_models
                 and attacks.ATTACKS[name].score_set is None)


#: The low-memory scorer setting on a GPU: fewer samples per pass, narrower vocabulary tiles.
LEAN_BATCH, LEAN_VOCAB_CHUNK = 4, 1024
#: Score agreement required between the two scorers where both run in float32 (CPU).
AGREEMENT_ATOL = 1e-5


# ---------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------


def bench_model_config(name: str) -> PretrainedConfig:
    """The config of `name` (alias, built-in, hub id in the local cache, or local folder)."""
    model = validate(ModelConfig, {"name": name}, "--model", "model")
    return models.model_config(model, "--model", published=True)


def random_model(config: PretrainedConfig, device: torch.device, seed: int = 0) -> nn.Module:
    """A causal LM of `config` with random float32 weights on `device`, SDPA attention."""
    torch.manual_seed(seed)
    with torch.device(device):
        return models.name_causal_lm_loss(
            AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32))


def sample_length(name: str) -> int:
    """Longest sample: the trial default for built-ins, the studies' 512 for real models."""
    return 128 if name in BUILTIN_MODELS else 512


def random_samples(count: int, max_length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` samples of random ids in [1, vocab), lengths uniform in [max_length/2, max_length]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max_length // 2, max_length + 1, size=count)
    return [rng.integers(1, vocab_size, size=int(n)).tolist() for n in lengths]


def stand_in_text(ids: list[int]) -> str:
    """A text for zlib's compressed length: random ids have no tokenizer to decode them."""
    return " ".join(map(str, ids))


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory (bytes) above the level at entry, of CUDA allocations or of the process (CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _reset_peak_rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.peak = max(_proc_status_bytes("VmHWM") - self.start, 0)


def _proc_status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if not match:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def _reset_peak_rss() -> int | None:
    """Give freed heap back to the OS and reset the peak RSS; the RSS now, or None off Linux."""
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
        return _proc_status_bytes("VmRSS")
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], Any], repeats: int, device: torch.device,
                   warm_up: bool = False) -> tuple[float, Any]:
    """(the median of `repeats` timed calls of `step`, the last call's result); `warm_up`:
    one untimed call first (allocations, hooks, a first trace)."""
    if warm_up:
        step()
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        result = step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _megabytes(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def naive_scores(model: nn.Module, token_ids: list[list[int]], texts: list[str],
                 attack_configs: list[AttackConfig]) -> dict[str, np.ndarray]:
    """Attack scores as existing MIA tools compute them: for each attack, one forward pass per
    sample (no batching), the full float32 logits, log-softmax over the whole vocabulary.

    The statistics each attack reads are computed that way, once per attack (as tools that
    run each attack on its own do), and handed to the registered attack (`memray.attacks`),
    so the two scorers differ only in how the statistics are computed. Takes the target
    model, token ids, the texts (zlib) and the attacks (`scored_attacks`); returns label ->
    float64 array, one score per sample.
    """
    device = next(model.parameters()).device
    model.eval()
    scores: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for config in attack_configs:
            spec = attacks.ATTACKS[config.name]
            values = []
            for ids, text in zip(token_ids, texts):
                input_ids = torch.tensor([ids], device=device)
                output = model(input_ids=input_ids, labels=input_ids)
                log_probs = torch.log_softmax(output.logits[0, :-1].float(), dim=-1)
                token_log_probs = log_probs.gather(1, input_ids[0, 1:, None])[:, 0]
                stats = TokenStats(token_log_probs.cpu().numpy())
                if spec.needs_vocab_stats:
                    probs = log_probs.exp()
                    mu = (probs * log_probs).sum(-1)
                    sigma = (probs * (log_probs - mu[:, None]) ** 2).sum(-1).sqrt()
                    stats.mu, stats.sigma = mu.cpu().numpy(), sigma.cpu().numpy()
                values.append(spec.score(config, stats, text, None))
            scores[config.label] = np.array(values, dtype=np.float64)
    return scores


@contextlib.contextmanager
def as_trials_load_it(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as `memray.models.load_model` gives it to a trial (GELU fused) for the
    duration; the modules it had are put back afterwards, for the baselines."""
    children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    models.fuse_activations(model)
    try:
        yield model
    finally:
        for parent, name, child in children:
            setattr(parent, name, child)


def memray_scores(model: nn.Module, token_ids: list[list[int]], texts: list[str],
                  attack_configs: list[AttackConfig], batch_size: int, vocab_chunk: int) -> dict[str, np.ndarray]:
    """Attack scores from memray's scorer, on the model as a trial loads it: one batched
    pass for every attack's statistics."""
    need_vocab_stats = any(attacks.ATTACKS[config.name].needs_vocab_stats for config in attack_configs)
    with as_trials_load_it(model):
        stats = scoring.score_tokens(model, token_ids, batch_size=batch_size, vocab_chunk=vocab_chunk,
                                     need_vocab_stats=need_vocab_stats)
    return attacks.attack_scores(attack_configs, stats, texts, None)


def max_score_difference(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference per attack label."""
    return {label: float(np.max(np.abs(left[label] - right[label]))) for label in left}


def bench_scoring(model: nn.Module, config: PretrainedConfig, device: torch.device, token_ids: list[list[int]],
                  repeats: int) -> dict[str, Any]:
    """Scoring section: the naive scorer and memray's at the trial defaults for this device
    (and, on a GPU, at a low-memory setting), interleaved `repeats` times."""
    texts = [stand_in_text(ids) for ids in token_ids]
    attack_configs = [AttackConfig(name=name) for name in scored_attacks()]
    defaults = EvalConfig()
    settings = {"memray": (defaults.batch_on(device.type), defaults.vocab_chunk)}
    if device.type == "cuda":  # on a CPU the defaults are the lean setting already
        settings["memray-lean"] = (LEAN_BATCH, LEAN_VOCAB_CHUNK)
    scorers: dict[str, tuple[dict[str, Any], Callable[[], dict[str, np.ndarray]]]] = {
        "naive": ({"batch_size": 1, "passes": len(attack_configs), "logits": "full float32"},
                  lambda: naive_scores(model, token_ids, texts, attack_configs)),
    }
    for name, (batch, chunk) in settings.items():
        rows, columns = scoring.tile_shape(device.type, chunk)
        scorers[name] = ({"batch_size": batch, "vocab_chunk": chunk, "tile": f"{rows}x{columns}", "passes": 1},
                         functools.partial(memray_scores, model, token_ids, texts, attack_configs, batch, chunk))
    warm = token_ids[:2]
    naive_scores(model, warm, texts[:2], attack_configs)  # first-call costs (kernels, allocator) out of the timings
    memray_scores(model, warm, texts[:2], attack_configs, *settings["memray"])
    seconds: dict[str, list[float]] = {name: [] for name in scorers}
    peaks: dict[str, list[int]] = {name: [] for name in scorers}
    results: dict[str, dict[str, np.ndarray]] = {}
    for _ in range(repeats):
        for name, (_, run) in scorers.items():
            with PeakMemory(device) as memory:
                started = time.perf_counter()
                results[name] = run()
                _sync(device)
                seconds[name].append(time.perf_counter() - started)
            if memory.peak is not None:
                peaks[name].append(memory.peak)
    tokens = sum(len(ids) - 1 for ids in token_ids)  # scored target tokens
    peak, gpu = peak_tflops(device)
    flops_per_token = 2 * matmul_params(model) + attention_flops(config, mean_context(token_ids), trained=False)
    rows = []
    for name, (settings, _) in scorers.items():
        elapsed = statistics.median(seconds[name])
        rate = tokens / elapsed
        row = {"scorer": name, **settings, "seconds": round(elapsed, 4), "tokens_per_s": round(rate, 1),
               "peak_mem_mb": _megabytes(max(peaks[name])) if peaks[name] else None}
        if peak is not None:
            # the naive scorer's passes each run a forward: count them all as work done
            row["mfu"] = round(mfu(rate * settings["passes"], flops_per_token, device), 4)
        rows.append(row)
    by_name = {row["scorer"]: row for row in rows}
    naive = by_name["naive"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / naive["tokens_per_s"], 2)
        if row["peak_mem_mb"] is not None and naive["peak_mem_mb"]:
            row["memory_ratio"] = round(row["peak_mem_mb"] / naive["peak_mem_mb"], 3)
    differences = max_score_difference(results["memray"], results["naive"])
    # on a GPU memray's forward runs under bf16 autocast: the scores differ by bf16 rounding
    tolerance = AGREEMENT_ATOL if device.type == "cpu" else None
    return {
        "samples": len(token_ids), "tokens": tokens, "repeats": repeats, "attacks": list(scored_attacks()),
        "rows": rows, "max_score_difference": differences,
        "scores_agree": None if tolerance is None else max(differences.values()) <= tolerance,
        "agreement_atol": tolerance, "gpu": gpu, "peak_tflops": peak,
    }


def bench_attacks(model: nn.Module, config: PretrainedConfig, device: torch.device, token_ids: list[list[int]],
                  repeats: int) -> dict[str, Any]:
    """Attacks section: the shared scoring pass (trial defaults for this device), then each
    registered attack scored alone from its statistics (the median of `repeats`), and the
    set-up of those that prepare one. The reference model's statistics of `ref` are stood
    in by the target's (a trial reads them from the sweep's cache). ReCaLL's shots and
    DC-PDD's frequency corpus are random samples apart from the scored ones."""
    defaults = EvalConfig()
    batch = defaults.batch_on(device.type)
    text_config = config.get_text_config()
    length = max(len(ids) for ids in token_ids)
    # stand-in validation split: shots, frequency corpus and known non-members (enough for any set-up's minimum)
    others = random_samples(max(len(token_ids), 64), length, text_config.vocab_size, seed=11)
    texts = [stand_in_text(ids) for ids in token_ids]
    by_text = {stand_in_text(ids): ids for ids in [*token_ids, *others]}
    setup = attacks.AttackSetup(
        token_ids=lambda found, most: [by_text[text][:most] for text in found], bos=None, validation_ids=others,
        context_length=int(getattr(text_config, "max_position_embeddings", None) or text_config.n_positions),
        max_length=length, vocab_size=text_config.vocab_size,
        frequency_texts=lambda: ("random stand-in samples", [stand_in_text(ids) for ids in others]), source="bench")
    configs = [AttackConfig(name=name) for name in attacks.ATTACKS if not attacks.ATTACKS[name].needs_reference_models]
    rows = []
    with as_trials_load_it(model):
        def score(ids: list[list[int]], vocab: bool = True) -> list[scoring.TokenStats]:
            return scoring.score_tokens(model, ids, batch_size=batch, vocab_chunk=defaults.vocab_chunk,
                                        need_vocab_stats=vocab)

        score(token_ids[:2])  # first-call costs out of the timings
        shared, stats = median_seconds(lambda: score(token_ids), repeats, device)
        validation = score(others, vocab=False)  # the quantile attack's known non-members
        rows.append({"attack": "(scoring pass)", "extra_pass": "one batched forward, shared by every attack",
                     "seconds": round(shared, 4), "x_scoring_pass": 1.0, "prepare_seconds": None})
        for attack_config in configs:
            spec = attacks.ATTACKS[attack_config.name]
            started = time.perf_counter()
            try:
                prepared = attacks.prepare_attacks([attack_config], setup)
            except ConfigError as err:  # a part it needs is not here (the neighbourhood's mask-filling model)
                rows.append({"attack": attack_config.label, "extra_pass": spec.extra_pass, "seconds": None,
                             "x_scoring_pass": None, "prepare_seconds": None, "skipped": err.message})
                continue
            prepare_seconds = time.perf_counter() - started if spec.prepare is not None else None
            context = attacks.AttackContext(token_ids, texts, stats, stats, model=model,
                                            score=lambda ids: score(ids, vocab=False), prepared=prepared,
                                            validation_ids=others, validation=validation)
            elapsed, _ = median_seconds(lambda: attacks.attack_scores([attack_config], stats, texts, stats, context),
                                        repeats, device)
            rows.append({"attack": attack_config.label, "extra_pass": spec.extra_pass or "none (reads the shared pass)",
                         "seconds": round(elapsed, 4), "x_scoring_pass": round(elapsed / shared, 3),
                         "prepare_seconds": None if prepare_seconds is None else round(prepare_seconds, 4)})
    model.zero_grad(set_to_none=True)
    return {"samples": len(token_ids), "repeats": repeats, "batch_size": batch, "rows": rows,
            "gradnorm_parameters": "every parameter (the random model is fully trained)"}


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


class _EpochClock(TrainerCallback):
    """Timestamps at the end of every epoch (after the device has finished its work)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ends: list[float] = []

    def tick(self) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())

    def on_epoch_end(self, args, state, control, **kwargs):
        self.tick()


def _method_config(name: str, **settings: Any) -> Any:
    """The method's config with its defaults (but `settings`); ConfigError for a name that is
    not a method."""
    if name not in methods.METHODS:
        raise ConfigError("--methods", "", f"{name!r} is not one of {', '.join(methods.METHODS)}")
    return TypeAdapter(MethodConfig).validate_python({"name": name, **settings})


def _train_memray(model: nn.Module, token_ids: list[list[int]], batch_size: int, lr: float, device: torch.device,
                  workdir: Path, compile_model: bool) -> list[float]:
    clock = _EpochClock(device)
    train = TrainConfig(epochs=2, batch_size=batch_size, checkpoints=False, compile=compile_model)
    fit(model, models.builtin_tokenizer(), token_ids, train, lr=lr, seed=0, checkpoints_dir=workdir,
        evaluate=lambda epoch: clock.tick(), on_epoch_end=lambda end: None, progress=False)
    return clock.ends


def _train_default(model: nn.Module, token_ids: list[list[int]], batch_size: int, lr: float, device: torch.device,
                   workdir: Path) -> list[float]:
    """A default `transformers.Trainer` set-up: the standard causal-LM collator, fp32, random sampler."""
    clock = _EpochClock(device)
    args = TrainingArguments(output_dir=str(workdir), num_train_epochs=2, per_device_train_batch_size=batch_size,
                             learning_rate=lr, report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=device.type == "cpu", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(token_ids),
                      data_collator=DataCollatorForLanguageModeling(models.builtin_tokenizer(), mlm=False),
                      callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock.ends


def padding_share(token_ids: list[list[int]], batch_size: int, grouped: bool, multiple_of: int | None,
                  seed: int = 0) -> float:
    """Share of the positions in one epoch's padded batches that are padding, for batches
    drawn as the Trainer draws them: length-grouped (`LengthGroupedSampler`, memray's
    default `train.group_by_length`) or at random (a default Trainer)."""
    lengths = [len(ids) for ids in token_ids]
    generator = torch.Generator().manual_seed(seed)
    sampler = (LengthGroupedSampler(batch_size, lengths=lengths, generator=generator) if grouped
               else torch.utils.data.RandomSampler(lengths, generator=generator))
    order = list(sampler)
    padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        width = max(batch) if multiple_of is None else math.ceil(max(batch) / multiple_of) * multiple_of
        padded += width * len(batch)
    return 1 - sum(lengths) / padded


def bench_training(config: PretrainedConfig, device: torch.device, token_ids: list[list[int]], batch_size: int,
                   method_names: list[str], compile_model: bool) -> dict[str, Any]:
    """Training section: per method, memray's `fit` and a default Trainer, two epochs each;
    the second epoch is timed (the first pays for start-up, optimizer state and compilation)."""
    tokens = sum(len(ids) for ids in token_ids)
    context = mean_context(token_ids)
    peak, gpu = peak_tflops(device)
    rows = []
    for method_name in method_names:
        for loop in ("memray", "default-trainer"):
            model = random_model(config, device)
            if loop == "memray":
                models.fuse_activations(model)  # as `models.load_model` gives it to a trial
            n_matmul, n_head = matmul_params(model), model.get_output_embeddings().weight.numel()
            wrapped, info = methods.apply_method(model, _method_config(method_name), "--methods")
            row: dict[str, Any] = {"method": method_name, "loop": loop, "trainable_params": info.trainable_params}
            try:
                with tempfile.TemporaryDirectory() as workdir, PeakMemory(device) as memory:
                    if loop == "memray":
                        ends = _train_memray(wrapped, token_ids, batch_size, info.lr, device, Path(workdir),
                                             compile_model)
                    else:
                        ends = _train_default(wrapped, token_ids, batch_size, info.lr, device, Path(workdir))
                elapsed = ends[1] - ends[0]
                rate = tokens / elapsed
                row.update(seconds_per_epoch=round(elapsed, 4), tokens_per_s=round(rate, 1),
                           peak_mem_mb=_megabytes(memory.peak))
                if peak is not None:
                    flops = train_flops_per_token(methods.METHODS[method_name].flop_class, n_matmul, info.trainable_params, n_head, config, context)
                    row["mfu"] = round(mfu(rate, flops, device), 4)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            del model, wrapped
            _free(device)
            rows.append(row)
    for row in rows:
        baseline = next(r for r in rows if r["method"] == row["method"] and r["loop"] == "default-trainer")
        if "tokens_per_s" in row and "tokens_per_s" in baseline:
            row["speedup"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 2)
    return {"samples": len(token_ids), "tokens_per_epoch": tokens, "batch_size": batch_size,
            "mean_context": round(context, 1), "compile": compile_model, "rows": rows, "gpu": gpu,
            "padding_share": {  # memray pads to a multiple of 8 on a GPU (as `memray.train.fit` does)
                "memray": round(padding_share(token_ids, batch_size, True, 8 if device.type == "cuda" else None), 4),
                "default-trainer": round(padding_share(token_ids, batch_size, False, None), 4)},
            "peak_tflops": peak}


# ---------------------------------------------------------------------------------------
# DP-SGD's per-sample gradients
# ---------------------------------------------------------------------------------------


def bench_dp(config: PretrainedConfig, device: torch.device, token_ids: list[list[int]], batch_size: int,
             method_names: list[str], repeats: int) -> dict[str, Any]:
    """DP section: per method, one batch's per-sample gradients by each engine that applies
    (the method's own, and torch.func, which is right for every method) against the plain
    backward pass of the same batch; seconds per batch (median of `repeats`), peak memory, and
    the largest difference between the engines' per-sample gradients (relative to the
    largest gradient)."""
    collator = DataCollatorForLanguageModeling(tokenizer=models.builtin_tokenizer(), mlm=False)
    batch = collator([{"input_ids": ids} for ids in token_ids[:batch_size]])
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    configs = [_method_config(name, **variant) for name in method_names
               for variant in ({}, *methods.METHODS[name].config.bench_variants)]
    rows, agreement = [], {}
    for method in configs:
        label = methods.method_label(method.model_dump())
        base = random_model(config, device)
        models.fuse_activations(base)  # as `models.load_model` gives it to a trial
        model, _ = methods.apply_method(base, method, "--methods")
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        with PeakMemory(device) as memory:
            plain, _ = median_seconds(functools.partial(_plain_backward, model, input_ids, attention_mask), repeats,
                                      device, warm_up=True)
        model.zero_grad(set_to_none=True)
        rows.append({"method": label, "engine": "none (plain backward)", "seconds": round(plain, 4),
                     "peak_mem_mb": _megabytes(memory.peak)})
        own = methods.dp_gradients(method)
        samples = {}
        for engine in dict.fromkeys([own, "torch.func"]):
            per_sample = dp.GRADIENT_ENGINES[engine](model, parameters)
            row: dict[str, Any] = {"method": label, "engine": engine + (" (its own)" if engine == own else "")}
            try:
                with PeakMemory(device) as memory:
                    seconds, _ = median_seconds(lambda: per_sample(input_ids, attention_mask, contextlib.nullcontext()),
                                                repeats, device, warm_up=True)
                row.update(seconds=round(seconds, 4), x_plain=round(seconds / plain, 2),
                           peak_mem_mb=_megabytes(memory.peak))
                with _without_dropout(model):  # both engines compute the same function
                    samples[engine] = [g.float().cpu() for g in per_sample(input_ids, attention_mask,
                                                                            contextlib.nullcontext())[1]]
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            finally:
                per_sample.close()
            rows.append(row)
        if len(samples) == 2:
            scale = max(float(g.abs().max()) for g in samples["torch.func"])
            agreement[label] = max(float((a - b).abs().max()) for a, b in zip(*samples.values())) / max(scale, 1e-30)
        del model, samples
        _free(device)
    return {"texts": len(input_ids), "tokens": int(attention_mask.sum()), "repeats": repeats, "rows": rows,
            "engines_max_relative_difference": agreement}


def _plain_backward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    dp.text_losses(model, input_ids, attention_mask).sum().backward()


@contextlib.contextmanager
def _without_dropout(model: nn.Module) -> Iterator[None]:
    """Every dropout of `model` at rate 0 inside the block, its own rate again after it."""
    rates = {module: module.p for module in model.modules() if isinstance(module, nn.Dropout)}
    for module in rates:
        module.p = 0.0
    try:
        yield
    finally:
        for module, rate in rates.items():
            module.p = rate


# ---------------------------------------------------------------------------------------
# Sweep overhead
# ---------------------------------------------------------------------------------------


def _sweep_trial_base(quick: bool) -> dict[str, Any]:
    """One tiny trial: built-in GPT-2 with random weights, the default dataset, one epoch."""
    size = 16 if quick else 32
    return {
        "model": {"name": "tiny-gpt2", "pretrained": False},
        "data": {"max_length": 64, "members": size, "nonmembers": size, "validation": size},
        "train": {"epochs": 1, "batch_size": 8, "checkpoints": False},
        "attacks": ["loss"],
    }


def bench_sweep(trials: int, quick: bool) -> dict[str, Any]:
    """Sweep section: `trials` tiny trials through Ray Tune (one at a time: each takes every
    CPU, so the difference is overhead, not parallelism) against the same trials run one
    after the other in this process. Skipped, with the reason, when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        return {"skipped": "Ray is not installed"}
    import yaml

    from memray import sweep, trial
    from memray.files import load_sweep

    cpus = os.cpu_count() or 1
    sweep_file = {"name": "bench-overhead", "base": _sweep_trial_base(quick), "grid": {"seed": list(range(trials))},
                  "resources": [{"cpus": cpus}], "wandb": {"mode": "disabled"}}
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        path = root / "bench-overhead.yaml"
        path.write_text(yaml.safe_dump(sweep_file))
        _, cells = load_sweep(path)
        with _environment(MEMRAY_CACHE=str(root / "cache")):
            started = time.perf_counter()
            for cell in cells:
                config = cell.config.model_copy(update={"output_dir": str(root / "in-process")})
                trial.run_trial(config, progress=False, cache_dir=root / "cache")
            in_process = time.perf_counter() - started
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()) as tune_output:
                code = sweep.run_sweep(path, storage=str(root / "tune"), num_cpus=cpus)
            through_tune = time.perf_counter() - started
    if code != 0:
        return {"trials": trials, "error": "a trial failed under Ray Tune", "log_tail": tune_output.getvalue()[-2000:]}
    return {"trials": trials, "cpus": cpus, "trial": _sweep_trial_base(quick),
            "in_process_s": round(in_process, 2), "ray_tune_s": round(through_tune, 2),
            "overhead_per_trial_s": round((through_tune - in_process) / trials, 2),
            "ratio": round(through_tune / in_process, 2)}


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------
# Reference cache
# ---------------------------------------------------------------------------------------


def bench_reference_cache(model: nn.Module, token_ids: list[list[int]], trials: int, device: torch.device) -> dict[str, Any]:
    """Reference-cache section: a sweep's `trials` trials each need the reference model's
    statistics on the same samples; scored once per trial, or once and then read from the
    cache (`memray.scoring.reference_stats`, as memray's trials do)."""
    defaults = EvalConfig()
    kwargs = {"batch_size": defaults.batch_on(device.type), "vocab_chunk": defaults.vocab_chunk,
              "need_vocab_stats": False}
    started = time.perf_counter()
    for _ in range(trials):
        scoring.score_tokens(model, token_ids, **kwargs)
    _sync(device)
    uncached = time.perf_counter() - started
    hits = 0
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        for _ in range(trials):
            _, hit = scoring.reference_stats({"bench": "reference"}, token_ids, lambda: model, Path(cache_dir), **kwargs)
            hits += hit
        _sync(device)
        cached = time.perf_counter() - started
    return {"trials": trials, "samples": len(token_ids), "cache_hits": hits,
            "once_per_trial_s": round(uncached, 3), "cached_s": round(cached, 3),
            "speedup": round(uncached / cached, 2)}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """`cpu`, `cuda` (ConfigError when no GPU is visible) or None: cuda when there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError("--device", "", f"{device!r} is not one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "", "cuda: no CUDA GPU is visible to this process")
    return torch.device(device)


def _machine(device: torch.device) -> dict[str, Any]:
    from memray.results import provenance

    info = provenance()
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    info["hardware"]["cpu"] = cpu
    with contextlib.suppress(OSError):
        info["hardware"]["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info["torch_threads"] = torch.get_num_threads()
    info["device"] = str(device)
    return info


def run_bench(model: str = "tiny-gpt2", device: str | None = None, *, quick: bool = False,
              method_names: list[str] | None = None, sections: list[str] | None = None,
              compile_model: bool = False, max_length: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its record (what `bench.json` holds).

    model: alias, built-in, hub id (local cache) or local folder; random weights.
    device: "cpu", "cuda" or None (cuda when available). quick: small sizes (seconds to a
    minute or two on a laptop CPU; for tests). method_names: training methods (default all).
    sections: a subset of SECTIONS (default all). compile_model: memray's training loop
    with `train.compile`. max_length: longest sample (default `sample_length`). progress:
    called with a line as each section starts.
    Raises ConfigError for an unknown model, method, section or device, or a max_length < 2.
    """
    say = progress or (lambda line: None)
    torch_device = resolve_device(device)
    sections = list(sections or SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError("--sections", "", f"{', '.join(unknown)}: not one of {', '.join(SECTIONS)}")
    method_names = list(method_names or methods.METHODS)
    for name in method_names:
        _method_config(name)
    config = bench_model_config(model)
    if max_length is not None and max_length < 2:
        raise ConfigError("--max-length", "", f"{max_length}: a sample needs at least 2 tokens")
    vocab, length = config.get_text_config().vocab_size, max_length or sample_length(model)
    on_gpu = torch_device.type == "cuda"
    score_samples = (8 if quick else 32) if not on_gpu else (16 if quick else 64)
    train_samples = (16 if quick else 64) if not on_gpu else (32 if quick else 128)
    repeats = 1 if quick else 3

    record: dict[str, Any] = {
        "command": "memray bench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(("memray", "bench.py")) else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": quick, "model": model, **_machine(torch_device),
    }
    reference = random_model(config, torch_device)
    n_params = sum(p.numel() for p in reference.parameters())
    record["model_shape"] = {"params": n_params, "matmul_params": matmul_params(reference), "vocab_size": vocab,
                             "layers": config.get_text_config().num_hidden_layers,
                             "hidden": config.get_text_config().hidden_size, "max_length": length,
                             "attention": reference.config._attn_implementation}
    score_ids = random_samples(score_samples, length, vocab, seed=1)
    if "scoring" in sections:
        say(f"scoring: {score_samples} samples of up to {length} tokens")
        record["scoring"] = bench_scoring(reference, config, torch_device, score_ids, repeats)
    if "attacks" in sections:
        say(f"attacks: {score_samples} samples, each attack's cost beside the shared scoring pass")
        record["attacks"] = bench_attacks(reference, config, torch_device, score_ids, repeats)
    if "reference_cache" in sections:
        say("reference cache")
        record["reference_cache"] = bench_reference_cache(reference, score_ids, trials=4, device=torch_device)
    del reference
    _free(torch_device)
    if "training" in sections:
        say(f"training: {', '.join(method_names)}; {train_samples} samples, 2 epochs per run")
        train_ids = random_samples(train_samples, length, vocab, seed=2)
        record["training"] = bench_training(config, torch_device, train_ids, TrainConfig().batch_size,
                                            method_names, compile_model)
    if "dp" in sections:
        say(f"dp: per-sample gradients of {TrainConfig().batch_size} texts, {', '.join(method_names)}")
        record["dp"] = bench_dp(config, torch_device, random_samples(train_samples, length, vocab, seed=3),
                                TrainConfig().batch_size, method_names, repeats)
    if "sweep" in sections:
        say("sweep overhead (Ray Tune)")
        record["sweep"] = bench_sweep(trials=2 if quick else 4, quick=quick)
    return record


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_record(record: dict[str, Any]) -> str:
    """The tables `memray bench` prints."""
    shape = record["model_shape"]
    hardware = record["hardware"]
    where = hardware.get("gpus")[0]["name"] if record["device"] == "cuda" and hardware.get("gpus") else hardware.get("cpu")
    parts = [f"memray bench: {record['model']} ({shape['params'] / 1e6:,.1f}M parameters, vocab {shape['vocab_size']:,}, "
             f"samples up to {shape['max_length']} tokens) on {record['device']} ({where}), {record['date']}"]
    if "scoring" in record:
        s = record["scoring"]
        parts.append(f"\nscoring: {s['samples']} samples, {s['tokens']:,} target tokens, attacks "
                     f"{', '.join(s['attacks'])}; median of {s['repeats']}")
        parts.append(_table(
            ["scorer", "batch", "vocab chunk", "tile", "passes", "tokens/s", "x naive", "peak MB", "x naive mem", "MFU"],
            [[r["scorer"], r["batch_size"], r.get("vocab_chunk"), r.get("tile"), r["passes"], r["tokens_per_s"], r["speedup"],
              r["peak_mem_mb"], r.get("memory_ratio"), r.get("mfu")] for r in s["rows"]]))
        worst = max(s["max_score_difference"].values())
        verdict = "" if s["scores_agree"] is None else (" (agree)" if s["scores_agree"] else " (DISAGREE)")
        parts.append(f"largest score difference memray vs naive: {worst:.2e}{verdict}")
    if "attacks" in record:
        a = record["attacks"]
        parts.append(f"\nattacks: {a['samples']} samples, each attack's cost per epoch beside the scoring pass they "
                     f"share; median of {a['repeats']}")
        parts.append(_table(["attack", "its own pass", "seconds", "x scoring pass", "set-up s (once per trial)"],
                            [[r["attack"], r["extra_pass"], r["seconds"], r["x_scoring_pass"], r["prepare_seconds"]]
                             for r in a["rows"]]))
        parts += [f"{r['attack']} not measured: {r['skipped']}" for r in a["rows"] if r.get("skipped")]
    if "training" in record:
        t = record["training"]
        parts.append(f"\ntraining: {t['samples']} samples ({t['tokens_per_epoch']:,} tokens) per epoch, batch "
                     f"{t['batch_size']}, second of two epochs timed")
        parts.append(_table(
            ["method", "loop", "trainable", "tokens/s", "x default", "peak MB", "MFU"],
            [[r["method"], r["loop"], r["trainable_params"], r.get("tokens_per_s", r.get("error")), r.get("speedup"),
              r.get("peak_mem_mb"), r.get("mfu")] for r in t["rows"]]))
        pad = t["padding_share"]
        parts.append(f"padding in the batches: memray (length-grouped) {pad['memray']:.1%}, "
                     f"default Trainer (random) {pad['default-trainer']:.1%}")
    if "dp" in record:
        d = record["dp"]
        parts.append(f"\ndp: per-sample gradients of one batch ({d['texts']} texts, {d['tokens']:,} tokens) for DP-SGD, "
                     f"beside the plain backward pass; median of {d['repeats']}")
        parts.append(_table(["method", "engine", "seconds", "x plain", "peak MB"],
                            [[r["method"], r["engine"], r.get("seconds", r.get("error")), r.get("x_plain"),
                              r.get("peak_mem_mb")] for r in d["rows"]]))
        if d["engines_max_relative_difference"]:
            worst = max(d["engines_max_relative_difference"].values())
            parts.append(f"largest difference between the engines' per-sample gradients (of the largest): {worst:.1e}")
    if "reference_cache" in record:
        c = record["reference_cache"]
        parts.append(f"\nreference cache: {c['trials']} trials' reference statistics: once per trial "
                     f"{c['once_per_trial_s']:.2f} s, cached {c['cached_s']:.2f} s ({c['speedup']}x)")
    if "sweep" in record:
        w = record["sweep"]
        if "skipped" in w:
            parts.append(f"\nsweep overhead: skipped: {w['skipped']}")
        elif "error" in w:
            parts.append(f"\nsweep overhead: error: {w['error']}")
        else:
            parts.append(f"\nsweep overhead: {w['trials']} tiny trials: in one process {w['in_process_s']:.1f} s, "
                         f"through Ray Tune {w['ray_tune_s']:.1f} s ({w['overhead_per_trial_s']:+.1f} s per trial)")
    return "\n".join(parts)


def bench_command(model: str = "tiny-gpt2", device: str | None = None, out: Path | str | None = "bench.json",
                  quick: bool = False, method_names: list[str] | None = None, sections: list[str] | None = None,
                  compile_model: bool = False, max_length: int | None = None) -> int:
    """`memray bench`: run, print the tables, write the record to `out` (None: no file). Returns 0."""
    record = run_bench(model, device, quick=quick, method_names=method_names, sections=sections,
                       compile_model=compile_model, max_length=max_length, progress=lambda line: print(f"[memray bench] {line}", file=sys.stderr,
                                                                                flush=True))
    print(format_record(record))
    if out is not None:
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwritten: {out}")
    return 0
