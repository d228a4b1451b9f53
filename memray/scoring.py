"""Per-token statistics of a causal LM on a set of samples, in one batched forward pass.

Owns what every membership-inference attack reads: for each sample, the log-probability of
each target token, and (for Min-K%++) the mean and standard deviation of the log-probability
over the whole vocabulary at each position. One forward pass of the target model per sample
set gives all of them, so adding an attack costs no extra model calls. Also owns the
on-disk cache of the reference model's statistics (the `ref` attack's base model), which is
computed once per (model, revision, split, length) and shared by every trial.

How the vocabulary statistics stay cheap: the full float32 logits of a batch
(batch x length x vocab) are never materialized. The model's output layer is swapped for
`nn.Identity` during the forward, so the model returns its final hidden states in place of
logits; the output layer's weight is then applied chunk by chunk over the vocabulary, in
float32, while an online (max-rescaled) log-sum-exp and the probability-weighted sums of
the logits are accumulated. This works for plain Hugging Face models and for PEFT-wrapped
ones (LoRA, prefix, prompt tuning, P-tuning), whose base model is the one patched.

Two fallbacks keep results exact where the trick does not hold:
- the output layer is not a plain `nn.Linear` (e.g. a PEFT wrapper around the head, as
  with `modules_to_save=["lm_head"]`): the hidden states still come back, and the real head
  module is applied to them a few hundred positions at a time;
- the model transforms the logits after the output layer (Gemma's final logit
  soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's
  `lm_head_multiplier`): the forward returns real logits, and the float32 statistics are
  computed over chunks of positions, so only one chunk is ever upcast to float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from memray.models import transforms_logits_after_head


#: Positions per float32 tile on the real-logits paths: 256 x 128k vocab x 4 B = 128 MB.
_ROWS_PER_TILE = 256
#: Positions per float32 tile on the vocabulary-chunked path: 1024 x 8192 columns x 4 B =
#: 32 MB, large enough for a GPU's matrix units, small next to a batch's full logits.
_TILE_ROWS = 1024
#: On a CPU a tile is 1024 positions x at most 512 vocabulary columns (2 MB): the output
#: layer's product then runs out of cache, at 1.6x the rate of a 256 x 4096 tile and 2x that
#: of a 1024 x 8192 one (measured on a 2-core EPYC, hidden 128), and every elementwise pass over
#: the tile reads cache, not memory. `vocab_chunk` stays an upper bound.
_TILE_ROWS_CPU, _TILE_COLUMNS_CPU = 1024, 512


@dataclass
class TokenStats:
    """Statistics of one sample: position t (0-based) describes target token x_{t+1}."""

    logprobs: np.ndarray  # float32 [n_tokens-1]: log p(x_t | x_<t) for t = 1..n-1
    mu: np.ndarray | None = None  # float32 [n_tokens-1]: E_{z~p(.|x<t)} log p(z|x<t); None if not asked
    sigma: np.ndarray | None = None  # float32 [n_tokens-1]: std of log p(z|x<t) under p(.|x<t)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood of the sample's target tokens (nats per token)."""
        return float(-np.mean(self.logprobs, dtype=np.float64))


# ---------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------


