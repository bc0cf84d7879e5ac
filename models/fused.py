"""Fused GLA blocks for GPU training (model.gpu_kernels = "fused"): the same parameters and the same math as
FLA's GLA blocks, with fewer bytes moved per step.

A profile of GLA 340M's bf16 training step (bench/gpu_profile.py, BENCHMARKS.md) put 29% of the GPU time
outside the GEMMs and the GLA chunk kernels. Three things here go after the parts of that time that are
bytes the math does not need:

  * Shared-input projections. The attention's input feeds five projections (q, k, v, the output gate g and
    the first low-rank gate projection) and the MLP's input feeds two (gate, up). Autograd computes one input
    gradient per projection and adds them up with separate elementwise kernels: four full-size adds per
    attention and one per MLP, every layer. `shared_linear` computes the input gradient as one chain of
    GEMMs accumulating into the same buffer (cuBLAS's beta = 1), so those adds disappear; the MLP's runs so.
    The attention's (`slab_linear`, the default `projections="slab"`) goes further: its five gradients are the
    column blocks of one [tokens, 3088] tensor (`GradSlab`), which the chunk kernels (dq, dk, dv) and our gated
    norm (dg) write straight into, so dx and the stacked dW are one GEMM each (1.025x the step on an H100).
  * The residual add fused into both pre-norms. FLA's GLA block fuses the MLP pre-norm with the residual
    add but not the attention pre-norm: each block ends with a plain `residual + mlp_out` and the next block
    normalizes it, and backward adds the two gradients of that sum in a kernel of its own. Here the blocks
    hand (mlp_out, residual) to the next block, whose attention pre-norm adds and normalizes in one kernel;
    the final norm takes the last pair the same way.
  * Our RMSNorm kernel (models/kernels/rmsnorm.py) for those norms: FLA's backward walks one row at a time
    at hidden size 1024 and runs at a fraction of the memory bandwidth.

`install(projections="cat")` runs the attention's five projections as one GEMM over the stacked weights instead
(`concat_linear`; fewer, wider GEMMs, paid for with copies; see its docstring for where it stands);
`install(projections="slab")` (the default) keeps the forward's five GEMMs (contiguous q, k, v for FLA's chunk
kernels) and makes the backward's two products one GEMM each over one gradient (`slab_linear`, `GradSlab`): our chunk
wrapper writes dq, dk and dv and our gated norm dg straight into its column blocks, anything else (FLA's gated norm,
FLA's chunk_gla, the gate's 16 columns) is copied in; "split" is the one-GEMM-each backward. Further switches,
each with the measured default (BENCHMARKS.md, "Passes the math does not need"): `gate` (GLA's low-rank gate as one
kernel each way, models/kernels/gate.py), `chunk` (GLA's chunked attention without FLA's output fill and dq/dk/dg
casts, models/kernels/gla.py) and `keep_z` (the SwiGLU product kept for backward); `mlp="gemm"` (SwiGLU in the
epilogues of the MLP's GEMMs, models/kernels/mlp_gemm.py) is off: timed on an H200 (2026-12-07), its Triton GEMMs lose
more to cuBLAS than the epilogue saves (0.985x in the trainer; BENCHMARKS.md). Under
activation checkpointing each fused block is checkpointed as FLA's would be, whichever way the installed transformers
implements it (`_block_forward`).

With `install(loss="ours")` the causal LM's head and loss, where labels are given, run as one function of
models/kernels/cross_entropy.py: the logits' gradient is written over them in the forward, one pass over the
[tokens, vocab] tensor less than FLA's fused cross entropy on paper, and such calls return no logits;
`install(gated_norm="ours")` (the default) runs GLA's output norm by models/kernels/gated_norm.py, and
`install(mlp="merged")` the MLP's gate and up projections as one GEMM. Timed on an H100 (BENCHMARKS.md, 2026-12-07),
none of the three changed the step beyond its noise on its own, so the defaults stay FLA's loss and the split MLP;
our gated norm is the default because it writes dg into the projections' slab (FLA's is copied there).

Nothing changes in the parameters or the state dict: checkpoints, exports and FSDP sharding see the same
model. The fused forward runs where it covers the call (training and plain evaluation: no cache, no
attention mask, no hidden-state outputs, no autocast); any other call runs FLA's forward unchanged. The
parts FLA already does well (most of GLA's chunk kernels) are FLA's own kernels (its functions
looked up at call time where a CPU runs them, so models/cpu_torch.py's CPU versions apply here too, which is how
the tests check this module on a machine without a GPU). SwiGLU + down projection are models/kernels/swiglu.py's
kernels and the gate after its first projection models/kernels/gate.py's by default (`install(swiglu="ours")`:
FLA's SwiGLU kernels divide per element and run well below memory bandwidth; on an H200 ours took the step's SwiGLU
time from 13.8 to 10.0 ms, BENCHMARKS.md), or FLA's swiglu_linear and torch's ops with swiglu="fla".
"""
from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NORMS = ("ours", "fla")
SWIGLUS = ("fla", "ours")
GATES = ("fused", "split")
CHUNKS = ("ours", "fla")
_FUSED_KWARG = "fused_residual"


