"""Small pieces of the loop: schedules, weight-decay groups, micro-batch splitting, NaN step skipping."""
import math
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"triton-cache-{os.getuid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from trainer.config import OptimConfig  # noqa: E402
from trainer.loop import micro_batch_size, micro_batches, train_step  # noqa: E402
from trainer.optim import build_optimizer, param_groups  # noqa: E402
from trainer.parallel import Dist  # noqa: E402
from trainer.precision import MasterWeights, Precision  # noqa: E402

FP32 = Precision("fp32", torch.device("cpu"))
from trainer.schedule import lr_at  # noqa: E402


def test_cosine_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, max_steps=110, schedule="cosine")
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_and_linear_schedules():
    kw = dict(lr=1.0, min_lr=0.0, warmup=10, max_steps=100)
    assert lr_at(50, schedule="wsd", decay_steps=20, **kw) == 1.0 and lr_at(79, schedule="wsd", decay_steps=20, **kw) == 1.0
    assert lr_at(90, schedule="wsd", decay_steps=20, **kw) == pytest.approx(0.5)
    assert lr_at(100, schedule="wsd", decay_steps=20, **kw) == pytest.approx(0.0)
    assert lr_at(55, schedule="linear", **kw) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cosine, wsd or linear"):
        lr_at(50, schedule="step", **kw)


def tiny_gla(**extra):
    from models import build
    cfg = {"model_type": "gla", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 1, "vocab_size": 64,
           "fuse_cross_entropy": False, "expand_k": 0.5, "tie_word_embeddings": False}
    cfg.update(extra)
    return build.build_model(build.load_config(cfg), "cpu", seed=0)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny_gla()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embeddings.weight" in kept and "lm_head.weight" in decayed
    assert all("norm" not in n and not n.endswith(".bias") for n in decayed)
    assert any("norm" in n for n in kept) and any(n.endswith(".bias") for n in kept)
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    tied = tiny_gla(tie_word_embeddings=True)  # a head tied to the embedding is the embedding: no decay
    assert not any(p is tied.lm_head.weight for p in param_groups(tied, 0.1)[0]["params"])


def test_micro_batches_split_rows_and_documents():
    ids = torch.arange(4 * 8).reshape(4, 8)
    cu = torch.tensor([0, 3, 8, 12, 16, 24, 27, 32], dtype=torch.int32)
    plain = list(micro_batches(ids, None, 2))
    assert len(plain) == 2 and plain[1][0].equal(ids[2:]) and plain[1][1].equal(ids[2:])
    parts = list(micro_batches(ids, cu, 2))
    assert parts[0][0].shape == (1, 16) and parts[0][2].tolist() == [0, 3, 8, 12, 16]
    assert parts[1][0].equal(ids[2:].reshape(1, -1)) and parts[1][2].tolist() == [0, 8, 11, 16]
    # Varlen labels: a row's last token does not predict the next row's first (unrelated text): the
    # model shifts labels left, so each row's first label is ignored; L-1 targets per row remain.
    labels = parts[1][1].view(2, 8)
    assert labels[:, 0].tolist() == [-100, -100] and labels[:, 1:].equal(ids[2:, 1:])


def test_varlen_validation_sees_each_document_alone():
    import numpy as np

    from trainer.data.loader import cu_seqlens
    from trainer.evaluate import validation_loss
    model = tiny_gla()
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 64, (3, 16), generator=g)
    rows[0, 5] = rows[1, 9] = rows[1, 12] = rows[2, 15] = 0  # EOS (id 0) ends documents mid-row
    bounds = lambda t: cu_seqlens(t, eos_id=0, bos_id=None)  # noqa: E731
    import contextlib
    got = validation_loss(model, rows, 2, Dist(), contextlib.nullcontext, bounds)
    # Reference: run every document as its own sequence, then score each row's tokens 1..L-1.
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            cuts = cu_seqlens(row.numpy()[None], 0, None)
            logits = torch.cat([model(input_ids=row[a:b][None]).logits[0] for a, b in zip(cuts[:-1], cuts[1:])])
            total += torch.nn.functional.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
            count += len(row) - 1
    assert got == pytest.approx(total / count, rel=1e-5)
    plain = validation_loss(model, rows, 2, Dist(), contextlib.nullcontext)
    assert abs(plain - got) > 1e-4  # without boundaries later documents see earlier ones: another number
    assert np.isfinite(got)


@pytest.fixture
def torch_ops():
    """FLA's GLA ops as plain PyTorch (models/cpu_torch.py), in bf16 too: faster than FLA's kernels interpreted."""
    from models import cpu_torch
    cpu_torch.install()
    yield
    cpu_torch.uninstall()


