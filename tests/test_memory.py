"""`fastgrad memory`: the analytic memory model (fastgrad.train.memory) against the measured peak of
real training steps, its exact categories against the real model and optimizer, and the command."""

import json
import time

import pytest
import torch

from fastgrad.cli import main
from fastgrad.models import LlamaConfig, LlamaForCausalLM, get_config
from fastgrad.optim import LowRankOptimizer, layerwise
from fastgrad.train.config import TrainConfig
from fastgrad.train.memory import MODELLED_OPTIMIZERS, anchors_for, estimate
from fastgrad.train.optimizers import OPTIMIZERS, build_optimizer, state_bytes
from fastgrad.train.profiling import measured_memory_events, storage_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

# |estimate − measured| / measured, for the peak of each phase. The model replays the step's
# allocations op by op; what is left is a few bytes of scalar tensors and, with accumulation, the
# token tensors of the later micro-batches that the measurement keeps resident.
TOLERANCE = 1e-4
MARK = 7777  # bytes of the marker allocation that separates the profiled steps
# Markers of the phases within a step (allocated and freed at once, like MARK).
PHASE_MARKS = {7771: "forward", 7772: "backward", 7773: "optimizer step"}
_MARK_OF = {phase: size for size, phase in PHASE_MARKS.items()}

# The `tiny` recipe model (2.1M parameters with this vocabulary), a 5.3M-parameter one, a wide one
# whose MLP weights (1024×512) exceed one 2^18-element block of the fused INT8 step, and a tall one
# whose MLP weights (4096×64, 64×4096) outweigh its activations and embeddings while Muon's
# Newton–Schulz of them (64×64 Gram matrices) stays fast on CPU.
MODELS = {
    "tiny": get_config("tiny", vocab_size=2048, max_seq_len=64),
    "5m": LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, max_seq_len=64
    ),
    "wide": LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=4, max_seq_len=64
    ),
    "tall": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=4096, num_layers=2, num_heads=4, max_seq_len=64
    ),
}


def _config(optim: str, **kw) -> TrainConfig:
    kw.setdefault("update_proj_gap", 1)  # every step refreshes the projector: the worst step
    kw.setdefault("dtype", "float32")
    return TrainConfig(model="tiny", optim=optim, **kw).resolved()


def _build(mc: LlamaConfig, cfg: TrainConfig):
    torch.manual_seed(0)
    model = LlamaForCausalLM(mc).to(getattr(torch, cfg.dtype))
    model.gradient_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(cfg, model)  # Q-GaLore: converts the projections to QLinear first
    stepper = (
        layerwise(model, optimizer, grad_accum_steps=cfg.grad_accum, streaming=cfg.layerwise_streaming)
        if cfg.layerwise
        else optimizer
    )
    return model, optimizer, stepper


def _mark(phase: str | None) -> None:
    if phase is not None:
        torch.empty(_MARK_OF[phase], dtype=torch.uint8)  # allocated and freed at once


def _train_step(model, optimizer, stepper, cfg, batches, mark: bool = False) -> None:
    """One optimizer step as fastgrad.train.loop takes it (``mark``: a marker allocation before each
    phase, see :func:`measured_phase_peaks`)."""
    for ids, labels in batches:
        _mark("forward" if mark else None)
        loss = model(ids, labels, shift_labels=False) / cfg.grad_accum
        _mark("backward" if mark else None)
        loss.backward()
        loss.item()
    _mark("optimizer step" if mark else None)
    if cfg.layerwise:
        stepper.finish_step()
    else:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float("inf"))
        # as the loop: its finite gradient norm spares fastgrad's optimizers their own check (on CPU an
        # fp32 sum of each gradient: a copy of a 16-bit one)
        optimizer.step(**({"grads_finite": True} if isinstance(optimizer, LowRankOptimizer) else {}))
        optimizer.zero_grad(set_to_none=True)


