"""The batched, vocabulary-chunked scorer against a slow per-sample float64 computation."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from memray.scoring import TokenStats, reference_stats, score_tokens, tile_shape, tokenize_texts

VOCAB = 300
LENGTHS = [7, 2, 12, 5, 12, 9, 3]  # mixed lengths: every batch below needs padding


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def sharpen(model: nn.Module) -> nn.Module:
    """Scale the output layer so the next-token distributions are far from uniform (a random
    tiny model is nearly uniform, which would make sigma trivially small)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def samples(seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=n).tolist() for n in LENGTHS]


def slow_stats(model: nn.Module, ids: list[int], virtual_tokens: int = 0) -> TokenStats:
    """One sample, no padding, full float64 log-softmax of the model's real logits."""
    with torch.no_grad():
        device = next(model.parameters()).device
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, virtual_tokens:].double().cpu()
    log_p = torch.log_softmax(logits[:-1], dim=-1)
    p = log_p.exp()
    mu = (p * log_p).sum(-1)
    sigma = (p * (log_p - mu[:, None]) ** 2).sum(-1).sqrt()
    logprobs = log_p.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return TokenStats(logprobs.numpy(), mu.numpy(), sigma.numpy())


def assert_same(fast: list[TokenStats], slow: list[TokenStats]) -> None:
    assert len(fast) == len(slow)
    for got, want in zip(fast, slow):
        assert got.logprobs.dtype == np.float32 and got.logprobs.shape == want.logprobs.shape
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.mu, want.mu, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.sigma, want.sigma, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("batch_size, vocab_chunk", [(3, 64), (16, 7), (1, 300)])
def test_matches_slow_path(make_model, batch_size, vocab_chunk):
    model = sharpen(make_model())
    token_ids = samples()
    slow = [slow_stats(model, ids) for ids in token_ids]
    assert max(s.sigma.max() for s in slow) > 1.0  # the distributions are not near uniform
    fast = score_tokens(model, token_ids, batch_size=batch_size, vocab_chunk=vocab_chunk)
    assert_same(fast, slow)  # same numbers, in the input order


def test_tiles_of_many_rows_and_vocabulary_chunks_match_the_slow_path():
    # more positions than one tile holds (1024) and a vocabulary wider than a CPU tile's
    # columns (512) and not a multiple of them: rows and columns are both split
    torch.manual_seed(0)
    vocab = 1300
    model = sharpen(GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=1,
                                               n_head=2)).eval())
    rng = np.random.default_rng(2)
    token_ids = [rng.integers(1, vocab, size=int(n)).tolist() for n in rng.integers(60, 121, size=14)]
    assert sum(len(ids) - 1 for ids in token_ids) > 1024
    slow = [slow_stats(model, ids) for ids in token_ids]
    assert_same(score_tokens(model, token_ids, batch_size=16, vocab_chunk=8192), slow)
    assert tile_shape("cpu", 8192) == (1024, 512) and tile_shape("cuda", 8192) == (1024, 8192)


def test_order_is_the_input_order():
    model = tiny_gpt2()
    token_ids = samples()
    forward = score_tokens(model, token_ids, batch_size=2, vocab_chunk=50)
    backward = score_tokens(model, token_ids[::-1], batch_size=2, vocab_chunk=50)
    assert [len(s.logprobs) for s in forward] == [n - 1 for n in LENGTHS]
    for a, b in zip(forward, backward[::-1]):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    assert forward[0].loss == pytest.approx(-forward[0].logprobs.astype(np.float64).mean())


def test_without_vocab_stats_gives_the_same_logprobs():
    model = sharpen(tiny_llama())
    token_ids = samples()
    full = score_tokens(model, token_ids, batch_size=4, vocab_chunk=64)
    plain = score_tokens(model, token_ids, batch_size=4, vocab_chunk=64, need_vocab_stats=False)
    for a, b in zip(full, plain):
        assert b.mu is None and b.sigma is None
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


