"""Methods: each trains what it says and nothing else, reports honest parameter counts,
and a placement that fits no module of the model is a clear error before any weights load."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from memray import methods, models
from memray.config import ConfigError, MethodConfig, ModelConfig, validate

METHOD = TypeAdapter(MethodConfig)


def method(**fields):
    return METHOD.validate_python(fields)


def tiny(name: str = "tiny-gpt2") -> torch.nn.Module:
    """A built-in with its fixed random init (no pretraining needed to test what trains)."""
    return models.load_model(validate(ModelConfig, {"name": name, "pretrained": False}, "test", "model"))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the base model (PEFT wrappers unwrapped, adapter weights left out)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: p.detach().clone() for name, p in base.named_parameters() if "lora_" not in name}


def train_steps(model: torch.nn.Module, steps: int = 2, lr: float = 1e-2) -> None:
    """A few AdamW steps on a fixed batch (the same way the Trainer updates weights)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = torch.randint(1, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = snapshot(model)
    assert set(after) == set(before)
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("spec", [
    {"name": "lora", "rank": 4, "placement": "attn"},
    {"name": "prefix", "virtual_tokens": 4},
    {"name": "prompt", "virtual_tokens": 4},
    {"name": "ptuning", "virtual_tokens": 4},
], ids=lambda s: s["name"])
def test_peft_methods_leave_every_base_weight_bit_identical(name, spec):
    model = tiny(name)
    wrapped, info = methods.apply_method(model, method(**spec))
    before = snapshot(wrapped)
    train_steps(wrapped)
    assert changed(before, wrapped) == set()  # the frozen body did not move, not even the embeddings
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert info.peft and info.trainable_params == sum(p.numel() for p in trainable) > 0
    assert info.total_params == sum(p.numel() for p in wrapped.parameters())
    assert info.trainable_params < info.total_params / 10
    assert info.virtual_tokens == (4 if spec["name"] in ("prompt", "ptuning") else 0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_full_trains_every_weight(name):
    model = tiny(name)
    wrapped, info = methods.apply_method(model, method(name="full"))
    before = snapshot(wrapped)
    train_steps(wrapped)
    assert changed(before, wrapped) == set(before)
    assert info.trainable_params == info.total_params == sum(p.numel() for p in model.parameters())
    assert not info.peft and info.trained == "all weights"


def test_head_on_tied_gpt2_trains_an_untied_copy_and_keeps_the_embeddings():
    model = tiny("tiny-gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    embeddings = model.transformer.wte.weight.detach().clone()
    wrapped, info = methods.apply_method(model, method(name="head"))
    assert model.lm_head.weight is not model.transformer.wte.weight
    before = snapshot(wrapped)
    train_steps(wrapped)
    assert changed(before, wrapped) == {"lm_head.weight"}
    assert torch.equal(model.transformer.wte.weight, embeddings)
    assert info.trainable_params == model.lm_head.weight.numel()
    assert "untied" in info.trained
    assert model.config.tie_word_embeddings is False  # a saved and reloaded model stays untied


def test_head_tied_without_untie_trains_the_shared_matrix_and_says_so():
    model = tiny("tiny-gpt2")
    wrapped, info = methods.apply_method(model, method(name="head", untie=False))
    before = snapshot(wrapped)
    train_steps(wrapped)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert changed(before, wrapped) == {"transformer.wte.weight"}  # one shared matrix (named once)
    assert "tied" in info.trained and "shared matrix" in info.trained


def test_head_on_untied_llama_trains_only_lm_head():
    model = tiny("tiny-llama")
    wrapped, info = methods.apply_method(model, method(name="head"))
    before = snapshot(wrapped)
    train_steps(wrapped)
    assert changed(before, wrapped) == {"lm_head.weight"}
    assert info.trainable_params == model.lm_head.weight.numel()


@pytest.mark.parametrize("name, placement, expected", [
    ("tiny-gpt2", "attn", {"attn.c_attn", "attn.c_proj"}),
    ("tiny-gpt2", "mlp", {"mlp.c_fc", "mlp.c_proj"}),
    ("tiny-gpt2", "both", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    ("tiny-llama", "attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("tiny-llama", "mlp", {"gate_proj", "up_proj", "down_proj"}),
])
def test_lora_placement_adapts_exactly_the_modules_of_that_block(name, placement, expected):
    wrapped, info = methods.apply_method(tiny(name), method(name="lora", rank=2, placement=placement))
    adapted = {n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and "lora_" not in n}
    layers = 2  # the built-ins have two blocks
    assert len(adapted) == layers * len(expected)
    # each adapted module's name ends with one of the expected block.leaf suffixes
    suffix = (lambda n: ".".join(n.split(".")[-2:])) if name == "tiny-gpt2" else (lambda n: n.split(".")[-1])
    assert {suffix(n) for n in adapted} == expected
    # GPT-2's c_proj exists in both blocks: attn placement must not touch the MLP's
    if placement == "attn":
        assert not any(".mlp." in n for n in adapted)
    rank_params = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert info.trainable_params == rank_params


def test_lora_rank_scales_the_trainable_parameters():
    counts = [methods.apply_method(tiny(), method(name="lora", rank=r))[1].trainable_params for r in (2, 4, 8)]
    assert counts[1] == 2 * counts[0] and counts[2] == 4 * counts[0]


def test_lora_target_modules_matching_nothing_is_an_error_naming_the_field():
    with pytest.raises(ConfigError) as err:
        methods.check_method(models.tiny_config("tiny-llama"),
                             method(name="lora", target_modules=["q_proj", "c_attn"]), "sweeps/x.yaml")
    text = str(err.value)
    assert text.startswith("sweeps/x.yaml: method.target_modules: c_attn matches no linear layer")
    assert "q_proj" not in text.split("matches")[0]  # the one that fits is not blamed
    assert "self_attn.q_proj" in text  # and the error lists what the model does have


def test_lora_on_a_model_family_without_known_placement_asks_for_target_modules():
    from transformers import BertConfig

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, is_decoder=True)
    with pytest.raises(ConfigError, match=r"method.placement: no LoRA placement is known for model type 'bert'"):
        methods.check_method(config, method(name="lora"), "s.yaml")


def test_check_method_needs_no_weights_for_a_7b_model():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    methods.check_method(config, method(name="lora", placement="both"))  # meta device: instant, no 27 GB
    with pytest.raises(ConfigError, match="c_fc"):
        methods.check_method(config, method(name="lora", target_modules=["c_fc"]))


def test_prompt_text_init_starts_from_the_embeddings_of_the_init_text():
    model = tiny("tiny-gpt2")
    text = "Continue the following text:"
    ids = models.builtin_tokenizer()(text)["input_ids"]
    wrapped, info = methods.apply_method(model, method(name="prompt", init="text", init_text=text,
                                                       virtual_tokens=len(ids)))
    prompt = wrapped.prompt_encoder["default"].embedding.weight
    expected = model.get_input_embeddings().weight[ids]
    assert torch.equal(prompt.detach(), expected.detach())
    assert "text init" in info.trained


def test_default_learning_rates_per_method_and_override():
    for name in ("full", "head", "lora", "prefix", "prompt", "ptuning"):
        assert methods.apply_method(tiny(), method(name=name))[1].lr == methods.DEFAULT_LR[name]
    assert methods.apply_method(tiny(), method(name="lora", lr=1e-3))[1].lr == 1e-3
    assert methods.DEFAULT_LR["full"] < methods.DEFAULT_LR["lora"]  # full fine-tuning needs the smallest step
