"""models/kernels/compile_check.py: every Triton kernel of the GLA training step (ours and FLA's, with each of our
kernel switches) compiles for sm_90 (H100/H200) and sm_80 (A100) on this machine, ptxas included, with shared memory
within the card's limit, and our kernels store 16-byte vectors, not 16-bit scalars.

The interpreter the other kernel tests use does not type-check kernels the way the compiler does; this does, without
a GPU. It runs in a subprocess: the check replaces Triton's driver, and this pytest process runs the interpreter."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ["_rms_fwd_kernel", "_rms_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_logsig_fwd_kernel",
        "_logsig_bwd_kernel", "_gate_fwd_kernel", "_gate_bwd_kernel", "_gla_bwd_intra_kernel", "_gla_bwd_inter_kernel", "_gla_bwd_dv_kernel",
        "_gla_fwd_intra_kernel", "_cross_entropy_kernel", "_gated_rmsnorm_fwd_kernel", "_gated_rmsnorm_bwd_kernel"]
HOPPER_ONLY = ["_gemm_gate_up_swiglu_kernel", "_gemm_down_grad_swiglu_kernel"]  # mlp="gemm", checked with TMA only


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_of_the_step_compiles(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=ROOT, TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-m", "models.kernels.compile_check", "--arch", str(arch)]
                          + (["--sass"] if arch == 90 else []), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = [line.split() for line in done.stdout.splitlines() if " B shared " in line]
    compiled = {row[0] for row in rows}
    expected = set(OURS) | (set(HOPPER_ONLY) if arch == 90 else set())
    assert expected <= compiled, sorted(expected - compiled)
    # our kernels store 16-byte vectors: a 16-bit store at a time (a row stride Triton was told not to specialize,
    # as the inter and dv kernels' once were) is 8x the store instructions; the loss kernel's one is a row's loss
    scalar = {row[0]: int(row[6]) for row in rows if row[0] in expected and row[0] != "_cross_entropy_kernel"}
    assert not any(scalar.values()), {k: v for k, v in scalar.items() if v}
    assert f"for sm_{arch}; 0 errors" in done.stdout
    assert "chunk_fwd_kernel_h" in compiled  # FLA's kernels in the step compile too
    if arch == 90:  # --sass: registers and SASS instructions of each kernel's first compilation
        sass = {row[0]: (int(row[10]), int(row[12])) for row in rows if "SASS" in row}
        assert set(OURS) <= set(sass), sorted(set(OURS) - set(sass))
        assert all(0 < regs <= 255 and n > 50 for regs, n in sass.values()), sass