# ---------------------------------------------------------------------------------------------------------
# Projections that share one input
# ---------------------------------------------------------------------------------------------------------

class SharedInputLinear(torch.autograd.Function):
    """y_i = x @ W_i^T for several bias-free weights W_i of one input x.

    Forward is one GEMM per weight (each output contiguous, as the consumers want it). Backward accumulates
    dx = sum_i dy_i @ W_i in one buffer through addmm (the GEMM adds into its output), instead of one GEMM
    output per projection plus an elementwise add per extra projection; dW_i = dy_i^T @ x as usual."""

    @staticmethod
    def forward(ctx, x, *weights):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x, *weights)
        return tuple(torch.mm(x2, w.t()).view(*x.shape[:-1], w.shape[0]) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx = None
        dweights = []
        for i, (dy, w) in enumerate(zip(grads, weights)):
            if dy is None:
                dweights.append(None)
                continue
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.needs_input_grad[0]:
                dx = torch.mm(dy2, w) if dx is None else dx.addmm_(dy2, w)
            dweights.append(torch.mm(dy2.t(), x2) if ctx.needs_input_grad[1 + i] else None)
        if dx is None and ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x2)
        return (dx.view_as(x) if dx is not None else None, *dweights)


def shared_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return SharedInputLinear.apply(x, *weights)


