"""GaLoreAdamW and AdamW with 8-bit blockwise moments kept with fastgrad's own quantize ops
(docs/algorithms.md §2.5; not bitsandbytes, which needs CUDA and its own codebook).

The representation of the moments (M, V) of a tensor of n elements, read as a flat vector cut into
blocks of ``block_size`` consecutive elements (the last block zero-padded), is

    V:  y = V^(1/4),           asymmetric per block: y ≈ zero + code·scale, zero = min of the block
    M:  r = M / √V̂  ∈ [−C, C],  symmetric per block:  r ≈ (code − 128)·scale,  √V̂ = ŷ² (decoded V)

with uint8 codes from :func:`fastgrad.ops.quantize_int8` (stochastic rounding) and fp32 scales (and
zeros for V; M's zero is −128·scale and is not stored). Decoding: √V̂ = ŷ², V̂ = ŷ⁴, M̂ = r̂·√V̂.
C = (1−β1)/√((1−β2)(1−β1²/β2)) (7.27 for β = (0.9, 0.999)) is the Cauchy–Schwarz bound of Adam's
moments, |M| ≤ C·√V for any gradient sequence started from zero; it requires β1² < β2.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch

from fastgrad.ops import QuantizedTensor, dequantize_int8, quantize_int8
from fastgrad.optim.base import ParamStep, adam_scalars, proj_like, transfer_moments
from fastgrad.optim.galore import GaLoreAdamW
from fastgrad.optim.projectors import Projector, effective_rank, lowrank_shape, mix_seed, resolve_side
from fastgrad.optim.sharding import row_shard

__all__ = ["EightBitMoments", "GaLoreAdamW8bit", "AdamW8bit", "moment_bound", "encode_moments", "decode_moments"]

_SR_SALT = 0x3842_4954_4D4F  # separates the moments' rounding stream from the projector's seed
_TINY = torch.finfo(torch.float32).tiny
BLOCK_SIZE = 256  # default values per quantization block of a moment
MIN_8BIT_SIZE = 4096  # default: moments of fewer elements stay fp32

# State keys of the 8-bit layout (a tensor below min_8bit_size keeps fp32 "exp_avg"/"exp_avg_sq").
M_CODES, M_SCALES = "exp_avg_codes", "exp_avg_scales"
V_CODES, V_SCALES, V_ZEROS = "exp_avg_sq_codes", "exp_avg_sq_scales", "exp_avg_sq_zeros"
QSEED = "exp_avg_qseed"


def moment_bound(betas: tuple[float, float]) -> float:
    """C with |M_t| ≤ C·√V_t for Adam's moments from zero, any gradients: by Cauchy–Schwarz on
    M_t = Σ(1−β1)β1^(t−i)·g_i against V_t = Σ(1−β2)β2^(t−i)·g_i², C² = (1−β1)²/((1−β2)(1−β1²/β2)).
    The recurrence keeps the bound: |β1·M + (1−β1)·g| ≤ C·√(β2·V + (1−β2)·g²) whenever |M| ≤ C·√V.
    ``inf`` when β1² ≥ β2 (no bound)."""
    beta1, beta2 = betas
    if beta1 == 0.0:
        return 1.0 / math.sqrt(1.0 - beta2)
    if beta1 * beta1 >= beta2:
        return math.inf
    return (1.0 - beta1) / math.sqrt((1.0 - beta2) * (1.0 - beta1 * beta1 / beta2))


def encode_moments(
    first: torch.Tensor, second: torch.Tensor, block_size: int, bound: float, seed: int, offset: int
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """Adam moments (M, V), fp32, contiguous, numel a multiple of ``block_size`` (both overwritten)
    -> (M codes, V codes): y = V^(1/4) asymmetric per block, then r = M/ŷ² clamped to ±``bound``
    symmetric per block; stochastic rounding with Philox stream positions [offset, offset + 2·numel)."""
    n = first.numel()
    y = second.sqrt_().sqrt_()
    qv = quantize_int8(y, block_size, stochastic=True, seed=seed, offset=offset)
    sqrt_v = dequantize_int8(qv.codes, qv.scales, qv.zeros).square_()
    ratio = first.div_(sqrt_v.clamp_min_(_TINY)).clamp_(-bound, bound)
    qm = quantize_int8(ratio, block_size, symmetric=True, stochastic=True, seed=seed, offset=offset + n)
    return qm, qv


def decode_moments(
    m_codes: torch.Tensor, m_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor, v_zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_moments`: fp32 (M̂, V̂) = (r̂·ŷ², ŷ⁴); M's zero is −128·scale."""
    sqrt_v = dequantize_int8(v_codes, v_scales, v_zeros).square_()
    first = dequantize_int8(m_codes, m_scales, m_scales * -128.0).mul_(sqrt_v)
    return first, sqrt_v.square_()


