"""Low-rank gradient projectors: one interface, four ways to choose the subspace.

A projector maps a 2-D gradient ``G`` (m×n) to a low-rank tensor ``R`` and back, on one *side*:

    side "left":  P is m×r',  R = Pᵀ G (r'×n),  up(X) = P X (m×n)
    side "right": P is r'×n,  R = G Pᵀ (m×r'), up(X) = X P (m×n)

with ``r' = min(rank, m, n)``. The products go through :func:`fastgrad.ops.lowrank_project` and
:func:`fastgrad.ops.lowrank_project_back` (the optimizers call them with :meth:`Projector.matrix`),
so whichever kernel serves those ops on the device does the work.

Projector objects are stateless strategies shared by all parameters of a param group. Everything a
parameter needs is kept in its optimizer state dict, as plain tensors and ints, so that
``torch.load(optimizer_state, weights_only=True)`` works (galore-torch pickles a Python object):

    proj_side  int        0 = left, 1 = right (decided once, remembered: no re-guessing from shapes)
    proj_rank  int        r'
    proj_seed  int        per-parameter seed (random draws are a function of it and proj_step)
    proj_step  int        optimizer step (0-based) of the last refresh
    proj       tensor     dense P in the gradient dtype            (svd, randomized)
    proj_idx   int32 (r') indices of the selected DCT basis vectors (dct; the basis is a shared cache)

Projectors (``projector`` key of a param group):

* ``svd``: top-r' singular vectors of the fp32 thin SVD (``torch.linalg.svd(full_matrices=False)``),
  cast to the gradient dtype (GaLore, docs/algorithms.md §2.4).
* ``randomized``: randomized range finder (Halko, Martinsson, Tropp 2011): Gaussian test matrix with
  ``oversample`` extra columns, ``power_iters`` power iterations re-orthonormalised by QR, then the
  SVD of the small matrix Qᵀ A. Seeded from (proj_seed, step): reproducible, O(m·n·(r'+p)) per pass.
* ``dct``: SVD-free (docs/algorithms.md §7). One orthonormal DCT-II basis per size, cached and shared by
  all parameters; a refresh keeps the r' basis vectors with the largest ℓ1 (``dct_norm=1``) or ℓ2
  norm of G Q (right) / Qᵀ G (left). Only the indices are stored; the low-rank gradient of the
  refresh step is read off the scores' matrix (no second product).
* ``random``: Gaussian P with N(0, 1/r') entries, redrawn from its seed whenever it is needed and
  never stored (APOLLO-style). The draw uses a generator on the gradient's device, so the stream is
  reproducible per device type (CPU and CUDA draw different matrices from the same seed).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fastgrad.ops import QuantizedTensor, lowrank_project, quantize_int4

# The projector API that fastgrad.optim re-exports.
PUBLIC_API = [
    "PROJECTORS",
    "Projector",
    "SVDProjector",
    "RandomizedProjector",
    "DCTProjector",
    "RandomProjector",
    "make_projector",
    "resolve_side",
    "dct_basis",
]
__all__ = [
    "LEFT",
    "RIGHT",
    "SIDE_NAMES",
    "SIDE_RULES",
    *PUBLIC_API,
    "QuantizedSVDProjector",
    "effective_rank",
    "lowrank_shape",
    "mix_seed",
    "clear_dct_cache",
]

LEFT, RIGHT = 0, 1
SIDE_NAMES = ("left", "right")
# "std": compress the smaller dimension (GaLore's rule); "reverse_std": the larger one.
SIDE_RULES = ("std", "reverse_std", "left", "right")

ProjState = dict[str, Any]


def resolve_side(rule: str, shape: tuple[int, int] | torch.Size) -> int:
    """Side (LEFT/RIGHT) for a weight of ``shape`` (m, n) under ``rule`` (one of :data:`SIDE_RULES`)."""
    m, n = shape
    if rule == "std":
        return RIGHT if m >= n else LEFT
    if rule == "reverse_std":
        return LEFT if m >= n else RIGHT
    if rule in SIDE_NAMES:
        return SIDE_NAMES.index(rule)
    raise ValueError(f"proj_side must be one of {SIDE_RULES}, got {rule!r}")


def effective_rank(rank: int, shape: tuple[int, int] | torch.Size) -> int:
    """r' = min(rank, m, n): the references slice singular vectors with ``[:rank]``, which clips."""
    return min(rank, *shape)


