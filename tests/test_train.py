"""memray.train: the chunked next-token loss gives the standard loss and gradients, for every
kind of method, and training with it ends at the same weights."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from memray import methods, models, train
from memray.config import MethodConfig, ModelConfig, TrainConfig
from memray.files import validate


def tiny(name: str) -> torch.nn.Module:
    return models.load_model(validate(ModelConfig, {"name": name, "pretrained": False}, "test", "model"))


def with_method(name: str, spec: dict) -> torch.nn.Module:
    """The model with the method applied: the same adapter init every call, dropout off."""
    torch.manual_seed(0)
    wrapped, _ = methods.apply_method(tiny(name), TypeAdapter(MethodConfig).validate_python(spec))
    return wrapped.eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on padding), as the collator makes them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 4000, (3, 20), generator=generator)
    labels = ids.clone()
    labels[1, 12:] = -100
    labels[2, 5:] = -100
    return ids, labels


SPECS = [
    ("tiny-gpt2", {"name": "full"}),  # tied embeddings: the head's weight is the embedding matrix
    ("tiny-llama", {"name": "full"}),
    ("tiny-gpt2", {"name": "head"}),
    ("tiny-llama", {"name": "lora", "rank": 4, "placement": "both"}),
    ("tiny-gpt2", {"name": "prompt", "virtual_tokens": 5}),  # virtual positions in front of the output
    ("tiny-llama", {"name": "prefix", "virtual_tokens": 5}),
]


@pytest.mark.parametrize("name, spec", SPECS, ids=lambda v: v if isinstance(v, str) else v["name"])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(name, spec, monkeypatch):
    monkeypatch.setattr(train, "CHUNKED_LOSS_ROWS", 7)  # several blocks, the last one short
    ids, labels = batch()
    attention = (labels != -100).long()
    attention[:, 0] = 1

    reference = with_method(name, spec)
    expected = reference(input_ids=ids, attention_mask=attention, labels=labels).loss
    expected.backward()

    model = with_method(name, spec)
    chunked = train.ChunkedLoss.of(model)
    with chunked.hidden_states():
        hidden = model(input_ids=ids, attention_mask=attention).logits
    assert hidden.shape[-1] == model.config.get_text_config().hidden_size  # no logits were made
    loss = chunked(hidden, labels, None)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expected_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == expected_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-4, atol=1e-6)
    # the output layer is itself again: the model computes logits as before
    assert model(input_ids=ids).logits.shape[-1] == models.TOKENIZER_VOCAB


def test_training_with_the_chunked_loss_ends_at_the_same_weights(tmp_path):
    samples = [ids.tolist() for ids in torch.randint(1, 4000, (12, 24), generator=torch.Generator().manual_seed(1))]
    samples = [s[: 10 + i] for i, s in enumerate(samples)]  # uneven lengths: padding in every batch
    finals = {}
    for mode in ("off", "on"):
        model = tiny("tiny-llama")
        config = TrainConfig(epochs=2, batch_size=4, grad_accum=2, checkpoints=False, chunked_loss=mode)
        assert train.ChunkedLoss.applies(model, config, None) == (mode == "on")
        losses = []
        train.fit(model, models.builtin_tokenizer(), samples, config, lr=1e-3, seed=0,
                  checkpoints_dir=tmp_path / mode, evaluate=lambda epoch: None,
                  on_epoch_end=lambda end: losses.append(end.train_loss), progress=False)
        finals[mode] = (losses, {k: v.clone() for k, v in model.state_dict().items()})
    assert finals["on"][0] == pytest.approx(finals["off"][0], rel=1e-4)
    for key, value in finals["off"][1].items():
        torch.testing.assert_close(finals["on"][1][key], value, rtol=1e-4, atol=1e-5)
    assert not torch.equal(finals["off"][1]["lm_head.weight"], tiny("tiny-llama").lm_head.weight)  # it trained


def test_chunked_loss_by_default_only_for_large_vocabularies():
    small = tiny("tiny-gpt2")
    assert not train.ChunkedLoss.applies(small, TrainConfig(), None)  # 4k vocabulary: the standard loss
    assert train.ChunkedLoss.applies(small, TrainConfig(chunked_loss="on"), None)
    assert not train.ChunkedLoss.applies(small, TrainConfig(chunked_loss="on"), {"zero_optimization": {"stage": 3}})
    assert not train.ChunkedLoss.applies(small, TrainConfig(chunked_loss="on", compile=True), None)
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2))  # GPT-2's 50,257 tokens
    assert train.ChunkedLoss.applies(gpt2, TrainConfig(), None)


def test_an_epoch_is_handed_on_only_after_it_was_measured():
    """The Trainer's order at an epoch's end (on_epoch_end, then log and save) is what lets
    a trial measure the weights in memory and report them with the checkpoint: checked."""
    from types import SimpleNamespace

    from memray.train import _EpochHook

    calls = []
    hook = _EpochHook(lambda epoch: calls.append(("measure", epoch)),
                      lambda end: calls.append(("saved", end.epoch, end.checkpoint_dir.name)), saving=True)
    args, state = SimpleNamespace(output_dir="ckpt"), SimpleNamespace(epoch=1.0, global_step=4)
    hook.on_epoch_end(args, state, None)
    hook.on_log(args, state, None, logs={"loss": 2.0})
    hook.on_save(args, state, None)
    assert calls == [("measure", 1), ("saved", 1, "checkpoint-4")]
    state = SimpleNamespace(epoch=2.0, global_step=8)
    with pytest.raises(RuntimeError, match="ended epoch 1 .* before its on_epoch_end"):
        hook.on_save(args, state, None)  # a save with no measured epoch: out of order