class EightBitMoments:
    """Mixin for a :class:`~fastgrad.optim.base.LowRankOptimizer` whose update runs
    ``_step_items(group, items)`` → per weight ``_weight_step(group, item, M, V)`` (GaLoreAdamW,
    QGaLoreAdamW): the Adam moments of every tensor of at least ``min_8bit_size`` elements are kept
    in 8 bits (the representation of the module docstring and :class:`GaLoreAdamW8bit`), decoded
    to fp32 for one weight's step at a time and re-encoded right after it; a low-rank INT8 weight
    (Q-GaLore's) takes the fused ``_fused_step`` on the decoded moments.

    Its constructor is the optimizer's with two more keyword arguments, ``block_size`` and
    ``min_8bit_size`` (the signature a subclass shows, e.g. in ``help()``, is that union)."""

    keep_dtype_keys = (M_SCALES, V_SCALES, V_ZEROS)

    def __init__(
        self, params: Iterable, *args: Any, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE, **kw: Any
    ) -> None:
        self._init_8bit(block_size, min_8bit_size)  # before the parameters are added
        super().__init__(params, *args, **kw)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__signature__ = None  # its own constructor's (not an inherited composed one)
            return
        # The signature of the float optimizer's constructor plus the 8-bit arguments, for help()
        # and editors (the constructor itself forwards everything else to it).
        parent = next(k for k in cls.__mro__[1:] if k is not EightBitMoments and "__init__" in k.__dict__)
        sig = inspect.signature(parent.__init__)
        mine = inspect.signature(EightBitMoments.__init__).parameters
        params = list(sig.parameters.values())
        if "block_size" not in sig.parameters:
            cut = next(i for i, q in enumerate(params) if q.kind is inspect.Parameter.KEYWORD_ONLY)
            params[cut:cut] = [mine["block_size"], mine["min_8bit_size"]]
        cls.__signature__ = sig.replace(parameters=params[1:])  # without self

    def _init_8bit(self, block_size: int, min_8bit_size: int) -> None:
        name = type(self).__name__
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
        if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
            raise ValueError(f"{name}: min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        betas = self.param_groups[-1]["betas"]
        if not moment_bound(betas) < math.inf:
            raise ValueError(
                f"{type(self).__name__}: betas must satisfy beta1² < beta2 for 8-bit moments (the bound "
                f"|M| ≤ C·√V their encoding relies on), got betas={tuple(betas)}"
            )

    # ------------------------------------------------------------------ layout
    def _padded(self, n: int) -> int:
        return -(-n // self.block_size) * self.block_size

    def _is_8bit(self, it: ParamStep) -> bool:
        st = it.state
        if M_CODES in st:
            return True
        return "exp_avg" not in st and it.low.numel() >= self.min_8bit_size

    def _fuses(self, it: ParamStep) -> bool:
        """8-bit moments are decoded and encoded around the step: only fp32-moment items fuse."""
        return super()._fuses(it) and not self._is_8bit(it)

    @staticmethod
    def _decode(st: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (M, V) from a state's codes, each of n_pad elements (the padding decodes to 0)."""
        return decode_moments(st[M_CODES], st[M_SCALES], st[V_CODES], st[V_SCALES], st[V_ZEROS])

    def _encode(self, group: dict[str, Any], it: ParamStep, first: torch.Tensor, second: torch.Tensor) -> None:
        """Store the fp32 (M, V) of n_pad elements (both overwritten) as codes, after step t ≥ 1."""
        st = it.state
        offset = (st["step"] - 1) * 2 * first.numel()  # positions never reused: resume and reruns are exact
        qm, qv = encode_moments(first, second, self.block_size, moment_bound(group["betas"]), st[QSEED], offset)
        st[M_CODES], st[M_SCALES] = qm.codes, qm.scales
        st[V_CODES], st[V_SCALES], st[V_ZEROS] = qv.codes, qv.scales, qv.zeros

    def dequantized_moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``p``'s (M, V) as fp32 tensors of the moment's shape (decoded, or copies of fp32 moments);
        None before ``p``'s first step."""
        st = self.state.get(p, {})
        if M_CODES in st:
            shape = self._moment_shape(self._group_of(p), p)
            n = math.prod(shape)
            first, second = self._decode(st)
            return first[:n].view(shape), second[:n].view(shape)
        if "exp_avg" in st:
            return st["exp_avg"].float().clone(), st["exp_avg_sq"].float().clone()
        return None

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @staticmethod
    def _moment_shape(group: dict[str, Any], p: torch.Tensor) -> tuple[int, ...]:
        """Shape of ``p``'s moments: the projected D×r' shape in a ``rank`` group, else ``p``'s."""
        if "rank" not in group:
            return tuple(p.shape)
        side = resolve_side(group["proj_side"], p.shape)
        return tuple(lowrank_shape(p.shape, side, effective_rank(group["rank"], p.shape)))

    # ------------------------------------------------------------------ step
    def prepare(
        self, group: dict[str, Any], p: torch.Tensor, proj: Projector | None, grad: torch.Tensor | None = None, **kw
    ) -> ParamStep:
        if row_shard(p) is not None:
            # Blocks and rounding streams over the local rows would make the trajectory depend on
            # the number of ranks; until they follow the global element index, refuse (before any
            # state of the step is changed).
            raise NotImplementedError(
                f"{type(self).__name__}: 8-bit moments of sharded (FSDP2) parameters are not supported yet; "
                "use the fp32-moment optimizer"
            )
        # The base class keeps P_old for state transfer only when it finds fp32 "exp_avg".
        state = self.state[p]
        if (
            proj is not None
            and group["state_transfer"]
            and M_CODES in state
            and proj.has_basis(state)
            and self.refresh_due(group, state)
        ):
            old = proj.matrix(state, proj_like(p, p.grad if grad is None else grad))
            item = super().prepare(group, p, proj, grad, **kw)
            if item.snapshot is not None:  # refreshed (not dropped for a non-finite gradient)
                item.proj_old = old
            return item
        return super().prepare(group, p, proj, grad, **kw)

    def _step_items(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        """fp32-moment items through the optimizer's own path; 8-bit ones one weight at a time:
        decode, (transfer,) update the moments, the weight's step, encode."""
        eight = [self._is_8bit(it) for it in items]
        dense = [it for it, q in zip(items, eight, strict=True) if not q]
        if dense:
            super()._step_items(group, dense)
        for it in (it for it, q in zip(items, eight, strict=True) if q):
            self._step_8bit(group, it)

    def _step_8bit(self, group: dict[str, Any], it: ParamStep) -> None:
        beta1, beta2 = group["betas"]
        st = it.state
        low = it.low.float()
        it.low = None
        n = low.numel()
        if M_CODES in st:
            first_pad, second_pad = self._decode(st)
        else:
            st[QSEED] = mix_seed(self._param_seed(group, it.source, it.index), _SR_SALT)
            first_pad = torch.zeros(self._padded(n), dtype=torch.float32, device=low.device)
            second_pad = torch.zeros_like(first_pad)
        first, second = first_pad[:n].view(low.shape), second_pad[:n].view(low.shape)
        if it.proj_old is not None:
            transfer_moments(first, second, it.proj_old, self.full_proj_matrix(it), st["proj_side"])
        if it.lowrank and it.param.dtype == torch.uint8:  # an INT8 weight: the fused op, on the decoded moments
            it.low, low = low, None
            self._fused_step(group, it, [first], [second])
        else:
            first.mul_(beta1).add_(low, alpha=1.0 - beta1)
            second.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            del low
            self._weight_step(group, it, first, second)
        self._encode(group, it, first_pad, second_pad)

    # ------------------------------------------------------------------ checkpoints
    def _check_param_state(
        self, name: str, gi: int, idx: int, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]
    ) -> None:
        super()._check_param_state(name, gi, idx, group, p, st)
        if M_CODES not in st:
            return
        low_shape = self._moment_shape(group, p)
        n_pad = self._padded(math.prod(low_shape))
        blocks = n_pad // self.block_size
        expected = {M_CODES: n_pad, V_CODES: n_pad, M_SCALES: blocks, V_SCALES: blocks, V_ZEROS: blocks}
        for key, size in expected.items():
            t = st.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
                raise ValueError(
                    f"{name}: parameter {idx} (group {gi}, shape {tuple(p.shape)}): saved '{key}' is {got}, "
                    f"expected shape ({size},) for moments of shape {low_shape} in blocks of {self.block_size}: "
                    "the state was saved for a different model, rank or block_size"
                )


class GaLoreAdamW8bit(EightBitMoments, GaLoreAdamW):
    """:class:`~fastgrad.optim.GaLoreAdamW` whose Adam moments are stored in 8 bits per element.

    Param groups, keys, defaults, modes (``faithful``), update rule, NaN/Inf policy and checkpoint
    checks are GaLoreAdamW's (see its docstring): a group with ``rank`` is low-rank and its moments
    have the projected shape (D×r'); any other group is plain HF-style AdamW. Defaults: lr 1e-3,
    β (0.9, 0.999), ε 1e-6 (added to √V without bias correction), weight_decay 0: GaLoreAdamW's,
    i.e. the recipes' HF AdamW. galore-torch's bitsandbytes GaLoreAdamW8bit has bnb's ε 1e-8 inside
    the bias correction and weight_decay 1e-2 (§2.5); the 8-bit encoding needs no larger ε (updates
    are bounded by C whatever ε, see below), so the GaLoreAdamW defaults are kept for
    comparability: with fp32 moments this class *is* GaLoreAdamW, bitwise.

    8-bit arguments:
      ``block_size`` (256, bitsandbytes ≥ 0.44): elements per quantization block (one fp32 scale,
      plus one fp32 zero for V); ``min_8bit_size`` (4096, as bitsandbytes): a moment with fewer
      elements (the *projected* shape for a low-rank weight) keeps fp32 ``exp_avg``/``exp_avg_sq``
      exactly like GaLoreAdamW. The layout is chosen at a weight's first step and kept.

    Representation (module docstring): V as V^(1/4) asymmetric per block, M as r = M/√V̂ clamped to
    ±C symmetric per block, both with stochastic rounding. Measured with this class and variants
    of its encoding on the tests' tiny LLaMA memorising 4 batches (AdamW lr 3e-3, every tensor of
    ≥ 1024 elements in 8 bits, 200 steps; final loss / largest per-coordinate |ΔW| in units of lr):
    torch AdamW fp32 0.0149 / 1.37; linear M + linear V 2.42 / 2.0e6; linear M + √V 0.072 / 1.3e4;
    linear M + V^(1/4) 0.0148 / 30; r + √V 0.0148 / 1.38; r + V^(1/4) (this) 0.0148 / 1.37. After
    50 steps (tests/test_optim_8bit.py) linear M + V is at 3.28 where fp32 and this are at 1.35.
      * V linear (codes spread evenly between a block's min and max) cannot hold V's range: V is a
        square and spans orders of magnitude within a block; entries below 1/255 of the block's
        largest decode to 0 (or one step), √V̂ collapses and M/(√V̂+ε) explodes. A root compresses
        the range (V^(1/4): 4 decades of V in 1 of y).
      * M linear fails the other way: an entry 100× below its block's largest keeps about one code,
        and that noise divided by its own small √V dominates its update. r = M/√V̂ is what the
        update uses (N ≈ r); exact Adam has |r| ≤ C, and r's error (a code step is max|r|/127 in its
        block) is the same for every coordinate whatever its scale. Clamping r to ±C keeps
        Adam's invariant |M̂| ≤ C·√V̂ in the stored pair, and the recurrence keeps it (see
        :func:`moment_bound`), so every update has |M/(√V+ε)| ≤ C per coordinate: no quantization
        noise can make it explode.
      * V^(1/4) rather than √V: stochastic rounding makes the stored root unbiased, so V̂ = ŷ⁴ is
        biased up by ≈ 6·Var(ŷ)/y² per encoding, and the EMA (which forgets 1e-3 per step) lets
        that settle at a floor relative to the block's largest entry. On a synthetic stream (4096
        coordinates, gradient scales log-uniform over 3 decades, 2000 steps) the mean |√V̂/√V − 1|
        of the smallest fifth of the coordinates is 1.1 with √V, 0.18 with V^(1/4), and the update
        direction N differs from fp32 Adam's on the same gradients by (relative 2-norm) 1.9 for linear M
        (clipped to ±C·√V̂) + √V, 1.5 for linear M + V^(1/4), 1.2 for r + √V, 0.15 for r + V^(1/4).
      * stochastic rounding (counter-based Philox: a seed per parameter, counters advanced by
        2·n_pad each step, so a resumed run draws the same numbers): round-to-nearest is biased, and
        an EMA step smaller than half a code ((1−β2)·(g² − V) is 1e-3 of V) would be rounded away
        every time; with stochastic rounding every encoding is unbiased (y and M exactly).
    Accuracy (tests/test_optim_8bit.py, real gradients of the tiny LLaMA): after 30 steps the
    dequantized M and V are within 1.4% and 1.7% (relative 2-norm) of fp32 moments fed the same
    gradients; after 50 steps of training the loss is within 0.2% (AdamW8bit vs torch AdamW) and
    2% (GaLoreAdamW8bit vs GaLoreAdamW, every projected moment in 8 bits) of the fp32 optimizer's.

    State of an 8-bit weight (n = elements of the moment, n_pad = n rounded up to block_size,
    blocks = n_pad / block_size): ``step`` int; ``exp_avg_qseed`` int (the rounding seed);
    ``exp_avg_codes`` uint8 (n_pad,), ``exp_avg_scales`` fp32 (blocks,); ``exp_avg_sq_codes``
    uint8 (n_pad,), ``exp_avg_sq_scales`` and ``exp_avg_sq_zeros`` fp32 (blocks,); plus the
    projector's keys. Bytes: 2·n_pad + 12·blocks (≈ 2.05 per element for block 256, vs 8 for fp32
    moments and 4 for bf16) + the projector as in GaLoreAdamW. :meth:`state_bytes` sums the tensors.
    Resume is bitwise (the rounding stream is a function of the seed and the step). Each step
    decodes one weight's moments to fp32 (transient, the size of that weight's moments), updates
    them, applies the update and re-encodes them before the next weight: fastgrad ops
    ``quantize_int8`` ×2 and ``dequantize_int8`` ×3 per 8-bit weight and step.

    ``state_transfer=True`` re-expresses the decoded moments in the new basis before they are
    updated; a rotation can take |M| above C·√V (by at most √r'), which the clamp then shortens.
    """


class AdamW8bit(GaLoreAdamW8bit):
    """AdamW with 8-bit blockwise moments: :class:`GaLoreAdamW8bit`'s full-rank path, with
    torch.optim.AdamW's update rule.

    ``AdamW8bit(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``
    (bitsandbytes' AdamW8bit defaults). Per step t with gradient G:
        W ← W·(1 − lr·wd)                                 # decoupled, before the update (torch)
        M ← β1 M + (1−β1) G;  V ← β2 V + (1−β2) G⊙G
        W ← W − lr/(1−β1^t) · M / (√V/√(1−β2^t) + ε)     # torch ε placement (= bnb's ε·√(1−β2^t))
    so with fp32 moments (tensors below ``min_8bit_size``) it is torch.optim.AdamW to rounding.
    Moments, ``block_size``, ``min_8bit_size``, state, NaN/Inf policy and checkpoints: as
    GaLoreAdamW8bit. Param groups may not carry ``rank`` (use GaLoreAdamW8bit).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = BLOCK_SIZE,
        min_8bit_size: int = MIN_8BIT_SIZE,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            True,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            nonfinite=nonfinite,
        )

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        raise ValueError("AdamW8bit: param groups may not have 'rank' (low-rank groups: use GaLoreAdamW8bit)")

    def _direction(
        self, group: dict[str, Any], step: int, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        scalars = adam_scalars(group, step, "torch")
        denom = (second.sqrt() / scalars.v_divisor).add_(scalars.eps)
        return scalars.step_size, torch.div(first, denom, out=denom)
