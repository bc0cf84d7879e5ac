"""models/cpu_torch.py: the pure-PyTorch GLA ops against FLA's own Triton kernels (run under the interpreter),
forward and gradients, op by op and for a whole tiny GLA model; the model.cpu_kernels switch."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton/fla are imported (see models/cpu_triton.py)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"triton-cache-{os.getuid()}"))

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models import build, cpu_torch  # noqa: E402
from tests.train_support import VOCAB, make_shards, run_trainer, tiny_model_json, write_toml  # noqa: E402
from trainer import config as run_config  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

RTOL = 1e-4  # max |ours - FLA| over max |FLA|, per tensor


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= RTOL * scale + 1e-7, f"{what}: max abs diff {err:.3g}, max |ref| {scale:.3g}"


def outputs_and_grads(fn, inputs, **kwargs):
    """Run fn on fresh leaf copies of inputs; backprop a fixed random projection of every output."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, **kwargs)
    out = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    gen = torch.Generator().manual_seed(123)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in out)
    loss.backward()
    return out, [x.grad for x in leaves if x is not None]


def compare(ours_fn, ref_fn, inputs, what, **kwargs):
    ours_out, ours_grads = outputs_and_grads(ours_fn, inputs, **kwargs)
    ref_out, ref_grads = outputs_and_grads(ref_fn, inputs, **kwargs)
    assert len(ours_out) == len(ref_out)
    for i, (a, b) in enumerate(zip(ours_out, ref_out)):
        assert a.dtype == b.dtype, (what, i, a.dtype, b.dtype)
        assert_close(a, b, f"{what} output {i}")
    for i, (a, b) in enumerate(zip(ours_grads, ref_grads)):
        assert_close(a, b, f"{what} grad of input {i}")


def gla_inputs(b, t, h, k, v, seed=0, state=None):
    g = torch.Generator().manual_seed(seed)
    q, key = torch.randn(b, t, h, k, generator=g), torch.randn(b, t, h, k, generator=g)
    val = torch.randn(b, t, h, v, generator=g)
    gate = F.logsigmoid(2 * torch.randn(b, t, h, k, generator=g)) / 16  # log decay per key dim, as GLA makes it
    h0 = None if state is None else torch.randn(*state, generator=g)
    return q, key, val, gate, h0


def fla_chunk_gla(q, k, v, g, h0=None, **kw):
    from fla.ops.gla import chunk_gla
    return chunk_gla(q, k, v, g, initial_state=h0, **kw)


def our_chunk_gla(q, k, v, g, h0=None, **kw):
    return cpu_torch.chunk_gla(q, k, v, g, initial_state=h0, **kw)


# T = 100: two chunks of 64 (the second padded); T = 40: one chunk; state_v_first as GLA calls it.
@pytest.mark.slow
@pytest.mark.parametrize("t,state_v_first,scale", [(100, True, None), (40, False, 0.3)])
def test_chunk_gla_matches_fla(t, state_v_first, scale):
    b, h, k, v = 2, 2, 8, 16
    state = (b, h, v, k) if state_v_first else (b, h, k, v)
    inputs = gla_inputs(b, t, h, k, v, state=state)
    compare(our_chunk_gla, fla_chunk_gla, inputs, f"chunk_gla T={t}", scale=scale,
            output_final_state=True, state_v_first=state_v_first)
    # training calls it without states
    compare(our_chunk_gla, fla_chunk_gla, inputs[:4] + (None,), f"chunk_gla T={t} no state",
            state_v_first=state_v_first)


@pytest.mark.slow
def test_fused_recurrent_gla_matches_fla():
    """GLA's path for sequences of <= 64 tokens (the trainer tests' seq_len 32)."""
    from fla.ops.gla import fused_recurrent_gla
    inputs = gla_inputs(2, 24, 2, 8, 16, seed=1, state=(2, 2, 16, 8))
    compare(lambda q, k, v, g, h0, **kw: cpu_torch.fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, **kw),
            lambda q, k, v, g, h0, **kw: fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, **kw),
            inputs, "fused_recurrent_gla", output_final_state=True, state_v_first=True)


