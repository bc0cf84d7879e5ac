"""Run FLA's Triton kernels on a machine without a GPU: the Triton interpreter plus a two-part patch.

Measured facts (triton 3.9, FLA's kernels on a machine without a GPU): with TRITON_INTERPRET=1 alone, Triton's autotuner
still benchmarks through the GPU driver and FLA kernels call `.to()` on `for` loop variables, which
the interpreter gives as plain ints. The patch keeps the first autotune config and wraps loop
variables. It touches triton internals, so it is applied only for the triton versions it was checked on.

`enable()` must run BEFORE triton or fla is imported (the interpreter flag is read at import time).
"""
from __future__ import annotations

import ast
import os
import sys
import warnings

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
    _enabled = True
