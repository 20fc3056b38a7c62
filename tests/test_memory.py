"""`fastgrad memory`: the analytic memory model (fastgrad.train.memory) against the measured peak of
real training steps, its exact categories against the real model and optimizer, and the command."""

import json
import time

import pytest
import torch

from fastgrad.cli import main
from fastgrad.models import LlamaConfig, LlamaForCausalLM, get_config
from fastgrad.optim import layerwise
from fastgrad.train.config import TrainConfig
from fastgrad.train.memory import MODELLED_OPTIMIZERS, anchors_for, estimate, measured_memory_events
from fastgrad.train.optimizers import OPTIMIZERS, build_optimizer, state_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = 0.10  # the bound on |estimate − measured| / measured
MARK = 7777  # bytes of the marker allocation that separates the profiled steps

# The `tiny` recipe model (2.1M parameters with this vocabulary) and a 5.3M-parameter one.
MODELS = {
    "tiny": get_config("tiny", vocab_size=2048, max_seq_len=64),
    "5m": LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, max_seq_len=64
    ),
}


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _config(optim: str, **kw) -> TrainConfig:
    kw.setdefault("update_proj_gap", 1)  # every step refreshes the projector: the worst step
    kw.setdefault("dtype", "float32")
    return TrainConfig(model="tiny", optim=optim, **kw).resolved()


def _build(mc: LlamaConfig, cfg: TrainConfig):
    torch.manual_seed(0)
    model = LlamaForCausalLM(mc).to(getattr(torch, cfg.dtype))
    model.gradient_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(cfg, model)  # Q-GaLore: converts the projections to QLinear first
    stepper = layerwise(model, optimizer, grad_accum_steps=cfg.grad_accum) if cfg.layerwise else optimizer
    return model, optimizer, stepper


def _train_step(model, optimizer, stepper, cfg, batches) -> None:
    """One optimizer step as fastgrad.train.loop takes it."""
    for ids, labels in batches:
        loss = model(ids, labels, shift_labels=False) / cfg.grad_accum
        loss.backward()
        loss.item()
    if cfg.layerwise:
        stepper.finish_step()
    else:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measured_peak(mc: LlamaConfig, cfg: TrainConfig, steps: int = 2) -> int:
    """Peak bytes alive during the last of ``steps`` training steps on CPU.

    The profiler's memory events cover all the steps, so the optimizer state the first step creates
    (and every tensor a later step replaces) is counted, allocation and release; the live total at
    each event is what was allocated minus what was freed since profiling started, plus what was
    resident before it: the weights, buffers and token batches. The peak is taken over the last
    step, after a marker allocation."""
    model, optimizer, stepper = _build(mc, cfg)
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.batch_size, cfg.seq_len)
    batches = [
        (torch.randint(0, mc.vocab_size, shape, generator=gen), torch.randint(0, mc.vocab_size, shape, generator=gen))
        for _ in range(cfg.grad_accum)
    ]
    resident = _storage_bytes([*model.parameters(), *model.buffers(), *(t for b in batches for t in b)])

    def run() -> None:
        for _ in range(steps):
            torch.empty(MARK, dtype=torch.uint8)  # allocated and freed at once: the marker
            _train_step(model, optimizer, stepper, cfg, batches)

    live = peak = 0
    marks = 0
    for nbytes in measured_memory_events(run):
        live += nbytes
        if nbytes == MARK:
            marks += 1
        if marks == steps:
            peak = max(peak, live)
    assert marks == steps
    return resident + peak


def _check(mc, cfg, between_refreshes=False):
    measured = measured_peak(mc, cfg)
    b = estimate(cfg, model_config=mc, device="cpu")
    est = b.peak_between_refreshes if between_refreshes else b.peak
    err = (est - measured) / measured
    print(
        f"\n{cfg.optim}{' layer-wise' if cfg.layerwise else ''}{' ckpt' if cfg.activation_checkpointing else ''} "
        f"{cfg.dtype} b={cfg.batch_size} s={cfg.seq_len}: measured {measured / 2**20:.3f} MiB, "
        f"estimated {est / 2**20:.3f} MiB ({b.peak_phase}), {100 * err:+.2f}%"
    )
    assert abs(err) < TOLERANCE, f"estimate {est} vs measured {measured} ({100 * err:+.1f}%)"
    return b


# ------------------------------------------------------------------------------------------------
# the peak against measured steps
# ------------------------------------------------------------------------------------------------

CASES = [("adamw", False), ("galore", False), ("q-galore", False), ("galore", True)]


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize(("optim", "lw"), CASES, ids=[o + ("-layerwise" if lw else "") for o, lw in CASES])
@pytest.mark.parametrize(
    ("model", "batch", "seq"),
    [("tiny", 4, 64), ("5m", 1, 32)],
    ids=["tiny-activations", "5m-optimizer"],
)
def test_peak_matches_measured_step(model, batch, seq, optim, lw, ckpt):
    """Refresh steps (the worst: the SVD runs). `tiny` with 256 tokens per step peaks in backward,
    where the activations are; the 5M model with 32 tokens peaks in the optimizer step, where the
    gradients, states and the SVD are: both ends of the model are exercised."""
    cfg = _config(optim, rank=16, layerwise=lw, activation_checkpointing=ckpt, batch_size=batch, seq_len=seq)
    b = _check(MODELS[model], cfg)
    if model == "tiny" and not ckpt:
        assert b.peak_phase == "backward"
    if model == "5m" and not lw:
        assert b.peak_phase == "optimizer step"