@pytest.mark.slow
def test_varlen_chunk_gla_matches_fla():
    """Packed documents (data.varlen): no state crosses a document boundary, inside or across chunks."""
    cu = torch.tensor([0, 30, 31, 100, 150], dtype=torch.int32)
    q, k, v, g, _ = gla_inputs(1, 150, 2, 8, 16, seed=2)
    compare(our_chunk_gla, fla_chunk_gla, (q, k, v, g), "varlen chunk_gla", cu_seqlens=cu.long())
    # with per-document initial and final states (inference), int32 offsets as the trainer passes them
    h0 = torch.randn(4, 2, 8, 16, generator=torch.Generator().manual_seed(3))
    compare(our_chunk_gla, fla_chunk_gla, (q, k, v, g, h0), "varlen chunk_gla with states",
            cu_seqlens=cu, output_final_state=True)


@pytest.mark.parametrize("residual,prenorm,residual_in_fp32", [(True, True, False), (False, False, False),
                                                               (False, True, True)])
def test_rms_norm_matches_fla(residual, prenorm, residual_in_fp32):
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 7, 48, generator=gen), 1 + 0.1 * torch.randn(48, generator=gen)
    r = torch.randn(2, 7, 48, generator=gen) if residual else None
    ref = cpu_torch.original("fla.modules.norm.layernorm", "rms_norm")
    compare(lambda x, w, r: cpu_torch.rms_norm(x, w, None, r, eps=1e-6, prenorm=prenorm,
                                               residual_in_fp32=residual_in_fp32),
            lambda x, w, r: ref(x, w, None, r, eps=1e-6, prenorm=prenorm, residual_in_fp32=residual_in_fp32),
            (x, w, r), f"rms_norm residual={residual} prenorm={prenorm}")


@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_rms_norm_gated_matches_fla(activation):
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(2, 9, 2, 16, generator=gen), torch.randn(2, 9, 2, 16, generator=gen)
    w = 1 + 0.1 * torch.randn(16, generator=gen)
    ref = cpu_torch.original("fla.modules.norm.fused_norm_gate", "rms_norm_gated")
    compare(lambda x, g, w: cpu_torch.rms_norm_gated(x, g, w, None, activation, eps=1e-5),
            lambda x, g, w: ref(x, g, w, None, activation, eps=1e-5), (x, g, w), f"rms_norm_gated {activation}")


def test_swiglu_and_swiglu_linear_match_fla():
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    w, b = torch.randn(12, 32, generator=gen), torch.randn(12, generator=gen)
    compare(cpu_torch.swiglu, cpu_torch.original("fla.modules.mlp", "swiglu"), (x, y), "swiglu")
    compare(cpu_torch.swiglu_linear, cpu_torch.original("fla.modules.mlp", "swiglu_linear"), (x, y, w, b),
            "swiglu_linear")
    compare(lambda x, y, w: cpu_torch.swiglu_linear(x, y, w, None),
            lambda x, y, w: cpu_torch.original("fla.modules.mlp", "swiglu_linear")(x, y, w, None), (x, y, w),
            "swiglu_linear without bias")


@pytest.fixture
def torch_ops():
    """Install the PyTorch ops for one test and always put FLA's back (other tests share the process)."""
    cpu_torch.install()
    try:
        yield
    finally:
        cpu_torch.uninstall()


def interpreter_launches():
    """Count Triton kernel launches under the interpreter (a dict updated while the patch is active)."""
    import triton.runtime.interpreter as interpreter
    counts = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        counts[self.fn.__name__] = counts.get(self.fn.__name__, 0) + 1
        return original(self, *args, **kwargs)
    return counts, original, run


def tiny_gla(**extra):
    cfg = {"model_type": "gla", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "expand_k": 0.5,
           "vocab_size": VOCAB, "fuse_cross_entropy": True, "tie_word_embeddings": False, **extra}
    config = build.load_config(cfg)
    build.adapt_to_device(config, torch.device("cpu"))  # as the trainer does: fuse_cross_entropy off
    return build.build_model(config, "cpu", seed=0)