def measured_phase_peaks(mc: LlamaConfig, cfg: TrainConfig, steps: int = 2) -> dict[str, int]:
    """Peak bytes alive in each phase (forward, backward, optimizer step; a phase that repeats, as
    forward and backward do with accumulation: its largest) of the last of ``steps`` training steps
    on CPU.

    The profiler's memory events cover all the steps, so the optimizer state the first step creates
    (and every tensor a later step replaces) is counted, allocation and release; the live total at
    each event is what was allocated minus what was freed since profiling started, plus what was
    resident before it: the weights, buffers and token batches. The last step starts after a marker
    allocation, each of its phases after one of its own size (layer-wise streaming updates the
    weights in backward; its optimizer step is the driver's finish_step)."""
    model, optimizer, stepper = _build(mc, cfg)
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.batch_size, cfg.seq_len)
    batches = [
        (torch.randint(0, mc.vocab_size, shape, generator=gen), torch.randint(0, mc.vocab_size, shape, generator=gen))
        for _ in range(cfg.grad_accum)
    ]
    resident = storage_bytes([*model.parameters(), *model.buffers(), *(t for b in batches for t in b)])

    def run() -> None:
        # Without oneDNN: on CPUs with AVX512-BF16 or AMX its bf16 GEMMs allocate packing scratch of
        # their own (tens of KB, depending on the machine), which the model of the step's tensors
        # does not describe; torch's own CPU GEMM allocates none.
        with torch.backends.mkldnn.flags(enabled=False):
            for _ in range(steps):
                torch.empty(MARK, dtype=torch.uint8)  # allocated and freed at once: the marker
                _train_step(model, optimizer, stepper, cfg, batches, mark=True)

    live, marks, phase = resident, 0, None
    peaks: dict[str, int] = {}
    for nbytes in measured_memory_events(run):
        if abs(nbytes) in PHASE_MARKS:  # a phase marker (not counted)
            if nbytes > 0 and marks == steps:
                phase = PHASE_MARKS[nbytes]
                peaks[phase] = max(peaks.get(phase, 0), live)
            continue
        live += nbytes
        if nbytes == MARK:
            marks += 1
        elif marks == steps and phase is not None:
            peaks[phase] = max(peaks[phase], live)
    assert marks == steps and set(peaks) == set(PHASE_MARKS.values())
    return peaks


def measured_peak(mc: LlamaConfig, cfg: TrainConfig, steps: int = 2) -> int:
    """Peak bytes alive during the last of ``steps`` training steps on CPU (see
    :func:`measured_phase_peaks`)."""
    return max(measured_phase_peaks(mc, cfg, steps).values())


def _describe(cfg: TrainConfig) -> str:
    lw = " layer-wise streaming" if cfg.layerwise and cfg.layerwise_streaming else " layer-wise" * cfg.layerwise
    return (
        f"{cfg.optim} r{cfg.rank}{lw}{' ckpt' * cfg.activation_checkpointing}"
        f"{' no-lowrank-grad' * (not cfg.lowrank_grad)} {cfg.dtype} b={cfg.batch_size} s={cfg.seq_len}"
        f"{f' ×{cfg.grad_accum}' if cfg.grad_accum > 1 else ''}"
    )


def _check(mc, cfg, between_refreshes=False):
    """The estimated peak of every phase against the measured one, of a refresh step (``phases``)
    or of a step between refreshes (``between_refreshes``: the second of two steps with
    update_proj_gap = 2; ``phases_between_refreshes``)."""
    measured = measured_phase_peaks(mc, cfg)
    b = estimate(cfg, model_config=mc, device="cpu")
    est = b.phases_between_refreshes if between_refreshes else b.phases
    print(
        f"\n{_describe(cfg)}: measured {max(measured.values()) / 2**20:.3f} MiB, estimated "
        f"{max(est.values()) / 2**20:.3f} MiB ({max(est, key=est.get)}); estimate − measured: "
        + ", ".join(f"{k} {est[k] - v:+d} B" for k, v in measured.items())
    )
    for phase, value in measured.items():
        err = (est[phase] - value) / value
        assert abs(err) < TOLERANCE, f"{phase}: estimate {est[phase]} vs measured {value} ({100 * err:+.3f}%)"
    return b


# ------------------------------------------------------------------------------------------------
# the peak against measured steps
# ------------------------------------------------------------------------------------------------

CASES = [("adamw", False), ("galore", False), ("q-galore", False), ("galore", True), ("galore-muon", True)]


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
        ("galore-muon", False, {}),  # LowRankGradLinear's R; Newton–Schulz of the r'-wide U
        ("galore-muon", False, {"dtype": "bfloat16"}),
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