def concat_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The same projections as one GEMM over the stacked weights: y = x @ cat(W_i)^T, split into column slices
    (row-strided views; a consumer that wants them contiguous copies them). Backward (autograd): the slices'
    gradients are copied into one [M, sum N_i] buffer, then dx and dW are one GEMM each. Narrow projections
    (GLA's q and k are 512 wide, the low-rank gate 16) are GEMM shapes cuBLAS runs well below its peak, and dW of
    a 512-row weight over 32k tokens needs split-K; the stacked GEMM is 3088 wide.

    Measured on an H200 (BENCHMARKS.md, 2026-12-06): 4.8 ms less GEMM time per GLA 340M step, 2.5 ms more copies,
    and a 3.4 ms slower eager step, because the extra host work in the forward lets the GPU idle there. Under
    train.cuda_graphs (no host in the way) it was still 2% slower than graphs with split projections (H100). Not the
    default."""
    y = F.linear(x, torch.cat(weights, 0))
    return y.split([w.shape[0] for w in weights], -1)


class GradSlab:
    """The gradient of several projections of one input as ONE [M, N1 + N2 + ...] tensor, for `slab_linear`: the
    kernels that compute those gradients in backward write them into its column blocks (`block`), and the
    projections' backward reads it as one matrix. Allocated when its first block is asked for, released by `take`."""

    def __init__(self, widths: list[int], m: int, dtype: torch.dtype, device: torch.device):
        self.widths, self.m, self.dtype, self.device = list(widths), m, dtype, device
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self._buf = None
        self.copied = None  # the blocks SlabLinear's backward had to copy in (no kernel wrote them there), once it ran

    def _buffer(self) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(self.m, sum(self.widths), dtype=self.dtype, device=self.device)
        return self._buf

    def block(self, i: int, shape=None) -> torch.Tensor:
        """Column block i ([M, N_i], rows strided by sum N), viewed as `shape` where given."""
        b = self._buffer()[:, self.offsets[i]:self.offsets[i] + self.widths[i]]
        return b if shape is None else b.view(shape)

    def into(self, i: int, shape) -> functools.partial:
        """A callable for a backward: block i as `shape`."""
        return functools.partial(self.block, i, tuple(shape))

    def take(self) -> torch.Tensor:
        """The whole gradient (allocated now if no kernel wrote into it), forgotten here."""
        buf, self._buf = self._buffer(), None
        return buf


class SlabLinear(torch.autograd.Function):
    """y_i = x @ W_i^T as `SharedInputLinear` forward (one GEMM per weight, each output contiguous, as FLA's chunk
    kernels read q, k, v), but backward is one GEMM for dx over the stacked weights (`swiglu.stacked_weights`: a
    view where they are adjacent) and one for the stacked dW, both over the slab's [M, sum N_i] gradient. Each
    dy_i that a kernel already wrote into its block is used where it lies; any other is copied in."""

    @staticmethod
    def forward(ctx, x, slab, *weights):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x, *weights)
        ctx.slab = slab
        return tuple(torch.mm(x2, w.t()).view(*x.shape[:-1], w.shape[0]) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        from models.kernels import swiglu
        x, *weights = ctx.saved_tensors
        slab = ctx.slab
        x2 = x.reshape(-1, x.shape[-1])
        buf = slab.take()
        slab.copied = []
        for i, dy in enumerate(grads):
            block = buf[:, slab.offsets[i]:slab.offsets[i] + slab.widths[i]]
            if dy is None:
                block.zero_()
                continue
            dy2 = dy.reshape(block.shape)
            if dy2.data_ptr() != block.data_ptr() or dy2.stride() != block.stride():
                block.copy_(dy2)
                slab.copied.append(i)
        dx = torch.mm(buf, swiglu.stacked_weights(*weights)).view_as(x) if ctx.needs_input_grad[0] else None
        dweights = [None] * len(weights)
        if any(ctx.needs_input_grad[2:]):
            dw = torch.mm(buf.t(), x2).split(slab.widths, 0)  # row blocks of one [sum N, K]: contiguous views
            dweights = [d if need else None for d, need in zip(dw, ctx.needs_input_grad[2:])]
        return (dx, None, *dweights)


def slab_linear(x: torch.Tensor, weights: list[torch.Tensor], slab: GradSlab | None = None) -> tuple[torch.Tensor, ...]:
    """The projections of `SlabLinear`. slab: the GradSlab its backward reads (make one with `new_slab` to hand its
    blocks to the kernels that compute the outputs' gradients); None: one of its own, every gradient copied in."""
    slab = new_slab(x, weights) if slab is None else slab
    return SlabLinear.apply(x, slab, *weights)


def new_slab(x: torch.Tensor, weights: list[torch.Tensor]) -> GradSlab:
    return GradSlab([w.shape[0] for w in weights], x.numel() // x.shape[-1], x.dtype, x.device)


PROJECTIONS = {"split": shared_linear, "cat": concat_linear, "slab": slab_linear}
PROJECTION_NAMES = {"split": "shared-input", "cat": "stacked (one GEMM)",
                    "slab": "shared-input (backward one GEMM each for dx and dW over one gradient)"}
# install()'s defaults where its argument is None; bench/train_bench.py's case modifiers set them per process
# "slab": 1.025x "split" in the trainer on an H100 with our gated norm writing dg into it (BENCHMARKS.md, 2026-12-07)
DEFAULT_PROJECTIONS = "slab"
DEFAULT_GATE = "fused"
DEFAULT_CHUNK = "ours"
DEFAULT_KEEP_Z = True  # measured faster on an H100 (BENCHMARKS.md), +1 bf16 [tokens, intermediate] tensor a layer
MLPS = ("split", "gemm", "merged")
# "gemm" (models/kernels/mlp_gemm.py): 0.985x in the trainer on an H200; "merged": 1.001x median, 1.010x mean on an
# H100 (its GEMMs save ~1 ms a step alone), within the noise (BENCHMARKS.md)
DEFAULT_MLP = "split"
LOSSES = ("ours", "fla")
DEFAULT_LOSS = "fla"  # "ours" (models/kernels/cross_entropy.py): 0.997x median, 1.004x mean on an H100 (BENCHMARKS.md)
GATED_NORMS = ("fla", "ours")
# "ours" (models/kernels/gated_norm.py): 0.995x median, 1.004x mean on an H100 alone, but it writes dg straight into
# the projections' slab where FLA's is copied there: -slab-gnorm 1.018x, -slab 1.008x (FLA's dv kernel both)
DEFAULT_GATED_NORM = "ours"


# ---------------------------------------------------------------------------------------------------------
# RMSNorm with the residual add
# ---------------------------------------------------------------------------------------------------------

def _norm_fn(kind: str):
    """rms_norm(x, weight, eps, residual, prenorm) -> y, or (y, x + residual) with prenorm."""
    if kind == "ours":
        from models.kernels import rmsnorm

        def ours(x, weight, eps, residual, prenorm):
            return rmsnorm.rms_norm(x, weight, eps=eps, residual=residual, prenorm=prenorm)
        return ours

    def fla(x, weight, eps, residual, prenorm):
        from fla.modules.norm import layernorm  # looked up per call: models/cpu_torch.py patches it on a CPU
        return layernorm.rms_norm(x, weight, None, residual=residual, eps=eps, prenorm=prenorm)
    return fla


# ---------------------------------------------------------------------------------------------------------
# The fused forward passes
# ---------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------
# SwiGLU + down projection, and the gate's logsigmoid
# ---------------------------------------------------------------------------------------------------------

def _gated_norm_fn(kind: str):
    """gated_norm(module, o, g, dg_into=None): GLA's output norm, FLA's FusedRMSNormGated `module` itself ("fla"), or
    models/kernels/gated_norm.py with the module's weight and eps ("ours"; modules it does not cover run FLA's;
    dg_into: where its backward writes g's gradient, see rms_norm_gated)."""
    if kind not in GATED_NORMS:
        raise ValueError(f"gated_norm={kind!r}: use one of {GATED_NORMS}")
    if kind == "fla":
        return lambda module, o, g, dg_into=None: module(o, g)

    def ours(module, o, g, dg_into=None):
        from models.kernels import gated_norm
        if (getattr(module, "activation", None) not in ("swish", "silu") or getattr(module, "weight", None) is None
                or getattr(module, "bias", None) is not None):
            return module(o, g)
        return gated_norm.rms_norm_gated(o, g, module.weight, module.eps, dg_into=dg_into)
    return ours


def _elementwise_fns(kind: str, gate: str = "fused", keep_z: bool = False, mlp: str = "split") -> types.SimpleNamespace:
    """swiglu_linear(x, y, weight, bias) and low_rank_gate(a, weight, bias, normalizer) = logsigmoid(a @ weight^T + bias)
    / normalizer (GLA's gate after its first low-rank projection).

    "fla": FLA's swiglu_linear (looked up per call: models/cpu_torch.py patches it on a CPU) and torch's ops for the
    gate, as FLA's layer. "ours": models/kernels/swiglu.py's SwiGLU and, with gate="fused", models/kernels/gate.py's
    one-kernel gate; gate="split": the gate's product as a GEMM, then models/kernels/swiglu.py's logsigmoid kernel
    (the default until 2026-12-06). keep_z (ours): the SwiGLU product saved from the forward for the down
    projection's weight gradient instead of written again in backward. mlp (ours): "split", the gate and up
    projections as cuBLAS GEMMs then swiglu_linear; "gemm": the whole MLP through models/kernels/mlp_gemm.py (SwiGLU
    in the epilogues of the gate/up GEMM and of the down projection's input-gradient GEMM), as `mlp(x, wg, wu, wd, b)`;
    "merged": the gate and up projections as one cuBLAS GEMM over the stacked weights (a view where they are adjacent
    in memory, as in the bf16 path's flat buffer), SwiGLU on its column blocks, dx and d[Wg; Wu] one GEMM each
    (swiglu.gate_up_swiglu; the SwiGLU product is kept for backward whatever keep_z says).
    On a CPU without the interpreter each takes its PyTorch reference."""
    if gate not in GATES:
        raise ValueError(f"gate={gate!r}: use one of {GATES}")
    if mlp not in MLPS:
        raise ValueError(f"mlp={mlp!r}: use one of {MLPS}")
    if kind == "ours":
        from models.kernels import gate as gate_kernels
        from models.kernels import swiglu

        def split_gate(a, weight, bias, normalizer):
            return swiglu.log_sigmoid_scaled(F.linear(a, weight, bias), normalizer)

        def gemm_mlp(x, wg, wu, wd, bias):
            from models.kernels import mlp_gemm
            if swiglu._use_kernel(x):
                return mlp_gemm.mlp(x, wg, wu, wd, bias, keep_z=keep_z)
            return mlp_gemm.mlp_reference(x, wg, wu, wd, bias)

        def merged_mlp(x, wg, wu, wd, bias):
            return F.linear(swiglu.gate_up_swiglu(x, wg, wu), wd, bias)
        return types.SimpleNamespace(swiglu_linear=functools.partial(swiglu.swiglu_linear, keep_z=keep_z),
                                     low_rank_gate=gate_kernels.low_rank_gate if gate == "fused" else split_gate,
                                     mlp={"gemm": gemm_mlp, "merged": merged_mlp}.get(mlp))

    def fla_swiglu_linear(x, y, weight, bias):
        from fla.modules import mlp as fla_mlp
        return fla_mlp.swiglu_linear(x, y, weight, bias)

    def torch_gate(a, weight, bias, normalizer):
        return F.logsigmoid(F.linear(a, weight, bias)) / normalizer
    return types.SimpleNamespace(swiglu_linear=fla_swiglu_linear, low_rank_gate=torch_gate)


def _chunk_fn(kind: str):
    """chunk(q, k, v, g, cu_seqlens, grads_into=None) -> o: GLA's chunked attention. "ours": models/kernels/gla.py
    (FLA's kernels without the output's zero fill and the fp32 -> bf16 casts of dq, dk, dg; grads_into: where its
    backward puts dq, dk, dv, see gla.chunk_gla); "fla": FLA's chunk_gla (looked up per call: models/cpu_torch.py
    patches it on a CPU)."""
    if kind not in CHUNKS:
        raise ValueError(f"chunk={kind!r}: use one of {CHUNKS}")
    if kind == "ours":
        from models.kernels import gla

        def ours(q, k, v, g, cu_seqlens, grads_into=None):
            return gla.chunk_gla(q, k, v, g, cu_seqlens=cu_seqlens, grads_into=grads_into)
        return ours

    def fla(q, k, v, g, cu_seqlens, grads_into=None):
        from fla.layers import gla as fla_gla
        return fla_gla.chunk_gla(q=q, k=k, v=v, g=g, state_v_first=True, cu_seqlens=cu_seqlens)[0]
    return fla


_FLA_ELEMENTWISE = _elementwise_fns("fla")


def _attention(attn, x: torch.Tensor, cu_seqlens, fns: types.SimpleNamespace = _FLA_ELEMENTWISE,
               project=shared_linear, chunk=None, gated_norm=None) -> torch.Tensor:
    """GatedLinearAttention.forward for the configurations `unsupported_reason` lets through, without cache."""
    from fla.layers import gla as fla_gla  # chunk_gla looked up per call (CPU versions on a CPU)
    B, T, _ = x.shape
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.g_proj.weight,
               attn.gk_proj[0].weight]
    H, dk, dv = attn.num_heads, attn.head_k_dim, attn.head_v_dim
    grads_into = dg_into = None
    if project is slab_linear:  # the kernels after the projections write q's, k's, v's and g's gradients into it
        slab = new_slab(x, weights)
        q, k, v, g, gk = slab_linear(x, weights, slab)
        grads_into = (slab.into(0, (B, T, H, dk)), slab.into(1, (B, T, H, dk)), slab.into(2, (B, T, H, dv)))
        dg_into = slab.into(3, (B, T, H, dv))
    else:
        q, k, v, g, gk = project(x, weights)
    gate_out = attn.gk_proj[1]
    gk = fns.low_rank_gate(gk, gate_out.weight, gate_out.bias, attn.gate_logit_normalizer)
    q, k, gk = (t.view(B, T, H, dk) for t in (q, k, gk))
    v = v.view(B, T, H, dv)
    if attn.clamp_min is not None:
        gk = torch.clamp_min(gk, attn.clamp_min)
    if T <= 64:  # as FLA's layer: the recurrent form for short inputs
        o, _ = fla_gla.fused_recurrent_gla(q=q, k=k, v=v, gk=gk, state_v_first=True, cu_seqlens=cu_seqlens)
    else:
        o = (chunk or _chunk_fn("fla"))(q, k, v, gk, cu_seqlens, grads_into=grads_into)
    o = (gated_norm or _gated_norm_fn("fla"))(attn.g_norm_swish_gate, o, g.view(B, T, H, dv), dg_into=dg_into)
    return attn.o_proj(o.reshape(B, T, H * dv))


def _mlp(mlp, x: torch.Tensor, fns: types.SimpleNamespace = _FLA_ELEMENTWISE) -> torch.Tensor:
    if getattr(fns, "mlp", None) is not None:
        return fns.mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, mlp.down_proj.bias)
    gate, up = shared_linear(x, [mlp.gate_proj.weight, mlp.up_proj.weight])
    return fns.swiglu_linear(gate, up, mlp.down_proj.weight, mlp.down_proj.bias)


