"""Models: the built-ins work offline with the shipped tokenizer, the tiny pretrained base is
built once and cached, aliases map to the studies' hub ids, and a model that is not there
is a clear error naming model.name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memray import data, models
from memray.config import MODEL_ALIASES, ConfigError, ModelConfig
from memray.files import validate


def model_config(**fields) -> ModelConfig:
    return validate(ModelConfig, fields, "test.yaml", "model")


def held_out_loss(model: torch.nn.Module, tokenizer, texts: list[str]) -> float:
    """Mean next-token loss over held-out pydoc texts (the base never trained on them)."""
    model.eval()
    losses = []
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:128]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def test_shipped_tokenizer_round_trips_english_and_has_its_special_tokens():
    tokenizer = models.builtin_tokenizer()
    assert len(tokenizer) == models.TOKENIZER_VOCAB
    assert tokenizer.eos_token == tokenizer.pad_token == models.EOS
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"
    text = "The with statement wraps the execution of a block with methods defined by a context manager."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.split()) * 2  # whole English words are mostly single tokens


@pytest.mark.parametrize("name, family, tied", [("tiny-gpt2", "gpt2", True), ("tiny-llama", "llama", False)])
def test_builtins_are_small_models_of_the_studies_families(name, family, tied):
    model = models.load_model(model_config(name=name, pretrained=False))
    assert model.config.model_type == family
    assert model.config.vocab_size == models.TOKENIZER_VOCAB
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    # the random init is fixed: two loads are the same weights, whatever the caller's RNG did
    torch.manual_seed(99)
    again = models.load_model(model_config(name=name, pretrained=False))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_pretrained_base_is_built_once_cached_and_knows_english(memray_cache):
    path = models.pretrained_base_path("tiny-gpt2")
    assert path.parent.parent == models.cache_dir() and str(path).startswith(memray_cache)
    made = json.loads((path / "pretrain.json").read_text())
    assert made["steps"] == models.PRETRAIN_STEPS and made["last_loss"] < made["first_loss"] / 1.5
    stamp = (path / "pretrain.json").stat().st_mtime_ns
    assert models.pretrained_base_path("tiny-gpt2") == path
    assert (path / "pretrain.json").stat().st_mtime_ns == stamp  # not built again

    tokenizer = models.builtin_tokenizer()
    held_out = data.pydoc_texts("finetune")[:8]  # topics the base never trained on
    base = models.load_model(model_config(name="tiny-gpt2"))
    random = models.load_model(model_config(name="tiny-gpt2", pretrained=False))
    base_loss, random_loss = held_out_loss(base, tokenizer, held_out), held_out_loss(random, tokenizer, held_out)
    assert random_loss > math.log(models.TOKENIZER_VOCAB) - 0.5  # random weights: about uniform
    assert base_loss < random_loss - 2  # the base has learned a good deal of the language
    # the base loads like any hub model, tokenizer included
    assert base.config.name_or_path == str(path)


def test_loaded_models_run_the_fused_gelu_with_the_same_outputs(tmp_path):
    from transformers.activations import ACT2CLS

    loaded = models.load_model(model_config(name="tiny-gpt2", pretrained=False)).eval()
    original = models.random_tiny("tiny-gpt2").eval()  # the transformers module, Python gelu_new
    acts = [type(block.mlp.act) for block in loaded.transformer.h]
    assert acts == [ACT2CLS["gelu_pytorch_tanh"]] * len(loaded.transformer.h)
    assert type(original.transformer.h[0].mlp.act) is ACT2CLS["gelu_new"]
    assert loaded.loss_type == "ForCausalLM"  # no warning that the config named an unknown loss
    ids = torch.randint(1, 4096, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path)  # the config still names the model's own activation
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"


def test_model_identity_keys_the_reference_cache():
    base = models.model_identity(model_config(name="tiny-gpt2"))
    random = models.model_identity(model_config(name="tiny-gpt2", pretrained=False))
    assert base["source"] == "builtin" and base["fingerprint"] != random["fingerprint"]
    hub = models.model_identity(model_config(name="gpt2-xl", revision="abc123"))
    assert hub == {"name": "gpt2-xl", "source": "openai-community/gpt2-xl", "revision": "abc123",
                   "fingerprint": "openai-community/gpt2-xl@abc123"}


def test_local_model_folder_loads_and_its_fingerprint_follows_its_weights(tmp_path):
    folder = tmp_path / "my-model"
    models.load_model(model_config(name="tiny-llama", pretrained=False)).save_pretrained(folder)
    models.builtin_tokenizer().save_pretrained(folder)
    config = model_config(name=str(folder))
    loaded = models.load_model(config)
    assert loaded.config.model_type == "llama"
    assert models.load_tokenizer(config).eos_token == models.EOS
    before = models.model_identity(config)["fingerprint"]
    loaded.lm_head.weight.data.add_(1.0)
    loaded.save_pretrained(folder)
    assert models.model_identity(config)["fingerprint"] != before


def test_study_aliases_name_the_hub_models():
    assert hub_of("gpt2") == "openai-community/gpt2"
    assert hub_of("llama-3.2-1b") == "meta-llama/Llama-3.2-1B"
    assert hub_of("llama-2-7b") == "meta-llama/Llama-2-7b-hf"
    assert set(MODEL_ALIASES) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-3.2-1b", "llama-2-7b"}


def hub_of(alias: str) -> str:
    return models.hub_source(model_config(name=alias))


def test_unknown_name_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match=r"test.yaml: model.name: 'gpt3' is not a known alias \(gpt2, "):
        model_config(name="gpt3")


def test_model_not_cached_offline_is_an_error_saying_how_to_get_it():
    # the tests run with HF_HUB_OFFLINE=1: a hub id that is not in the local cache cannot load
    with pytest.raises(ConfigError) as err:
        models.check_model(model_config(name="nobody-has/this-model"), "sweeps/x.yaml")
    text = str(err.value)
    assert text.startswith("sweeps/x.yaml: model.name:") and "nobody-has/this-model" in text
    assert "Traceback" not in text
