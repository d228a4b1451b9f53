"""Extraction memorization: does the fine-tuned model reproduce its training data?

Owns
- prefix -> continuation generation, batched with the KV cache (plain Hugging Face models
  and PEFT models alike; for prefix / prompt / P-tuning the virtual tokens are in place as
  in training, since `PeftModel.generate` adds them);
- exact extraction (the generated suffix equals the true one token for token, the
  "k-extractable" of Carlini et al. 2021, arXiv 2012.07805) and the longest common prefix;
- relaxed similarity between generated and true suffix text: ROUGE-L, BLEU and normalized
  edit similarity (Wang & Li 2025, arXiv 2506.20856), as means and shares above thresholds;
- breakdowns of any metric by a sample's copy count in the training data (`...@dup5`);
- secret canaries and their exposure (Carlini et al. 2019, "The Secret Sharer",
  arXiv 1802.08232).

Metric names follow the project contract: `extract/exact`, `extract/rougeL@0.5`, the
non-member control under `extract/nonmember/...`, `mia/<attack>/auc@dup5`,
`canary/exposure@dup10` (`@dup0`: never-inserted control canaries).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import sacrebleu
import torch
from peft import PeftType
from rapidfuzz.distance import Levenshtein
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score

from memray.config import CanaryConfig, ExtractionConfig
from memray.metric_keys import mia_prefix

#: Similarities between generated and true suffix, each in [0, 1].
SIMILARITIES: tuple[str, ...] = ("rougeL", "bleu", "edit")

# No stemming: memorization is about the exact words, not their stems.
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


def generate_continuations(
    model: torch.nn.Module,
    prefixes: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    pad_token_id: int,
    eos_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Continue each prefix (token ids) and return the generated token ids per prefix.

    Prefixes are decoded `batch_size` at a time (one `model.generate` call each, left-padded,
    with the KV cache). With `eos_token_id=None` every continuation has exactly
    `max_new_tokens` tokens, since the true suffix it is compared with has no reason to stop;
    with an eos id a continuation ends after its first eos. Greedy unless `do_sample`;
    `top_k` / `top_p` None mean no such filtering. Sampling draws from a forked RNG seeded
    with `seed`, so the caller's (training) random state is left as it was. The model is put
    in eval mode for the call and returned to its previous mode.
    """
    if not prefixes:
        return []
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token")
    device = next(model.parameters()).device
    settings: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        # explicit values: the global defaults (top_k=50) or a hub model's generation config
        # (e.g. top_p=0.9) would otherwise filter silently
        settings.update(temperature=temperature, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0)
    continuations: list[list[int]] = []
    was_training = model.training
    model.eval()
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prefixes), batch_size):
                batch = prefixes[start : start + batch_size]
                width = max(len(p) for p in batch)
                input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, prefix in enumerate(batch):
                    input_ids[row, width - len(prefix) :] = torch.as_tensor(list(prefix), dtype=torch.long)
                    attention_mask[row, width - len(prefix) :] = 1
                generator, inputs = _generation_inputs(model, input_ids.to(device), attention_mask.to(device))
                output = generator.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,  # None overrides the model's own eos: no early stop
                    **settings,
                )
                # with input_ids, generate returns prompt + continuation; with inputs_embeds, the continuation
                new_tokens = output[:, width:] if "input_ids" in inputs else output
                for generated in new_tokens.tolist():
                    continuations.append(_cut_at_eos(generated, eos_token_id))
    finally:
        model.train(was_training)
    return continuations


def _generation_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model to call `generate` on and its inputs, with a prompt-learning model's virtual
    tokens put in place explicitly.

    Prefix tuning (Li & Liang 2021) trains key/value states that precede every input: they go
    in as a prefilled KV cache. Prompt tuning and P-tuning train input embeddings that precede
    the text: they go in as `inputs_embeds`. In both, the attention mask gains the virtual
    positions at its left, as in `PeftModel.forward` during training. This uses only PEFT's
    `get_prompt` and the base model's public `generate`, not `PeftModel.generate`, whose
    injection depends on the name transformers gives the generation cache (it followed
    transformers' rename of `past_key_values` to `cache` in 5.24 only partly, and generated
    without the virtual tokens). Any other model generates from its own inputs.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is None or not peft_config.is_prompt_learning:
        return model, {"input_ids": input_ids, "attention_mask": attention_mask}
    base = model.get_base_model()
    batch_size = input_ids.shape[0]
    virtual = torch.ones((batch_size, peft_config.num_virtual_tokens), dtype=attention_mask.dtype, device=attention_mask.device)
    inputs: dict[str, Any] = {"attention_mask": torch.cat((virtual, attention_mask), dim=1)}
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        inputs["input_ids"] = input_ids
        inputs[_cache_argument(base)] = model.get_prompt(batch_size)
    elif peft_config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        embeds = model.word_embeddings(input_ids)
        prompts = model.get_prompt(batch_size=batch_size).to(embeds.dtype)
        inputs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
    else:
        raise ValueError(f"generation with PEFT method {peft_config.peft_type} is not supported")
    return base, inputs