@pytest.mark.parametrize("optim", ["adamw", "q-galore", "galore"])
def test_peak_matches_measured_step_bfloat16(optim):
    """16-bit models: fp32 copies in the norms, the rotary embedding and the loss."""
    cfg = _config(optim, rank=16, batch_size=2, seq_len=64, dtype="bfloat16", activation_checkpointing=True)
    _check(MODELS["tiny"], cfg)


@pytest.mark.parametrize(
    ("optim", "lw", "extra"),
    [
        ("galore", False, {}),
        ("galore", False, {"lowrank_grad": False}),
        ("galore", False, {"dtype": "bfloat16"}),
        ("q-galore", False, {}),
        ("q-galore8bit", False, {}),
        ("q-galore8bit", True, {}),
        ("galore", True, {}),
        ("galore", True, {"lowrank_grad": False}),
    ],
)
def test_peak_between_refreshes_matches_measured_step(optim, lw, extra):
    """update_proj_gap = 2: the second step does not refresh (Q-GaLore's QLinear and, unless
    lowrank_grad is off, GaLore's LowRankGradLinear then compute only the projected gradient in
    backward)."""
    cfg = _config(optim, rank=16, layerwise=lw, batch_size=1, seq_len=32, update_proj_gap=2, **extra)
    _check(MODELS["5m"], cfg, between_refreshes=True)


def test_peak_with_gradient_accumulation_matches_measured_step():
    """Later micro-batches run their forward and backward with the gradients already there."""
    cfg = _config("galore", rank=16, batch_size=2, seq_len=32, grad_accum=2)
    _check(MODELS["tiny"], cfg)


# ------------------------------------------------------------------------------------------------
# exact categories
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("optim", [o for o in OPTIMIZERS if o in MODELLED_OPTIMIZERS])
def test_weights_and_optimizer_states_are_exact(optim, dtype):
    """Weights (parameters and buffers, after Q-GaLore's INT8 conversion) and the optimizer state
    after a step (``state_bytes``), at each optimizer's recipe rank for `tiny`, byte for byte."""
    mc = MODELS["tiny"]
    cfg = _config(optim, dtype=dtype, batch_size=2, seq_len=16)
    model, optimizer, stepper = _build(mc, cfg)
    ids = torch.randint(0, mc.vocab_size, (2, 16))
    _train_step(model, optimizer, stepper, cfg, [(ids, ids)])
    b = estimate(cfg, model_config=mc, device="cpu")
    assert b.weights == _storage_bytes([*model.parameters(), *model.buffers()])
    assert b.optimizer_states == state_bytes(optimizer)


def test_estimate_allocates_nothing_and_7b_is_instant():
    cfg = TrainConfig(model="7b", optim="q-galore", rank=1024, layerwise=True, activation_checkpointing=True)
    cfg.batch_size, cfg.seq_len, cfg.vocab_size = 1, 256, 32000
    start = time.perf_counter()
    b = estimate(cfg)
    assert time.perf_counter() - start < 2.0
    allocated = sum(nbytes for nbytes in measured_memory_events(lambda: estimate(cfg)) if nbytes > 0)
    assert allocated < 2**20  # shapes only: no tensor of the model
    assert b.config["parameters"] == 6_738_415_616  # LLaMA-7B with a 32000-token vocabulary
    assert b.config["dtype"] == "bfloat16" and b.config["device"] == "cuda"
    assert b.peak == max(b.phases.values()) >= b.weights + b.optimizer_states + b.gradients
    assert b.peak_between_refreshes < b.peak  # no SVD, no full gradient of a QLinear


def test_estimate_rejects_unknown_model_and_optimizer():
    with pytest.raises(ValueError, match="unknown model"):
        estimate(TrainConfig(model="huge", optim="adamw"))
    with pytest.raises(ValueError, match="no memory model"):
        estimate(TrainConfig(model="tiny", optim="sgd"))


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------

SEVEN_B = [
    "memory", "--model", "7b", "--optim", "q-galore", "--rank", "1024", "--layerwise",
    "--batch-size", "1", "--seq-len", "256", "--activation-checkpointing", "--dtype", "bfloat16",
]  # fmt: skip


def test_memory_command_7b_qgalore_layerwise(capsys):
    assert main(SEVEN_B) == 0
    out = capsys.readouterr().out
    for line in ("| weights ", "| gradients ", "| optimizer states ", "| projector transients ", "| activations "):
        assert line in out
    assert "| total (sum) " in out and "| estimated peak (" in out and "GiB" in out
    assert "15.26 GB" in out and "Q-GaLore README" in out  # the published figure, beside ours
    assert "llama-7b" in out and "rank 1024" in out and "layer-wise" in out


def test_memory_command_json(capsys):
    assert main([*SEVEN_B, "--json", "--vocab-size", "32000"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak"] >= data["weights"] + data["optimizer_states"]
    categories = ("weights", "gradients", "optimizer_states", "projector_transients", "activations")
    assert data["total"] == sum(data[k] for k in categories)
    assert anchors_for("llama-7b", "q-galore")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "huge"], "unknown model"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--optim", "adamw", "--layerwise"], "--layerwise works with"),
    ],
)
def test_memory_command_errors(capsys, args, message):
    assert main(["memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgrad memory: error:") and message in err


def test_memory_command_rejects_unknown_optimizer(capsys):
    with pytest.raises(SystemExit) as info:
        main(["memory", "--optim", "sgd"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
