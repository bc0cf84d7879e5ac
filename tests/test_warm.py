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