def loss_and_grads(model, x, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# T = 80 takes GLA's chunk path, T = 24 its fused_recurrent path; fuse_swiglu off uses swiglu, on swiglu_linear.
@pytest.mark.slow
@pytest.mark.parametrize("t,extra", [(80, {}), (24, {"fuse_swiglu": False, "num_kv_heads": 1})])
def test_tiny_gla_model_loss_and_grads_match_the_interpreter(t, extra, monkeypatch):
    import triton.runtime.interpreter as interpreter
    model = tiny_gla(**extra)
    assert cpu_torch.unsupported_reason(model.config) is None
    x = torch.randint(1, VOCAB, (2, t), generator=torch.Generator().manual_seed(7))
    ref_loss, ref_grads = loss_and_grads(model, x)  # FLA's kernels, interpreted

    counts, _, counting_run = interpreter_launches()
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counting_run)
    cpu_torch.install()
    try:
        loss, grads = loss_and_grads(model, x)
    finally:
        cpu_torch.uninstall()
    assert counts == {}, f"Triton kernels still ran under the interpreter: {counts}"
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        assert_close(grads[name], ref_grads[name], name)

    # and the patch is gone again: FLA's kernels run
    counts.clear()
    loss_and_grads(model, x[:, :8])
    assert counts, "uninstall() left the PyTorch ops in place"


@pytest.mark.slow
def test_tiny_gla_varlen_and_eval_match_the_interpreter(torch_ops):
    """cu_seqlens (data.varlen) through the whole model, and eval mode (use_cache: final states are returned)."""
    model = tiny_gla()
    x = torch.randint(1, VOCAB, (1, 96), generator=torch.Generator().manual_seed(8))
    cu = torch.tensor([0, 40, 41, 96], dtype=torch.int32)
    loss, grads = loss_and_grads(model, x, cu_seqlens=cu)
    cpu_torch.uninstall()
    ref_loss, ref_grads = loss_and_grads(model, x, cu_seqlens=cu)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name in grads:
        assert_close(grads[name], ref_grads[name], name)
    model.eval()
    with torch.no_grad():
        ref_logits = model(input_ids=x[:, :70]).logits
        cpu_torch.install()
        logits = model(input_ids=x[:, :70]).logits
    assert_close(logits, ref_logits, "eval logits")


@pytest.mark.slow
def test_generation_with_the_recurrent_cache_matches_the_interpreter(torch_ops):
    """Decoding: the cached recurrent state goes back in as initial_state, one token at a time."""
    model = tiny_gla().eval()
    x = torch.randint(1, VOCAB, (1, 70), generator=torch.Generator().manual_seed(9))
    ours = model.generate(x, max_new_tokens=6, do_sample=False)
    cpu_torch.uninstall()
    assert torch.equal(ours, model.generate(x, max_new_tokens=6, do_sample=False))


def test_install_uninstall_and_originals():
    import fla.layers.gla as gla_layer
    import fla.ops.gla as gla_ops
    cpu_torch.install()
    try:
        assert cpu_torch.installed()
        assert gla_layer.chunk_gla is cpu_torch.chunk_gla
        assert gla_ops.chunk_gla is not cpu_torch.chunk_gla  # FLA's own function stays reachable
        cpu_torch.install()  # idempotent
        assert cpu_torch.original("fla.layers.gla", "chunk_gla") is gla_ops.chunk_gla
    finally:
        cpu_torch.uninstall()
    assert not cpu_torch.installed() and gla_layer.chunk_gla is gla_ops.chunk_gla