# The fused projected-Adam step (galore_adam_step_): the `wide` model at 16 tokens peaks in the
# optimizer step, in the first low-rank weight's op (all R alive, N, the op's scratch).
FUSED = [
    ("q-galore", {}),  # INT8 W: blocks of 512 and 256 whole rows decoded, updated, re-quantized in place
    ("q-galore", {"dtype": "bfloat16"}),
    ("galore", {}),  # fp32 W and P: one addmm_
    ("galore", {"dtype": "bfloat16"}),  # 16-bit W and P: scratch blocks of P and W
    ("galore", {"lowrank_grad": False, "dtype": "bfloat16"}),
    ("galore8bit", {"rank": 6}),  # R of 3072 (fused) and 6144 (8-bit moments) elements, per group in that order
    ("q-galore8bit", {"rank": 6, "dtype": "bfloat16"}),
    ("q-galore", {"grad_accum": 2}),
    ("q-galore", {"layerwise": True, "dtype": "bfloat16"}),  # finish_step: fp32 norms, then the updates
    ("galore", {"layerwise": True, "dtype": "bfloat16", "grad_accum": 2}),  # fp32 buffers of the 16-bit R
    ("galore-muon", {}),  # (not fused) U, its bf16 copy, Newton–Schulz of m×r' or r'×n, O back-projected
    ("galore-muon", {"dtype": "bfloat16"}),
    ("galore-muon", {"lowrank_grad": False}),
    ("q-galore-muon", {}),  # INT8 W: one block of whole rows dequantized, Δ from O's or P̂'s rows, re-quantized
    ("q-galore-muon", {"dtype": "bfloat16"}),
    ("galore-muon", {"layerwise": True, "dtype": "bfloat16", "grad_accum": 2}),  # fp32 buffers of R; U from R
    ("q-galore-muon", {"layerwise": True}),  # finish_step: fp32 norms, then the INT8 updates
]


@pytest.mark.parametrize(
    ("optim", "extra"), FUSED, ids=["-".join([o, *(f"{k}={v}" for k, v in e.items())]) for o, e in FUSED]
)
def test_fused_step_matches_measured_step(optim, extra):
    """GaLoreAdamW / QGaLoreAdamW update each low-rank weight with fp32/16-bit moments by one
    galore_adam_step_ call (R held by a local until it returns, N in an R-sized fp32 scratch):
    between refreshes, non-layer-wise and layer-wise, with and without accumulation."""
    kw = {"rank": 16, **extra}
    cfg = _config(optim, batch_size=1, seq_len=16, update_proj_gap=2, **kw)
    b = _check(MODELS["wide"], cfg, between_refreshes=True)
    assert b.peak_between_refreshes <= b.peak


# Muon (fastgrad.optim.Muon as pretrain --optim muon builds it): the momentum buffer per attention/MLP
# weight, AdamW for the rest; one weight at a time, U = lerp(G, B), its bf16 copy and the Newton–Schulz
# op's buffers (csrc/cpu/newton_schulz.cpp). `5m` peaks in the optimizer step (its 688×256 MLP
# weights are worked on transposed), `tiny` at 256 tokens in backward.
# muon8bit (Muon8bit): each Muon weight's 8-bit momentum decoded to fp32, U in fp32, re-encoded; the
# AdamW groups' 8-bit moments (the embedding and head) decoded, updated and re-encoded one at a time.
# Layer-wise (--layerwise): Muon's and Muon8bit's parameters are all full-rank slots, every gradient
# kept by the driver until finish_step (deferred; its fp32 norms first) and freed as the update
# consumes it, or each weight updated in its hook with a copy of what the update writes (streaming:
# on `tall` the MLP weights' updates, beside the activations, set the backward peak).
LW, STREAM = {"layerwise": True}, {"layerwise": True, "layerwise_streaming": True}
MUON = [
    ("muon", "5m", "float32", 1, 32, {}),
    ("muon", "5m", "bfloat16", 1, 32, {}),
    ("muon", "tiny", "float32", 4, 64, {}),
    ("muon8bit", "5m", "float32", 1, 32, {}),
    ("muon8bit", "5m", "bfloat16", 1, 32, {}),
    ("muon8bit", "tiny", "float32", 4, 64, {}),
    ("galore-muon", "5m", "float32", 1, 32, {}),
    ("galore-muon", "5m", "bfloat16", 1, 32, {}),
    ("q-galore-muon", "5m", "float32", 1, 32, {}),
    ("q-galore-muon", "5m", "bfloat16", 1, 32, {}),
    ("muon", "tall", "float32", 1, 16, LW),
    ("muon", "tall", "bfloat16", 1, 16, STREAM),
    ("muon", "tall", "float32", 1, 16, {**STREAM, "grad_accum": 2, "activation_checkpointing": True}),
    ("muon8bit", "tall", "bfloat16", 1, 16, {**LW, "grad_accum": 2}),  # the 16-bit G freed once upcast
    ("muon8bit", "tall", "float32", 1, 16, STREAM),  # the copy: the weight, the momentum's codes and scales
    ("q-galore-muon", "5m", "bfloat16", 1, 32, {**LW, "grad_accum": 2}),  # a refresh from the accumulated G
]


