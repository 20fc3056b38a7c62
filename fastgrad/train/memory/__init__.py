"""Analytic memory model of one ``fastgrad pretrain`` step (``fastgrad memory``).

:func:`estimate` predicts from the model's shapes alone (nothing is allocated: LLaMA-7B takes
milliseconds) the bytes of a training step: weights, gradients, optimizer states, projector
transients and activations, and the **peak**, which is not their sum: activations are freed as
backward proceeds while gradients appear, the optimizer's temporaries come when the activations
are gone, and the projector's SVD runs with whatever its moment leaves alive.

The model
---------
A step is replayed as a sequence of allocations and frees (a "tape") on top of what stays resident
(weights and buffers, optimizer states, the token batch). The peak is the largest live total; it is
reported per phase (forward, backward, optimizer step) and for two kinds of step: a projector
*refresh* step (the first step, then every T steps: the worst one, and what ``peak`` is) and a step
between refreshes (``peak_between_refreshes``). The events follow the code of
:mod:`fastgrad.models.llama`, :mod:`fastgrad.nn.qlinear`, :mod:`fastgrad.nn.lowrank`, the optimizers
and :mod:`fastgrad.optim.layerwise`, op by op as the profiler records them on CPU. With a = batch ×
seq tokens, C hidden, I intermediate, V vocabulary, e bytes of the model dtype:

* **Saved activations, per decoder layer**: per RMSNorm the fp32 input (in fp32 the residual itself,
  else a copy), the fp32 normalised value, the output and 1/rms (a floats); q and k after the rotary
  embedding and v (a·C·e each; k, v repeated to all heads under GQA); the attention output and its
  log-sum-exp (batch·heads·seq fp32): ``scaled_dot_product_attention`` takes the flash kernel on CPU
  and on CUDA, which neither materialises nor saves the seq×seq attention matrix (the math backend,
  a fallback this model does not count, would save batch·heads·seq² probabilities); the SwiGLU's
  gate, silu, up and product (4·a·I·e). In fp32 that is 10·a·C·4 + 4·a·I·4 bytes per layer. Forward transients: the
  rotary embedding's fp32 temporaries (four a·C), a QLinear's fp32 matmul output.
* **Loss**: the logits (a·V·e), their fp32 copy (16-bit models), the fp32 log-softmax (saved).
  Backward starts with two more a·V fp32 tensors: with a large vocabulary the peak is at the head.
* **Activation checkpointing** keeps each layer's input (a·C·e) only (and, on CPU, the 5056-byte CPU
  RNG state, a second one during the recomputation); backward recomputes the layer (until its last
  saved tensor) right before its backward. LowRankGradLinear then forms G: it looks its projection
  up by the weight it saved, which the recomputation hands back as another tensor (QLinear is not
  affected).
* **Backward**: every op frees what it saved and allocates its input gradients (the SwiGLU's three
  a·I gradients are the largest per layer); weight gradients appear in backward order (head first,
  embedding last) in the model dtype, fp32 for QLinear's INT8 weights.
* **Gradients, non-layer-wise**: alive from creation to the optimizer step (and, with
  ``--grad-accum`` > 1, through the later micro-batches). Between refreshes a QLinear computes the
  projected gradient R (D×r', fp32) in backward and no m×n gradient exists (:mod:`fastgrad.nn.lowrank`).
* **Gradients, layer-wise**: a low-rank weight's gradient is projected in its hook (after a refresh
  from it, on refresh steps) and freed; its R is kept until ``finish_step``, as are the full
  gradients of the full-rank parameters (embeddings, norms, head); optimizers whose update reads
  the full gradient (Fira, APOLLO, FRUGAL) keep every full gradient until then, and Muon and
  Muon8bit, which project none, have only full-rank parameters (the driver keeps every gradient).
  ``finish_step`` takes the fp32 norm of each (an fp32 copy of a 16-bit tensor on CPU) before
  updating; the step frees each R and each full-rank parameter's gradient as it consumes it.
* **Layer-wise streaming** (``--layerwise-streaming``): in the last micro-batch each parameter's
  hook (autograd's AccumulateGrad of a Linear, norm or embedding weight; inside a QLinear's
  backward; as a layer delivers R) finalizes its accumulation, takes its norm and runs the
  optimizer's update of that weight alone, then frees its R or full gradient (and the projector
  its refresh replaced; an R a layer delivered is freed when the layer returns): nothing is held
  until ``finish_step``, and the update's temporaries come during backward, with the activations
  not yet freed, beside a copy of what the update writes (the weight, its optimizer state but the
  projector: Adam's moments, Muon's momentum buffer, Muon8bit's codes and scales).
* **Optimizer step**: the GaLore family projects every gradient first (all R alive, and the
  replaced projectors, which the step's rollback snapshot keeps), then updates param group by
  param group (low-rank, then the rest), in each the weights with fp32/16-bit moments first, then
  the 8-bit ones. A low-rank weight with fp32/16-bit moments (GaLore, Q-GaLore, and the 8-bit
  variants below min_8bit_size) is one fused ``galore_adam_step_`` op: the moments in place, N in
  an R-sized fp32 scratch, R held until the op returns; a dense W by one addmm_ (fp32) or scratch
  blocks of P and W (16-bit), an INT8 W decoded, updated and re-quantized in place by blocks of
  whole rows of ≤ 2^18 fp32 elements. Full-rank weights: Adam's denominator; 8-bit moments are
  decoded to fp32 one weight at a time, the weight updated unfused (Q-GaLore8bit's INT8 weight:
  the fused op on the decoded moments), re-encoded. Fira's and FRUGAL's
  m×n residual; torch's AdamW: per tensor on CPU, ``foreach`` on CUDA (a copy of every second
  moment at once).
* **Muon** (the attention and MLP weights; AdamW for the rest): one weight at a time, U = lerp(G, B)
  in the gradient's dtype, its copy in ns_dtype (bf16), the Newton–Schulz op's result and buffers
  (CPU, csrc/cpu/newton_schulz.cpp: A and B, s×s, two s×l iterates and the normalised X; GPU, the
  Triton launcher's: A, B and the iterates with aligned rows), then W.add_ (on CPU an fp32 W adds an
  fp32 copy of the bf16 result); AdamW's denominator per weight. ``muon8bit`` (Muon8bit): a momentum
  of ≥ 4096 elements in 8 bits (n_pad + 4·blocks bytes), decoded to fp32 (n_pad) around the update, U
  in fp32, re-encoded (codes, scales, an unused zeros); the AdamW groups' moments as AdamW8bit's
  (decoded, updated, re-encoded one weight at a time); under FSDP stored by rows (a (rows, t) scale
  table). ``galore-muon`` (GaLoreMuon): GaLore's projection (svd P, LowRankGradLinear's R between
  refreshes), a momentum of R's shape and dtype, at a refresh carried into the new basis (the r'×r'
  rotation, an fp32 product), U = lerp(R, B), Newton–Schulz of the r'-wide U (m×r' or r'×n), O cast
  to P's dtype and added back into W in place; AdamW for the rest (FSDP: a right-side U gathered, m×r').
  ``q-galore-muon`` (QGaLoreMuon): Q-GaLore's INT8 weights, INT4 projector and refresh state, the
  momentum r'·max(m, n) fp32, O in fp32, and the INT8 update by blocks of whole rows (≤ 2^20
  elements): Ŵ dequantized, Δ = up(O's rows, P̂) or up(O, P̂'s rows) with the kernel's scratch, the
  re-quantized codes, scales and zeros. Layer-wise (``--layerwise``, ``--layerwise-streaming``):
  Muon's and Muon8bit's every parameter is a full-rank slot, its gradient freed as the momentum
  update returns (Muon8bit's 16-bit G once upcast to fp32; an AdamW parameter's before its
  denominator); GaLoreMuon and QGaLoreMuon accumulate and refresh as GaLore and Q-GaLore do and
  update as above, each weight in its hook when streaming.
* **FSDP** (``cfg.fsdp``, ``fastgrad memory --fsdp N``): one process's step, the replay above with
  FSDP2's all-gathers and reduce-scatters at its units' boundaries and the optimizer on the rank's
  rows (:mod:`fastgrad.train.memory.fsdp`).
* **Projector refresh**: the SVD (``full_matrices=False``) of the fp32 gradient: LAPACK's copy of
  the input, U, S, Vᴴ, then the new P (two copies for GaLore's strided slice; Q-GaLore's fp32 basis
  and INT4 codes). APOLLO's random P is regenerated (r'·d fp32) whenever it is needed.
* **CPU kernels** (``device="cpu"``): the C++ ops' scratch blocks, sized by the very functions the
  kernels call (``fastgrad._C.projection_scratch``, ``tn_matmul_scratch``, ``int8_step_scratch``:
  blocks of ≤ 1 MiB of P, ≤ 4 MiB of G, the fused INT8 step's ≤ 1 MiB of decoded rows), their fp32
  results cast to 16 bits, the flash-attention kernel's per-thread blocks (one thread counted), and
  the fp32 copies torch makes for an in-place op mixing a 16-bit tensor with an fp32 one
  (APOLLO's/Fira's ``addcmul_``, 8-bit AdamW's ``add_``, a 16-bit R added into the layer-wise fp32
  buffer).
* **GPU kernels** (``device="cuda"``): what the Triton launchers allocate, from the plans they use
  (:mod:`fastgrad.kernels.plans`): the split-K workspaces of the projections and of
  ``lowrank_grad`` (on a GPU of ``sm_count`` SMs), its T×r' intermediate Z in dy's dtype, the
  quantizer's partial statistics, the fused step's N; outputs in their own dtype (no fp32 copy).

Not modelled: the CUDA context (~0.5 GiB), the caching allocator's fragmentation and reserve,
cuBLAS/cuSOLVER workspaces and scratch LAPACK allocates outside torch's allocator, ``torch.compile``,
DDP buckets. The numbers are those of ``torch.cuda.max_memory_allocated`` (and of the profiler's
memory events on CPU).

Validation (tests/test_memory.py): the peak of each phase against the live-memory peak of real steps
measured with the profiler on CPU, to a relative 1e-4 (what is left is a few bytes of scalar
tensors, and the later micro-batches' token tensors that the measurement keeps): small LLaMAs,
AdamW, GaLore (with and without LowRankGradLinear), Q-GaLore, their 8-bit-moment variants, Muon,
Muon8bit, GaLoreMuon, QGaLoreMuon, with and without activation checkpointing, fp32 and bf16, gradient
accumulation, refresh steps and steps between refreshes, layer-wise and layer-wise streaming (the
Muon family too), and a model whose QLinear weights exceed one 2^18-element block of the fused INT8
step; and exactly the weights and ``optimizer.state_bytes()`` after a step, for every optimizer.
Fira, APOLLO and FRUGAL are modelled the same way but not held to the measured peaks: a few of their
temporaries are missing (on the tests' wide model their steps come out up to 0.2% low; FRUGAL's bf16
step between refreshes 3.4%).
Under FSDP (tests/test_memory_fsdp.py, 2 gloo processes): the persistent bytes byte for byte and the
peak of each phase to 1e-4, Fira and APOLLO included."""

from fastgrad.train.memory.figures import ANCHORS, Anchor, anchors_for
from fastgrad.train.memory.model import LOWRANK_OPTIMIZERS, MODELLED_OPTIMIZERS, MemoryBreakdown, estimate, format_bytes
from fastgrad.train.memory.report import format_report

__all__ = [
    "MemoryBreakdown",
    "estimate",
    "MODELLED_OPTIMIZERS",
    "LOWRANK_OPTIMIZERS",
    "Anchor",
    "ANCHORS",
    "anchors_for",
    "format_bytes",
    "format_report",
]