def test_select_falls_back_for_uncovered_models(caplog):
    gla = build.load_config({"model_type": "gla", "hidden_size": 32, "num_heads": 1, "vocab_size": VOCAB})
    build.adapt_to_device(gla, torch.device("cpu"))
    others = [build.load_config({"model_type": "transformer", "hidden_size": 32, "num_heads": 2,
                                 "vocab_size": VOCAB}),
              build.load_config({"model_type": "gla", "hidden_size": 32, "num_heads": 1, "vocab_size": VOCAB,
                                 "use_short_conv": True, "fuse_cross_entropy": False})]
    try:
        with caplog.at_level(logging.INFO, logger="models.cpu_torch"):
            assert cpu_torch.select(gla, "torch") == "torch" and cpu_torch.installed()
            assert cpu_torch.select(gla, "triton") == "triton" and not cpu_torch.installed()
            assert cpu_torch.select(others[0], "torch") == "triton" and not cpu_torch.installed()
            assert cpu_torch.select(others[1], "torch") == "triton" and not cpu_torch.installed()
        lines = [r.message for r in caplog.records]
        assert len(lines) == 4 and all(m.startswith("CPU kernels: ") for m in lines)
        assert lines[0].startswith("CPU kernels: torch") and lines[1].startswith("CPU kernels: triton")
        assert "model_type 'transformer'" in lines[2] and "falls back to the interpreter" in lines[2]
        assert "use_short_conv" in lines[3]
        with pytest.raises(ValueError, match="model.cpu_kernels"):
            cpu_torch.select(gla, "cuda")
    finally:
        cpu_torch.uninstall()


def test_cpu_kernels_config_key(tmp_path):
    assert run_config.load(None).model.cpu_kernels == "torch"
    assert run_config.load(None, ["model.cpu_kernels=triton"]).model.cpu_kernels == "triton"
    with pytest.raises(run_config.ConfigError, match=r"command line: model.cpu_kernels = 'interpreter' must be one of"):
        run_config.load(None, ["model.cpu_kernels=interpreter"])
    p = tmp_path / "run.toml"
    p.write_text('[model]\ncpu_kernels = "gpu"\n')
    with pytest.raises(run_config.ConfigError, match=f"{p}: model.cpu_kernels = 'gpu' must be one of"):
        run_config.load(str(p))
    p.write_text('[model]\ncpu_kernel = "torch"\n')
    with pytest.raises(run_config.ConfigError, match="unknown key 'model.cpu_kernel'"):
        run_config.load(str(p))
    p.write_text('[model]\ncpu_kernels = 1\n')
    with pytest.raises(run_config.ConfigError, match="model.cpu_kernels"):
        run_config.load(str(p))


@pytest.mark.slow
def test_trainer_uses_the_torch_ops_by_default_and_matches_the_interpreter(tmp_path):
    """The switch end to end: one log line each way, the same per-step losses both ways (sequences of 96 tokens:
    GLA's chunk path), and a model the PyTorch ops do not cover falls back to the interpreter and trains."""
    shards = make_shards(str(tmp_path / "shards"), sequences=16, seq_len=96)

    def run(name, model_json, steps, **model):
        cfg = write_toml(str(tmp_path / f"{name}.toml"), {
            "model": {"config": model_json, **model}, "data": {"shards": shards, "global_batch": 2},
            "train": {"max_steps": steps}, "optim": {"lr": 1e-2, "warmup": 1},
            "checkpoint": {"every": 0, "at_end": False},
            "run": {"out_dir": str(tmp_path / name), "progress": False, "tensorboard": False}})
        p = run_trainer(str(tmp_path), cfg)
        return p.stderr, [r["loss"] for r in read_metrics(str(tmp_path / name))]

    gla = tiny_model_json(str(tmp_path / "gla.json"))
    err, fast = run("torch", gla, 3)
    assert err.count("CPU kernels: ") == 1 and err.count("CPU kernels: torch") == 1
    err, interpreted = run("triton", gla, 3, cpu_kernels="triton")
    assert err.count("CPU kernels: ") == 1 and err.count("CPU kernels: triton") == 1
    assert len(fast) == len(interpreted) == 3
    for a, b in zip(fast, interpreted):
        assert abs(a - b) <= 1e-4 * abs(b), (fast, interpreted)

    err, losses = run("transformer", tiny_model_json(str(tmp_path / "tf.json"), "transformer"), 1)
    assert err.count("CPU kernels: ") == 1
    assert "CPU kernels: triton" in err and "model_type 'transformer'" in err and "falls back to the interpreter" in err
    assert len(losses) == 1 and losses[0] == losses[0]