@pytest.mark.parametrize("precision,fused", [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)])
def test_nan_step_is_skipped_without_touching_weights_or_optimizer(precision, fused, request):
    """fused: AdamW's fused kernel (the GPU's; it exists on a CPU too) skips the step by itself (found_inf), with
    no host read of the loss before the step; otherwise train_step checks on the host."""
    from trainer.loop import skips_on_device
    model = tiny_gla()
    prec = FP32
    if precision == "bf16":
        request.getfixturevalue("torch_ops")
        prec = MasterWeights(model, torch.device("cpu"))
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    if fused:
        from trainer.optim import param_groups
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, fused=True)
    assert skips_on_device(opt) == fused
    d = Dist()
    good = torch.randint(1, 63, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, norm, applied = train_step(model, opt, good, None, 2, 1.0, 1e-2, d, prec)
    assert applied and math.isfinite(loss) and math.isfinite(norm)
    with torch.no_grad():
        model.model.embeddings.weight[63] = float("inf")  # any batch holding token 63 now gives a NaN loss
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    bad = good.clone()
    bad[0, 3] = 63
    loss, norm, applied = train_step(model, opt, bad, None, 1, 1.0, 1e-2, d, prec)
    assert not applied and not (math.isfinite(loss) and math.isfinite(norm))
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
        assert p.equal(params[n]) or (n == "model.embeddings.weight"), n
    assert torch.equal(model.model.embeddings.weight[:63], params["model.embeddings.weight"][:63])
    assert all(p.grad is None for p in model.parameters())
    for p in opt.state:  # Adam moments and step counts unchanged
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    steps = {float(opt.state[p]["step"]) for p in opt.state}
    assert steps == {1.0}  # the skipped step did not advance Adam's step count


@pytest.mark.parametrize("clip", [0.05, 1e9, 0.0], ids=["clipping", "under-the-bound", "off"])
def test_clipping_folded_into_the_fused_step_gives_clip_grad_norms_step(clip):
    """On the on-device path (fused AdamW) the clip is the kernel's grad_scale divisor instead of clip_grad_norm_'s
    multiply over the gradients: the same weights and moments up to rounding, the same reported norm; nothing left
    set on the optimizer afterwards."""
    from trainer.loop import launch_step
    x = torch.randint(0, 63, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for folded in (True, False):
        model = tiny_gla()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, fused=True)
        if folded:
            loss, norm, applied = launch_step(model, opt, x, None, 2, clip, 1e-2, Dist(), FP32).result()
            assert getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None
        else:  # what the loop did before: clip_grad_norm_, then the plain fused step
            for group in opt.param_groups:
                group["lr"] = 1e-2
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")).item()
            opt.step()
        runs.append((norm, [p.detach().clone() for p in model.parameters()],
                     [opt.state[p]["exp_avg"].clone() for p in model.parameters()]))
    (norm_a, weights_a, moments_a), (norm_b, weights_b, moments_b) = runs
    assert norm_a == pytest.approx(norm_b, rel=1e-6)
    if clip == 0.05:
        assert norm_a > 10 * clip  # the clip did act
    for a, b in zip(weights_a + moments_a, weights_b + moments_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()


def test_bf16_master_weights_step_is_a_bf16_copys_passes_with_fp32_grads_and_weights(torch_ops):
    """train.precision=bf16 without FSDP: each micro-batch's forward and backward are exactly those of a bf16
    copy of the weights; the micro-batches' gradients add up in fp32; clipping and AdamW run on the fp32
    weights and states, which stay fp32 (checkpoints and export see them)."""
    import copy
    model = tiny_gla(num_hidden_layers=2)
    x = torch.randint(1, 63, (4, 16), generator=torch.Generator().manual_seed(2))
    half = copy.deepcopy(model).to(torch.bfloat16)
    grads, loss_sum = [torch.zeros_like(p) for p in model.parameters()], 0.0
    for part in (x[:2], x[2:]):
        loss = half(input_ids=part, labels=part).loss / 2
        loss.backward()
        loss_sum += loss.float().item()
        for g, p in zip(grads, half.parameters()):
            g += p.grad.float()
        half.zero_grad(set_to_none=True)
    expected = copy.deepcopy(model)
    ref_opt = build_optimizer(expected, OptimConfig(lr=1e-2), torch.device("cpu"))
    for p, g in zip(expected.parameters(), grads):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(expected.parameters(), 0.5)
    ref_opt.step()

    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    loss, norm, applied = train_step(model, opt, x, None, 2, 0.5, 1e-2, Dist(), MasterWeights(model, torch.device("cpu")))
    assert applied and loss == pytest.approx(loss_sum, abs=1e-6) and norm == pytest.approx(float(ref_norm), rel=1e-6)
    for (n, p), q in zip(model.named_parameters(), expected.parameters()):
        assert p.dtype == torch.float32 and p.grad is None, n
        assert torch.equal(p, q), n
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    # the fp32 weights keep what a bf16 weight cannot hold (an update smaller than bf16's spacing)
    assert any(not torch.equal(p, p.to(torch.bfloat16).float()) for p in model.parameters())


def test_activation_checkpointing_gives_the_same_step():
    x = torch.randint(1, 63, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (False, True):
        model = tiny_gla(num_hidden_layers=2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
        loss, norm, applied = train_step(model, opt, x, None, 2, 1.0, 1e-2, Dist(), FP32)
        results.append((loss, norm, [p.detach().clone() for p in model.parameters()]))
    (l0, n0, p0), (l1, n1, p1) = results
    assert l0 == pytest.approx(l1, abs=1e-6) and n0 == pytest.approx(n1, rel=1e-5)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_validation_rows_are_the_first_m_sequences_split_across_ranks(tmp_path):
    import numpy as np

    from shards.format import decode_block, read_blocks, read_manifest
    from shards.storage import LocalStorage
    from tests.train_support import make_shards
    from trainer.data.validation import load_val_rows
    root = make_shards(str(tmp_path / "val"), sequences=24, seq_len=16, rows_per_block=5, shards=2)
    st = LocalStorage(root)
    m = read_manifest(st)
    everything = np.concatenate([decode_block(st.read_range(s.name, b.offset, b.length), b, m, s.name)
                                 for s in m.shards for b in read_blocks(st, s)])
    one = load_val_rows(root, 14, Dist())
    assert one.equal(torch.from_numpy(everything[:14].astype(np.int64)))
    halves = [load_val_rows(root, 14, Dist(rank=r, world_size=2)) for r in (0, 1)]
    assert torch.cat(halves).equal(one)
    thirds = [load_val_rows(root, 14, Dist(rank=r, world_size=3)) for r in range(3)]
    assert torch.cat(thirds).equal(one[:12])  # 14 // 3 = 4 each: equal forward passes on every rank


def test_prune_keeps_the_checkpoint_just_saved_when_a_newer_one_is_damaged(tmp_path):
    # A run that fell back from a damaged step-000003 to step-000001 saves step-000002: with keep=1 that
    # new checkpoint is the one to keep (the damaged one stays until the redone step 3 replaces it).
    from trainer.checkpoint import Checkpointer, list_checkpoints
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1, d=Dist())
    ckpt.save(1, model, opt, {})
    os.makedirs(tmp_path / "ckpt" / "step-000003")  # damaged: no train_state.json
    ckpt.save(2, model, opt, {})
    assert [os.path.basename(p) for p in list_checkpoints(ckpt.root)] == ["step-000002", "step-000003"]
    assert ckpt.load_latest(model, opt)["step"] == 2


def test_metrics_history_survives_a_failure_while_dropping_redone_steps(tmp_path, monkeypatch):
    import builtins

    from trainer import metrics
    lines = "".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(6))
    (tmp_path / "metrics.jsonl").write_text(lines)
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def writelines(self, _):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics, "open", lambda p, mode="r": Full(real_open(p, mode)) if "w" in mode
                        else real_open(p, mode), raising=False)
    with pytest.raises(OSError, match="No space"):
        metrics.MetricsLog(str(tmp_path), True, start_step=3, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_text() == lines  # the resume failed, the history is intact
    monkeypatch.undo()
    log = metrics.MetricsLog(str(tmp_path), True, start_step=3, tensorboard=False)
    log.log({"step": 3, "loss": 0.5})
    log.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [0, 1, 2, 3]


def test_too_few_validation_sequences_for_the_ranks_names_the_fix(tmp_path):
    from tests.train_support import make_shards
    from trainer.data.validation import load_val_rows
    root = make_shards(str(tmp_path / "val"), sequences=2, seq_len=16, rows_per_block=1, shards=1)
    with pytest.raises(ValueError, match=r"val_sequences=1 \(.* holds 2\) is fewer than the 3 ranks: raise it"):
        load_val_rows(root, 1, Dist(rank=0, world_size=3))
    with pytest.raises(ValueError, match=r"holds 2\) is fewer than the 3 ranks: use a larger validation set"):
        load_val_rows(root, 64, Dist(rank=0, world_size=3))  # raising data.val_sequences cannot help


def test_a_checkpoint_that_does_not_load_is_named_with_its_cause_and_the_previous_is_used(tmp_path, caplog):
    # DCP raises CheckpointException, a BaseException (not an Exception), wrapping each rank's real error.
    from trainer.checkpoint import CheckpointError, Checkpointer
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=3, d=Dist())
    ckpt.save(1, model, opt, {})
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))  # keys "0.weight", "0.bias": not this model's
    ckpt.save(2, other, torch.optim.AdamW(other.parameters()), {})
    with caplog.at_level("ERROR", logger="trainer.checkpoint"):
        assert ckpt.load_latest(model, opt)["step"] == 1
    assert any("step-000002 does not load" in r.message and "Missing key" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match=r"step-000002 does not load \(RuntimeError: Missing key"):
        ckpt.load(str(tmp_path / "ckpt" / "step-000002"), model, opt)


