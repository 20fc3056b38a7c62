"""Using a trained run: its model as a float ``LlamaForCausalLM`` (:func:`load_run_model`), exported
as a Hugging Face ``transformers`` folder (:func:`export_hf`, ``fastgrad export``), and sampled from
(:func:`generate`, ``fastgrad sample``).

A run directory carries everything needed: ``config.json`` (the model and how it was trained),
``tokenizer.json`` (written when the run starts) and ``checkpoint/model.safetensors``. The model
is rebuilt as the run built it (a Q-GaLore run's attention/MLP layers as INT8 ``QLinear``), the
checkpoint is loaded strictly, and INT8 weights are de-quantized (code·scale + zero, fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from fastgrad.models import LlamaConfig, LlamaForCausalLM, get_config
from fastgrad.nn import dequantize_model
from fastgrad.train.checkpoint import find_checkpoint, load_weights
from fastgrad.train.config import TrainConfig
from fastgrad.train.optimizers import build_optimizer

TOKENIZER = "tokenizer.json"


def run_tokenizer(run_dir: Path) -> Tokenizer:
    path = run_dir / TOKENIZER
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {TOKENIZER} (runs record their tokenizer from this version of fastgrad on)")
    return Tokenizer.from_file(str(path))


def load_run_model(run_dir: Path) -> tuple[LlamaForCausalLM, TrainConfig]:
    """The run's last checkpointed model, float (fp32) and in eval mode, with its config."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.json)")
    cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"{run_dir}: no checkpoint in it")
    vocab = run_tokenizer(run_dir).get_vocab_size()
    model = LlamaForCausalLM(get_config(cfg.model, vocab, cfg.seq_len))
    build_optimizer(cfg, model)  # the run's module conversions (QLinear, LowRankGradLinear)
    load_weights(checkpoint, model)
    return dequantize_model(model).float().eval(), cfg


def hf_config(config: LlamaConfig) -> dict:
    """The ``transformers`` LlamaConfig of ``config`` (same rotary convention: halves rotated)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.initializer_range,
        "torch_dtype": "float32",
    }


def export_hf(run_dir: Path, out: Path) -> Path:
    """Write ``out`` as a Hugging Face folder: config.json, model.safetensors (fp32, the parameter
    names are ``transformers``' own), tokenizer.json and tokenizer_config.json. ``out`` must not
    exist (nothing is overwritten)."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"--out {out} already exists; choose a new folder")
    model, _ = load_run_model(run_dir)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(model.config), indent=1))
    (tmp / TOKENIZER).write_text((Path(run_dir) / TOKENIZER).read_text())
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    tmp.rename(out)
    return out


@torch.no_grad()
def generate(
    model: LlamaForCausalLM, ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """``ids`` continued by ``max_new_tokens`` tokens: greedy (temperature 0) or sampled from
    softmax(logits / temperature), within the model's context window (the last max_seq_len tokens)."""
    if not ids:
        raise ValueError("the prompt encodes to no token")
    gen = torch.Generator().manual_seed(seed)
    out = list(ids)
    window = model.config.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([out[-window:]]))[0, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
        else:
            out.append(int(logits.argmax()))
    return out