def _muon_id(optim, model, dtype, extra):
    mode = ("-streaming" if extra.get("layerwise_streaming") else "-layerwise") if extra.get("layerwise") else ""
    accum = f"-x{extra['grad_accum']}" if extra.get("grad_accum", 1) > 1 else ""
    return f"{optim}-{model}-{dtype}{mode}{accum}{'-ckpt' if extra.get('activation_checkpointing') else ''}"


@pytest.mark.parametrize(
    ("optim", "model", "dtype", "batch", "seq", "extra"), MUON, ids=[_muon_id(o, m, d, e) for o, m, d, _, _, e in MUON]
)
def test_muon_step_matches_measured_step(optim, model, dtype, batch, seq, extra):
    cfg = _config(optim, dtype=dtype, batch_size=batch, seq_len=seq, **extra)
    b = _check(MODELS[model], cfg)
    assert b.config["layerwise"] == cfg.layerwise and b.config["layerwise_streaming"] == cfg.layerwise_streaming
    if model == "5m" and optim in ("muon", "muon8bit"):
        assert b.peak_phase == "optimizer step"
    if cfg.layerwise_streaming:
        assert b.phases["optimizer step"] < b.phases["backward"]


# Layer-wise streaming: every weight updated in its hook of the last micro-batch's backward.
STREAMING = [
    # optim, lowrank_grad, grad_accum, checkpointing, dtype, refresh step
    ("galore", True, 1, False, "float32", False),
    ("galore", True, 1, False, "float32", True),
    ("galore", True, 2, False, "bfloat16", False),  # R accumulated in fp32; the delivered R alive in the update
    ("galore", True, 1, True, "bfloat16", False),  # checkpointing: LowRankGradLinear forms G (see the model)
    ("galore", False, 1, False, "bfloat16", False),
    ("galore", False, 2, True, "float32", True),
    ("q-galore", True, 1, False, "float32", False),
    ("q-galore", True, 1, False, "bfloat16", True),
    ("q-galore", True, 2, True, "bfloat16", False),
    ("q-galore", True, 2, False, "float32", True),
    ("q-galore8bit", True, 1, True, "float32", False),
    ("galore8bit", True, 2, False, "bfloat16", True),
    # GaLoreMuon, QGaLoreMuon: the R a layer delivers is held by it until the update in its hook returns
    ("galore-muon", True, 1, False, "bfloat16", False),
    ("galore-muon", True, 1, False, "float32", True),  # the momentum carried into the refreshed basis
    ("galore-muon", False, 2, True, "bfloat16", False),
    ("q-galore-muon", True, 1, False, "float32", False),
    ("q-galore-muon", True, 2, False, "float32", True),
]


@pytest.mark.parametrize(
    ("optim", "lowrank_grad", "accum", "ckpt", "dtype", "refresh"),
    STREAMING,
    ids=[
        f"{o}{'' if g else '-no-lowrank-grad'}-x{a}{'-ckpt' if c else ''}-{d}-{'refresh' if r else 'between'}"
        for o, g, a, c, d, r in STREAMING
    ],
)
def test_layerwise_streaming_matches_measured_step(optim, lowrank_grad, accum, ckpt, dtype, refresh):
    """--layerwise-streaming: each weight's update (and its temporaries) happens in its hook during
    backward and its R or full gradient is freed at once."""
    cfg = _config(
        optim, rank=16, batch_size=1, seq_len=16, layerwise=True, layerwise_streaming=True, grad_accum=accum,
        activation_checkpointing=ckpt, dtype=dtype, lowrank_grad=lowrank_grad, update_proj_gap=1 if refresh else 2,
    )  # fmt: skip
    b = _check(MODELS["wide"], cfg, between_refreshes=not refresh)
    assert b.config["layerwise_streaming"] and b.phases["optimizer step"] < b.phases["backward"]


def test_layerwise_streaming_activation_heavy_step_matches_measured_step():
    """Streaming where the activations dominate (256 tokens): the updates run beside them."""
    cfg = _config("galore", rank=16, batch_size=4, seq_len=64, layerwise=True, layerwise_streaming=True)
    b = _check(MODELS["tiny"], cfg)
    assert b.peak_phase == "backward"


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
    assert b.weights == storage_bytes([*model.parameters(), *model.buffers()])
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