def test_fsdp_keeps_flas_no_weight_decay_marks():
    # FLA marks some parameters (e.g. Mamba's 2-D A_log) _no_weight_decay; fully_shard makes new parameters.
    import torch.distributed as dist

    from trainer import parallel

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
            self.A_log = torch.nn.Parameter(torch.zeros(4, 4))
            self.A_log._no_weight_decay = True

    d = Dist()
    try:
        model = parallel.wrap(Tiny(), "fsdp", d)
        decay, no_decay = param_groups(model, 0.1)
        assert any(p is model.A_log for p in no_decay["params"])
        assert not any(p is model.A_log for p in decay["params"]) and len(decay["params"]) == 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp_keeps_what_the_backward_starts_with_gathered_after_the_forward(reshard):
    """parallel.fsdp_reshard_after_forward frees a block's gathered parameters after its forward, to gather them
    again in the backward; the last block and the root (embeddings, final norm, LM head) keep theirs either way, since
    the backward starts with them (resharding them only added an all-gather with nothing to overlap). Seen from the
    outside: between forward and backward their parameters are plain tensors, the other blocks' DTensors. Training,
    a validation forward (no backward follows) and another step still match the unsharded model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from trainer import parallel
    try:
        reference = tiny_gla(num_hidden_layers=3)
        model = parallel.wrap(tiny_gla(num_hidden_layers=3), "fsdp", Dist(), reshard_after_forward=reshard)
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=x, labels=x).loss
        gathered = {n for n, p in model.named_parameters() if not hasattr(p, "device_mesh")}
        kept = {n for n, _ in model.named_parameters()
                if not n.startswith("model.layers.") or n.startswith("model.layers.2.")}  # the last block, the root
        assert gathered == (kept if reshard else {n for n, _ in model.named_parameters()})
        loss.backward()
        assert all(hasattr(p, "device_mesh") for p in model.parameters())  # the backward reshards them all
        model.zero_grad(set_to_none=True)

        opts = [build_optimizer(m, OptimConfig(lr=1e-2), torch.device("cpu")) for m in (reference, model)]
        d = Dist(distributed=True)
        for step in range(2):
            want = train_step(reference, opts[0], x, None, 2, 1.0, 1e-2, Dist(), FP32)
            got = train_step(model, opts[1], x, None, 2, 1.0, 1e-2, d, FP32)
            assert got[0] == pytest.approx(want[0], rel=1e-5), step
            with torch.no_grad():  # validation: a forward with no backward after it
                assert model(input_ids=x, labels=x).loss.item() == pytest.approx(
                    reference(input_ids=x, labels=x).loss.item(), rel=1e-5)
            saved = get_model_state_dict(model)  # what a checkpoint would write now
            for n, p in reference.state_dict().items():
                assert torch.allclose(saved[n].full_tensor(), p, rtol=1e-5, atol=1e-6), (step, n)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cli_prints_user_errors_as_one_line_and_keeps_a_bugs_traceback(tmp_path, monkeypatch, capsys):
    import trainer.loop
    from trainer.__main__ import main
    from trainer.config import ConfigError
    cfg = tmp_path / "run.toml"
    cfg.write_text("")

    def fail(exc):
        def train(_cfg):
            raise exc
        return train
    monkeypatch.setattr(trainer.loop, "train", fail(ConfigError("train.micro_batch=3 must divide 4")))
    assert main([str(cfg)]) == 1 and "error: train.micro_batch=3" in capsys.readouterr().err
    # A ValueError from inside torch or the model is a bug, not a config problem: not reduced to one line.
    monkeypatch.setattr(trainer.loop, "train", fail(ValueError("Expected input batch_size (4) to match")))
    with pytest.raises(ValueError, match="batch_size"):
        main([str(cfg)])


@pytest.mark.parametrize("victim", ["__0_0.distcp", "__0_1.distcp", "__0_2.distcp", "__0_3.distcp"])
def test_a_write_failing_in_any_dcp_writer_thread_fails_the_save(tmp_path, monkeypatch, victim):
    """DCP drops the errors of its extra writer threads; the save must fail anyway, keep the last good
    checkpoint (keep=1 would otherwise prune it) and leave nothing that looks complete."""
    import contextlib
    import errno

    from torch.distributed.checkpoint.filesystem import FileSystem

    from trainer.checkpoint import CheckpointError, Checkpointer, list_checkpoints
    model = tiny_gla()
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    x = torch.randint(1, 63, (2, 16), generator=torch.Generator().manual_seed(0))
    train_step(model, opt, x, None, 2, 1.0, 1e-2, Dist(), FP32)  # AdamW states exist
    root = tmp_path / "ckpt"
    ck = Checkpointer(str(root), keep=1, d=Dist(), threads=4)
    ck.save(1, model, opt, {"loader": {}})
    assert victim in os.listdir(root / "step-000001")  # 4 threads: 4 data files

    original = FileSystem.create_stream

    def create_stream(self, path, mode):
        if str(path).endswith(f"step-000002.tmp/{victim}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    with pytest.raises(CheckpointError, match="step-000002 failed") as failed:
        ck.save(2, model, opt, {"loader": {}})
    assert victim in str(failed.value) and "No space left on device" in str(failed.value)
    monkeypatch.undo()
    assert [os.path.basename(p) for p in list_checkpoints(str(root))] == ["step-000001"]
    assert sorted(os.listdir(root)) == ["step-000001"]
    assert ck.load_latest(model, opt)["step"] == 1


def test_the_divergence_message_names_the_causes_the_settings_show():
    from trainer.loop import divergence_causes
    assert "seq_len 1 leaves no next token to predict" in divergence_causes(1, 3e-4, 1.0)
    assert "seq_len 16 is very short" in divergence_causes(16, 3e-4, 1.0)
    both = divergence_causes(2048, 0.5, 0)
    assert "optim.lr=0.5 is high" in both and "clipping is off (optim.clip=0)" in both
    assert divergence_causes(2048, 3e-4, 1.0) == "resume from it with a lower optim.lr or a tighter optim.clip"


def test_master_weights_buffers_hold_only_this_steps_gradients():
    """accumulate() copies a buffer's first gradient of a step and adds later ones (no zeroing pass): a gradient
    of an earlier step never leaks into a later one, and a parameter without a gradient this step has a zero
    buffer (summed over processes) and no .grad."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4)})
    prec = MasterWeights(model, torch.device("cpu"))
    x = torch.randn(3, 4)

    def step(use_b: bool, parts: int):
        expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        with prec.compute():
            for _ in range(parts):
                y = model["a"](x.bfloat16())
                if use_b:
                    y = model["b"](y)
                y.float().square().sum().backward()
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        expected[n] += p.grad.float()
                prec.accumulate()
        prec.reduce()
        return expected

    step(use_b=True, parts=2)
    model.zero_grad(set_to_none=True)  # as train_step does after the optimizer step
    expected = step(use_b=False, parts=3)
    for n, p in model.named_parameters():
        if n.startswith("b."):
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, expected[n]), n
    assert not prec.grad_flat[sum(p.numel() for p in model["a"].parameters()):].any()