def _block_forward(self, hidden_states, *args, **kwargs):
    """A GLA block. Called with `fused_residual=` (by `_model_forward`): takes the previous block's
    (mlp_out, residual) pair, returns its own. Called any other way: FLA's forward."""
    if _FUSED_KWARG not in kwargs:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    residual = kwargs.pop(_FUSED_KWARG)
    if self.gradient_checkpointing and self.training and not _checkpoints_in_call():
        # this transformers checkpoints in the class's `forward`, which this instance's forward replaces
        return self._gradient_checkpointing_func(
            functools.partial(_fused_block, self, cu_seqlens=kwargs.get("cu_seqlens")), hidden_states, residual)
    return _fused_block(self, hidden_states, residual, kwargs.get("cu_seqlens"))


def _checkpoints_in_call() -> bool:
    """Where transformers' GradientCheckpointingLayer checkpoints: in `__call__` (older releases, around this
    instance's forward, so nothing to do here) or by wrapping each layer class's `forward` (5.2x, which the fused
    forward bypasses: `_block_forward` checkpoints itself then)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return "__call__" in vars(GradientCheckpointingLayer)


def _fused_block(self, hidden_states, residual, cu_seqlens=None):
    norm = self._fused_norm
    x, residual = norm(hidden_states, self.attn_norm.weight, self.attn_norm.eps, residual, True)
    o = _attention(self.attn, x, cu_seqlens, self._fused_elementwise, self._fused_project, self._fused_chunk,
                   self._fused_gated_norm)
    x, residual = norm(o, self.mlp_norm.weight, self.mlp_norm.eps, residual, True)
    return _mlp(self.mlp, x, self._fused_elementwise), residual


def _covers(model, kwargs: dict) -> bool:
    """Whether the fused forward covers this call of the base model (else FLA's forward runs)."""
    if kwargs.get("past_key_values") is not None or kwargs.get("attention_mask") is not None:
        return False
    if kwargs.get("use_cache") or kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return False
    if model.config.output_hidden_states or (kwargs.get("use_cache") is None and model.config.use_cache
                                             and not model.training):
        return False
    if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
        return False
    return set(kwargs) <= {"input_ids", "inputs_embeds", "cu_seqlens", "return_dict", "use_cache",
                           "past_key_values", "attention_mask", "output_hidden_states", "output_attentions"}


def _model_forward(self, input_ids=None, **kwargs):
    """GLAModel.forward: the fused blocks where `_covers` allows, FLA's forward otherwise."""
    kwargs["input_ids"] = input_ids
    if not _covers(self, kwargs):
        return type(self).forward(self, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPast
    inputs_embeds = kwargs.get("inputs_embeds")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
    layer_kwargs = {"cu_seqlens": kwargs["cu_seqlens"]} if kwargs.get("cu_seqlens") is not None else {}
    residual = None
    for layer in self.layers:
        hidden, residual = layer(hidden, fused_residual=residual, **layer_kwargs)
    hidden = self._fused_norm(hidden, self.norm.weight, self.norm.eps, residual, False)
    if kwargs.get("return_dict") is False or (kwargs.get("return_dict") is None and not self.config.return_dict):
        return (hidden,)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=None)


def _loss_covers(model, labels, kwargs: dict) -> bool:
    """Whether `_causal_lm_forward` computes this call's loss itself (else FLA's forward runs)."""
    config = model.config
    if labels is None or getattr(config, "fuse_linear_cross_entropy", False) or getattr(config, "use_l2warp", False):
        return False
    if kwargs.get("return_dict") is False or (kwargs.get("return_dict") is None and not config.return_dict):
        return False
    if kwargs.get("num_items_in_batch") is not None or kwargs.get("logits_to_keep"):
        return False
    return getattr(model, "lm_head", None) is not None and model.lm_head.bias is None and _covers(_base(model), kwargs)


def _causal_lm_forward(self, input_ids=None, labels=None, **kwargs):
    """GLAForCausalLM.forward: with labels, the LM head and the loss as one function of models/kernels/cross_entropy.py
    (the logits' gradient written in the forward, over the logits). Such a call returns the loss and no logits
    (`logits=None`, as FLA's fuse_linear_cross_entropy does): the logits never exist outside that function. Any
    other call (no labels: evaluation, generation) runs FLA's forward."""
    if not _loss_covers(self, labels, kwargs):
        return type(self).forward(self, input_ids=input_ids, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from models.kernels import cross_entropy
    hidden = self.model(input_ids=input_ids, **kwargs)[0]
    labels = labels.to(hidden.device)
    shifted = torch.cat((labels[..., 1:], torch.full_like(labels[..., :1], cross_entropy.IGNORE_INDEX)), -1)
    loss = cross_entropy.linear_cross_entropy(hidden, self.lm_head.weight, shifted)
    return CausalLMOutputWithPast(loss=loss, logits=None)


# ---------------------------------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------------------------------

def _base(model):
    return getattr(model, "model", model)


def unsupported_reason(model) -> str | None:
    """None if `install` covers this model's blocks, else what it does not cover (FLA's modules then run)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "gla":
        return f"model_type {model_type!r} (fused blocks exist for 'gla')"
    checks = [
        (getattr(config, "attn", None) is not None, "hybrid softmax-attention layers (attn)"),
        (getattr(config, "attnres_block_size", None) is not None, "attnres_block_size"),
        (not getattr(config, "fuse_norm", True), "fuse_norm = false"),
        (getattr(config, "hidden_act", "swish") != "swish", "hidden_act other than swish"),
        (not getattr(config, "fuse_swiglu", True), "fuse_swiglu = false"),
    ]
    for bad, what in checks:
        if bad:
            return f"GLA with {what}"
    base = _base(model)
    for block in getattr(base, "layers", []):
        attn = block.attn
        for bad, what in [
            (type(attn).__name__ != "GatedLinearAttention", f"attention {type(attn).__name__}"),
            (getattr(attn, "use_short_conv", False), "use_short_conv"),
            (getattr(attn, "feature_map_fn", None) is not None, "feature_map"),
            (getattr(attn, "num_kv_groups", 1) != 1, "num_kv_heads != num_heads"),
            (getattr(attn, "mode", "chunk") != "chunk", f"attn_mode {getattr(attn, 'mode', None)!r}"),
            (not getattr(attn, "use_output_gate", False) or not getattr(attn, "fuse_norm_and_gate", False),
             "no fused output gate (use_output_gate and fuse_norm)"),
            (any(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "g_proj")),
             "biased q/k/v/g projections"),
            (attn.gk_proj[0].bias is not None, "a biased gate projection"),
            (not isinstance(attn.gk_proj, torch.nn.Sequential) or len(attn.gk_proj) != 2
             or not all(isinstance(m, torch.nn.Linear) for m in attn.gk_proj), "a gate other than two linear layers"),
            (block.mlp.gate_proj.bias is not None or block.mlp.up_proj.bias is not None, "a biased MLP"),
            (getattr(block.attn_norm, "bias", None) is not None or getattr(block.mlp_norm, "bias", None) is not None,
             "biased block norms"),
        ]:
            if bad:
                return f"GLA with {what}"
    if not hasattr(base, "layers") or getattr(base.norm, "bias", None) is not None:
        return "GLA without the expected layers / final norm"
    return None


def install(model, norm: str = "ours", swiglu: str = "ours", projections: str | None = None, gate: str | None = None,
            chunk: str | None = None, keep_z: bool | None = None, mlp: str | None = None, loss: str | None = None,
            gated_norm: str | None = None) -> str:
    """Switch a built GLA model (plain, or wrapped by FSDP2 / activation checkpointing afterwards) to the
    fused forward. Returns a one-line description. Raises ValueError naming what is not covered.

    norm: whose RMSNorm kernel ("ours": models/kernels/rmsnorm.py, or "fla"). swiglu: whose SwiGLU + down
    projection and gate logsigmoid ("fla": FLA's swiglu_linear and torch's logsigmoid / normalizer, or "ours":
    models/kernels/swiglu.py, the default: measured faster in the training step on an H200). projections: the
    attention's five input projections as one GEMM each, their input gradient accumulated in one buffer ("split",
    `shared_linear`), as one GEMM over the stacked weights ("cat", `concat_linear`), or one GEMM each forward and
    one GEMM each for dx and the stacked dW backward over one [tokens, 3088] gradient that the chunk kernels and the
    gated norm write their input gradients into ("slab", `slab_linear`); None: DEFAULT_PROJECTIONS.
    gate (with swiglu="ours"): GLA's low-rank gate after its first projection as one kernel ("fused",
    models/kernels/gate.py) or a GEMM and a logsigmoid kernel ("split"); None: DEFAULT_GATE. chunk: GLA's chunked
    attention through models/kernels/gla.py ("ours") or FLA's chunk_gla ("fla"); None: DEFAULT_CHUNK. keep_z (with
    swiglu="ours"): the MLP's SwiGLU product kept from forward for backward (one [tokens, intermediate] bf16 tensor
    per layer held, one write of it less in backward); None: DEFAULT_KEEP_Z. mlp (with swiglu="ours"): "split" (the
    gate and up projections as cuBLAS GEMMs, then the SwiGLU kernels), "gemm" (SwiGLU in the GEMMs' epilogues,
    models/kernels/mlp_gemm.py) or "merged" (gate and up as one cuBLAS GEMM over the stacked weights,
    swiglu.gate_up_swiglu); None: DEFAULT_MLP. loss: a causal LM's head and loss, where labels are given, as
    models/kernels/cross_entropy.py's one function ("ours"; such calls return no logits) or FLA's ("fla"); None:
    DEFAULT_LOSS. gated_norm: GLA's gated output norm by FLA's module ("fla") or models/kernels/gated_norm.py ("ours");
    None: DEFAULT_GATED_NORM."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: use one of {NORMS}")
    if swiglu not in SWIGLUS:
        raise ValueError(f"swiglu={swiglu!r}: use one of {SWIGLUS}")
    projections = DEFAULT_PROJECTIONS if projections is None else projections
    if projections not in PROJECTIONS:
        raise ValueError(f"projections={projections!r}: use one of {tuple(PROJECTIONS)}")
    gate = DEFAULT_GATE if gate is None else gate
    chunk_kind = DEFAULT_CHUNK if chunk is None else chunk
    chunk = _chunk_fn(chunk_kind)
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"fused blocks do not cover {reason}")
    keep_z = DEFAULT_KEEP_Z if keep_z is None else bool(keep_z)
    mlp = DEFAULT_MLP if mlp is None else mlp
    if mlp != "split" and swiglu != "ours":
        raise ValueError(f'mlp="{mlp}" runs our SwiGLU kernels: use it with swiglu="ours"')
    loss = DEFAULT_LOSS if loss is None else loss
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: use one of {LOSSES}")
    fns = _elementwise_fns(swiglu, gate, keep_z, mlp)  # refuses a bad gate or mlp before the model is touched
    gated_norm_kind = DEFAULT_GATED_NORM if gated_norm is None else gated_norm
    gnorm = _gated_norm_fn(gated_norm_kind)
    fn = _norm_fn(norm)
    base = _base(model)
    base._fused_norm = fn
    base.forward = types.MethodType(_model_forward, base)
    for block in base.layers:
        block._fused_norm = fn
        block._fused_elementwise = fns
        block._fused_project = PROJECTIONS[projections]
        block._fused_chunk = chunk
        block._fused_gated_norm = gnorm
        block.forward = types.MethodType(_block_forward, block)
    head_loss = loss == "ours" and base is not model and getattr(model, "lm_head", None) is not None
    if head_loss:
        model.forward = types.MethodType(_causal_lm_forward, model)
    return (f"fused GLA blocks ({len(base.layers)} layers): "
            f"{PROJECTION_NAMES[projections]} projections, residual add fused into "
            f"both pre-norms, {'our' if norm == 'ours' else 'FLA'} RMSNorm kernel, "
            f"{('our SwiGLU kernels' + {'gemm': ' in the MLP GEMMs', 'merged': ' after one gate+up GEMM'}.get(mlp, '') + (' (product kept for backward)' if keep_z or mlp == 'merged' else '')) if swiglu == 'ours' else 'FLA SwiGLU'}, "
            f"{'torch ops for the gate' if swiglu != 'ours' else 'our one-kernel gate' if gate == 'fused' else 'a GEMM and our logsigmoid for the gate'}, "
            f"{'our' if chunk_kind == 'ours' else 'FLA'} chunk_gla wrapper, "
            f"{'our' if gated_norm_kind == 'ours' else 'FLA'} gated output norm"
            f"{', LM head + loss with the gradient written in forward' if head_loss else ''}")


def installed(model) -> bool:
    return "forward" in vars(_base(model))


def uninstall(model) -> None:
    base = _base(model)
    for m in [model, base, *getattr(base, "layers", [])]:
        vars(m).pop("forward", None)
        vars(m).pop("_fused_norm", None)
        vars(m).pop("_fused_elementwise", None)
        vars(m).pop("_fused_project", None)
        vars(m).pop("_fused_chunk", None)
        vars(m).pop("_fused_gated_norm", None)


def select(model, choice: str, device: torch.device) -> str:
    """The trainer's switch (model.gpu_kernels). Returns the path taken ("fused" or "fla"), with one log line."""
    if choice not in ("fused", "fla"):
        raise ValueError(f"model.gpu_kernels = {choice!r} must be 'fused' or 'fla'")
    if device.type != "cuda":
        return "fla"
    if choice == "fla":
        log.info("GPU kernels: FLA's modules as they are (model.gpu_kernels=fla)")
        return "fla"
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("GPU kernels: FLA's modules as they are: the fused blocks do not cover %s", reason)
        return "fla"
    log.info("GPU kernels: %s (model.gpu_kernels=fla runs FLA's modules unchanged)", install(model))
    return "fused"
