"""The replay of one training step as allocations and frees (the model of the package docstring):
:func:`estimate` and the :class:`MemoryBreakdown` it returns."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field

import torch

from fastgrad.models.llama import LlamaConfig, get_config
from fastgrad.nn.qlinear import fit_group_size
from fastgrad.optim.galore8bit import BLOCK_SIZE, MIN_8BIT_SIZE
from fastgrad.optim.muon import Muon
from fastgrad.optim.projectors import proj_group_size
from fastgrad.optim.qgalore import QGALORE_DEFAULTS, UPDATE_BLOCK_ELEMS
from fastgrad.train.config import TrainConfig
from fastgrad.train.memory.scratch import DEFAULT_SM_COUNT, KernelScratch
from fastgrad.train.optimizers import QLINEAR_GROUP_SIZE

# The optimizers this model knows (the 8-bit ones are used when fastgrad.train.optimizers has them).
MODELLED_OPTIMIZERS = (
    "adamw",
    "adamw8bit",
    "galore",
    "galore8bit",
    "q-galore",
    "q-galore8bit",
    "fira",
    "apollo",
    "apollo-mini",
    "frugal",
    "muon",
    "muon8bit",
    "galore-muon",
    "q-galore-muon",
)
LOWRANK_OPTIMIZERS = {
    "galore", "galore8bit", "q-galore", "q-galore8bit", "fira", "apollo", "apollo-mini", "frugal", "galore-muon",
    "q-galore-muon",
}  # fmt: skip
_READS_GRAD = {"fira", "apollo", "apollo-mini", "frugal"}  # update_reads_grad: keep G until the update
_EIGHT_BIT = {"adamw8bit", "galore8bit", "q-galore8bit", "muon8bit"}
# Muon's optimizers: Muon on the attention and MLP weights, AdamW for the rest (muon8bit: Muon8bit,
# the momentum of a Muon weight of ≥ min_8bit_size elements and the AdamW moments in 8 bits).
# galore-muon (GaLoreMuon): Muon on each attention/MLP weight's projected gradient R (GaLore's svd P).
# q-galore-muon (QGaLoreMuon): the same on Q-GaLore's INT8 weights and INT4 projector.
_MUON = {"muon", "muon8bit", "galore-muon", "q-galore-muon"}
# Layers that compute R = down(G, P) in backward between refreshes (fastgrad.nn.lowrank): QLinear
# always; LowRankGradLinear for the GaLore optimizers with cfg.lowrank_grad (fastgrad.train.optimizers).
_PROJECTED_GRAD = {"q-galore", "q-galore8bit", "q-galore-muon"}
_PROJECTED_GRAD_OPTIONAL = {"galore", "galore8bit", "galore-muon"}
# Optimizers stepped per param group by LowRankOptimizer ``_step_items`` (GaLoreAdamW, QGaLoreAdamW,
# their 8-bit-moment variants, AdamW8bit): each weight's step is a method call (its temporaries are
# freed when it returns) and a low-rank weight with fp32/16-bit moments is one fused op call. The
# others (Fira, APOLLO, FRUGAL) update inline in their loop: the previous weight's denominator lives
# until rebound.
_STEP_ITEMS = {"galore", "galore8bit", "q-galore", "q-galore8bit", "adamw8bit"}
BLOCK_8BIT = BLOCK_SIZE  # 8-bit moments (GaLoreAdamW8bit, AdamW8bit): values per block
MIN_8BIT_NUMEL = MIN_8BIT_SIZE  # moments of fewer elements stay dense
QUEUE_SIZE = QGALORE_DEFAULTS["queue_size"]  # Q-GaLore's cosine queue
SVD_SCRATCH = 14_400  # bytes: the small LAPACK buffers torch allocates besides U, S, Vh and the input copy
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Muon's Newton–Schulz dtype as ``fastgrad pretrain --optim muon`` builds it (Muon's default, bf16).
NS_BYTES = inspect.signature(Muon).parameters["ns_dtype"].default.itemsize


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of one training step. ``peak`` is the largest live total over the step (the phases'
    maxima are in ``phases``; of a step between projector refreshes in ``phases_between_refreshes``),
    not the sum of the categories."""

    weights: int
    gradients: int
    optimizer_states: int
    projector_transients: int
    activations: int
    peak: int
    peak_phase: str
    peak_between_refreshes: int
    phases: dict[str, int] = field(default_factory=dict)
    phases_between_refreshes: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)
    # FSDP (``cfg.fsdp``): the categories above are one rank's; this holds what sharding adds or
    # splits (fastgrad.train.memory.fsdp), by name, in bytes. Empty without FSDP.
    sharding: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Sum of the categories (not the peak: they are not all alive at once, and the optimizer's and
        the kernels' temporaries are in none of them)."""
        return self.weights + self.gradients + self.optimizer_states + self.projector_transients + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("projector transients", self.projector_transients),
            ("activations", self.activations),
        ]


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weight:
    """A parameter of the model: name, shape and whether it is an attention/MLP projection (the
    weights the low-rank optimizers project and Q-GaLore quantizes)."""

    name: str
    shape: tuple[int, ...]
    proj: bool = False
    # The parameter's shape when ``shape`` is one rank's rows of it (FSDP); None: the whole parameter.
    whole: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The whole parameter's shape: its rank r', projection side and projector follow from it."""
        return self.whole or self.shape


def _weights(mc: LlamaConfig) -> list[_Weight]:
    """The parameters of LlamaForCausalLM(mc), in ``model.parameters()`` order."""
    c, i, kv = mc.hidden_size, mc.intermediate_size, mc.num_kv_heads * mc.head_dim
    out = [_Weight("model.embed_tokens.weight", (mc.vocab_size, c))]
    for n in range(mc.num_layers):
        p = f"model.layers.{n}."
        out += [
            _Weight(p + "input_layernorm.weight", (c,)),
            _Weight(p + "self_attn.q_proj.weight", (c, c), True),
            _Weight(p + "self_attn.k_proj.weight", (kv, c), True),
            _Weight(p + "self_attn.v_proj.weight", (kv, c), True),
            _Weight(p + "self_attn.o_proj.weight", (c, c), True),
            _Weight(p + "post_attention_layernorm.weight", (c,)),
            _Weight(p + "mlp.gate_proj.weight", (i, c), True),
            _Weight(p + "mlp.up_proj.weight", (i, c), True),
            _Weight(p + "mlp.down_proj.weight", (c, i), True),
        ]
    out.append(_Weight("model.norm.weight", (c,)))
    if not mc.tie_embeddings:
        out.append(_Weight("lm_head.weight", (mc.vocab_size, c)))
    return out


def _rank_of(optim: str, rank: int | None, shape: tuple[int, int]) -> int:
    """r' of a projected weight: min(rank, m, n); FRUGAL without --rank: density 0.25 of the
    compressed dimension (min(m, n) for the default "std" side)."""
    m, n = shape
    if optim == "frugal" and rank is None:
        return min(max(1, round(0.25 * min(m, n))), m, n)
    if optim == "apollo-mini":
        rank = 1 if rank is None else rank
    return min(rank or 1, m, n)


def _padded(n: int) -> int:
    return -(-n // BLOCK_8BIT) * BLOCK_8BIT


def _moments_bytes(numel: int, elem: int, eight_bit: bool) -> int:
    """Adam's two moments of ``numel`` values: dense in ``elem`` bytes, or (8-bit optimizers, moments
    of ≥ 4096 values) uint8 codes padded to whole blocks, an fp32 scale per block for M and an fp32
    scale and zero per block for V (fastgrad.optim.galore8bit)."""
    if eight_bit and numel >= MIN_8BIT_NUMEL:
        n_pad = _padded(numel)
        return 2 * n_pad + 12 * (n_pad // BLOCK_8BIT)
    return 2 * numel * elem


def format_bytes(nbytes: int) -> str:
    """GiB from 1 GiB up, else MiB."""
    if abs(nbytes) >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------
# the tape
# ------------------------------------------------------------------------------------------------


class _Tape:
    """Live bytes over a replayed step; remembers the maximum per phase."""

    def __init__(self, resident: int, trace: list[tuple[str, int]] | None = None) -> None:
        self.live = resident
        self.phase = ""
        self.peaks: dict[str, int] = {}
        self.trace = trace  # (phase, ±bytes) of every non-empty event, when given (for debugging the model)

    def start(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.live)

    def alloc(self, nbytes: int) -> None:
        if self.trace is not None and nbytes:
            self.trace.append((self.phase, nbytes))
        self.live += nbytes
        if self.live > self.peaks[self.phase]:
            self.peaks[self.phase] = self.live

    def free(self, nbytes: int) -> None:
        if self.trace is not None and nbytes:
            self.trace.append((self.phase, -nbytes))
        self.live -= nbytes

    def temp(self, nbytes: int) -> None:
        """A temporary that is freed right away."""
        self.alloc(nbytes)
        self.free(nbytes)


class _Step:
    """The replay of one optimizer step of ``cfg`` on the model ``mc`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, mc: LlamaConfig, device: str, sm_count: int) -> None:
        self.cfg, self.mc, self.device = cfg, mc, device
        self.optim = cfg.optim
        self.e = _DTYPE_BYTES[cfg.dtype]
        self.scratch = KernelScratch(device, self.e, sm_count)
        self.cast = self.e != 4
        self.quantized = cfg.optim in ("q-galore", "q-galore8bit", "q-galore-muon")  # QLinear (INT8) weights
        self.lowrank = cfg.optim in LOWRANK_OPTIMIZERS
        # Layer-wise stepping drives a LowRankOptimizer: the low-rank ones and the Muon family (whose
        # plain Muon and Muon8bit have only full-rank slots); plain AdamW is refused by pretrain.
        self.layerwise = cfg.layerwise and (self.lowrank or cfg.optim in _MUON)
        self.streaming = self.layerwise and cfg.layerwise_streaming  # each weight updated in its hook
        self.reads_grad = cfg.optim in _READS_GRAD
        self.eight_bit = cfg.optim in _EIGHT_BIT
        self.weights = _weights(mc)
        b, t = cfg.batch_size, cfg.seq_len
        self.tokens = a = b * t
        c, i, e = mc.hidden_size, mc.intermediate_size, self.e
        self.kv_dim = mc.num_kv_heads * mc.head_dim
        self.X, self.X4, self.M = a * c * e, a * c * 4, a * i * e  # activations of width C (e, fp32), I
        self.XKV, self.X4KV = a * self.kv_dim * e, a * self.kv_dim * 4
        self.R4 = a * 4  # 1/rms per token
        self.LSE = b * mc.num_heads * t * 4  # attention log-sum-exp
        self.V = a * mc.vocab_size  # logits elements
        self.batch = 2 * a * 8  # input ids and labels (int64)
        # torch.utils.checkpoint keeps torch.get_rng_state() per checkpointed layer: a CPU tensor
        self._rng_state = torch.get_rng_state().numel() if device == "cpu" else 0
        self._held: _Weight | None = None  # streaming: the weight whose R its layer holds during the update

    # ------------------------------------------------------------------ per-weight quantities
    def grad_bytes(self, w: _Weight) -> int:
        """The full gradient: fp32 for QLinear codes, else the model dtype."""
        return w.numel * (4 if (self.quantized and w.proj) else self.e)

    def is_lowrank(self, w: _Weight) -> bool:
        return self.lowrank and w.proj

    def rank(self, w: _Weight) -> int:
        return _rank_of(self.optim, self.cfg.rank, w.full_shape)

    @staticmethod
    def is_left(w: _Weight) -> bool:
        """Whether ``w`` is projected on the left (P m×r', R r'×n): m < n (the default side rule)."""
        m, n = w.full_shape
        return m < n

    def low_numel(self, w: _Weight) -> int:
        """Elements of R: D×r' (D = max(m, n)); of a rank's rows (FSDP), rows×r' on the right side,
        the whole r'×n on the left."""
        m, n = w.shape
        return (n if self.is_left(w) else m) * self.rank(w)

    def low_bytes(self, w: _Weight) -> int:
        """R = down(G, P): D×r' in the gradient's dtype."""
        return self.low_numel(w) * (4 if self.quantized else self.e)

    def proj_bytes(self, w: _Weight) -> int:
        """The stored projector of a low-rank weight."""
        r = self.rank(w)
        m, n = w.full_shape
        d = min(m, n)
        if self.optim in ("apollo", "apollo-mini"):
            return 0  # random P: regenerated from its seed
        if self.quantized:  # packed INT4 + fp32 scales/zeros per group along P's rows
            left = m < n
            rows, row = (m, r) if left else (r, n)
            g = self._proj_group(w)
            return rows * row // 2 + 8 * rows * (row // g)
        return r * d * self.e

    def _proj_group(self, w: _Weight) -> int:
        """Group size of Q-GaLore's INT4 P, along P's rows (m×r left, r×n right)."""
        m, n = w.full_shape
        return proj_group_size(self.rank(w) if m < n else n, QGALORE_DEFAULTS["proj_group_size"])

    def qgalore_refresh_extra_bytes(self, w: _Weight) -> int:
        """What a Q-GaLore refresh keeps besides P: P's first singular vector (proj_past, min(m, n)
        fp32) and the cosine queue; 0 for the other optimizers."""
        return 4 * min(w.full_shape) + 4 * QUEUE_SIZE if self.quantized else 0

    def is_muon(self, w: _Weight) -> bool:
        """Whether Muon orthogonalizes ``w`` (muon_param_groups: the attention and MLP weights)."""
        return self.optim in _MUON and w.proj

    def momentum_bytes(self, w: _Weight) -> int:
        """Muon's momentum buffer of ``w``: in the gradient's dtype, or (Muon8bit, ≥ min_8bit_size
        elements) uint8 codes padded to whole blocks and an fp32 scale per block; a low-rank
        weight's (GaLoreMuon) zeros_like(R), plus its projector."""
        if self.is_lowrank(w):  # (QGaLoreMuon: fp32, and Q-GaLore's refresh state)
            return self.low_bytes(w) + self.proj_bytes(w) + self.qgalore_refresh_extra_bytes(w)
        if self._is_8bit(w):
            n_pad = _padded(w.numel)
            return n_pad + 4 * (n_pad // BLOCK_8BIT)
        return w.numel * self.e

    def state_bytes(self, w: _Weight) -> int:
        """What the optimizer's state holds for ``w`` after a step (the tensors only)."""
        if self.optim == "adamw":
            return 2 * w.numel * self.e + 4  # torch keeps the step count as a 0-d fp32 tensor
        if self.optim in _MUON:  # the momentum buffer, or AdamW's two moments (int step)
            return self.momentum_bytes(w) if self.is_muon(w) else _moments_bytes(w.numel, self.e, self.eight_bit)
        if not self.is_lowrank(w):
            return _moments_bytes(w.numel, self.e, self.eight_bit)
        elem = 4 if self.quantized else self.e
        total = _moments_bytes(self.low_numel(w), elem, self.eight_bit) + self.proj_bytes(w)
        if self.optim in ("fira", "apollo", "apollo-mini"):
            total += 4  # the norm-growth limiter's remembered norm (0-d fp32)
        return total + self.qgalore_refresh_extra_bytes(w)

    def qlinear_bytes(self, w: _Weight) -> int:
        """INT8 codes plus fp32 scales and zeros per group (fit_group_size(256, in_features))."""
        m, n = w.shape
        g = fit_group_size(QLINEAR_GROUP_SIZE, n)
        return m * n + 8 * m * (n // g)

    def weight_bytes(self) -> int:
        total = 0
        for w in self.weights:
            total += self.qlinear_bytes(w) if (self.quantized and w.proj) else w.numel * self.e
        mc = self.mc
        return total + 2 * mc.max_seq_len * mc.head_dim * 4  # rotary cos/sin tables (fp32 buffers)

    def optimizer_state_bytes(self) -> int:
        return sum(self.state_bytes(w) for w in self.weights)

    def regenerated_bytes(self, w: _Weight) -> int:
        """APOLLO's random P, drawn in fp32 (and cast) whenever it is needed; never stored."""
        r, d = self.rank(w), min(w.full_shape)
        return r * d * 4 + (r * d * self.e if self.cast else 0)

    def _refresh(self, tape: _Tape, w: _Weight) -> None:
        """A projector refresh from ``w``'s full gradient, replacing the stored P: the SVD of the
        gradient in fp32 (``full_matrices=False``: LAPACK factorises a copy into U, S, Vh), then P
        (GaLore: ``.to(copy=True)`` keeps the slice's strides and ``.contiguous()`` copies again;
        Q-GaLore: a contiguous fp32 basis, quantized to INT4). Sharded: of the gathered G."""
        m, n = w.full_shape
        d, r = min(m, n), self.rank(w)
        usv = 4 * (m * d + d + d * n)
        g32 = m * n * 4 if (self.cast and not self.quantized) else 0
        proj = self.proj_bytes(w)
        tape.alloc(g32)  # grad.float()
        tape.alloc(usv)
        tape.temp(4 * m * n + SVD_SCRATCH)  # LAPACK's copy of the input and small buffers
        if self.quantized:
            tape.alloc(r * d * 4)  # the basis, contiguous fp32
            extra = self.qgalore_refresh_extra_bytes(w)
            tape.alloc(extra)  # its first vector, the cosine queue (new tensors)
            tape.alloc(proj)  # quantize_int4: codes, scales, zeros
            if self.device != "cpu":  # the Triton quantizer's partial statistics, when it splits groups
                g = self._proj_group(w)
                tape.temp(self.scratch.quantize(r * d // g, g, symmetric=False))
            tape.free(r * d * 4)
            replaced = proj + extra
        else:
            tape.alloc(2 * proj)
            tape.free(proj)  # the strided copy
            replaced = proj
        tape.free(usv + g32)
        # The step's rollback snapshot keeps the replaced tensors until the step is over.
        self._snapshots += replaced

    def refresh_transient(self, w: _Weight) -> int:
        """Peak working memory of refreshing ``w``'s projector (the new P included)."""
        if self.optim in ("apollo", "apollo-mini"):
            return self.regenerated_bytes(w)
        self._snapshots = 0
        tape = _Tape(0)
        tape.start("refresh")
        self._refresh(tape, w)
        return tape.peaks["refresh"]

    # ------------------------------------------------------------------ the replay
    def run(self, refresh: bool, trace: list[tuple[str, int]] | None = None) -> dict[str, int]:
        """Replay one step (a projector-refresh step or not); returns the peak of each phase (and
        appends every event to ``trace`` if given)."""
        tape = _Tape(self.weight_bytes() + self.optimizer_state_bytes() + self.batch, trace)
        # the SVD projectors' refresh (APOLLO's random P needs no gradient and is regenerated anyway)
        self._snapshots = 0  # replaced projector tensors kept by the step's rollback snapshots
        self._norms = 0  # the layer-wise driver's per-weight gradient norms (0-d fp32), kept until used
        self._due = refresh and self.lowrank and self.optim not in ("apollo", "apollo-mini")
        ga = self.cfg.grad_accum
        for micro in [0] if ga == 1 else [0, ga - 1]:  # the middle micro-batches are like the last one
            self._micro, self._last = micro, micro == ga - 1
            tape.start("forward")
            self._forward(tape)
            tape.start("backward")
            self._backward(tape)
        tape.start("optimizer step")
        self._optimizer_step(tape)
        return tape.peaks

    # ------------------------------------------------------------------ forward
    def _norm_forward(self, tape: _Tape, keep: bool) -> None:
        """RMSNorm of an input held by the caller; leaves its output (X) alive and, if ``keep``, its
        saved tensors: the fp32 input (a copy in 16-bit; in fp32 the input itself), 1/rms, the fp32
        normalised value and (16-bit) the fp32 copy of the weight."""
        X4, R4, C4 = self.X4, self.R4, self.mc.hidden_size * 4
        saved = 0
        if self.cast:
            tape.alloc(X4)  # x.float()
            saved += X4
        tape.alloc(X4)  # pow(2)
        tape.temp(R4)  # mean
        tape.free(X4)
        tape.temp(R4)  # + eps
        tape.alloc(R4)  # rsqrt
        tape.alloc(X4)  # xf * rsqrt
        saved += R4 + X4
        if self.cast:
            tape.alloc(C4)  # weight.float()
            saved += C4
        tape.alloc(X4)  # · weight, in fp32
        if self.cast:
            tape.alloc(self.X)  # .to(x.dtype)
            tape.free(X4)
        if not keep:
            tape.free(saved)

    def _linear_forward(self, tape: _Tape, w: _Weight, out: int) -> None:
        """The output (``out`` bytes) of a Linear; a QLinear decodes Ŵ inside its matmul (the
        quantized projection op with Ŵ as an m×n "right" projector): fp32 output, then cast."""
        if not (self.quantized and w.proj):
            tape.alloc(out)
            return
        m, n = w.shape
        a = self.tokens
        scratch = self.scratch.down(red=n, rank=m, other=a, g_f32=not self.cast, p_f32=False)
        if self.device != "cpu":  # the Triton launcher writes the output in x's dtype
            tape.alloc(out)
            tape.temp(scratch)
            return
        tape.alloc(a * m * 4)
        tape.alloc(scratch)
        if self.cast:
            tape.alloc(out)  # cast before the kernel's scratch is released
            tape.free(a * m * 4)
        tape.free(scratch)

    def _rotary_forward(self, tape: _Tape, size: int, size4: int) -> None:
        """apply_rotary on an input of ``size`` bytes (``size4`` in fp32); leaves the output alive."""
        if self.cast:
            tape.alloc(size4)  # x.float()
        tape.alloc(size4 // 2)  # -x2
        tape.alloc(size4)  # cat
        tape.free(size4 // 2)
        tape.alloc(2 * size4)  # xf·cos, rotated·sin
        tape.alloc(size4)  # their sum
        tape.free(2 * size4)
        if self.cast:
            tape.alloc(size)  # .to(x.dtype)
            tape.free(size4)
        tape.free(size4)  # rotated
        if self.cast:
            tape.free(size4)  # x.float()

    def _layer(self, n: int) -> dict[str, _Weight]:
        prefix = f"model.layers.{n}."
        return {w.name[len(prefix) :].split(".")[-2]: w for w in self.weights if w.name.startswith(prefix)}

    def _qkv(self) -> int:
        """Bytes of q, k, v as the attention saves them (k, v repeated to all heads under GQA)."""
        return 3 * self.X if self.mc.num_heads > self.mc.num_kv_heads else self.X + 2 * self.XKV

    def _layer_forward(self, tape: _Tape, n: int, keep: bool, recompute: bool = False) -> None:
        """Decoder layer ``n``, its input (X) alive. ``keep``: leave the saved tensors alive (else it
        runs under a checkpoint: only the output survives). ``recompute``: the checkpoint's
        recomputation in backward, which stops after the last saved tensor."""
        X, XKV, M = self.X, self.XKV, self.M
        ws = self._layer(n)
        self._norm_forward(tape, keep)  # h1
        self._linear_forward(tape, ws["q_proj"], X)
        self._linear_forward(tape, ws["k_proj"], XKV)
        self._linear_forward(tape, ws["v_proj"], XKV)
        self._rotary_forward(tape, X, self.X4)
        self._rotary_forward(tape, XKV, self.X4KV)
        tape.free(X + XKV)  # q, k before the rotation
        if self.mc.num_heads > self.mc.num_kv_heads:
            tape.alloc(2 * X)  # repeat_interleave of k and v
            tape.free(2 * XKV)
        tape.alloc(X)  # attention output (flash: plus the log-sum-exp; its transpose-reshape is a view)
        tape.alloc(self.LSE)
        tape.temp(self.scratch.flash(self.cfg.seq_len, self.mc.head_dim, backward=False))
        if not keep:
            tape.free(self.LSE)
        tape.alloc(X)  # o_proj
        if not keep:
            tape.free(self._qkv() + 2 * X)  # q, k, v, attention output, h1
        tape.alloc(X)  # x1 = x + o
        tape.free(X)  # o
        self._norm_forward(tape, keep)  # h2
        self._linear_forward(tape, ws["gate_proj"], M)
        tape.alloc(M)  # silu
        if not keep:
            tape.free(M)  # gate
        self._linear_forward(tape, ws["up_proj"], M)
        tape.alloc(M)  # silu · up
        if not keep:
            tape.free(2 * M)  # silu, up
        self._linear_forward(tape, ws["down_proj"], X)
        if not keep:
            tape.free(M + X)  # product, h2
        if recompute:
            tape.free(X)  # the down projection's output
            if self.cast:
                tape.free(X)  # x1 (16-bit: the norm saved a copy)
            return
        tape.alloc(X)  # x2 = x1 + d
        tape.free(X)  # d
        if self.cast or not keep:
            tape.free(X)  # x1 (fp32: saved by the second norm)
        if self.cast and not self.cfg.activation_checkpointing:
            tape.free(X)  # the input (fp32: saved by the first norm; checkpointing: kept by the checkpoint)

    def _forward(self, tape: _Tape) -> None:
        X, V, e = self.X, self.V, self.e
        tape.alloc(X)  # embedding output
        for n in range(self.mc.num_layers):
            if self.cfg.activation_checkpointing:
                tape.alloc(self._rng_state)  # the checkpoint keeps the CPU RNG state for the recomputation
            self._layer_forward(tape, n, keep=not self.cfg.activation_checkpointing)
        self._norm_forward(tape, keep=True)
        if self.cast:
            tape.free(X)  # the last layer's output (fp32: saved by the norm)
        tape.alloc(V * e)  # logits
        if self.cast:
            tape.alloc(V * 4)  # .float()
        tape.alloc(V * 4)  # log_softmax (saved)
        if self.cast:
            tape.free(V * 4)
        tape.free(V * e)  # logits

    # ------------------------------------------------------------------ gradients
    def _projected(self, w: _Weight) -> bool:
        """Whether ``w``'s layer computes R itself in this step's backward (no m×n gradient): a
        QLinear or LowRankGradLinear between refreshes (the optimizer publishes P after a step the
        next one does not refresh)."""
        layers = self.optim in _PROJECTED_GRAD or (self.optim in _PROJECTED_GRAD_OPTIONAL and self.cfg.lowrank_grad)
        return layers and w.proj and not self._due

    def _new_grad(self, tape: _Tape, w: _Weight) -> None:
        """Backward produces the gradient of ``w``: it becomes p.grad (first micro-batch), or is a new
        tensor that the weight's grad-ready point (:meth:`_hook`) adds into what is kept; a QLinear
        adds straight into its fp32 .grad, when the layer-wise driver has not taken it."""
        if self._micro > 0 and self.quantized and w.proj and not self.layerwise:
            return
        tape.alloc(self.grad_bytes(w))

    def _new_projected_grad(self, tape: _Tape, w: _Weight, quantized: bool) -> None:
        """fastgrad.ops.lowrank_grad: R from dy and x via the T×r' product Z (fp32), delivered to the
        weight's projected gradient (then its grad-ready hook runs, :meth:`_hook`). A QLinear
        (``quantized``) passes dy and x in fp32 and gets an fp32 R; a LowRankGradLinear passes them
        in the model's dtype and gets R in it (the C++ kernel upcasts 16-bit blocks of them)."""
        m, n = w.shape
        a, r = self.tokens, self.rank(w)
        casts = a * (m + n) * 4 if quantized and self.cast else 0  # QLinear: dy, x in fp32
        f32_inputs = quantized or not self.cast
        right = m >= n
        tape.alloc(casts)
        if self.device != "cpu":  # the Triton launcher: R in dy's dtype, then Z (dy's dtype) and workspaces
            tape.alloc(self.low_bytes(w))
            itemsize = 4 if f32_inputs else self.e
            side = "right" if right else "left"
            tape.temp(self.scratch.lowrank_grad(a, m, n, r, side, itemsize))
            tape.free(casts)
            self._deliver(tape, w)
            return
        tape.alloc(a * r * 4)  # Z
        p_f32 = not quantized and not self.cast
        tape.temp(self.scratch.down(red=n if right else m, rank=r, other=a, g_f32=f32_inputs, p_f32=p_f32))
        low = self.low_bytes(w)
        if f32_inputs:  # one at::mm (fp32 operands) into R
            tape.alloc(low)
        else:  # tn_matmul_f32: an fp32 R from blocks of the 16-bit dy (right) or x (left), then R in dtype
            width = m if right else n
            out32 = (m * r if right else r * n) * 4
            tape.alloc(out32)
            # tn_matmul_f32(dy, Z) (right) or (Zᵀ, x) (left): the 16-bit operand upcast by blocks
            tape.temp(self.scratch.tn_matmul(a, width, r, right))
            tape.alloc(low)
            tape.free(out32)
        tape.free(a * r * 4 + casts)
        self._deliver(tape, w)

    def _deliver(self, tape: _Tape, w: _Weight) -> None:
        """deliver_projected_grad: R added to the weight's projected gradient, then its grad-ready
        hooks run, before the layer returns."""
        self._hook(tape, w)

    def _hook(self, tape: _Tape, w: _Weight) -> None:
        """The gradient of ``w`` for this micro-batch is complete: autograd's AccumulateGrad (a
        Linear's, a norm's, the embedding's weight) or a fastgrad layer's grad-ready hook (a QLinear's
        G, inside its backward; a projected R, as the layer delivers it). Non-layer-wise, a later
        micro-batch's gradient is added into p.grad (or R into the projected gradient) and freed;
        layer-wise, the driver's hook takes it (fastgrad.optim.layerwise ``_hook``) and, streaming,
        updates the weight in the last micro-batch (:meth:`_stream`)."""
        g = self.grad_bytes(w)
        low = self.low_bytes(w) if self.is_lowrank(w) else 0
        delivered = 0  # a delivered R that was added into what is kept: freed when the layer returns
        if self._projected(w):  # R, delivered by the layer
            if self._micro > 0:
                tape.temp(self._mixed_add(w))
                delivered = low  # added into the accumulated one
            elif self.layerwise and self._fp32_buffer(w):
                tape.alloc(self._fp32_buffer(w))  # accumulated (and all-reduced) in fp32
                delivered = low
            elif self.streaming and self._last:  # the update takes the very R the layer holds until it returns
                delivered = low
                self._held = w
        elif not self.layerwise:
            if self._micro > 0 and not (self.quantized and w.proj):
                tape.free(g)  # added into p.grad
            return
        elif not self.is_lowrank(w):
            if self._micro > 0:
                tape.free(g)  # added into the kept gradient
        elif self.reads_grad or self._due:  # the full gradient is accumulated (refresh from the whole G, or read)
            if self._micro > 0:
                tape.free(g)  # added into the buffer
            if self._last:
                self._project(tape, w, self._due)
                if not self.reads_grad:
                    tape.free(g)  # the buffer is freed once projected
        else:  # between refreshes: project each micro-batch's G, keep R (summed over micro-batches)
            self._project(tape, w, False)
            if self._micro > 0:
                tape.temp(self._mixed_add(w))
                tape.free(low)  # added into the buffer
            elif self._fp32_buffer(w):
                tape.alloc(self._fp32_buffer(w))  # accumulated (and all-reduced) in fp32
                tape.free(low)
            tape.free(g)
        if self.streaming and self._last:
            self._stream(tape, w)
        self._held = None
        tape.free(delivered)

    def _mixed_add(self, w: _Weight) -> int:
        """Bytes of the fp32 copy torch makes of a 16-bit R added into an fp32 buffer (CPU)."""
        return self._fp32_buffer(w) if self.device == "cpu" else 0

    def _fp32_buffer(self, w: _Weight) -> int:
        """Layer-wise with several micro-batches, a 16-bit R is accumulated in an fp32 buffer (bytes;
        0 when it is not)."""
        if not (self.layerwise and self.is_lowrank(w)):
            return 0
        if self.cfg.grad_accum > 1 and self.cast and not self.quantized and not self.reads_grad and not self._due:
            return self.low_numel(w) * 4
        return 0

    def _node_hook(self, tape: _Tape, w: _Weight) -> None:
        """The hook of a Linear weight after its backward node (autograd's post-accumulate-grad hook);
        a QLinear runs it inside its backward, and a projected gradient as it is delivered (see
        :meth:`_linear_backward`)."""
        if not (self.quantized and w.proj) and not self._projected(w):
            self._hook(tape, w)

    def _project(self, tape: _Tape, w: _Weight, refresh: bool) -> None:
        """LowRankOptimizer.prepare: refresh the projector if due, then R = down(G, P) (kept)."""
        if refresh:
            self._refresh(tape, w)
        m, n = w.shape  # (a rank's rows of) G
        r, low = self.rank(w), self.low_bytes(w)
        red, other = (m, n) if self.is_left(w) else (n, m)  # right side: G Pᵀ reduces over n; left: Pᵀ G over m
        if self.optim in ("apollo", "apollo-mini"):
            tape.alloc(self.regenerated_bytes(w))  # P regenerated from its seed
        g_f32 = self.quantized or not self.cast
        p_f32 = not self.quantized and not self.cast
        scratch = self.scratch.down(red=red, rank=r, other=other, g_f32=g_f32, p_f32=p_f32)
        if not g_f32 and self.device == "cpu":  # the C++ kernel's fp32 result, cast to G's dtype before it returns
            tape.alloc(self.low_numel(w) * 4)
            tape.alloc(scratch)
            tape.alloc(low)
            tape.free(scratch + self.low_numel(w) * 4)
        else:
            tape.alloc(low)
            tape.temp(scratch)
        if self.optim in ("apollo", "apollo-mini"):
            tape.free(self.regenerated_bytes(w))

    # ------------------------------------------------------------------ backward
    def _linear_backward(self, tape: _Tape, w: _Weight, dx: int) -> None:
        """Weight and input gradients of a Linear (MmBackward: G first, then dx). A QLinear computes
        dx = dy·Ŵ with Ŵ decoded inside the matmul, then G (fp32) or, between refreshes, R."""
        if not (self.quantized and w.proj):
            if self._projected(w):  # LowRankGradLinear between refreshes: dx = dy·W, then R
                tape.alloc(dx)
                self._new_projected_grad(tape, w, quantized=False)
                return
            self._new_grad(tape, w)
            tape.alloc(dx)
            return
        m, n = w.shape
        a = self.tokens
        tape.alloc(dx)
        dx_scratch = self.scratch.up(n, m, a, a * m, out_f32=not self.cast, p_f32=False, accumulate=False)
        tape.temp(dx_scratch)
        if self._projected(w):
            self._new_projected_grad(tape, w, quantized=True)
            return
        casts = a * (m + n) * 4 if self.cast else 0  # dy.float(), x.float()
        tape.alloc(casts)
        self._new_grad(tape, w)
        self._hook(tape, w)  # the grad-ready hook runs inside the layer's backward
        tape.free(casts)

    def _norm_backward(self, tape: _Tape, w: _Weight, residual: bool) -> None:
        """RMSNorm backward, the output gradient (X) alive: frees the norm's saved tensors and the
        output gradient; the input gradient is added into the residual stream's (``residual``) or
        left alive (X)."""
        X, X4, R4, C4 = self.X, self.X4, self.R4, self.mc.hidden_size * 4
        if self.cast:
            tape.alloc(X4)  # .to() backward: the gradient in fp32
            tape.free(X)
        tape.alloc(2 * X4)  # grad·weight, grad·xf2
        if self.cast:
            tape.alloc(C4)  # weight gradient in fp32
        else:
            self._new_grad(tape, w)
        tape.free(3 * X4)  # grad·xf2, the output gradient, xf2
        if self.cast:
            tape.free(C4)  # weight.float()
            self._new_grad(tape, w)  # weight.float() backward
            tape.free(C4)
        self._hook(tape, w)  # AccumulateGrad runs next (autograd gives it priority)
        tape.alloc(2 * X4)  # grad·rsqrt, grad·xf
        tape.temp(R4)
        tape.free(2 * X4)  # grad·xf, grad of xf2
        tape.alloc(X4)  # mean backward
        tape.free(R4)  # 1/rms
        tape.alloc(3 * X4)  # pow backward
        tape.free(4 * X4)  # its temporaries, the mean's gradient; its result is summed in place
        tape.free(X4 if self.cast else X)  # the saved input (fp32: the residual itself)
        if self.cast:
            tape.alloc(X)  # x.float() backward
            tape.free(X4)
        if residual:
            tape.free(X)  # summed in place into the residual stream's gradient

    def _layer_backward(self, tape: _Tape, n: int) -> None:
        """Backward of layer ``n``: its saved tensors and the output gradient (X) alive on entry, the
        input gradient (X) alive on exit."""
        X, XKV, M = self.X, self.XKV, self.M
        ws = self._layer(n)
        # MLP branch (the output gradient also flows, unchanged, to x1)
        self._linear_backward(tape, ws["down_proj"], M)
        tape.free(M)  # product
        self._node_hook(tape, ws["down_proj"])
        tape.alloc(2 * M)  # gradients of silu and up
        tape.free(3 * M)  # gradient of the product, up, silu
        self._linear_backward(tape, ws["up_proj"], X)
        tape.free(M)  # gradient of up
        self._node_hook(tape, ws["up_proj"])
        tape.alloc(M)  # silu backward
        tape.free(2 * M)  # gradient of silu, gate
        self._linear_backward(tape, ws["gate_proj"], X)
        tape.free(M + X)  # gradient of gate, h2
        self._node_hook(tape, ws["gate_proj"])
        tape.alloc(X)  # sum of the two gradients of h2
        tape.free(2 * X)
        self._norm_backward(tape, ws["post_attention_layernorm"], residual=True)
        # attention branch
        self._linear_backward(tape, ws["o_proj"], X)
        self._node_hook(tape, ws["o_proj"])
        qkv = self._qkv()
        tape.alloc(qkv)  # gradients of q, k, v
        tape.temp(self.scratch.flash(self.cfg.seq_len, self.mc.head_dim, backward=True))
        tape.free(X + qkv + self.LSE + X)  # attention output's gradient, q, k, v, lse, output
        if self.mc.num_heads > self.mc.num_kv_heads:
            tape.alloc(2 * XKV)  # repeat_interleave backward
            tape.free(2 * X)
        for size, size4 in ((X, self.X4), (XKV, self.X4KV)):  # rotary backward
            if self.cast:
                tape.alloc(size4)
                tape.free(size)
            tape.alloc(2 * size4)  # grad·cos, grad·sin
            tape.free(size4)
            tape.alloc(size4 // 2 + size4)  # neg, cat
            tape.free(size4 + size4 // 2 + size4)
            if self.cast:
                tape.alloc(size)
                tape.free(size4)
        self._linear_backward(tape, ws["v_proj"], X)
        tape.free(XKV)
        self._node_hook(tape, ws["v_proj"])
        self._linear_backward(tape, ws["k_proj"], X)
        tape.free(XKV)
        self._node_hook(tape, ws["k_proj"])
        tape.alloc(X)
        tape.free(2 * X)
        self._linear_backward(tape, ws["q_proj"], X)
        tape.free(2 * X)  # gradient of q, h1
        self._attention_inputs_done(tape, n)
        tape.free(X)  # the third gradient of h1 is summed in place
        self._node_hook(tape, ws["q_proj"])
        self._norm_backward(tape, ws["input_layernorm"], residual=True)

    def _backward(self, tape: _Tape) -> None:
        ws = {w.name: w for w in self.weights}
        X, V, e = self.X, self.V, self.e
        tape.alloc(V * 4)  # nll_loss backward
        tape.alloc(V * 4)  # log_softmax backward
        tape.free(2 * V * 4)  # nll's gradient, the saved log-softmax
        if self.cast:
            tape.alloc(V * e)  # .float() backward
            tape.free(V * 4)
        head = ws.get("lm_head.weight")
        self._linear_backward(tape, head if head is not None else ws["model.embed_tokens.weight"], X)
        tape.free(V * e + X)  # the logits' gradient, the final norm's output
        if head is not None:  # (a tied head's gradient is accumulated with the embedding's)
            self._node_hook(tape, head)
        self._norm_backward(tape, ws["model.norm.weight"], residual=False)
        for n in reversed(range(self.mc.num_layers)):
            self._pre_layer_backward(tape, n)
            if self.cfg.activation_checkpointing:  # the recomputation runs under fork_rng: a second RNG state
                tape.alloc(self._rng_state)
                self._layer_forward(tape, n, keep=True, recompute=True)
                tape.free(self._rng_state)
            self._layer_backward(tape, n)
            tape.free(self._rng_state if self.cfg.activation_checkpointing else 0)  # the checkpoint's, at last
            if self.cfg.activation_checkpointing and self.cast:
                tape.free(X)  # the checkpoint's input (fp32: freed with the first norm's saved input)
            self._post_layer_backward(tape, n)
        self._new_grad(tape, ws["model.embed_tokens.weight"])
        tape.free(X)  # the embedding output's gradient
        self._hook(tape, ws["model.embed_tokens.weight"])

    def _pre_layer_backward(self, tape: _Tape, n: int) -> None:
        """Where layer ``n``'s backward starts (before a checkpoint's recomputation): nothing here;
        FSDP unshards the layer (fastgrad.train.memory.fsdp)."""

    def _post_layer_backward(self, tape: _Tape, n: int) -> None:
        """Where layer ``n``'s input gradient is complete: nothing here; FSDP reduce-scatters."""

    def _attention_inputs_done(self, tape: _Tape, n: int) -> None:
        """Where the gradient of layer ``n``'s q, k, v projections' input is complete: nothing here;
        FSDP reduce-scatters the layer's QLinear unit."""

    # ------------------------------------------------------------------ optimizer step
    def _optimizer_step(self, tape: _Tape) -> None:
        e = self.e
        if self.streaming:  # finish_step: every weight was updated in its hook; the norm of the norms
            tape.temp(self._norms)  # torch.stack of the per-weight norms
            tape.free(self._norms)
            self._norms = 0
            return
        lowrank = [w for w in self.weights if self.is_lowrank(w)]
        rest = [w for w in self.weights if not self.is_lowrank(w)]
        if self.layerwise:  # finish_step: the consumed gradients finalized, their global norm
            self._finish_layerwise(tape, lowrank + rest)
        else:  # LowRankOptimizer.step: refresh and project every low-rank gradient (all R held), then update
            for w in lowrank:
                if not self._projected(w):  # else R is already there, computed in backward
                    self._project(tape, w, self._due)
        if self.optim in _MUON:  # Muon.update_group: the Muon group, then the AdamW group
            for w in self.weights:
                if self.is_muon(w):
                    self._muon_family_update(tape, w)
            self._step_items(tape, [w for w in self.weights if not self.is_muon(w)])
            tape.free(self._snapshots)  # the projectors a refresh replaced
            self._snapshots = 0
            return
        if self.optim == "adamw":  # torch.optim.AdamW
            if self.device == "cuda":  # foreach: sqrt of every second moment at once, in place after
                tape.temp(sum(w.numel * e for w in self.weights))
                return
            prev = 0
            for w in self.weights:  # per tensor: sqrt(V), / bias correction; the last denominator lives on
                tape.alloc(2 * w.numel * e)
                tape.free(w.numel * e + prev)
                prev = w.numel * e
            tape.free(prev)
            return
        if self.optim in _STEP_ITEMS:
            for group in (lowrank, rest):  # the param groups: [low-rank, the rest]
                self._step_items(tape, group)
        else:
            self._prev = 0  # the previous weight's denominator, released when rebound (inline loops)
            for w in lowrank:
                self._update(tape, w, lowrank=True)
            tape.free(self._prev)
            self._prev = 0
            for w in rest:
                self._update(tape, w, lowrank=False)
            tape.free(self._prev)
        tape.free(self._snapshots)
        self._snapshots = 0

    def _finish_layerwise(self, tape: _Tape, weights: list[_Weight]) -> None:
        """LayerwiseOptimizer._finish before the updates: each slot finalized (a low-rank weight's fp32
        accumulation buffer back to the gradient's dtype; a full-rank gradient handed to the step as
        it is), then the global norm: each consumed gradient's (fp32), then theirs."""
        for w in weights:
            if self._fp32_buffer(w):
                tape.alloc(self.low_bytes(w))
                tape.free(self._fp32_buffer(w))
        for w in weights:
            self._norm(tape, w)
        tape.temp(self._norms)
        tape.free(self._norms)
        self._norms = 0

    def _muon_family_update(self, tape: _Tape, w: _Weight) -> None:
        """The step of ``w`` by Muon, Muon8bit, GaLoreMuon or QGaLoreMuon: a low-rank weight's
        (:meth:`_lowrank_muon_update`), a Muon weight's (:meth:`_muon_update`), or an AdamW
        parameter's (the AdamW group's ``_step_items``, as GaLoreAdamW's full-rank items: the moments,
        then ``adamw_update``'s denominator √V/√(1−β2^t) + ε; Muon8bit's 8-bit moments decoded,
        updated and re-encoded); ``w``'s consumed gradient alive on entry."""
        if self.is_lowrank(w):
            self._lowrank_muon_update(tape, w)
        elif self.is_muon(w):
            self._muon_update(tape, w)
        else:
            self._step_items(tape, [w])

    def _muon_momentum(self, tape: _Tape, w: _Weight) -> int:
        """Muon._momentum_update of one weight (its gradient alive: in p.grad, or owned by the step
        under the layer-wise driver, which frees it with ``it.low = None`` and the method's locals):
        B updated in place and U = lerp(G, B) allocated, in the gradient's dtype; Muon8bit's 8-bit
        momentum: G in fp32, B decoded to fp32 (n_pad), updated, U in fp32, B re-encoded
        (quantize_int8: codes, scales and an unused zeros) replacing the old codes; the decoded B and
        fp32 G freed at return. Leaves U alive (held by the caller until the step returns); returns
        its bytes per element."""
        owned = self.grad_bytes(w) if self._owned(w) else 0
        if not self._is_8bit(w):
            tape.alloc(w.numel * self.e)  # grad.lerp(buf, momentum)
            tape.free(owned)  # G, at return
            return self.e
        numel = w.numel
        n_pad = _padded(numel)
        blocks = n_pad // BLOCK_8BIT
        g32 = numel * 4 if self.e != 4 else 0
        tape.alloc(g32)  # it.low.float()
        if g32:
            tape.free(owned)  # it.low = None: the 16-bit G
            owned = 0
        tables = self._load_momentum(tape, w, blocks)
        tape.alloc(4 * blocks)  # dequantize_int8's zeros, −128·scale
        tape.alloc(n_pad * 4)  # the decoded B
        tape.free(4 * blocks + tables)
        tape.alloc(numel * 4)  # U = grad.lerp(buf, momentum), fp32
        tape.alloc(n_pad + 8 * blocks)  # quantize_int8: codes, scales, zeros
        self._store_momentum(tape, w, n_pad, blocks)
        tape.free(n_pad * 4 + g32 + owned)  # the decoded B, the fp32 G
        return 4

    def _load_momentum(self, tape: _Tape, w: _Weight, blocks: int) -> int:
        """What decoding an 8-bit momentum needs besides its codes (bytes, released with the
        dequantization's zeros): nothing here; stored by rows (FSDP), its flat scales rebuilt."""
        return 0

    def _store_momentum(self, tape: _Tape, w: _Weight, n_pad: int, blocks: int) -> None:
        """The new codes and scales replace the old ones; the quantizer's zeros are dropped."""
        tape.free(n_pad + 4 * blocks)  # the old codes and scales
        tape.free(4 * blocks)  # the unused zeros

    def _muon_update(self, tape: _Tape, w: _Weight) -> None:
        """Muon._muon_step of one weight (its gradient alive in p.grad): U (:meth:`_muon_momentum`),
        U in ns_dtype (a copy unless the same), the Newton–Schulz op (its result and its buffers),
        W.add_(O); U and O are freed when the method returns."""
        m, n = w.shape
        u_elem = self._muon_momentum(tape, w)  # held by the caller until the step returns
        u = w.numel * u_elem
        cast = w.numel * NS_BYTES if u_elem != NS_BYTES else 0
        tape.alloc(cast)  # update.to(ns_dtype)
        self._newton_schulz(tape, m, n)
        tape.free(cast)  # the argument, once the op returns
        if self.e != NS_BYTES and self.device == "cpu":
            tape.temp(w.numel * self.e)  # W.add_(O): O in W's dtype (CPU)
        tape.free(u + w.numel * NS_BYTES)

    def _lowrank_muon_update(self, tape: _Tape, w: _Weight) -> None:
        """GaLoreMuon's step of a low-rank weight (its R alive, owned by the step unless the layer that
        delivered it holds it, :meth:`_owned`): at a refresh the momentum carried into the new basis
        (transfer_moments), U = lerp(R, B) (R freed when the momentum update returns), Newton–Schulz
        of the r'-wide U (m×r' right, r'×n left), O cast to P's dtype and added back into W in place
        (lowrank_project_back_add_)."""
        m, n = w.shape  # (a rank's rows of) W
        r, left = self.rank(w), self.is_left(w)
        low = self.low_numel(w)
        elem = 4 if self.quantized else self.e
        if self._due:
            self._transfer(tape, w)
        tape.alloc(low * elem)  # U = grad.lerp(buf, momentum)
        if self._owned(w):
            tape.free(low * elem)  # R (it.low = None), when the momentum update returns
        whole = self._gather_low(tape, w, elem)
        ns_rows, ns_cols = (r, n) if left else (w.full_shape[0], r)  # sharded: the gathered right-side U
        cast = ns_rows * ns_cols * NS_BYTES if elem != NS_BYTES else 0
        tape.alloc(cast)  # update.to(ns_dtype)
        self._newton_schulz(tape, ns_rows, ns_cols)
        tape.free(cast + whole)  # the argument, then `del update` (the gathered one)
        if self.quantized:  # QGaLoreMuon: O (its rows) in fp32, then the INT8 update by blocks of rows
            tape.alloc(low * 4)
            tape.free(ns_rows * ns_cols * NS_BYTES)
            self._int8_update(tape, w)
            tape.free(low * 4 + low * elem)  # O, U
            return
        back = low * self.e if self.e != NS_BYTES else 0
        tape.alloc(back)  # ortho (its rows).to(P's dtype)
        split, other = (m, n) if left else (n, m)
        tape.temp(self.scratch.up(split, r, other, low, out_f32=not self.cast, p_f32=not self.cast))
        tape.free(back)
        tape.free(low * elem + ns_rows * ns_cols * NS_BYTES)  # U, O

    def _int8_update(self, tape: _Tape, w: _Weight) -> None:
        """QuantizedWeights._update_int8 with QGaLoreMuon's Δ: per block of whole rows (≤ 2^20
        elements) Ŵ dequantized (fp32), Δ = lowrank_project_back of O's rows (right) or of P̂'s rows
        (left), fp32, with the kernel's scratch, then the re-quantized codes, scales and zeros (copied
        into the layer); a block's Ŵ and codes are released as the next block's replace them."""
        m, n = w.shape
        r, left = self.rank(w), self.is_left(w)
        groups = n // fit_group_size(QLINEAR_GROUP_SIZE, n)
        block = max(1, UPDATE_BLOCK_ELEMS // max(n, 1))
        prev = (0, 0)
        for r0 in range(0, m, block):
            rows = min(m, r0 + block) - r0
            tape.alloc(rows * n * 4)  # Ŵ's rows
            tape.free(prev[0])
            tape.alloc(rows * n * 4)  # Δ's rows
            split, other = (rows, n) if left else (n, rows)
            tape.temp(self.scratch.up(split, r, other, 0, out_f32=True, p_f32=False, accumulate=False))
            tape.free(rows * n * 4)
            q = rows * n + 8 * rows * groups
            tape.alloc(q)  # quantize_int8: codes, scales, zeros
            tape.free(prev[1])
            prev = (rows * n * 4, q)
        tape.free(sum(prev))

    def _gather_low(self, tape: _Tape, w: _Weight, elem: int) -> int:
        """The whole U of a row-sharded R (FSDP, right side), gathered for Newton–Schulz: nothing here."""
        return 0

    def _transfer(self, tape: _Tape, w: _Weight) -> None:
        """transfer_moments(B, None, P_old, P_new, side): the r'×r' rotation lowrank_project(P_old,
        P_new) (the C++ kernel's fp32 result, cast to P's dtype, then .float()), then B ← B·C (right)
        or C·B (left) through an fp32 copy of B (16-bit) and the fp32 product, copied back."""
        m, n = w.full_shape
        r, low = self.rank(w), self.low_numel(w)
        red = m if self.is_left(w) else n
        if self.cast:
            tape.alloc(r * r * 4)
            tape.alloc(self.scratch.down(red=red, rank=r, other=r, g_f32=False, p_f32=False))
            tape.alloc(r * r * self.e)
            tape.free(self.scratch.down(red=red, rank=r, other=r, g_f32=False, p_f32=False) + r * r * 4)
            tape.alloc(r * r * 4)  # .float()
            tape.free(r * r * self.e)
            tape.alloc(low * 4)  # B.float()
        else:
            tape.alloc(r * r * 4)
        tape.temp(low * 4)  # the product
        tape.free(r * r * 4 + (low * 4 if self.cast else 0))

    def _newton_schulz(self, tape: _Tape, m: int, n: int) -> None:
        """fastgrad.ops.newton_schulz of an m×n matrix in ns_dtype: leaves its result alive."""
        tape.alloc(m * n * NS_BYTES)
        tape.temp(self.scratch.newton_schulz(m, n, NS_BYTES))

    def _consumed(self, w: _Weight) -> tuple[int, int]:
        """(elements, bytes per element) of what the optimizer consumes for ``w``: R (fp32 for a
        QLinear, else the gradient's dtype) or the full gradient."""
        if self.is_lowrank(w):
            return self.low_numel(w), 4 if self.quantized else self.e
        return w.numel, self.e

    def _norm(self, tape: _Tape, w: _Weight) -> None:
        """The layer-wise driver's fp32 2-norm of ``w``'s consumed gradient (torch._foreach_norm with
        dtype=float32: a 0-d result, kept with the others, and on CPU an fp32 copy of a 16-bit input)."""
        numel, elem = self._consumed(w)
        tape.alloc(4)
        self._norms += 4
        if elem != 4 and self.device == "cpu":
            tape.temp(numel * 4)

    def _stream(self, tape: _Tape, w: _Weight) -> None:
        """Layer-wise streaming (LayerwiseOptimizer._stream), in ``w``'s hook of the last micro-batch:
        the accumulation finalized, its norm (kept until finish_step), the optimizer's update of this
        weight alone, its buffers (and the projector its refresh replaced) released."""
        if self._fp32_buffer(w):  # the fp32 accumulation back to the gradient's dtype
            tape.alloc(self.low_bytes(w))
            tape.free(self._fp32_buffer(w))
        self._norm(tape, w)
        lowrank = self.is_lowrank(w)
        copy = self.skip_copy_bytes(w)
        tape.alloc(copy)
        if self.optim in _MUON:  # update_group(group, [item])
            self._muon_family_update(tape, w)
        elif self.optim in _STEP_ITEMS:
            self._step_items(tape, [w])
        else:  # an inline update loop over one weight; an update that reads G had it kept until now
            self._prev = 0
            self._update(tape, w, lowrank=lowrank)
            tape.free(self._prev + (self.grad_bytes(w) if self.reads_grad else 0))
            self._prev = 0
        tape.free(copy)
        tape.free(self._snapshots)
        self._snapshots = 0

    def skip_copy_bytes(self, w: _Weight) -> int:
        """Streaming's on-device NaN/Inf skip (LayerwiseOptimizer._update_masked): the copy of what
        ``w``'s update writes, alive during the update: the weight (a QLinear's codes, scales and
        zeros) and its optimizer state but the projector's (which only a refresh writes)."""
        weight = self.qlinear_bytes(w) if (self.quantized and w.proj) else w.numel * self.e
        state = self.state_bytes(w)
        if self.is_lowrank(w):
            state -= self.proj_bytes(w) + self.qgalore_refresh_extra_bytes(w)
        return weight + state

    # GaLoreAdamW, QGaLoreAdamW and their 8-bit-moment variants (AdamW8bit too: GaLoreAdamW8bit's
    # full-rank path), fastgrad.optim: per param group ``_step_items``.
    def _is_8bit(self, w: _Weight) -> bool:
        """Whether ``w``'s moments are 8-bit (EightBitMoments: at least min_8bit_size elements)."""
        return self.eight_bit and self._consumed(w)[0] >= MIN_8BIT_NUMEL

    def _step_items(self, tape: _Tape, items: list[_Weight]) -> None:
        """``_step_items`` of one param group: the fp32/16-bit-moment items (full-rank: moments by
        foreach, in place, then each weight's step; low-rank: each one fused op call), then the
        8-bit-moment items one at a time."""
        dense = [w for w in items if not self._is_8bit(w)]
        for w in dense:
            if not self.is_lowrank(w):
                self._full_step(tape, w)
        for w in dense:
            if self.is_lowrank(w):
                self._fused_step(tape, w)
        for w in items:
            if self._is_8bit(w):
                self._step_8bit(tape, w)

    def _owned(self, w: _Weight) -> bool:
        """Whether the consumed gradient is freed by the step (``it.low = None``): R, unless the layer
        that delivered it still holds it (streaming, the update in the layer's hook: freed when the
        layer returns); a full-rank gradient when the layer-wise driver held it (else p.grad keeps it)."""
        if self.is_lowrank(w):
            return w is not self._held
        return self.layerwise and not self.reads_grad

    def _full_step(self, tape: _Tape, w: _Weight) -> None:
        """``_weight_step`` of a full-rank weight with moments in its gradient's dtype: √V + ε (then
        N in place; AdamW8bit's √V/√(1−β2^t) is a second temporary), W.add_(N)."""
        numel, elem = self._consumed(w)
        if self._owned(w):
            tape.free(numel * elem)  # it.low = None
        tape.alloc(numel * elem)
        if self.optim == "adamw8bit":
            tape.alloc(numel * elem)
            tape.free(numel * elem)
        tape.free(numel * elem)

    def _fused_step(self, tape: _Tape, w: _Weight) -> None:
        """``_fused_step`` of a low-rank weight with fp32/16-bit moments: one galore_adam_step_ op
        (csrc/cpu/adam_step.cpp; R held by a local until it returns). The moments are updated in
        place and N goes to an R-sized fp32 scratch; a dense W takes one addmm_ (fp32 W and P) or
        project_back_blocked (scratch blocks of P and of W); an INT8 W is decoded, updated and
        re-quantized in place by blocks of whole rows of ≤ 2^18 fp32 elements, with a block of the
        decoded INT4 P. The GPU kernels need only N."""
        numel, elem = self._consumed(w)
        self._fused_op(tape, w)
        if self._owned(w):
            tape.free(numel * elem)  # R when the step returns

    def _fused_op(self, tape: _Tape, w: _Weight) -> None:
        """The transient of one galore_adam_step_ call: N (R-sized fp32), and on CPU the C++
        kernel's scratch (kernels/plans.py: N is all the Triton kernels need)."""
        numel, _ = self._consumed(w)
        m, n = w.shape  # (a rank's rows of) W
        r = self.rank(w)
        left = self.is_left(w)
        tape.alloc(self.scratch.adam_step(numel))  # N
        if self.device == "cpu":
            if self.quantized:
                rows_block, p_block = self.scratch.int8_step(m, n, r, left)
                tape.alloc(rows_block)  # the decoded rows
                tape.alloc(p_block)  # a block of P
                tape.free(rows_block + p_block)
            else:
                split, other = (m, n) if left else (n, m)
                tape.temp(self.scratch.up(split, r, other, 0, out_f32=not self.cast, p_f32=not self.cast))
        tape.free(self.scratch.adam_step(numel))

    def _step_8bit(self, tape: _Tape, w: _Weight) -> None:
        """EightBitMoments._step_8bit, a weight with 8-bit moments: R (or G) in fp32, (M, V) decoded
        to fp32, updated, the weight's step (``_weight_step``: N, then W, unfused; an INT8 weight:
        the fused op on the decoded moments, R alive until it returns), re-encoded."""
        lowrank = self.is_lowrank(w)
        numel, elem = self._consumed(w)
        n_pad = _padded(numel)
        blocks = n_pad // BLOCK_8BIT
        owned = self._owned(w)
        if elem != 4:
            tape.alloc(numel * 4)  # it.low.float()
            if owned:
                tape.free(numel * elem)  # it.low = None
        tables = self._load_8bit(tape, w, blocks)
        tape.alloc(n_pad * 4)  # decode_moments: √V̂ (squared in place to V̂)
        tape.alloc(blocks * 4)  # M's zeros, −128·scale
        tape.alloc(n_pad * 4)  # M̂
        tape.free(blocks * 4 + tables)
        if lowrank and self.quantized:
            self._fused_op(tape, w)
            if elem != 4 or owned:
                tape.free(numel * 4)  # R, once the op returns
        else:
            self._unfused_8bit_step(tape, w, owned)
        tape.alloc(n_pad + 8 * blocks)  # encode_moments: V^(1/4) quantized
        tape.alloc(n_pad * 4)  # √V̂
        tape.alloc(n_pad + 8 * blocks)  # M / √V̂ quantized
        tape.free(n_pad * 4)  # √V̂
        self._store_8bit(tape, w, n_pad, blocks)
        tape.free(2 * n_pad * 4)  # the decoded M and V

    def _load_8bit(self, tape: _Tape, w: _Weight, blocks: int) -> int:
        """What decoding ``w``'s 8-bit moments needs besides their codes (bytes, released with M's
        zeros): nothing here; moments stored by rows rebuild their flat per-block tables (FSDP)."""
        return 0

    def _store_8bit(self, tape: _Tape, w: _Weight, n_pad: int, blocks: int) -> None:
        """The new codes replace the old ones in the state."""
        tape.free(2 * n_pad + 12 * blocks)  # the old codes
        tape.free(4 * blocks)  # M's unused zeros

    def _unfused_8bit_step(self, tape: _Tape, w: _Weight, owned: bool) -> None:
        """The decoded moments updated, then ``_weight_step``: N, then W (unfused)."""
        e = self.e
        numel, elem = self._consumed(w)
        if elem != 4 or owned:
            tape.free(numel * 4)  # del low, once the moments are updated
        tape.alloc(numel * 4)  # the denominator, then N
        if self.optim == "adamw8bit":
            tape.temp(numel * 4)  # √V / √(1−β2^t)
        if self.is_lowrank(w):  # lowrank_project_back_add_(W, N.to(P's dtype), P, side, −η·α)
            m, n = w.shape
            split, other = (m, n) if self.is_left(w) else (n, m)
            cast = numel * e if e != 4 else 0
            tape.alloc(cast)
            tape.temp(self.scratch.up(split, self.rank(w), other, numel, out_f32=not self.cast, p_f32=not self.cast))
            tape.free(cast)
        elif e != 4 and self.device == "cpu":
            tape.temp(2 * numel * 4)  # W.add_(fp32 N) on a 16-bit W: fp32 copies (CPU)
        tape.free(numel * 4)

    # Fira, APOLLO, FRUGAL: the update loop of a param group, inline.
    def _update(self, tape: _Tape, w: _Weight, lowrank: bool) -> None:
        """The update of one weight (its R, or its full gradient, alive on entry)."""
        e = self.e
        m, n = w.shape if len(w.shape) == 2 else (1, w.numel)
        r = self.rank(w) if lowrank else 0
        numel = self.low_numel(w) if lowrank else w.numel
        low = numel * e  # moments, R and N: the gradient's dtype
        # a full-rank weight's gradient kept by the layer-wise driver is freed with it.low = None
        kept = not lowrank and self.layerwise and not self.reads_grad
        if self.optim == "frugal" and lowrank:
            tape.temp(m * n * e)  # the residual G − up(R): one m×n buffer
        if self.optim not in ("fira", "apollo", "apollo-mini") and (lowrank or kept):
            tape.free(low if lowrank else self.grad_bytes(w))  # it.low = None before the step
        tape.alloc(low)  # the denominator √V + ε, then N in place
        tape.free(self._prev)
        self._prev = low
        if lowrank:
            split, other = (m, n) if self.is_left(w) else (n, m)
            mixed = 4 * m * n if (self.cast and self.device == "cpu") else 0
            if self.optim == "fira":
                tape.alloc(m * n * e)  # the residual G − α·up(R)
                tape.temp(self.scratch.up(split, r, other, low, out_f32=not self.cast, p_f32=not self.cast))
                tape.free(low)
                tape.temp(mixed)  # vector_norm(residual, dtype=fp32) upcasts it (CPU)
                tape.temp(3 * mixed)  # W.addcmul_(residual, fp32 coefficients): fp32 copies (CPU)
                tape.free(m * n * e)
            elif self.optim in ("apollo", "apollo-mini"):
                tape.free(low)
                tape.temp(mixed)  # vector_norm(G, dtype=fp32)
                tape.temp(3 * mixed)  # W.addcmul_(G, fp32 coefficients)
            if self.optim not in ("apollo", "apollo-mini"):
                tape.temp(self.scratch.up(split, r, other, low, out_f32=not self.cast, p_f32=not self.cast))

    # ------------------------------------------------------------------ categories
    def gradient_bytes(self) -> int:
        """Gradients of a refresh step: every full gradient (non-layer-wise; layer-wise with several
        micro-batches, which accumulates them for the refresh; or when the update reads them), else
        the full-rank parameters' and the largest low-rank one (in its hook); plus the projected
        gradients R that the step holds. Streaming: one weight's gradient and R at a time (with
        several micro-batches every full gradient is accumulated until the last one, and one R)."""
        lows = sum(self.low_bytes(w) for w in self.weights if self.is_lowrank(w))
        if self.streaming:
            low = {w.name: self.low_bytes(w) if self.is_lowrank(w) else 0 for w in self.weights}
            if self.cfg.grad_accum > 1:
                return sum(self.grad_bytes(w) for w in self.weights) + max(low.values())
            return max(self.grad_bytes(w) + low[w.name] for w in self.weights)
        if not self.layerwise or self.reads_grad or self.cfg.grad_accum > 1:
            return sum(self.grad_bytes(w) for w in self.weights) + lows
        full = sum(self.grad_bytes(w) for w in self.weights if not self.is_lowrank(w))
        largest = max((self.grad_bytes(w) for w in self.weights if self.is_lowrank(w)), default=0)
        return full + lows + largest

    def activation_bytes(self) -> int:
        """What the forward leaves alive for backward (saved tensors, checkpointed inputs, the
        log-softmax), and the token batch."""
        tape = _Tape(0)
        tape.start("forward")
        self._micro, self._last, self._due = 0, True, False
        self._forward(tape)
        return tape.live + self.batch

    def projector_bytes(self) -> int:
        """The largest refresh working set (SVD factors, the new P beside the old); APOLLO: its
        regenerated random P."""
        return max((self.refresh_transient(w) for w in self.weights if self.is_lowrank(w)), default=0)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


def _visible_sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return DEFAULT_SM_COUNT


def estimate(
    cfg: TrainConfig,
    *,
    model_config: LlamaConfig | None = None,
    device: str | None = None,
    sm_count: int | None = None,
    processes: int | None = None,
) -> MemoryBreakdown:
    """The memory of one training step of ``cfg`` (see the module docstring for the model).

    ``model_config`` overrides ``cfg.model`` (e.g. a custom small LlamaConfig); by default it is
    ``get_config(cfg.model, cfg.vocab_size, cfg.seq_len)``, as ``fastgrad pretrain`` builds it
    (with a trained tokenizer the vocabulary is its size). ``device`` ("cpu" or "cuda"; default
    ``cfg.device``, else "cuda") selects the AdamW implementation torch uses (``foreach`` on CUDA) and
    the default dtype (``cfg.dtype``, else bfloat16 on CUDA, float32 on CPU). Nothing is allocated.
    On CUDA the kernels' workspaces are those the Triton launchers allocate on a GPU with
    ``sm_count`` SMs (default: the visible GPU's, else ``DEFAULT_SM_COUNT``).
    With ``cfg.fsdp`` the step is one process's of ``processes`` (default: ``WORLD_SIZE``, else 1)
    under FSDP2, as ``fastgrad pretrain --fsdp`` runs it (fastgrad.train.memory.fsdp): the
    categories are that rank's, and ``sharding`` details what sharding adds.
    Raises ValueError for an unknown model or optimizer, or a configuration pretrain refuses.
    """
    if cfg.optim not in MODELLED_OPTIMIZERS:
        raise ValueError(f"no memory model for --optim {cfg.optim!r}; known: {', '.join(MODELLED_OPTIMIZERS)}")
    config_error = cfg.fsdp_error()  # what fastgrad pretrain refuses, in its words
    if config_error:
        raise ValueError(config_error)
    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE", "1")) if cfg.fsdp else 1
    if not cfg.fsdp and processes != 1:
        raise ValueError(f"processes={processes} models FSDP's sharding: set cfg.fsdp (fastgrad memory --fsdp N)")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"--fsdp takes the number of processes, a positive integer; got {processes!r}")
    cfg = cfg.resolved()
    mc = model_config or get_config(cfg.model, vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_len)
    dev = (device or cfg.device or "cuda").split(":")[0]
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda for the memory model, got {device or cfg.device!r}")
    if cfg.dtype is None:  # as fastgrad pretrain: --mixed-precision keeps fp32 weights
        cfg.dtype = "bfloat16" if dev == "cuda" and not cfg.mixed_precision else "float32"
    if cfg.dtype not in _DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPE_BYTES)}, got {cfg.dtype!r}")
    if cfg.seq_len > mc.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {mc.max_seq_len}")
    if sm_count is None:
        sm_count = _visible_sm_count() if dev == "cuda" else DEFAULT_SM_COUNT
    if cfg.fsdp:
        from fastgrad.train.memory.fsdp import _FsdpStep  # it builds on this module

        step = _FsdpStep(cfg, mc, dev, sm_count, processes)
        state = step.opt  # the optimizer on the rank's rows
    else:
        step = state = _Step(cfg, mc, dev, sm_count)
    phases = step.run(refresh=True)
    phases_between = step.run(refresh=False)
    notes = []
    if cfg.layerwise and not step.layerwise:  # (AdamW: pretrain refuses it)
        notes.append(f"--layerwise has no effect for {cfg.optim} (not a low-rank optimizer): modelled without it")
    lowrank = [w for w in state.weights if state.is_lowrank(w)]
    if step.quantized and not step.eight_bit and cfg.optim not in _MUON:
        moments = sum(_moments_bytes(state.low_numel(w), 4, False) for w in lowrank)
        notes.append(
            f"QGaLoreAdamW keeps the Adam moments of the projected gradients in fp32 ({format_bytes(moments)}); "
            "the Q-GaLore paper's are 8-bit: --optim q-galore8bit"
        )
    if cfg.layerwise_streaming and not step.layerwise:
        notes.append("--layerwise-streaming has no effect without layer-wise stepping: modelled without it")
    if step.streaming:
        notes.append(
            "layer-wise streaming: each weight is updated in its gradient hook during the last micro-batch's backward "
            "(the update's temporaries come with the activations still alive) and its R or full gradient is freed "
            "at once; no gradient clipping, NaN/Inf skips per weight (decided on the device: a copy of what the "
            "update writes, weight and state, is alive during it)"
        )
    elif step.layerwise and not lowrank:  # Muon, Muon8bit: every parameter is a full-rank slot
        grads = sum(step.grad_bytes(w) for w in step.weights)
        notes.append(
            f"layer-wise, {cfg.optim} projects no gradient: every full gradient is kept until finish_step (for the "
            f"exact global norm and the NaN/Inf policy): {format_bytes(grads)}; --layerwise-streaming frees each "
            "one in its hook"
        )
    elif step.layerwise:
        lows = sum(step.low_bytes(w) for w in lowrank)
        notes.append(
            f"layer-wise, every projected gradient R is kept until finish_step (for the exact global norm and the "
            f"NaN/Inf policy): {format_bytes(lows)}; --layerwise-streaming frees each one in its hook"
        )
    if model_config is None and cfg.model != "tiny" and mc.vocab_size != 32000:
        notes.append(
            f"vocabulary {mc.vocab_size} (fastgrad's BPE default); the papers' LLaMA tokenizer has 32000 "
            "(--vocab-size 32000)"
        )
    if dev == "cuda":
        notes.append(
            "what torch.cuda.max_memory_allocated counts: the CUDA context (~0.5 GiB), the caching allocator's "
            "fragmentation and cuBLAS/cuSOLVER workspaces come on top" + (", and NCCL's buffers" if cfg.fsdp else "")
        )
    if cfg.fsdp and step.lowrank and max(phases_between.values()) > max(phases.values()):
        notes.append(
            "under --fsdp the layers that compute R keep each weight's whole R (from this process's batch) until "
            "backward ends, when they are averaged: between refreshes that can exceed a refresh step's "
            "reduce-scattered G"
        )
    peak_phase = max(phases, key=phases.get)
    config = {
        "model": cfg.model,
        "optim": cfg.optim,
        "rank": cfg.rank if step.lowrank else None,
        "layerwise": step.layerwise,
        "layerwise_streaming": step.streaming,
        "activation_checkpointing": cfg.activation_checkpointing,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "grad_accum": cfg.grad_accum,
        "dtype": cfg.dtype,
        "device": dev,
        "vocab_size": mc.vocab_size,
        "parameters": sum(w.numel for w in step.weights),
        "fsdp": processes if cfg.fsdp else None,
        "mixed_precision": cfg.mixed_precision,
    }
    return MemoryBreakdown(
        weights=step.weight_bytes(),
        gradients=step.gradient_bytes(),
        optimizer_states=step.optimizer_state_bytes(),
        projector_transients=step.projector_bytes(),
        activations=step.activation_bytes(),
        peak=phases[peak_phase],
        peak_phase=peak_phase,
        peak_between_refreshes=max(phases_between.values()),
        phases=dict(phases),
        phases_between_refreshes=dict(phases_between),
        notes=tuple(notes),
        config=config,
        sharding=step.sharding() if cfg.fsdp else {},
    )