def test_master_weights_take_gradients_given_as_a_list_as_they_take_dot_grad():
    """accumulate(grads) (trainer.graphs hands a CUDA graph's static gradient tensors this way) fills the fp32
    buffers exactly as accumulate() does from .grad, first micro-batch copied, later ones added, None entries
    left without a gradient."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4)})
    x = torch.randn(3, 4)
    results = []
    for given in (False, True):
        prec = MasterWeights(model, torch.device("cpu"))
        with prec.compute():
            for _ in range(2):
                model["a"](x.bfloat16()).float().square().sum().backward()
                if given:
                    grads = [p.grad for p in prec.params]
                    for p in prec.params:
                        p.grad = None
                    prec.accumulate([g.clone() if g is not None else None for g in grads])
                else:
                    prec.accumulate()
        prec.reduce()
        results.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert results[0].keys() == results[1].keys()
    for n in results[0]:
        if n.startswith("b."):
            assert results[0][n] is None and results[1][n] is None, n
        else:
            assert torch.equal(results[0][n], results[1][n]), n


@pytest.mark.parametrize("settings, fix", [
    (("autocast", "none", False, False), "train.precision=bf16"),
    (("bf16", "fsdp", False, False), "parallel.mode=ddp or none"),
    (("bf16", "none", True, False), "data.varlen=false"),
    (("bf16", "ddp", False, True), "train.compile"),
])
def test_cuda_graphs_refuse_what_they_do_not_cover_naming_the_fix(settings, fix):
    from trainer.graphs import unsupported_reason
    assert unsupported_reason("bf16", "none", False, False) is None
    assert unsupported_reason("bf16", "ddp", False, False) is None
    reason = unsupported_reason(*settings)
    assert reason and fix in reason and reason.startswith("train.cuda_graphs")


def _lag_run(tmp_path, name, monkeypatch, read_at_once, ready_as_launched=False):
    """A 7-step in-process run (checkpoint every 3, validation every 4) with fused AdamW, the optimizer that skips
    a non-finite step on the device and so lets the loop read each step's numbers after launching the next.
    read_at_once: every step read right after its launch instead (the order the loop had before). The steps'
    numbers are taken as still on their way from a GPU (PendingStep.ready False) unless ready_as_launched, which
    keeps what the CPU run gives (ready at launch). Returns the order of launches and reads, the metrics and the
    final weights."""
    import json

    import trainer.loop as loop
    from tests.train_support import make_shards, tiny_model_json
    from trainer.config import load
    from trainer.metrics import read_metrics

    root = tmp_path / "data"
    if not root.exists():
        make_shards(str(root / "shards"), sequences=64, seq_len=32)
        make_shards(str(root / "val"), sequences=8, seq_len=32, seed=1)
        tiny_model_json(str(root / "gla.json"))
    monkeypatch.setattr(loop, "build_optimizer", lambda model, cfg, device: torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True))  # fused AdamW exists on a CPU too
    events = []
    launch = loop.launch_step

    class Recorded:
        def __init__(self, pending, step):
            self.pending, self.step = pending, step
            self.ready = pending.ready if ready_as_launched else False  # False: as a GPU run's step would be

        def result(self):
            events.append(("read", self.step))
            return self.pending.result()

    def recording_launch(*args, **kwargs):
        step = sum(1 for e in events if e[0] == "launch")
        events.append(("launch", step))
        pending = Recorded(launch(*args, **kwargs), step)
        if read_at_once:
            pending.result()
        return pending

    monkeypatch.setattr(loop, "launch_step", recording_launch)
    out = str(tmp_path / name)
    cfg = load(None, [f"model.config={root / 'gla.json'}", f"data.shards={root / 'shards'}",
                      f"data.val_shards={root / 'val'}", "data.val_sequences=4", "data.global_batch=4",
                      "train.max_steps=7", "train.micro_batch=2", "train.eval_every=4", "checkpoint.every=3",
                      "checkpoint.keep=3", "optim.lr=1e-2", f"run.out_dir={out}", "run.progress=false",
                      "run.tensorboard=false"])
    loop.train(cfg)
    records = read_metrics(out)
    return events, records, json.load(open(os.path.join(out, "summary.json")))


def test_loop_reads_each_step_after_queueing_the_next(tmp_path, monkeypatch):
    """With an optimizer that skips NaN steps on the device, step N is launched before step N-1's loss is read (the
    GPU then never waits for Python between steps); at a checkpoint (3, 6), validation (4) and the end (7) the
    step is read before anything else. The numbers logged are those of reading every step at once."""
    events, records, summary = _lag_run(tmp_path, "lagged", monkeypatch, read_at_once=False)
    order = [f"{kind[0]}{step}" for kind, step in events]
    # boundaries after steps 2 (checkpoint 3), 3 (validation at 4), 5 (checkpoint 6) and 6 (the end, 7)
    assert order == ["l0", "l1", "r0", "l2", "r1", "r2", "l3", "r3", "l4", "l5", "r4", "r5", "l6", "r6"], order
    monkeypatch.undo()
    at_once, records_at_once, summary_at_once = _lag_run(tmp_path, "at-once", monkeypatch, read_at_once=True)
    assert [f"{kind[0]}{step}" for kind, step in at_once][:4] == ["l0", "r0", "l1", "r1"]
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "skipped_steps", "epoch", "val_loss")
    assert [[r.get(k) for k in keys] for r in records] == [[r.get(k) for k in keys] for r in records_at_once]
    assert [r["step"] for r in records] == list(range(7)) and "val_loss" in records[3] and "val_loss" in records[6]
    for key in ("final_loss", "final_val_loss", "best_val_loss", "skipped_steps", "steps"):
        assert summary[key] == summary_at_once[key], key
    assert all(r["tokens_per_s"] > 0 and 0 <= r["data_wait_share"] < 1 for r in records)


def test_loop_reads_a_step_at_once_where_its_numbers_are_ready_at_launch(tmp_path, monkeypatch):
    """On a CPU (and on paths that read the loss before the optimizer step) a step's numbers exist when its launch
    returns: the loop reads them then. Lagged, step N's logged time would be step N+1's work and the last step's
    nearly zero (one absurd tokens/s that dominated the run's mean)."""
    events, records, summary = _lag_run(tmp_path, "ready", monkeypatch, read_at_once=False, ready_as_launched=True)
    order = [f"{kind[0]}{step}" for kind, step in events]
    assert order == [f"{kind}{i}" for i in range(7) for kind in "lr"], order
    monkeypatch.undo()
    _, records_at_once, _ = _lag_run(tmp_path, "at-once", monkeypatch, read_at_once=True)
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "skipped_steps", "val_loss")
    assert [[r.get(k) for k in keys] for r in records] == [[r.get(k) for k in keys] for r in records_at_once]


