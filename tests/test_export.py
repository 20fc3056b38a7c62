"""Using a trained run: `fastgrad export RUN --to hf` writes a folder that transformers loads and
that computes the same logits and greedy continuation as the run's model; `fastgrad sample`
continues a prompt; INT8 (Q-GaLore) runs are de-quantized; nothing is overwritten."""

import json
from pathlib import Path

import pytest
import torch

from fastgrad.cli import main
from fastgrad.nn.qlinear import QLinear
from fastgrad.train.export import generate, load_run_model, run_tokenizer

transformers = pytest.importorskip("transformers")

SMALL = ["--seq-len", "32", "--batch-size", "4", "--vocab-size", "512", "--eval-every", "100", "--no-progress"]


@pytest.fixture(scope="module", params=["q-galore", "galore"])
def run(request, tmp_path_factory, text_file) -> Path:
    """A 3-step run: Q-GaLore (INT8 QLinear layers) or GaLore (LowRankGradLinear layers)."""
    out = tmp_path_factory.mktemp("runs")
    args = ["pretrain", "--out", str(out), "--data", str(text_file), *SMALL]
    assert main([*args, "--optim", request.param, "--steps", "3", "--name", "r"]) == 0
    return out / "r"


def test_the_run_model_is_the_trained_model(run):
    """The rebuilt model's weights are the checkpoint's (de-quantized codes for QLinear layers)."""
    model, cfg = load_run_model(run)
    assert not any(isinstance(m, QLinear) for m in model.modules())
    from safetensors.torch import load_file

    saved = load_file(str(run / "checkpoint/model.safetensors"))
    w = model.model.layers[0].self_attn.q_proj.weight
    if cfg.optim == "q-galore":
        codes = saved["model.layers.0.self_attn.q_proj.weight"]
        assert codes.dtype == torch.uint8
        scales = saved["model.layers.0.self_attn.q_proj.scales"]
        zeros = saved["model.layers.0.self_attn.q_proj.zeros"]
        group = codes.shape[1] // scales.shape[1]
        expected = (codes.float().view(-1, group) * scales.view(-1, 1) + zeros.view(-1, 1)).view_as(w)
        assert torch.equal(w, expected)
    else:
        assert torch.equal(w, saved["model.layers.0.self_attn.q_proj.weight"])


def test_export_loads_in_transformers_with_the_same_logits_and_continuation(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model, _ = load_run_model(run)
    text = "In the beginning God created the heaven and the earth."
    ids = run_tokenizer(run).encode(text).ids
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max()
    greedy = hf.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x))
    assert greedy[0].tolist() == generate(model, ids, 8)
    # Nothing is overwritten: a second export to the same folder is refused.
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def test_sample_continues_the_prompt(run, capsys):
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "And God said", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out.strip()
    model, _ = load_run_model(run)
    tokenizer = run_tokenizer(run)
    expected = tokenizer.decode(generate(model, tokenizer.encode("And God said").ids, 5))
    assert text == expected and text.startswith("And God said") and len(text) > len("And God said")
    assert main(["sample", str(run), "--prompt", "x", "--temperature", "-1"]) == 2


def test_export_and_sample_errors_name_the_problem(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "tiny"}))
    assert main(["export", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
