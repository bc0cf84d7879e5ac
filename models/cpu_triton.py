"""Run FLA's Triton kernels on a machine without a GPU: the Triton interpreter plus a three-part patch.

Measured facts (triton 3.9, FLA's kernels on a machine without a GPU): with TRITON_INTERPRET=1 alone, Triton's autotuner
still benchmarks through the GPU driver and FLA kernels call `.to()` on `for` loop variables, which
the interpreter gives as plain ints; and it computes on the uint16 bits of bf16 values. The patch keeps the first
autotune config, wraps loop variables, and computes bf16 values as a GPU does (`_patch_bfloat16`). It touches triton
internals, so it is applied only for the triton versions it was checked on.

`enable()` must run BEFORE triton or fla is imported (the interpreter flag is read at import time).
"""
from __future__ import annotations

import ast
import os
import sys
import warnings

import numpy as np

CHECKED_TRITON = ("3.9.",)
_enabled = False


def enable() -> None:
    """Switch Triton to its interpreter and patch it for FLA. Idempotent."""
    global _enabled
    if _enabled:
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError("models.cpu_triton.enable() ran after triton was imported; call it first "
                               "(or set TRITON_INTERPRET=1 in the environment)")
        os.environ["TRITON_INTERPRET"] = "1"
    # FLA warns at import that Triton "is not supported on current platform" when there is no GPU: on this path
    # that is the choice made here, not news, and it printed on every CPU run
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    import triton
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    if not triton.__version__.startswith(CHECKED_TRITON):
        raise RuntimeError(f"models/cpu_triton.py patches triton internals checked on triton {CHECKED_TRITON}, "
                           f"found {triton.__version__}: install the pinned triton (requirements.txt) or re-check the patch")

    # 1) No GPU benchmarking while interpreting: keep the first autotune config.
    original_prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: original_prune(self, kwargs)[:1]

    # 2) Loop variables become interpreter tensors so that FLA's `i.to(...)` works.
    def visit_for(self, node):
        node = self.generic_visit(node)
        if isinstance(node.target, ast.Name):
            name = node.target.id
            wrap = ast.Assign(
                targets=[ast.Name(id=name, ctx=ast.Store())],
                value=ast.Call(func=ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                                  attr="to_tensor", ctx=ast.Load()),
                               args=[ast.Name(id=name, ctx=ast.Load()), ast.Constant(value=False)], keywords=[]))
            node.body.insert(0, ast.fix_missing_locations(ast.copy_location(wrap, node)))
        return node

    interpreter.ASTTransformer.visit_For = visit_for
    _patch_bfloat16(interpreter)
    _enabled = True


def _widen(bits):
    """bfloat16 values held as their uint16 bits -> float32, exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _narrow(values):
    """float32 (or wider) -> bfloat16 bits, rounded to nearest even as the GPU's conversion; NaN stays NaN."""
    x = np.asarray(values, dtype=np.float32)
    bits = x.view(np.uint32)
    out = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


def _patch_bfloat16(interpreter) -> None:
    """3) bfloat16 under the interpreter. triton 3.9's interpreter keeps bf16 values as their uint16 bits and computes
    on the bits: tl.dot multiplies them as integers (a bf16 product came out ~1e13 too large), +, *, tl.sum, ... of bf16
    operands act on the integers, and an fp32 -> bf16 cast truncates where the GPU rounds to nearest
    even. Here bf16 operands of tl.dot are widened to fp32 exactly (the tensor cores' bf16 x bf16 -> fp32 products);
    float arithmetic, comparisons and negation whose operands are all bf16 run in fp32 and round back to bf16
    (the GPU computes them in fp32 too); a bf16 tl.sum adds pairs in a tree, each sum rounded to bf16; casts to bf16
    round to nearest even. Loads, stores and bit casts keep the bits.
    """
    import triton.language as tl
    handle = interpreter.TensorHandle
    builder = interpreter.InterpreterBuilder

    def is_bf16(h) -> bool:
        return getattr(h.dtype, "scalar", None) == tl.bfloat16 and h.data.dtype == np.uint16

    def wide(h):
        return handle(_widen(h.data), tl.float32) if is_bf16(h) else h

    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, wide(a), wide(b), d, input_precision, max_num_imprecise_acc)

    float_ops = {np.add, np.subtract, np.multiply, np.divide, np.fmod, np.minimum, np.maximum, np.fmin, np.fmax,
                 np.less, np.greater, np.less_equal, np.greater_equal, np.equal, np.not_equal}
    original_binary = builder.binary_op

    def binary_op(self, lhs, rhs, op):
        if op in float_ops and is_bf16(lhs) and is_bf16(rhs):
            out = op(_widen(lhs.data), _widen(rhs.data))
            return handle(out if out.dtype == np.bool_ else _narrow(out), lhs.dtype.scalar)
        return original_binary(self, lhs, rhs, op)

    original_unary = builder.unary_op

    def unary_op(self, arg, op):
        if is_bf16(arg):
            return handle(_narrow(op(_widen(arg.data))), arg.dtype.scalar)
        return original_unary(self, arg, op)

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.bfloat16 and src_ty != tl.bfloat16:  # from a float or an integer: rounded to nearest even
            return handle(_narrow(src.data.astype(np.float64 if src_ty.is_fp64() else np.float32)), tl.bfloat16)
        if src_ty == tl.bfloat16 and dst_ty != tl.bfloat16 and src.data.dtype == np.uint16:
            return handle(_widen(src.data).astype(interpreter._get_np_dtype(dst_ty)), dst_ty)
        return original_cast(self, src, dst_type)

    reduce_ops = interpreter.ReduceOps
    original_sum = reduce_ops.sum

    def reduce_sum(self, input):
        """tl.sum of bf16 values stays bf16 in Triton's typing (FLA's inter kernel sums h * dh so): a GPU adds pairs
        and rounds each sum to bf16, in a tree. Here a pairwise tree along the axis, each level rounded to bf16."""
        if not is_bf16(input.handle):
            return original_sum(self, input)
        data = _widen(input.handle.data)
        shape = data.shape
        data = data.reshape(-1) if self.axis is None else np.moveaxis(data, self.axis, -1)
        n = data.shape[-1]
        width = 1 << max(0, (n - 1).bit_length())
        data = np.concatenate([data, np.zeros(data.shape[:-1] + (width - n,), np.float32)], axis=-1)
        while data.shape[-1] > 1:
            data = _widen(_narrow(data[..., 0::2] + data[..., 1::2]))
        out = data[..., 0]
        if self.keep_dims:
            out = out.reshape([1] * len(shape)) if self.axis is None else np.expand_dims(out, self.axis)
        return self.to_tensor(_narrow(out), input.dtype)

    builder.create_dot = create_dot
    builder.binary_op = binary_op
    builder.unary_op = unary_op
    builder.cast_impl = cast_impl
    # the lambdas bound at class creation (create_fp_trunc = lambda ...: self.cast_impl(...)) look cast_impl up on
    # self, so they take the patched one. tl.max and tl.min need nothing (Triton's frontend widens bf16 to fp32 for
    # them), nor tl.exp, tl.sqrt, ... (it refuses bf16 there, as on a GPU); tl.sum keeps bf16 and is patched.
    reduce_ops.sum = reduce_sum