def _pending_loss_worker(rank: int, init_file: str, out_dir: str):
    """One of two gloo ranks: the loss launch_step's PendingStep gives (on-device path, fused AdamW) against the
    rank's own loss of the same batch."""
    import copy
    import json

    import torch.distributed as dist

    from trainer.loop import launch_step
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_gla()
        local_model = copy.deepcopy(model)
        x = torch.randint(1, 63, (2, 16), generator=torch.Generator().manual_seed(10 + rank))  # another batch per rank
        fused = [torch.optim.AdamW(param_groups(m, 0.1), lr=1e-2, fused=True) for m in (model, local_model)]
        local, _, _ = launch_step(local_model, fused[1], x, None, 2, 1.0, 1e-2, Dist(), FP32).result()
        pending = launch_step(model, fused[0], x, None, 2, 1.0, 1e-2,
                              Dist(rank=rank, world_size=2, distributed=True), FP32)
        loss, norm, applied = pending.result()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"local": local, "loss": loss, "applied": applied}, f)
    finally:
        dist.destroy_process_group()


def _fsdp_on_device_worker(rank: int, init_file: str, out_dir: str):
    """One of two gloo ranks: FSDP2 (DTensor parameters) with fused AdamW, the on-device step against the host-checked
    one, then a batch with a non-finite loss on rank 1 only."""
    import torch.distributed as dist

    from trainer import parallel
    from trainer.loop import launch_step, skips_on_device
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        d = Dist(rank=rank, world_size=2, distributed=True)
        good = torch.randint(1, 63, (4, 16), generator=torch.Generator().manual_seed(20 + rank))
        runs = {}
        for on_device in (True, False):
            model = tiny_gla()
            with torch.no_grad():
                model.model.embeddings.weight[63] = float("inf")  # a batch holding token 63 gives a NaN loss
            model = parallel.wrap(model, "fsdp", d)
            opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, fused=True)
            assert skips_on_device(opt)
            opt._skips_on_device = on_device  # False: the host reads the loss before the step, as before
            steps = [launch_step(model, opt, good, None, 2, 0.05, 1e-2, d, FP32) for _ in range(2)]
            assert [s.ready for s in steps] == [True, True]  # a CPU's numbers: there at launch
            results = [s.result() for s in steps]
            full = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
            moments = {n: opt.state[p]["exp_avg"].full_tensor().clone() for n, p in model.named_parameters()}
            bad = good.clone()
            if rank == 1:
                bad[0, 3] = 63
            skipped = launch_step(model, opt, bad, None, 2, 0.05, 1e-2, d, FP32).result()
            unchanged = all(p.detach().full_tensor()[:63].equal(full[n][:63]) for n, p in model.named_parameters())
            unchanged &= all(opt.state[p]["exp_avg"].full_tensor().equal(moments[n])
                             for n, p in model.named_parameters())
            step_counts = sorted({float(opt.state[p]["step"]) for p in opt.state})
            runs[on_device] = {"results": results, "skipped": skipped, "unchanged": unchanged, "steps": step_counts,
                               "weights": full}
        torch.save(runs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_with_fused_adamw_skips_a_non_finite_step_on_the_device(tmp_path):
    """FSDP2's parameters are DTensors; its optimizer step no longer needs the host to read the loss first: the
    gradient norm is all-reduced on the device (full_tensor), the fused kernel skips the step by found_inf where the
    norm or the rank's loss is not finite, and every rank reaches the same decision (rank 1's NaN reaches rank 0's
    gradient shards through the reduce-scatter). The step equals the host-checked one, clip included."""
    import torch.multiprocessing as mp
    mp.spawn(_fsdp_on_device_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for runs in ranks:
        on, host = runs[True], runs[False]
        for (loss_a, norm_a, applied_a), (loss_b, norm_b, applied_b) in zip(on["results"], host["results"]):
            assert applied_a and applied_b and loss_a == pytest.approx(loss_b, rel=1e-6)
            assert norm_a == pytest.approx(norm_b, rel=1e-5) and norm_a > 0.05  # the clip acted
        for n, w in on["weights"].items():
            assert torch.allclose(w[:63], host["weights"][n][:63], rtol=1e-5, atol=1e-6), n
        for run in (on, host):
            loss, norm, applied = run["skipped"]
            assert not applied and not math.isfinite(norm)
            assert run["unchanged"] and run["steps"] == [2.0]
    assert ranks[0][True]["results"] == ranks[1][True]["results"]  # the ranks' mean loss and global norm


def test_pending_step_loss_is_the_mean_over_ranks(tmp_path):
    """The on-device path sums the ranks' losses with an all-reduce of a device tensor (no host read) and divides
    on the host: every rank gets the mean of the ranks' own losses, as the host path's all_reduce_mean gives."""
    import json

    import torch.multiprocessing as mp
    mp.spawn(_pending_loss_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert got[0]["local"] != got[1]["local"]
    mean = (got[0]["local"] + got[1]["local"]) / 2
    assert got[0]["loss"] == got[1]["loss"] == mean and got[0]["applied"] and got[1]["applied"]


@pytest.mark.parametrize("mode", ["fsdp", "fsdp-defer", "ddp"])
def test_gradient_accumulation_reduces_where_the_settings_say(mode):
    """Gradient accumulation over two micro-batches. FSDP2 by default reduce-scatters each micro-batch's gradients
    (they stay sharded, as FSDP2 and torchtitan do); with parallel.fsdp_defer_reduce it keeps them unsharded until
    the last micro-batch. FSDP2 reads that switch in its backward hooks: a loop whose backward ran after the switch's
    context had closed reduce-scattered every micro-batch whatever the setting. Seen from the outside: at the second
    micro-batch's forward the first one's gradients are reduced (a sharded parameter holds a .grad) only without the
    deferral. DDP (which reads its flag in the forward): its comm hook runs only after the last micro-batch's forward.
    Every way, the step is that of the whole batch at once."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from trainer import parallel
    if mode == "ddp":
        parallel._single_process_group(Dist())
    model = opt = None
    try:
        d = Dist(distributed=True) if mode == "ddp" else Dist()
        reference = tiny_gla()
        batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        ref_opt = build_optimizer(reference, OptimConfig(lr=1e-2), torch.device("cpu"))
        want = train_step(reference, ref_opt, batch, None, 2, 1.0, 1e-2, Dist(), FP32)

        model = parallel.wrap(tiny_gla(), mode.partition("-")[0], d, defer_reduce=mode == "fsdp-defer")
        params = list(model.parameters())  # FSDP2: the sharded ones (its forward swaps the root's to unsharded)
        forwards, reduced_after = [], []
        model.register_forward_pre_hook(lambda m, a: forwards.append([p.grad is not None for p in params]))
        if mode == "ddp":
            def hook(state, bucket):
                reduced_after.append(len(forwards))
                return default_hooks.allreduce_hook(None, bucket)
            model.register_comm_hook(None, hook)
        opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
        loss, norm, applied = train_step(model, opt, batch, None, 1, 1.0, 1e-2, d, FP32)
        assert len(forwards) == 2 and not any(forwards[0])
        if mode == "fsdp":
            assert all(forwards[1]), "the first micro-batch's gradients were not reduce-scattered"
        elif mode == "fsdp-defer":
            assert not any(forwards[1]), "the first micro-batch's gradients were reduced before the last micro-batch"
        else:
            assert reduced_after and set(reduced_after) == {2}
        assert applied and loss == pytest.approx(want[0], rel=1e-5) and norm == pytest.approx(want[1], rel=1e-4)
    finally:
        # DDP's reducer holds the gloo group: freed after destroy_process_group, its destructor could wait forever
        # on the group's worker threads (a CI run hung there); free the model while the group is alive
        model = opt = None
        import gc
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def _overlap_worker(rank: int, init: str, out: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same init on both ranks (MasterWeights broadcasts rank 0's anyway)
        model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(16, 8), "a": torch.nn.Linear(8, 8),
                                     "unused": torch.nn.Linear(8, 8), "b": torch.nn.Linear(8, 16)})
        calls = []
        real = dist.all_reduce

        def spy(*args, **kwargs):  # the real all-reduce, counted
            calls.append(args[0].numel())
            return real(*args, **kwargs)
        dist.all_reduce = spy
        launched_before_emb = []
        model["emb"].register_full_backward_pre_hook(lambda m, g: launched_before_emb.append(len(calls)))
        x = torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(rank))

        def step(prec, overlap: bool):
            with prec.compute():
                for part in range(2):
                    h = model["b"](torch.relu(model["a"](model["emb"](x[:, part:part + 3]))))
                    with prec.reducing(overlap and part == 1):
                        h.float().square().mean().backward()
                    prec.accumulate()
            prec.reduce()
            grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            return grads

        prec = MasterWeights(model, torch.device("cpu"), group_size=2, bucket_bytes=64 * 4)
        assert len(prec._buckets) >= 4
        calls.clear()
        flat = step(prec, overlap=False)
        assert calls == [prec.grad_flat.numel()]
        calls.clear(), launched_before_emb.clear()
        overlapped = step(prec, overlap=True)
        assert len(calls) == len(prec._buckets) and sum(calls) == prec.grad_flat.numel()
        torch.save({"flat": flat, "overlapped": overlapped, "launched_before_emb": launched_before_emb[-1],
                    "again": step(prec, overlap=True)}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_master_weights_over_two_processes_reduce_buckets_during_the_backward(tmp_path):
    """bf16 over several processes: the last micro-batch's backward all-reduces each bucket of the fp32 gradient
    buffer as soon as its gradients are in (before the backward reaches the first layer), and the gradients are
    bit for bit those of one all-reduce of the whole buffer after the backward (two ranks: a + b either way), also
    for a parameter without a gradient (zeros, as under DDP) and over two micro-batches."""
    import torch.multiprocessing as mp
    mp.spawn(_overlap_worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for res in results:
        assert res["launched_before_emb"] > 0
        for name, g in res["flat"].items():
            for other in (res["overlapped"], res["again"]):
                assert torch.equal(g, other[name]), name
            assert g.any() != name.startswith("unused"), name  # zeros, as DDP gives an unused parameter
    for name, g in results[0]["overlapped"].items():  # the same averaged gradient on both ranks
        assert torch.equal(g, results[1]["overlapped"][name]), name


def test_a_stopped_runs_summary_line_says_stopped_and_a_finished_runs_says_done(tmp_path, caplog):
    """A run stopped by a signal printed "done: ..." before "stopped by SIGINT after step 37": it is not done."""
    from trainer.loop import _report
    with caplog.at_level("INFO", logger="trainer"):
        _report(str(tmp_path), {"steps": 37, "checkpoint": "ckpt/step-000037", "stopped_by": "SIGINT"}, 300)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stopped: steps=37, checkpoint=ckpt/step-000037, stopped_by=SIGINT"
    assert lines[1].startswith("stopped by SIGINT after step 37 of 300: checkpoint ckpt/step-000037")
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer"):
        _report(str(tmp_path), {"steps": 300, "checkpoint": "ckpt/step-000300"}, 300)
    assert [r.getMessage() for r in caplog.records] == ["done: steps=300, checkpoint=ckpt/step-000300"]


def test_the_progress_line_names_the_step_its_validation_loss_is_from():
    """Most steps do not validate: the last validation loss, repeated on their progress lines, carries its step."""
    from trainer.loop import progress_extra
    assert progress_extra(7.25, 3e-4, 12345.6, None, None) == "loss 7.2500 lr 3.00e-04 12,346 tok/s"
    assert progress_extra(7.25, 3e-4, 12345.6, 7.18881, 200) == "loss 7.2500 lr 3.00e-04 12,346 tok/s val 7.1888@200"


def test_cli_without_a_config_says_what_to_give(capsys):
    """argparse called the optional overrides required ("the following arguments are required: config,
    overrides"); and an override given first was read as the config's path."""
    from trainer.__main__ import main
    for argv, message in (([], "error: give the run config TOML (e.g. configs/demo.toml), optionally followed by "
                                "section.key=value overrides"),
                          (["train.max_steps=3"], "error: 'train.max_steps=3' is an override: give the run config "
                                                  "TOML first, then the overrides")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "required" not in err, err
        assert "usage: python -m trainer [-h] CONFIG.toml [section.key=value ...]" in err


def test_a_micro_batch_larger_than_a_ranks_share_becomes_that_share(caplog):
    # `make train NPROC=2` on the demo (global batch 4, micro-batch 4) stopped both ranks: "train.micro_batch=4 must
    # divide the local batch 2"; more ranks than a config was written for now run with smaller micro-batches
    import logging

    from trainer.config import ConfigError
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert micro_batch_size(4, 2, 4, 2) == 2
    assert "train.micro_batch=4 is more than this rank's 2 sequences a step (data.global_batch=4 / 2 ranks): " \
           "micro-batches of 2" in caplog.text
    assert micro_batch_size(None, 8, 16, 2) == 8 and micro_batch_size(2, 8, 16, 2) == 2
    with pytest.raises(ConfigError, match=r"train.micro_batch=3 must divide the local batch 8 \(data.global_batch=16 "
                                          r"/ 2 ranks\)"):
        micro_batch_size(3, 8, 16, 2)
