"""Methods: each trains what it says and nothing else, reports honest parameter counts,
and a placement that fits no module of the model is a clear error before any weights load."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from memray import methods, models
from memray.config import ConfigError, MethodConfig, ModelConfig, TrialConfig
from memray.files import validate
from memray.distributed import ModelShape

METHOD = TypeAdapter(MethodConfig)


def method(**fields):
    return METHOD.validate_python(fields)


def tiny(name: str = "tiny-gpt2") -> torch.nn.Module:
    """A built-in with its fixed random init (no pretraining needed to test what trains)."""
    return models.load_model(validate(ModelConfig, {"name": name, "pretrained": False}, "test", "model"))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the base model (PEFT wrappers unwrapped, adapter weights left out)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: p.detach().clone() for name, p in base.named_parameters()
            if "lora_" not in name and "ia3_" not in name}


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


#: One row per registered method (several for a method with a notable option): every row
#: runs through the shared contract below on both built-in families. A method registered
#: without a row fails `test_every_registered_method_has_a_test_case`.
TEST_CASES = [
    ("full", {"name": "full"}),
    ("head", {"name": "head"}),
    ("ia3", {"name": "ia3"}),
    ("lora", {"name": "lora", "rank": 4, "placement": "attn"}),
    ("lora-dora", {"name": "lora", "rank": 4, "placement": "both", "dora": True}),
    ("prefix", {"name": "prefix", "virtual_tokens": 4}),
    ("prompt", {"name": "prompt", "virtual_tokens": 4}),
    ("ptuning", {"name": "ptuning", "virtual_tokens": 4}),
]
VIRTUAL_POSITIONS = {"prompt": 4, "ptuning": 4}  # what the rows above prepend to the input


def test_every_registered_method_has_a_test_case():
    assert set(methods.METHODS) == {fields["name"] for _, fields in TEST_CASES}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("fields", [f for _, f in TEST_CASES], ids=[case for case, _ in TEST_CASES])
def test_method_contract(name, fields):
    """Every method: fits the model before any weight exists, counts parameters honestly,
    trains something, never moves a frozen weight, and PEFT methods leave the whole base
    model bit-identical."""
    config = method(**fields)
    spec = methods.METHODS[config.name]
    methods.check_method(models.tiny_config(name), config, "s.yaml")  # meta skeleton: fits
    model = tiny(name)
    wrapped, info = methods.apply_method(model, config)
    parameters = dict(wrapped.named_parameters())
    trainable = {n for n, p in parameters.items() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in parameters.items() if not p.requires_grad}
    before = {n: parameters[n].detach().clone() for n in trainable}
    base_before = snapshot(wrapped)
    train_steps(wrapped)
    assert all(torch.equal(frozen[n], parameters[n]) for n in frozen)  # what is frozen stays put
    assert any(not torch.equal(before[n], parameters[n]) for n in trainable)  # and training moves something
    assert info.trainable_params == sum(parameters[n].numel() for n in trainable) > 0
    assert info.total_params == sum(p.numel() for p in parameters.values())
    assert info.peft == spec.peft and info.lr == spec.default_lr > 0
    assert info.virtual_tokens == VIRTUAL_POSITIONS.get(config.name, 0)
    assert 1 <= spec.train_pass_cost <= 3 and info.trained
    # the planning estimate (no weights loaded) is of the order of the real count; GQA
    # models get fewer prefix keys and values than the estimate's one per hidden unit
    estimate = spec.estimate_trainable(ModelShape.from_config(models.tiny_config(name)), config)
    assert info.trainable_params / 2.5 <= estimate <= info.trainable_params * 2.5
    if spec.peft:
        assert changed(base_before, wrapped) == set()  # the frozen body did not move, not even the embeddings
        assert info.trainable_params < info.total_params / 10


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
    assert methods.apply_method(tiny(), method(name="lora", lr=1e-3))[1].lr == 1e-3
    lr = {name: methods.METHODS[name].default_lr for name in methods.METHODS}
    assert lr["full"] < lr["lora"]  # full fine-tuning needs the smallest step


def test_dora_adds_a_trained_magnitude_per_adapted_layer():
    lora, lora_info = methods.apply_method(tiny("tiny-llama"), method(name="lora", rank=2))
    dora, dora_info = methods.apply_method(tiny("tiny-llama"), method(name="lora", rank=2, dora=True))
    magnitudes = [p for n, p in dora.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 2 * 4  # two blocks x q, k, v, o
    assert dora_info.trainable_params == lora_info.trainable_params + sum(p.numel() for p in magnitudes)
    assert dora_info.trained.startswith("DoRA r=2")


@pytest.mark.parametrize("name, expected", [
    ("tiny-gpt2", {"attn.c_attn": False, "mlp.c_proj": True}),
    ("tiny-llama", {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}),
])
def test_ia3_rescales_keys_values_and_the_mlp_input(name, expected):
    wrapped, info = methods.apply_method(tiny(name), method(name="ia3"))
    adapted = {n: m for n, m in wrapped.named_modules() if hasattr(m, "ia3_l") and not n.endswith("ia3_l")}
    suffixes = {".".join(n.split(".")[-2:]) for n in adapted}
    assert suffixes == set(expected) and len(adapted) == 2 * len(expected)  # two blocks
    for module_name, module in adapted.items():
        assert module.is_feedforward == expected[".".join(module_name.split(".")[-2:])]
    # one vector per adapted layer: as long as its output (or its input, for feed-forward)
    assert info.trainable_params == sum(p.numel() for n, p in wrapped.named_parameters() if "ia3_l" in n)


def test_ia3_on_an_unknown_family_or_bad_targets_is_a_clear_error():
    from transformers import BertConfig

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, is_decoder=True)
    with pytest.raises(ConfigError, match=r"s.yaml: method.name: ia3: no layout is known for model type 'bert'"):
        methods.check_method(config, method(name="ia3"), "s.yaml")
    with pytest.raises(ConfigError, match=r"method.target_modules: q_proj matches no linear layer"):
        methods.check_method(models.tiny_config("tiny-gpt2"), method(name="ia3", target_modules=["q_proj"]), "s.yaml")
    with pytest.raises(ConfigError, match="s.yaml: method: feedforward_modules fc2 must also be in target_modules"):
        validate(TrialConfig, {"method": {"name": "ia3", "target_modules": ["c_fc"], "feedforward_modules": ["fc2"]}},
                 "s.yaml")