def test_prompt_tuning_drops_virtual_tokens():
    model = get_peft_model(sharpen(tiny_gpt2()), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():  # a trained-looking prompt, not the zero-ish init
        for param in model.prompt_encoder.parameters():
            param.normal_()
    token_ids = samples()
    slow = [slow_stats(model, ids, virtual_tokens=5) for ids in token_ids]
    fast = score_tokens(model, token_ids, batch_size=3, vocab_chunk=64, virtual_tokens=5)
    assert_same(fast, slow)
    # the prompt changes the numbers: the virtual tokens were really used
    bare = score_tokens(model.get_base_model(), token_ids, batch_size=3, vocab_chunk=64)
    assert not np.allclose(bare[0].logprobs, fast[0].logprobs, atol=1e-3)
    with pytest.raises(ValueError, match="virtual_tokens"):
        score_tokens(model, token_ids, virtual_tokens=0)


def test_prefix_tuning():
    model = get_peft_model(sharpen(tiny_llama()), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    token_ids = samples()
    slow = [slow_stats(model, ids) for ids in token_ids]
    fast = score_tokens(model, token_ids, batch_size=3, vocab_chunk=64)
    assert_same(fast, slow)
    bare = score_tokens(model.get_base_model(), token_ids, batch_size=3, vocab_chunk=64)
    assert not np.allclose(bare[0].logprobs, fast[0].logprobs, atol=1e-3)  # the prefix was used


def test_peft_wrapped_output_layer():
    """A head trained through PEFT's modules_to_save is not a plain Linear: the real module is used."""
    model = get_peft_model(
        sharpen(tiny_llama()),
        LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    token_ids = samples()
    slow = [slow_stats(model, ids) for ids in token_ids]
    assert_same(score_tokens(model, token_ids, batch_size=3, vocab_chunk=64), slow)


def test_logit_softcapping_falls_back_to_real_logits():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          max_position_embeddings=64, final_logit_softcapping=2.0)
    model = sharpen(Gemma2ForCausalLM(config).eval())
    token_ids = samples()
    slow = [slow_stats(model, ids) for ids in token_ids]
    assert_same(score_tokens(model, token_ids, batch_size=3, vocab_chunk=64), slow)


def test_output_layer_restored_after_scoring_and_after_an_error():
    model = tiny_gpt2()
    head = model.get_output_embeddings()
    model.train()
    score_tokens(model, samples(), batch_size=4)
    assert model.get_output_embeddings() is head and model.training

    def broken_forward(*args, **kwargs):
        assert isinstance(model.get_output_embeddings(), nn.Identity)  # swapped during the forward
        raise RuntimeError("out of memory")

    model.transformer.forward = broken_forward
    with pytest.raises(RuntimeError, match="out of memory"):
        score_tokens(model, samples(), batch_size=4)
    assert model.get_output_embeddings() is head
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_rejects_samples_without_a_target():
    with pytest.raises(ValueError, match="sample 1 has 1 token"):
        score_tokens(tiny_gpt2(), [[1, 2, 3], [4]])


class CharTokenizer:
    """A stand-in tokenizer: one id per character, optional BOS handling."""

    def __init__(self, bos_token_id, adds_bos):
        self.bos_token_id, self.adds_bos = bos_token_id, adds_bos

    def __call__(self, texts, truncation=False, max_length=None):
        single = isinstance(texts, str)
        encoded = []
        for text in [texts] if single else texts:
            ids = ([self.bos_token_id] if self.adds_bos else []) + [ord(c) for c in text]
            encoded.append(ids[:max_length] if truncation else ids)
        return {"input_ids": encoded[0] if single else encoded}


def test_tokenize_texts_prepends_bos_once_and_truncates():
    texts = ["abcdef", "xy"]
    gpt2_like = tokenize_texts(CharTokenizer(bos_token_id=0, adds_bos=False), texts, max_length=4)
    assert gpt2_like == [[0, 97, 98, 99], [0, 120, 121]]
    llama_like = tokenize_texts(CharTokenizer(bos_token_id=1, adds_bos=True), texts, max_length=4)
    assert llama_like == [[1, 97, 98, 99], [1, 120, 121]]
    no_bos = tokenize_texts(CharTokenizer(bos_token_id=None, adds_bos=False), texts, max_length=4)
    assert no_bos == [[97, 98, 99, 100], [120, 121]]


def test_reference_stats_are_cached(tmp_path):
    token_ids = samples()
    calls = []

    def load_model():
        calls.append(1)
        return tiny_gpt2()

    key = {"model": "tiny-gpt2", "revision": None, "split": "abc123", "max_length": 16}
    first, cached = reference_stats(key, token_ids, load_model, tmp_path, batch_size=4, vocab_chunk=64)
    assert not cached and len(calls) == 1
    second, cached = reference_stats(key, token_ids, load_model, tmp_path, batch_size=4, vocab_chunk=64)
    assert cached and len(calls) == 1  # the model was not loaded again
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.mu, b.mu)
        np.testing.assert_array_equal(a.sigma, b.sigma)
    assert [p.suffix for p in tmp_path.iterdir() if p.suffix != ".lock"] == [".npz"]  # no temp file left

    _, cached = reference_stats({**key, "split": "other"}, token_ids, load_model, tmp_path, batch_size=4)
    assert not cached and len(calls) == 2  # another split is another entry


@pytest.mark.gpu
def test_cuda_bf16_forward_stays_close_to_float32():
    """On CUDA the forward runs under bf16 autocast; the statistics stay close to float32's."""
    model = sharpen(tiny_llama()).cuda()
    token_ids = samples()
    slow = [slow_stats(model, ids) for ids in token_ids]  # float32 forward, float64 softmax
    fast = score_tokens(model, token_ids, batch_size=3, vocab_chunk=64)
    for got, want in zip(fast, slow):
        # measured on an H100: at most 0.008 per token, 0.005 on the loss, 0.0013 on mu and sigma
        assert got.loss == pytest.approx(float(-want.logprobs.mean()), abs=0.02)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=0.05)
        np.testing.assert_allclose(got.mu, want.mu, atol=0.01)
        np.testing.assert_allclose(got.sigma, want.sigma, atol=0.01)
        assert np.abs(got.logprobs - want.logprobs).max() > 1e-5  # bf16 autocast was really on


@pytest.mark.gpu
def test_cuda_peak_memory_stays_below_the_full_logits():
    """A Llama-3-sized vocabulary: the batch's float32 logits would take 2.1 GB; the chunked
    scorer never holds them."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128_256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).cuda().eval()
    token_ids = torch.randint(1, config.vocab_size, (16, 256)).tolist()
    full_logits_bytes = 16 * 256 * config.vocab_size * 4
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stats = score_tokens(model, token_ids, batch_size=16, vocab_chunk=8192)
    peak = torch.cuda.max_memory_allocated() - baseline
    assert peak < full_logits_bytes / 2, f"peak {peak / 2**30:.2f} GiB"
    assert all(np.isfinite(s.sigma).all() and s.logprobs.shape == (255,) for s in stats)