def _cache_argument(model: torch.nn.Module) -> str:
    """The name under which `model.generate` takes a prefilled KV cache: `cache` since
    transformers 5.24, `past_key_values` before."""
    parameters = inspect.signature(model.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cut_at_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


# ---------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------


def similarity(generated: str, reference: str) -> dict[str, float]:
    """Similarities of a generated text to the reference, each in [0, 1]:

    - `rougeL`: ROUGE-L F-measure (rouge-score: lower-cased alphanumeric words, longest
      common subsequence);
    - `bleu`: sacrebleu sentence BLEU / 100 (exponential smoothing, effective n-gram order,
      so short identical texts score 1);
    - `edit`: rapidfuzz normalized Levenshtein similarity on characters,
      1 - distance / max(len).
    """
    return {
        "rougeL": _ROUGE.score(reference, generated)["rougeL"].fmeasure,
        "bleu": min(1.0, sacrebleu.sentence_bleu(generated, [reference]).score / 100),  # 1 + 4e-16 happens
        "edit": Levenshtein.normalized_similarity(generated, reference),
    }


def common_prefix_length(generated: Sequence[int], reference: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share."""
    length = 0
    for produced, expected in zip(generated, reference):
        if produced != expected:
            break
        length += 1
    return length


# ---------------------------------------------------------------------------------------
# Extraction metrics
# ---------------------------------------------------------------------------------------

#: A sample as the trial passes it: (sample id, token ids, copies in the training data).
Sample = tuple[Any, Sequence[int], int]


def extraction_metrics(
    cfg: ExtractionConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    members: Sequence[Sample],
    nonmembers: Sequence[Sample],
    seed: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Prefix -> continuation extraction of members, with non-members as the control.

    Takes the config, the model (plain or PEFT), its tokenizer (for decoding and the pad /
    eos ids), members and non-members as (sample id, token ids, copies), and a seed.
    Up to `cfg.samples` members at least `prefix_tokens + suffix_tokens` long are drawn with
    the seed (the same ones every epoch), and as many non-members; shorter samples are
    skipped and counted. Each is prompted with its first `prefix_tokens` tokens; the
    `suffix_tokens` generated are compared with the true next tokens.

    Returns (metrics, rows). Metrics: `extract/exact` (share generated exactly),
    `extract/lcp` (mean common prefix, tokens), `extract/rougeL`, `extract/bleu`,
    `extract/edit` (means), `extract/<similarity>@<t>` (share with similarity >= t),
    `extract/samples`, `extract/skipped`; the same under `extract/nonmember/`; and when the
    drawn members' copy counts differ, every member metric per copy count
    (`extract/exact@dup5`, `extract/samples@dup5`, ...). Rows, one per sample: sample_id,
    member, copies, exact, lcp, rougeL, bleu, edit, generated_text, suffix_text.
    """
    needed = cfg.prefix_tokens + cfg.suffix_tokens
    rng = np.random.default_rng(seed)
    member_pick, member_skipped = _draw(members, needed, cfg.samples, rng)
    nonmember_pick, nonmember_skipped = _draw(nonmembers, needed, len(member_pick), rng)
    chosen = [(s, True) for s in member_pick] + [(s, False) for s in nonmember_pick]

    decoding = cfg.decoding
    eos = tokenizer.eos_token_id if decoding.stop_at_eos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    generated = generate_continuations(
        model,
        [list(ids[: cfg.prefix_tokens]) for (_, ids, _), _ in chosen],
        max_new_tokens=cfg.suffix_tokens,
        batch_size=cfg.batch_size,
        pad_token_id=pad,
        eos_token_id=eos,
        do_sample=decoding.do_sample,
        temperature=decoding.temperature,
        top_k=decoding.top_k,
        top_p=decoding.top_p,
        seed=seed,
    )

    rows = []
    for ((sample_id, ids, copies), member), tokens in zip(chosen, generated):
        suffix = list(ids[cfg.prefix_tokens : needed])
        generated_text = tokenizer.decode(tokens, skip_special_tokens=True)
        suffix_text = tokenizer.decode(suffix, skip_special_tokens=True)
        rows.append({
            "sample_id": sample_id,
            "member": member,
            "copies": copies,
            "exact": tokens == suffix,
            "lcp": common_prefix_length(tokens, suffix),
            **similarity(generated_text, suffix_text),
            "generated_text": generated_text,
            "suffix_text": suffix_text,
        })

    thresholds = cfg.thresholds.model_dump()
    member_rows = [r for r in rows if r["member"]]
    nonmember_rows = [r for r in rows if not r["member"]]
    metrics = {
        **_prefixed("extract/", summarize(member_rows, thresholds)),
        "extract/skipped": float(member_skipped),
        **_prefixed("extract/nonmember/", summarize(nonmember_rows, thresholds)),
        "extract/nonmember/skipped": float(nonmember_skipped),
    }
    copies = [r["copies"] for r in member_rows]
    if len(set(copies)) > 1:
        metrics.update(duplicate_breakdown(member_rows, copies, lambda g: summarize(g, thresholds), "extract/"))
    return metrics, rows


def _draw(samples: Sequence[Sample], needed: int, count: int, rng: np.random.Generator) -> tuple[list[Sample], int]:
    """Up to `count` samples with at least `needed` tokens, in their original order; and how
    many were too short."""
    long_enough = [s for s in samples if len(s[1]) >= needed]
    picked = rng.choice(len(long_enough), size=min(count, len(long_enough)), replace=False)
    return [long_enough[i] for i in sorted(picked)], len(samples) - len(long_enough)


def summarize(rows: Sequence[dict[str, Any]], thresholds: dict[str, list[float]]) -> dict[str, float]:
    """Extraction metrics of a group of rows (unprefixed names: exact, lcp, rougeL, ...,
    rougeL@0.5, ..., samples). An empty group has only samples = 0."""
    summary: dict[str, float] = {"samples": float(len(rows))}
    if not rows:
        return summary
    summary["exact"] = float(np.mean([r["exact"] for r in rows]))
    summary["lcp"] = float(np.mean([r["lcp"] for r in rows]))
    for name in SIMILARITIES:
        values = np.array([r[name] for r in rows])
        summary[name] = float(values.mean())
        for threshold in thresholds.get(name, []):
            summary[f"{name}@{threshold:g}"] = float((values >= threshold).mean())
    return summary


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {prefix + key: value for key, value in metrics.items()}


# ---------------------------------------------------------------------------------------
# Breakdowns by copy count
# ---------------------------------------------------------------------------------------


def duplicate_breakdown(
    values: Sequence[T],
    copies: Sequence[int],
    metric_fn: Callable[[list[T]], dict[str, float]],
    prefix: str = "",
) -> dict[str, float]:
    """A metric per copy count.

    Takes values (rows, scores, ...) with each one's copy count, and a function from a group
    of values to named metrics. Returns `{prefix}{name}@dup{c}` for every name that
    `metric_fn` gives on the values with copy count c, for each c present.
    """
    if len(values) != len(copies):
        raise ValueError(f"{len(values)} values but {len(copies)} copy counts")
    breakdown: dict[str, float] = {}
    for count in sorted(set(copies)):
        group = [v for v, c in zip(values, copies) if c == count]
        for name, value in metric_fn(group).items():
            breakdown[f"{prefix}{name}@dup{count}"] = value
    return breakdown


def mia_duplicate_breakdown(
    label: str,
    member_scores: Sequence[float],
    member_copies: Sequence[int],
    nonmember_scores: Sequence[float],
) -> dict[str, float]:
    """Membership AUC per copy count: for each copy count c among members, the AUC of the
    attack's scores (higher = more likely a member) on the members with c copies against
    all non-members, named `mia/<label>/auc@dup<c>`."""
    nonmember_scores = list(nonmember_scores)

    def auc(group: list[float]) -> dict[str, float]:
        labels = [1] * len(group) + [0] * len(nonmember_scores)
        return {"auc": float(roc_auc_score(labels, group + nonmember_scores))}

    return duplicate_breakdown(list(member_scores), member_copies, auc, mia_prefix(label))


# ---------------------------------------------------------------------------------------
# Canaries
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """A secret canary: `text` is the config's format with `secret` (its digits, joined by
    the separator) filled in; `repeats` is how often the trial inserts it into the training
    texts (0: a held-out control, never inserted)."""

    id: str
    text: str
    secret: str
    repeats: int


def make_canaries(cfg: CanaryConfig, seed: int) -> list[Canary]:
    """`cfg.count` canaries to insert (copy counts taken in turn from `cfg.repeats`), then
    `cfg.heldout` controls with repeats 0; all secrets distinct, a pure function of the seed."""
    heldout = cfg.count if cfg.heldout is None else cfg.heldout
    secrets = _random_secrets(cfg, cfg.count + heldout, np.random.default_rng([seed, 0]), exclude=set())
    repeats = [cfg.repeats[i % len(cfg.repeats)] for i in range(cfg.count)] + [0] * heldout
    return [
        Canary(id=f"canary-{i}", text=_canary_text(cfg, secret), secret=secret, repeats=r)
        for i, (secret, r) in enumerate(zip(secrets, repeats))
    ]


def _random_secrets(cfg: CanaryConfig, count: int, rng: np.random.Generator, exclude: set[str]) -> list[str]:
    """`count` distinct random digit strings of length `cfg.digits`, none in `exclude`."""
    seen = set(exclude)
    secrets: list[str] = []
    while len(secrets) < count:
        digits = "".join(map(str, rng.integers(0, 10, size=cfg.digits)))
        if digits not in seen:
            seen.add(digits)
            secrets.append(digits)
    return secrets


def _canary_text(cfg: CanaryConfig, secret: str) -> str:
    return cfg.format.format(secret=cfg.separator.join(secret))


def sequence_log_likelihoods(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, batch_size: int = 32, pad_token_id: int = 0
) -> list[float]:
    """Total log-probability (natural log) of each token sequence under the model, each token
    given the ones before it, batched and right-padded: the sum the training loss averages.
    The first token is predicted only where something precedes it: the virtual tokens of
    prompt / P-tuning models (as in their training); not in plain or prefix-tuned models."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                width = max(len(s) for s in batch)
                input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, tokens in enumerate(batch):
                    input_ids[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
                    attention_mask[row, : len(tokens)] = 1
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                if logits.shape[1] > width:  # prompt / P-tuning: virtual tokens predict the first one
                    logits, targets, mask = logits[:, -width - 1 : -1], input_ids, attention_mask
                else:
                    logits, targets, mask = logits[:, :-1], input_ids[:, 1:], attention_mask[:, 1:]
                log_probs = logits.float().log_softmax(-1)
                token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                totals += (token_log_probs * mask).sum(-1).tolist()
    finally:
        model.train(was_training)
    return totals


#: Scores token sequences: higher = more likely under the model (e.g. total log-likelihood).
ScoreFn = Callable[[list[list[int]]], list[float]]


def exposures(
    cfg: CanaryConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    canaries: Sequence[Canary],
    *,
    seed: int,
    batch_size: int = 32,
    score_fn: ScoreFn | None = None,
) -> list[float]:
    """Exposure of each canary, in bits (Carlini et al. 2019, section 4):
    log2 |R| - log2 rank, where R is the canary plus `cfg.candidates - 1` random secrets of
    the same format (one population for all canaries, drawn with the seed, sharing no
    secret with any canary) and rank is the canary's place in R by likelihood (1 = most
    likely; candidates that tie count ahead of it). A memorized canary ranks first:
    log2(candidates) bits; an unseen one ranks at random: about 1/ln 2 = 1.44 bits on average.

    `score_fn` maps token id lists to scores (higher = more likely); by default the total
    log-likelihood under `model` (`sequence_log_likelihoods`).
    """
    if not canaries:
        return []
    rng = np.random.default_rng([seed, 1])
    others = _random_secrets(cfg, cfg.candidates - 1, rng, exclude={c.secret for c in canaries})
    texts = [c.text for c in canaries] + [_canary_text(cfg, s) for s in others]
    token_ids = [list(ids) for ids in tokenizer(texts)["input_ids"]]
    if score_fn is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        scores = sequence_log_likelihoods(model, token_ids, batch_size=batch_size, pad_token_id=pad)
    else:
        scores = list(score_fn(token_ids))
    canary_scores = np.array(scores[: len(canaries)])
    other_scores = np.array(scores[len(canaries) :])
    ranks = 1 + (other_scores[None, :] >= canary_scores[:, None]).sum(axis=1)
    return [math.log2(cfg.candidates) - math.log2(int(rank)) for rank in ranks]


def canary_metrics(
    cfg: CanaryConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    canaries: Sequence[Canary],
    *,
    seed: int,
    batch_size: int = 32,
    score_fn: ScoreFn | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Exposure metrics for one epoch: `canary/exposure` (mean over inserted canaries) and
    `canary/exposure@dup<r>` per copy count r (`@dup0`: the never-inserted controls, the
    chance level); rows: canary_id, repeats, secret, exposure."""
    values = exposures(cfg, model, tokenizer, canaries, seed=seed, batch_size=batch_size, score_fn=score_fn)
    rows = [
        {"canary_id": c.id, "repeats": c.repeats, "secret": c.secret, "exposure": e}
        for c, e in zip(canaries, values)
    ]
    inserted = [r["exposure"] for r in rows if r["repeats"] > 0]
    metrics = {"canary/exposure": float(np.mean(inserted))} if inserted else {}
    metrics.update(duplicate_breakdown(
        rows, [r["repeats"] for r in rows], lambda g: {"exposure": float(np.mean([r["exposure"] for r in g]))}, "canary/"
    ))
    return metrics, rows