def lowrank_shape(shape: tuple[int, int] | torch.Size, side: int, rank: int) -> tuple[int, int]:
    """Shape of R = down(G) for G of ``shape``: (r', n) on the left, (m, r') on the right."""
    m, n = shape
    return (rank, n) if side == LEFT else (m, rank)


def proj_shape(shape: tuple[int, int] | torch.Size, side: int, rank: int) -> tuple[int, int]:
    """Shape of the dense P: (m, r') on the left, (r', n) on the right."""
    m, n = shape
    return (m, rank) if side == LEFT else (rank, n)


_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, counter: int) -> int:
    """A well-mixed 63-bit seed from (seed, counter) (SplitMix64 finaliser): one stream per refresh."""
    z = (seed * 0x9E3779B97F4A7C15 + counter + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


_DCT_CACHE: dict[tuple[int, torch.dtype, torch.device, bool], torch.Tensor] = {}


def dct_basis(size: int, dtype: torch.dtype, device: torch.device | str, transposed: bool = False) -> torch.Tensor:
    """Orthonormal DCT-II matrix B (size×size), row i = basis vector of frequency i, cached per key.

    ``B[i, j] = c_i·√(2/s)·cos(π·i·(2j+1)/(2s))`` with ``c_0 = √½`` and ``c_i = 1`` otherwise, so
    ``B Bᵀ = I``. ``transposed=True`` gives the contiguous Bᵀ (columns are the basis vectors).
    The angle's integer part ``i·(2j+1) mod 4s`` is formed exactly in int64 and the cosine in fp64,
    so the matrix is accurate to the target dtype for any size.
    """
    device = torch.device(device)
    key = (size, dtype, device, transposed)
    basis = _DCT_CACHE.get(key)
    if basis is None:
        i = torch.arange(size, dtype=torch.int64).unsqueeze(1)
        j = torch.arange(size, dtype=torch.int64).unsqueeze(0)
        phase = (i * (2 * j + 1)) % (4 * size)
        b = torch.cos(phase.to(torch.float64) * (math.pi / (2 * size))) * math.sqrt(2.0 / size)
        b[0] *= math.sqrt(0.5)
        if transposed:
            b = b.t()
        basis = b.to(device=device, dtype=dtype).contiguous()
        _DCT_CACHE[key] = basis
    return basis


def clear_dct_cache() -> None:
    """Drop the shared DCT bases (they are rebuilt on demand)."""
    _DCT_CACHE.clear()


class Projector(ABC):
    """Interface of a projector. Subclasses keep no per-parameter data on ``self``.

    The optimizer calls, per parameter and step:
      ``init_state`` once; ``refresh`` when the subspace is due (it may return the projected
      gradient if it fell out of the computation, else None); ``matrix`` to get the dense P for
      ``lowrank_project`` / ``lowrank_project_back``.
    """

    name: ClassVar[str]
    # Keys of the per-parameter state this projector writes at a refresh (snapshotted for rollback).
    refresh_keys: ClassVar[tuple[str, ...]]
    # Whether ``matrix`` returns a stored tensor (True) or builds P anew at each call (False).
    stores_matrix: ClassVar[bool] = False

    def init_state(self, state: ProjState, shape: torch.Size, rank: int, side: int, seed: int) -> None:
        """Write the fixed per-parameter entries: side, effective rank and seed."""
        state["proj_side"] = side
        state["proj_rank"] = effective_rank(rank, shape)
        state["proj_seed"] = seed

    # Whether ``refresh`` reads the gradient (a row-sharded one is gathered for it); the random
    # projector draws its subspace from the seed alone.
    refresh_reads_grad: ClassVar[bool] = True

    def has_basis(self, state: ProjState) -> bool:
        return "proj_step" in state

    @abstractmethod
    def refresh(self, state: ProjState, grad: torch.Tensor, step: int) -> torch.Tensor | None:
        """Choose a new subspace from ``grad`` (m×n) at 0-based optimizer ``step``."""

    @abstractmethod
    def matrix(self, state: ProjState, grad: torch.Tensor) -> torch.Tensor:
        """Dense P for a gradient like ``grad``: (m, r') left or (r', n) right, grad's dtype and device."""

    def snapshot(self, state: ProjState) -> ProjState:
        """The refresh-owned entries of ``state`` (restored if the step is rolled back)."""
        return {k: state[k] for k in self.refresh_keys if k in state}

    @staticmethod
    def restore(state: ProjState, snap: ProjState, keys: tuple[str, ...]) -> None:
        for k in keys:
            state.pop(k, None)
        state.update(snap)

    def stored_shapes(self, shape: torch.Size, side: int, rank: int) -> dict[str, tuple[int, ...]]:
        """Expected shapes of the tensors this projector stores (for load_state_dict checks)."""
        return {}

    def subspace_shared(self, state: ProjState) -> None:
        """Called on every rank of a row-sharded parameter once the first rank's refresh tensors
        have replaced its own: re-derive anything the refresh computed from them on the host."""
        return None


class SVDProjector(Projector):
    """Top-r' singular vectors of the fp32 thin SVD of G, stored in G's dtype (GaLore)."""

    name = "svd"
    refresh_keys = ("proj", "proj_step")
    stores_matrix = True

    def refresh(self, state: ProjState, grad: torch.Tensor, step: int) -> None:
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        r = state["proj_rank"]
        basis = u[:, :r] if state["proj_side"] == LEFT else vh[:r]
        # A copy, not a view: a view of vh would keep the whole n×n factor alive.
        state["proj"] = basis.to(grad.dtype, copy=True).contiguous()
        state["proj_step"] = step
        return None

    def matrix(self, state: ProjState, grad: torch.Tensor) -> torch.Tensor:
        return state["proj"]

    def stored_shapes(self, shape: torch.Size, side: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {"proj": proj_shape(shape, side, rank)}


class RandomizedProjector(SVDProjector):
    """Randomized range finder with power iterations, then an exact SVD of the small Qᵀ A.

    For side left the dominant column space of A = G is found, for side right that of A = Gᵀ
    (i.e. the row space of G). With ℓ = min(r' + oversample, m, n):
        Ω ~ N(0, 1) (cols(A)×ℓ);  Q = qr(A Ω)
        repeat power_iters times:  Q = qr(A qr(Aᵀ Q))
        B = Qᵀ A (ℓ×cols(A));  B = Ũ Σ Ṽᵀ;  basis = Q Ũ[:, :r']
    Everything runs in fp32; the basis is cast to G's dtype.
    """

    name = "randomized"

    def __init__(self, oversample: int = 10, power_iters: int = 2) -> None:
        if oversample < 0 or power_iters < 0:
            raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
        self.oversample = oversample
        self.power_iters = power_iters

    def refresh(self, state: ProjState, grad: torch.Tensor, step: int) -> None:
        a = grad.float() if state["proj_side"] == LEFT else grad.float().t()
        r = state["proj_rank"]
        width = min(r + self.oversample, *a.shape)
        gen = _generator(mix_seed(state["proj_seed"], step), a.device)
        omega = torch.randn(a.shape[1], width, generator=gen, device=a.device, dtype=torch.float32)
        q = torch.linalg.qr(a @ omega).Q
        for _ in range(self.power_iters):
            q = torch.linalg.qr(a.t() @ q).Q
            q = torch.linalg.qr(a @ q).Q
        u_small = torch.linalg.svd(q.t() @ a, full_matrices=False).U
        basis = q @ u_small[:, :r]  # rows(A)×r', orthonormal columns
        if state["proj_side"] == RIGHT:
            basis = basis.t()
        state["proj"] = basis.to(grad.dtype).contiguous()
        state["proj_step"] = step
        return None


class DCTProjector(Projector):
    """SVD-free projector: r' columns of a shared DCT-II basis picked by the norm of G's coefficients.

    Right side (basis size s = n): S = G Bᵀ (m×s), score_j = ‖S[:, j]‖; left (s = m): S = B G
    (s×n), score_i = ‖S[i, :]‖. ``proj_idx`` = the r' best indices in increasing order (so a
    frequency kept across refreshes keeps its slot in the moments). P = B[idx] (right) or
    Bᵀ[:, idx] (left) is gathered from the cache at each use.
    """

    name = "dct"
    refresh_keys = ("proj_idx", "proj_step")

    def __init__(self, dct_norm: int = 1) -> None:
        if dct_norm not in (1, 2):
            raise ValueError(f"dct_norm must be 1 or 2, got {dct_norm}")
        self.dct_norm = dct_norm

    @staticmethod
    def _basis(state: ProjState, grad: torch.Tensor) -> torch.Tensor:
        m, n = grad.shape
        if state["proj_side"] == LEFT:
            return dct_basis(m, grad.dtype, grad.device, transposed=True)  # m×m, columns = basis
        return dct_basis(n, grad.dtype, grad.device)  # n×n, rows = basis

    def refresh(self, state: ProjState, grad: torch.Tensor, step: int) -> torch.Tensor:
        left = state["proj_side"] == LEFT
        # All s coefficients at once: lowrank_project with the full basis as P.
        coeffs = lowrank_project(grad, self._basis(state, grad), SIDE_NAMES[state["proj_side"]])
        score = torch.linalg.vector_norm(coeffs, ord=self.dct_norm, dim=1 if left else 0, dtype=torch.float32)
        idx = torch.topk(score, state["proj_rank"], sorted=False).indices.sort().values
        state["proj_idx"] = idx.to(torch.int32)
        state["proj_step"] = step
        return coeffs.index_select(0 if left else 1, idx)

    def matrix(self, state: ProjState, grad: torch.Tensor) -> torch.Tensor:
        idx = state["proj_idx"]
        return self._basis(state, grad).index_select(1 if state["proj_side"] == LEFT else 0, idx)

    def stored_shapes(self, shape: torch.Size, side: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {"proj_idx": (rank,)}


class RandomProjector(Projector):
    """Gaussian P with N(0, 1/r') entries, drawn from (proj_seed, proj_step) at each use; not stored."""

    name = "random"
    refresh_keys = ("proj_step",)

    refresh_reads_grad = False

    def refresh(self, state: ProjState, grad: torch.Tensor, step: int) -> None:
        state["proj_step"] = step
        return None

    def matrix(self, state: ProjState, grad: torch.Tensor) -> torch.Tensor:
        r = state["proj_rank"]
        shape = proj_shape(grad.shape, state["proj_side"], r)
        gen = _generator(mix_seed(state["proj_seed"], state["proj_step"]), grad.device)
        p = torch.randn(shape, generator=gen, device=grad.device, dtype=torch.float32)
        return p.mul_(1.0 / math.sqrt(r)).to(grad.dtype)


PROJECTORS: dict[str, type[Projector]] = {
    cls.name: cls for cls in (SVDProjector, RandomizedProjector, DCTProjector, RandomProjector)
}
# Param-group keys that configure a projector, with their defaults.
PROJECTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "svd": {},
    "randomized": {"oversample": 10, "power_iters": 2},
    "dct": {"dct_norm": 1},
    "random": {},
}


def make_projector(name: str, **options: Any) -> Projector:
    """Projector ``name`` (a key of :data:`PROJECTORS`) configured by its options (others ignored)."""
    if name not in PROJECTORS:
        raise ValueError(f"projector must be one of {tuple(PROJECTORS)}, got {name!r}")
    known = PROJECTOR_OPTIONS[name]
    return PROJECTORS[name](**{k: options.get(k, v) for k, v in known.items()})


def proj_group_size(row: int, group_size: int) -> int:
    """INT4 group along a P row of length ``row``: the largest even divisor of ``row`` ≤ ``group_size``."""
    if row % 2:
        raise ValueError(
            f"QGaLoreAdamW: the INT4 projector packs two codes per byte, so its rows need an even length; "
            f"got {row} (choose an even rank for left-projected (wide) weights)"
        )
    g = min(group_size, row)
    while row % g or g % 2:
        g -= 1
    return g


class QuantizedSVDProjector(Projector):
    """SVD projector that stores P as packed INT4 and tracks Q-GaLore's adaptive interval.

    State (tensors and ints): ``proj_codes`` uint8 (r'·d/2), ``proj_scales``/``proj_zeros`` fp32,
    ``proj_past`` fp32 first singular vector, ``proj_queue`` fp32 (queue_size,) with
    ``proj_queue_len`` valid entries at its end, ``proj_pending`` bool (a growth of T decided at
    the last refresh, applied at the next refresh candidate, see :meth:`QGaLoreAdamW.refresh_due`),
    ``proj_svd_count``, ``proj_step``; ``proj_gap`` (current T) is kept by the optimizer.
    """

    name = "svd"
    refresh_keys: ClassVar[tuple[str, ...]] = (
        "proj_codes",
        "proj_scales",
        "proj_zeros",
        "proj_step",
        "proj_past",
        "proj_queue",
        "proj_queue_len",
        "proj_pending",
        "proj_svd_count",
    )
    stores_matrix = True

    def __init__(
        self, group_size: int, cos_threshold: float, gamma_proj: float, queue_size: int, signed_cos: bool
    ) -> None:
        self.group_size = group_size
        self.cos_threshold = cos_threshold
        self.gamma_proj = gamma_proj
        self.queue_size = queue_size
        self.signed_cos = signed_cos

    def init_state(self, state: ProjState, shape: torch.Size, rank: int, side: int, seed: int) -> None:
        super().init_state(state, shape, rank, side, seed)
        row = proj_shape(shape, side, state["proj_rank"])[1]
        proj_group_size(row, self.group_size)  # validate early, with a clear message
        state["proj_svd_count"] = 0
        state["proj_queue_len"] = 0

    def refresh(self, state: ProjState, grad: torch.Tensor, step: int) -> None:
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        r = state["proj_rank"]
        left = state["proj_side"] == LEFT
        basis = (u[:, :r] if left else vh[:r]).contiguous()
        vec = (basis[:, 0] if left else basis[0]).clone()
        past = state.get("proj_past")
        if past is not None:
            cos = F.cosine_similarity(past, vec, dim=0)
            if not self.signed_cos:
                cos = cos.abs()
            queue = torch.cat((state["proj_queue"][1:], cos.reshape(1)))  # new tensor: snapshots stay valid
            state["proj_queue"] = queue
            state["proj_queue_len"] = n = min(state["proj_queue_len"] + 1, self.queue_size)
            if n == self.queue_size:
                # Read here, at a refresh (its SVD synchronises anyway), not at the later steps that use it.
                state["proj_pending"] = self._grows(queue)
        elif "proj_queue" not in state:
            state["proj_queue"] = torch.zeros(self.queue_size, dtype=torch.float32, device=grad.device)
        state["proj_past"] = vec
        q = quantize_int4(basis, proj_group_size(basis.shape[1], self.group_size))
        state["proj_codes"], state["proj_scales"], state["proj_zeros"] = q.codes, q.scales, q.zeros
        state["proj_svd_count"] += 1
        state["proj_step"] = step
        return None

    def _grows(self, queue: torch.Tensor) -> bool:
        """Whether a full queue of cosines grows the interval T (one host read)."""
        return bool(queue.mean() >= self.cos_threshold)

    def subspace_shared(self, state: ProjState) -> None:
        """The growth decision from the first rank's queue, as every rank now holds it (each rank's
        own SVD could have put its cosines on the other side of the threshold)."""
        if "proj_pending" in state:
            state["proj_pending"] = self._grows(state["proj_queue"])

    def matrix(self, state: ProjState, grad: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(state["proj_codes"], state["proj_scales"], state["proj_zeros"], 4)

    def stored_shapes(self, shape: torch.Size, side: int, rank: int) -> dict[str, tuple[int, ...]]:
        rows, row = proj_shape(shape, side, rank)
        groups = row // proj_group_size(row, self.group_size)
        return {
            "proj_codes": (rows, row // 2),
            "proj_scales": (rows, groups),
            "proj_zeros": (rows, groups),
            "proj_past": (rows if side == LEFT else row,),
            "proj_queue": (self.queue_size,),
        }
