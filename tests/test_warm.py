"""models.warm: the split of autotune candidates over processes, and its CPU refusal."""
from hypothesis import given
from hypothesis import strategies as st

from models.warm import config_share, main


@given(st.integers(1, 40), st.integers(1, 40))
def test_every_config_compiled_once_and_no_process_idle(n_configs, count):
    configs = [f"cfg{i}" for i in range(n_configs)]
    shares = [config_share(configs, i, count) for i in range(count)]
    assert all(len(s) >= 1 for s in shares)  # each process runs the kernel, so its step goes on
    taken = [c for s in shares for c in s]
    assert set(taken) == set(configs)
    if count <= n_configs:  # enough configs: each compiled by exactly one process
        assert sorted(taken) == sorted(configs)
    else:  # more processes than configs: one config each
        assert all(len(s) == 1 for s in shares)


def test_no_gpu_is_a_clear_refusal(capsys):
    assert main(["--model", "configs/gla_340M.json", "--seq-len", "64", "--batch", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_share_that_cannot_run_falls_back_to_all_configs():
    """With the real Triton autotuner (under the interpreter): process 2 of 4 owns only BLOCK=64, which
    'does not fit' (its pre-hook raises OutOfResources, as compiling it would on a GPU). The kernel still
    runs, tuned over all configs, and the patch comes off again."""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from models import cpu_triton
    cpu_triton.enable()
    import torch
    import triton
    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    from triton.runtime.errors import OutOfResources

    from models.warm import restrict_autotuners

    def too_big(nargs):
        raise OutOfResources(300000, 232448, "shared memory")

    configs = [triton.Config({"BLOCK": b}, pre_hook=too_big if b == 64 else None) for b in (16, 32, 64, 128)]

    def time_once(kernel_call, quantiles):  # no GPU timer here: run once, equal timings
        kernel_call()
        return [1.0, 1.0, 1.0]

    @triton.autotune(configs=configs, key=["n"], do_bench=time_once)
    @triton.jit
    def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    before, cpu_prune = autotuner.Autotuner.run, autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: self.configs  # not cpu_triton's first-only
    restore = restrict_autotuners(2, 4)
    try:
        assert [c.kwargs["BLOCK"] for c in add_one.prune_configs({})] == [64]
        x, y = torch.zeros(100), torch.zeros(100)
        add_one[lambda m: (triton.cdiv(100, m["BLOCK"]),)](x, y, 100)
        assert y.eq(1).all()
        assert add_one.best_config.kwargs["BLOCK"] != 64
        assert len(add_one.prune_configs({})) == 4  # this kernel is now tuned over all its configs
    finally:
        restore()
        assert autotuner.Autotuner.run is before
        autotuner.Autotuner.prune_configs = cpu_prune


def test_kernels_option_is_checked_before_anything_runs(capsys):
    assert main(["--model", "configs/gla_340M.json", "--seq-len", "64", "--batch", "1", "--kernels", "fused,triton"]) == 2
    assert "--kernels 'fused,triton': use fused or fla" in capsys.readouterr().err
    assert main(["--model", "configs/gla_340M.json", "--seq-len", "64", "--batch", "1", "--precision", "bf16,"]) == 2
    assert "--precision 'bf16,'" in capsys.readouterr().err


def test_install_kernels_fla_keeps_the_model_and_fused_needs_models_fused():
    """fla leaves FLA's modules in place; fused goes through models.fused.install, and where this checkout has
    no models/fused.py the refusal names the way out."""
    import importlib.util

    import pytest

    from models import build
    from models.warm import install_kernels
    model = build.build_model(build.load_config("configs/gla_340M.json"), "meta")
    before = [type(m) for m in model.modules()]
    assert install_kernels(model, "fla") == "FLA modules"
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match="use fused or fla"):
        install_kernels(model, "triton")
    if importlib.util.find_spec("models.fused") is None:
        with pytest.raises(SystemExit, match="models/fused.py is not in this checkout; use fla"):
            install_kernels(model, "fused")


def test_the_process_count_fits_the_gpu_memory():
    """16 processes at GLA 340M batch 16 x 2048 ran an 80 GB H100 out of memory (2026-12-05); an H200 held them."""
    from models.warm import processes_for_memory
    gib = 1 << 30
    assert processes_for_memory([79 * gib], 16, 2048, 1024) == 8
    assert processes_for_memory([139 * gib], 16, 2048, 1024) == 15
    assert processes_for_memory([79 * gib, 79 * gib], 16, 2048, 1024) == 16
    assert processes_for_memory([79 * gib], 32, 2048, 2048) == 2  # 4x the elements: ~35 GiB a process
    assert processes_for_memory([1 * gib], 16, 2048, 1024) == 1  # at least one a GPU, as before
    assert processes_for_memory([79 * gib], 1, 128, 64) == 71  # tiny shapes: 1 GiB floor