@pytest.mark.parametrize("optim", ["galore", "q-galore"])
def test_cuda_estimate_counts_the_triton_launchers_workspaces(monkeypatch, optim):
    """The GPU branch sizes workspaces with the launchers' own plans (kernels/plans.py, checked
    against the launchers in tests/test_kernel_plans.py): a plan that splits every matmul raises
    the CUDA estimate, and leaves the CPU one (the C++ kernels' scratch) as it was."""
    from fastgrad.kernels.plans import SplitK

    from fastgrad.train.memory import scratch

    # a small vocabulary, so that the head does not hide the projections' workspaces
    cfg = TrainConfig(model="tiny", optim=optim, rank=16, batch_size=4, seq_len=128, lowrank_grad=True, vocab_size=256)
    before = {dev: estimate(cfg, device=dev) for dev in ("cuda", "cpu")}
    always = SplitK(min_k=1, max_splits=64, traffic_budget=float("inf"), nominal_tile=1 << 20, align=1)
    monkeypatch.setattr(scratch, "SPLIT_K", always)
    after = {dev: estimate(cfg, device=dev) for dev in ("cuda", "cpu")}
    assert after["cuda"].phases_between_refreshes["backward"] > before["cuda"].phases_between_refreshes["backward"]
    assert after["cuda"].phases["optimizer step"] > before["cuda"].phases["optimizer step"]
    assert after["cpu"] == before["cpu"]


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


def test_memory_command_layerwise_streaming(capsys):
    """--layerwise-streaming: the same weights and states, no projected gradients held until the end
    of the step, the updates in backward."""
    assert main([*SEVEN_B, "--json"]) == 0
    deferred = json.loads(capsys.readouterr().out)
    assert main([*SEVEN_B, "--layerwise-streaming", "--json"]) == 0
    streaming = json.loads(capsys.readouterr().out)
    assert streaming["config"]["layerwise_streaming"] and not deferred["config"]["layerwise_streaming"]
    for key in ("weights", "optimizer_states", "activations"):
        assert streaming[key] == deferred[key]
    assert streaming["gradients"] < deferred["gradients"] and streaming["peak"] < deferred["peak"]
    assert streaming["peak_phase"] == "backward" and streaming["phases"]["optimizer step"] < streaming["peak"]
    assert main([*SEVEN_B, "--layerwise-streaming"]) == 0
    out = capsys.readouterr().out
    assert "layer-wise (streaming)" in out and "note: layer-wise streaming" in out


def test_memory_cap_models_layerwise_streaming():
    """fastgrad pretrain --max-memory-gb refuses a step by the model of the whole config: a cap
    between the two peaks admits --layerwise-streaming and refuses the deferred updates."""
    from fastgrad.cli import _check_memory_cap

    base = {
        "model": "7b", "optim": "q-galore", "rank": 1024, "layerwise": True, "activation_checkpointing": True,
        "batch_size": 1, "seq_len": 256, "vocab_size": 32000, "dtype": "bfloat16", "device": "cuda",
    }  # fmt: skip
    deferred = estimate(TrainConfig(**base)).peak
    streaming = estimate(TrainConfig(**base, layerwise_streaming=True)).peak
    assert streaming < deferred
    cap = (streaming + deferred) / 2 / 2**30
    _check_memory_cap(TrainConfig(**base, layerwise_streaming=True, max_memory_gb=cap))
    with pytest.raises(ValueError, match="needs about .* --layerwise-streaming"):
        _check_memory_cap(TrainConfig(**base, max_memory_gb=cap))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "huge"], "unknown model"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--optim", "adamw", "--layerwise"], "--layerwise works with"),
        (["--layerwise-streaming"], "add --layerwise"),
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


def test_cpu_estimate_without_the_extension_is_a_one_line_error():
    """The CPU model counts the C++ kernels' scratch from fastgrad._C's own plans: without the
    extension, `fastgrad memory --device cpu` says so in one line (the CUDA estimate still works)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FASTGRAD_NO_EXT": "1"}
    cmd = [sys.executable, "-m", "fastgrad.cli", "memory", "--model", "tiny", "--optim", "galore"]
    cpu = subprocess.run([*cmd, "--device", "cpu"], capture_output=True, text=True, env=env)
    assert cpu.returncode == 2 and "Traceback" not in cpu.stderr
    assert "C++ kernels, which did not load (disabled by FASTGRAD_NO_EXT=1)" in cpu.stderr
    cuda = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert cuda.returncode == 0 and "estimated peak" in cuda.stdout