def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to `max_length` tokens, unpadded.

    Every sample starts with the tokenizer's BOS token when it has one (GPT-2's tokenizer
    does not add it, Llama's does): the first real token is then scored too, conditioned
    on BOS, the same way for every model. Tokenizers without a BOS token are left as is.
    """
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    prepend = bos is not None and not adds_bos
    budget = max_length - 1 if prepend else max_length
    encoded = tokenizer(list(texts), truncation=True, max_length=budget)["input_ids"]
    return [[bos, *ids] if prepend else list(ids) for ids in encoded]


def scored_texts(tokenizer, token_ids: list[list[int]]) -> list[str]:
    """The text each sample's scored tokens spell (special tokens such as BOS left out):
    the whole text when it fit in max_length, its kept part when it was truncated. Zlib
    divides the loss of exactly these tokens by this text's compressed size."""
    return [tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) for ids in token_ids]


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def score_tokens(
    model: nn.Module,
    token_ids: list[list[int]],
    *,
    batch_size: int = 16,
    vocab_chunk: int = 8192,
    need_vocab_stats: bool = True,
    virtual_tokens: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[TokenStats]:
    """Per-token statistics of `model` on each sample, in the order given.

    model: a Hugging Face causal LM, or a PEFT model wrapping one.
    token_ids: one list of ids per sample (at least 2 tokens each), e.g. from `tokenize_texts`.
    batch_size: samples per forward pass; samples are sorted by length so batches pad little.
    vocab_chunk: vocabulary columns projected at a time; the float32 tile is at most
        1024 positions x vocab_chunk, whatever the batch size.
    need_vocab_stats: also compute mu and sigma (only Min-K%++ reads them).
    virtual_tokens: positions a prompt-based PEFT method (prompt tuning, P-tuning) prepends
        to the model's output; they are dropped before the targets are aligned. Prefix
        tuning puts its prefix in the attention cache, not the output: pass 0 there.
    device: where the inputs go; default the device of the model's parameters.
    progress: show a progress bar over batches.

    The model is put in eval mode for the call (its previous mode is restored) and run
    under `torch.inference_mode()`; on CUDA the forward runs under bf16 autocast while the
    statistics are computed in float32.
    """
    if batch_size < 1 or vocab_chunk < 1 or virtual_tokens < 0:
        raise ValueError("batch_size and vocab_chunk must be positive and virtual_tokens non-negative")
    for index, ids in enumerate(token_ids):
        if len(ids) < 2:
            raise ValueError(f"sample {index} has {len(ids)} token(s); scoring needs at least 2 (a context and a target)")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    # longest first: a batch that does not fit in memory fails at once, not at the end
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")

    results: list[TokenStats | None] = [None] * len(token_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _output_layer(model) as head:
            for batch in batches:
                samples = [token_ids[i] for i in batch]
                for i, stats in zip(batch, _score_batch(model, head, samples, autocast, device,
                                                        vocab_chunk, need_vocab_stats, virtual_tokens)):
                    results[i] = stats
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def _output_layer(model: nn.Module) -> Iterator[nn.Module | None]:
    """Swap the output layer for `nn.Identity` while scoring, so the forward returns hidden
    states; yields the real output layer, or None when the model must keep it (logits are
    transformed after it). The original layer is put back even if scoring fails."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT -> HF model
    head = base.get_output_embeddings()
    config = base.config.get_text_config()
    if head is None or transforms_logits_after_head(config):  # the Identity trick would skip that step
        yield None
        return
    base.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def _score_batch(
    model: nn.Module,
    head: nn.Module | None,
    samples: list[list[int]],
    autocast: contextlib.AbstractContextManager,
    device: torch.device,
    vocab_chunk: int,
    need_vocab_stats: bool,
    virtual_tokens: int,
) -> list[TokenStats]:
    """Statistics of one batch of samples (right-padded, so positions match unpadded runs)."""
    width = max(len(ids) for ids in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)  # pad id 0: masked, never a target
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, ids in enumerate(samples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    with autocast:
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if output.shape[1] != width + virtual_tokens:
        raise ValueError(
            f"the model returned {output.shape[1]} positions for {width} input tokens; "
            f"virtual_tokens={virtual_tokens} does not match the method's prepended tokens"
        )
    output = output[:, virtual_tokens:]
    # position t predicts token t+1: keep the positions whose target is a real token
    valid = attention_mask[:, 1:].bool()
    states = output[:, :-1][valid]  # [N, hidden] or [N, vocab]
    targets = input_ids[:, 1:][valid]  # [N]

    if head is None:  # real logits came back
        columns = _stats_by_rows(lambda rows: rows, states, targets, need_vocab_stats)
    elif isinstance(head, nn.Linear):
        columns = _stats_by_vocab_chunks(head.weight, head.bias, states, targets, vocab_chunk, need_vocab_stats)
    else:  # a wrapped head (e.g. PEFT modules_to_save): apply the real module
        columns = _stats_by_rows(head, states, targets, need_vocab_stats)

    counts = [len(ids) - 1 for ids in samples]
    split = [
        np.split(column.float().cpu().numpy(), np.cumsum(counts)[:-1]) if column is not None else [None] * len(samples)
        for column in columns
    ]
    return [TokenStats(logprobs=lp, mu=mu, sigma=sd) for lp, mu, sd in zip(*split)]


def tile_shape(device_type: str, vocab_chunk: int) -> tuple[int, int]:
    """(positions, vocabulary columns) of the float32 tile the scorer projects at a time."""
    if device_type == "cuda":
        return _TILE_ROWS, vocab_chunk
    return _TILE_ROWS_CPU, min(vocab_chunk, _TILE_COLUMNS_CPU)


def _stats_by_vocab_chunks(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    vocab_chunk: int,
    need_vocab_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(target log-prob, mu, sigma) per row of `hidden` [N, D], `_TILE_ROWS` rows at a
    time, projecting `vocab_chunk` columns of the output layer at a time in float32: the
    float32 tile is at most rows x vocab_chunk whatever the batch size. On a CPU the tile
    is cache-sized (`_TILE_ROWS_CPU` x at most `_TILE_COLUMNS_CPU`)."""
    rows, vocab_chunk = tile_shape(hidden.device.type, vocab_chunk)
    parts = [
        _vocab_chunked_block(weight, bias, hidden[start : start + rows].float(),
                             targets[start : start + rows], vocab_chunk, need_vocab_stats)
        for start in range(0, hidden.shape[0], rows)
    ]
    return tuple(torch.cat(column) if column[0] is not None else None for column in zip(*parts))  # type: ignore[return-value]


def _vocab_chunked_block(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    vocab_chunk: int,
    need_vocab_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(target log-prob, mu, sigma) per row of the float32 `hidden` [rows, D].

    Online softmax over the vocabulary chunks: with running max m, weights w = exp(l - m)
    and s0 = sum w, log Z = m + log s0 and p = w / s0. For Min-K%++ the p-weighted mean
    and spread of the logits l are merged chunk by chunk (Chan et al.'s parallel variance):
    each chunk's mean and sum of squared deviations are computed around the chunk's own
    mean (two passes over the tile), never as E[l^2] - E[l]^2, which cancels in float32.
    Then mu = E_p[log p] = E_p[l] - log Z and sigma^2 = Var_p[log p] = Var_p[l]. The
    per-row merge runs in float64; two float32 tiles are alive at a time.
    """
    rows = hidden.shape[0]
    running_max = torch.full((rows,), -math.inf, device=hidden.device)
    s0 = torch.zeros(rows, device=hidden.device, dtype=torch.float64)
    mean = torch.zeros(rows, device=hidden.device, dtype=torch.float64)  # E_p[l] of the chunks so far
    spread = torch.zeros(rows, device=hidden.device, dtype=torch.float64)  # s0 * Var_p[l] of the chunks so far
    target_logit = torch.zeros(rows, device=hidden.device)
    for start in range(0, weight.shape[0], vocab_chunk):
        stop = min(start + vocab_chunk, weight.shape[0])
        logits = hidden @ weight[start:stop].float().T
        if bias is not None:
            logits += bias[start:stop].float()
        in_chunk = (targets >= start) & (targets < stop)
        local = (targets - start).clamp(0, stop - start - 1)
        target_logit += torch.where(in_chunk, logits.gather(1, local[:, None])[:, 0], 0.0)

        new_max = torch.maximum(running_max, logits.amax(dim=1))
        scale = torch.exp(running_max - new_max).double()  # rescales the old sums; 0 on the first chunk
        centred = logits.sub_(new_max[:, None])
        weights = torch.exp(centred)
        chunk_s0 = weights.sum(dim=1)
        old_s0, s0 = s0 * scale, s0 * scale + chunk_s0.double()
        if need_vocab_stats:
            chunk_centre = torch.linalg.vecdot(weights, centred, dim=1) / chunk_s0
            deviations = centred.sub_(chunk_centre[:, None])
            chunk_spread = torch.linalg.vecdot(weights.mul_(deviations), deviations, dim=1).double()
            chunk_mean = new_max.double() + chunk_centre.double()
            delta = chunk_mean - mean
            share = chunk_s0.double() / s0
            spread = spread * scale + chunk_spread + delta**2 * old_s0 * share
            mean = mean + delta * share
        running_max = new_max

    log_z = running_max.double() + torch.log(s0)
    logprobs = (target_logit.double() - log_z).float()
    if not need_vocab_stats:
        return logprobs, None, None
    return logprobs, (mean - log_z).float(), (spread / s0).clamp_min(0.0).sqrt().float()


def _stats_by_rows(
    project: Callable[[torch.Tensor], torch.Tensor],
    states: torch.Tensor,
    targets: torch.Tensor,
    need_vocab_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(target log-prob, mu, sigma) per row, for real logits `project(states[rows])`,
    `_ROWS_PER_TILE` rows at a time so that only one tile is upcast to float32."""
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for start in range(0, states.shape[0], _ROWS_PER_TILE):
        logits = project(states[start : start + _ROWS_PER_TILE]).float()
        log_p = torch.log_softmax(logits, dim=-1)
        logprobs = log_p.gather(1, targets[start : start + _ROWS_PER_TILE, None])[:, 0]
        if not need_vocab_stats:
            parts.append((logprobs, None, None))
            continue
        p = log_p.exp()
        mu = (p * log_p).sum(dim=1)
        sigma = (p * (log_p - mu[:, None]) ** 2).sum(dim=1).sqrt()
        parts.append((logprobs, mu, sigma))
    logprobs, mu, sigma = zip(*parts)
    if not need_vocab_stats:
        return torch.cat(logprobs), None, None
    return torch.cat(logprobs), torch.cat(mu), torch.cat(sigma)


# ---------------------------------------------------------------------------------------
# Reference-model statistics, cached on disk
# ---------------------------------------------------------------------------------------


def reference_stats(
    key: dict,
    token_ids: list[list[int]],
    load_model: Callable[[], nn.Module],
    cache_dir: Path,
    **score_kwargs,
) -> tuple[list[TokenStats], bool]:
    """Statistics of the reference model on these samples, computed once and cached.

    key: what identifies the reference statistics, JSON-serializable: model identity,
        revision, split hash, max_length, ... The cache entry is named by a hash of `key`,
        of the token ids themselves (a different tokenization is a different entry) and of
        `need_vocab_stats`.
    load_model: called only on a cache miss; returns the reference model.
    cache_dir: folder of the cache (shared by the trials of a sweep).
    score_kwargs: passed to `score_tokens`.
    Returns (statistics in the order of `token_ids`, whether they came from the cache).

    A file lock makes concurrent trials wait for the one computing an entry, and the entry
    is written to a temporary file first and renamed, so a reader never sees half a file.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokens_digest = hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()
    need_vocab_stats = score_kwargs.get("need_vocab_stats", True)
    identity = {"key": key, "tokens": tokens_digest, "need_vocab_stats": need_vocab_stats}
    name = "ref-" + hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_dir / f"{name}.npz"
    with FileLock(str(cache_dir / f"{name}.lock")):
        if path.exists():
            return _load_stats(path), True
        stats = score_tokens(load_model(), token_ids, **score_kwargs)
        _save_stats(path, stats, identity)
        return stats, False


def _save_stats(path: Path, stats: list[TokenStats], identity: dict) -> None:
    """Write ragged per-sample arrays as flat arrays plus offsets, atomically."""
    arrays = {
        "offsets": np.cumsum([0] + [len(s.logprobs) for s in stats]),
        "logprobs": np.concatenate([np.zeros(0, np.float32), *(s.logprobs for s in stats)]),
        "identity": np.array(json.dumps(identity, sort_keys=True, default=str)),
    }
    if stats and stats[0].mu is not None:
        arrays["mu"] = np.concatenate([s.mu for s in stats])
        arrays["sigma"] = np.concatenate([s.sigma for s in stats])
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _load_stats(path: Path) -> list[TokenStats]:
    with np.load(path) as data:
        offsets = data["offsets"]
        columns = {name: data[name] for name in ("logprobs", "mu", "sigma") if name in data}
    bounds = list(zip(offsets[:-1], offsets[1:]))
    return [
        TokenStats(
            logprobs=columns["logprobs"][a:b],
            mu=columns["mu"][a:b] if "mu" in columns else None,
            sigma=columns["sigma"][a:b] if "sigma" in columns else None,
        )
        for a, b in bounds
    ]
