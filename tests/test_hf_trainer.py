"""The README's Hugging Face Trainer recipe: a transformers LlamaForCausalLM trained by Trainer with
fastgrad's optimizers passed as ``optimizers=(optimizer, None)``, GaLore on the attention/MLP
weights, and Q-GaLore with INT8 weights (``quantize_model`` before, ``dequantize_model`` before
``save_pretrained``)."""

import pytest
import torch
from optim_common import OpCounter

from fastgrad.nn import QLinear, dequantize_model, quantize_model
from fastgrad.optim import (
    GaLoreAdamW,
    LayerwiseAsOptimizer,
    QGaLoreAdamW,
    galore_param_groups,
    layerwise,
    qgalore_param_groups,
)

transformers = pytest.importorskip("transformers")

VOCAB, STEPS = 64, 12


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _dataset():
    """Two repeated sequences: a model that learns drives the loss well down in a few steps."""
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, VOCAB, (32,), generator=gen) for _ in range(2)]
    return [{"input_ids": s, "labels": s.clone()} for s in seqs * 16]


def _train(model, optimizer, out, max_grad_norm=1.0, accum=1):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, max_grad_norm=max_grad_norm, lr_scheduler_type="constant",
        gradient_accumulation_steps=accum,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), optimizers=(optimizer, None))
    with OpCounter() as counter:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, counter


def test_trainer_with_galore(tmp_path):
    model = _model()
    optimizer = GaLoreAdamW(galore_param_groups(model, rank=8, update_proj_gap=5), lr=3e-3)
    losses, counter = _train(model, optimizer, tmp_path)
    assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0], losses
    lowrank = optimizer.param_groups[0]["params"]
    assert len(lowrank) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    assert counter.calls["fastgrad.galore_adam_step_"] == STEPS * len(lowrank)  # the fused low-rank step ran


def test_trainer_with_qgalore_int8_weights_saves_a_float_model(tmp_path):
    model = quantize_model(_model())
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 14
    optimizer = QGaLoreAdamW(qgalore_param_groups(model, rank=8, update_proj_gap=5), lr=3e-3)
    # Between refreshes a QLinear hands the optimizer R, not an m×n gradient, so Trainer's norm
    # clipping would not see it: clip with fastgrad.nn.clip_grad_norm_ in your own loop, or not at all.
    losses, counter = _train(model, optimizer, tmp_path, max_grad_norm=0.0)
    assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0], losses
    assert counter.calls["fastgrad.galore_adam_step_int8_"] == STEPS * 14
    ids = torch.tensor([_dataset()[0]["input_ids"].tolist()])
    with torch.no_grad():
        trained = model(ids).logits
    dequantize_model(model).save_pretrained(tmp_path / "float")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "float").eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - trained).abs().max() <= 1e-4 * trained.abs().max()


@pytest.mark.parametrize("streaming", [False, True], ids=["deferred", "streaming"])
def test_trainer_with_layerwise_galore(tmp_path, streaming):
    """The layer-wise driver under Trainer: LayerwiseAsOptimizer makes optimizer.step() its
    finish_step(); Trainer's gradient accumulation (2) is the driver's, clipping is the driver's
    (Trainer's own is off: the driver consumed p.grad), Trainer's schedule sets its learning rate."""
    model = _model()
    clip = None if streaming else 1.0
    driver = layerwise(
        model, lambda m: GaLoreAdamW(galore_param_groups(m, rank=8, update_proj_gap=5), lr=3e-3),
        grad_accum_steps=2, max_grad_norm=clip, streaming=streaming,
    )  # fmt: skip
    optimizer = LayerwiseAsOptimizer(driver)
    losses, counter = _train(model, optimizer, tmp_path, max_grad_norm=0.0, accum=2)
    assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0], losses
    assert driver.steps == STEPS and optimizer.last_stats.step == STEPS
    assert counter.calls["fastgrad.galore_adam_step_"] == STEPS * 14
    assert all(p.grad is None for p in model.parameters())  # the driver consumed every gradient
