"""models/: SDPA attention vs a naive reference, FLOPs counting, building and meta init of FLA models on CPU."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton/fla are imported (see models/cpu_triton.py)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"triton-cache-{os.getuid()}"))

import glob  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models import build, sdpa_attention  # noqa: E402
from models.flops import flops_per_token, six_n  # noqa: E402
from tests.train_support import VOCAB  # noqa: E402


def naive_attention(q, k, v, causal, window=-1):
    """q [B,T,H,D], k/v [B,S,Hkv,D] in float64, bottom-right causal alignment, explicit softmax."""
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    t, s = q.shape[1], k.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    qi = torch.arange(t)[:, None] + s - t
    kj = torch.arange(s)[None, :]
    allowed = torch.ones(t, s, dtype=torch.bool)
    if causal:
        allowed &= kj <= qi
    if window >= 0:
        allowed &= kj >= qi - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("t,s,h,hkv,causal,window", [(7, 7, 4, 4, True, -1), (7, 7, 4, 2, True, -1),
                                                     (3, 9, 2, 1, True, -1), (8, 8, 2, 2, False, -1),
                                                     (9, 9, 2, 2, True, 3)])
def test_sdpa_matches_naive(t, s, h, hkv, causal, window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, t, h, 8, generator=g)
    k, v = torch.randn(2, s, hkv, 8, generator=g), torch.randn(2, s, hkv, 8, generator=g)
    out = sdpa_attention.flash_attn_func(q, k, v, causal=causal, window_size=(window, 0) if window >= 0 else (-1, -1))
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, causal, window), atol=1e-5, rtol=1e-5)


def test_sdpa_varlen_matches_per_document_reference():
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 6, 13, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 2, 8, generator=g) for _ in range(3))
    out = sdpa_attention.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = naive_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)[0]
        torch.testing.assert_close(out[a:b].double(), ref, atol=1e-5, rtol=1e-5)


def tiny_transformer():
    config = build.load_config({"model_type": "transformer", "hidden_size": 32, "num_hidden_layers": 1,
                                "num_heads": 2, "vocab_size": VOCAB, "fuse_cross_entropy": False})
    return build.build_model(config, "cpu", seed=0)


def test_transformer_builds_and_trains_without_flash_attn():
    model = tiny_transformer()
    x = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(VOCAB)) < 0.5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_transformer_varlen_equals_separate_documents():
    """Packed documents with cu_seqlens give the same logits as running each document alone."""
    model = tiny_transformer().eval()
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (5, 9, 2)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    with torch.no_grad():
        logits = model(input_ids=packed, cu_seqlens=cu).logits[0]
        for doc, a in zip(docs, cu[:-1].tolist()):
            alone = model(input_ids=doc[None]).logits[0]
            torch.testing.assert_close(logits[a:a + len(doc)], alone, atol=1e-4, rtol=1e-4)


def test_matmul_flops_match_torch_flop_counter():
    """Our matmul count agrees with torch's FlopCounterMode on the SDPA transformer (softmax part counted apart)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_transformer().eval()
    b, t = 2, 16
    x = torch.randint(1, VOCAB, (b, t))
    ours = flops_per_token(model, t)
    attn = model.model.layers[0].attn
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=x)
    assert counter.get_total_flops() == b * t * ours["matmul"]  # the CPU SDPA kernel is not counted by torch
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(input_ids=x)  # the math backend is two batched matmuls over the full T x T square
    assert counter.get_total_flops() == b * t * ours["matmul"] + 4 * b * attn.num_heads * attn.head_dim * t * t
    assert ours["mixing"] == 4 * attn.num_heads * attn.head_dim * (t + 1) / 2  # we count the causal half


def test_flops_sanity_against_6n():
    """At 2048 tokens the real count of the shipped 340M models is within 10% of 6N; the formula is explicit."""
    for name in ("gla_340M", "transformer_340M", "gated_deltanet_340M", "delta_net_340M", "retnet_340M"):
        model = build.build_model(build.load_config(f"configs/{name}.json"), "meta")
        f = flops_per_token(model, 2048)
        assert 0.9 < f["train"] / six_n(model) < 1.1, name
        assert f["train"] == 3 * (f["matmul"] + f["conv"] + f["mixing"])
    gla = build.build_model(build.load_config("configs/gla_340M.json"), "meta")
    f = flops_per_token(gla, 2048)
    h, dk, dv, c = 4, 128, 256, 64  # 1024 * 0.5 / 4 heads, 1024 / 4 heads, chunk 64
    assert f["mixing"] == 24 * h * (2 * c * dk + 2 * c * dv + 4 * dk * dv)
    # tied embeddings: the LM head is a real matmul, the lookup is not: 2 * 1024 * 32000 per token
    assert f["matmul"] > 2 * 1024 * 32000


def test_shipped_model_configs_build():
    counts = {}
    for path in sorted(glob.glob("configs/*.json")):
        with open(path) as f:
            assert json.load(f)["vocab_size"] == 32000, path
        counts[os.path.basename(path)] = build.count_parameters(build.build_model(build.load_config(path), "meta"))
    assert abs(counts["gla_340M.json"] - 341.7e6) < 0.1e6  # the original trainer's GLA 340M
    for name in ("gla_1B.json", "gla_7B.json", "transformer_340M.json", "gated_deltanet_340M.json",
                 "delta_net_340M.json", "mamba2_340M.json", "retnet_340M.json", "demo_gla.json"):
        assert name in counts


def test_meta_init_matches_model_init():
    """meta -> materialize gives the same shapes, buffers and init statistics as the model's own init."""
    config = build.load_config({"model_type": "transformer", "hidden_size": 64, "num_hidden_layers": 2,
                                "num_heads": 2, "vocab_size": VOCAB, "tie_word_embeddings": True})
    ref = build.build_model(config, "cpu", seed=0)
    meta = build.build_model(config, "meta")
    build.materialize(meta, torch.device("cpu"), seed=0)
    assert meta.lm_head.weight is meta.model.embeddings.weight  # ties restored
    ref_sd, meta_sd = ref.state_dict(), meta.state_dict()
    assert ref_sd.keys() == meta_sd.keys()
    for name, p in ref_sd.items():
        q = meta_sd[name]
        assert q.shape == p.shape and torch.isfinite(q).all(), name
        if p.ndim >= 2:
            assert abs(q.std().item() - p.std().item()) < 0.2 * p.std().item() + 1e-6, name
        else:
            torch.testing.assert_close(q, p)  # norms (ones), biases (zeros)
    for (name, b), (_, c) in zip(ref.named_buffers(), meta.named_buffers()):
        torch.testing.assert_close(c, b, msg=name)  # rotary inv_freq recomputed


def test_fused_cross_entropy_switched_off_on_cpu(caplog):
    config = build.load_config("configs/demo_gla.json")
    assert config.fuse_cross_entropy is True
    with caplog.at_level(logging.INFO, logger="models.build"):
        build.adapt_to_device(config, torch.device("cpu"))
    assert config.fuse_cross_entropy is False
    assert sum("fuse_cross_entropy switched off" in r.message for r in caplog.records) == 1
    with open("configs/demo_gla.json") as f:
        assert json.load(f)["fuse_cross_entropy"] is True  # the user's file is untouched


def test_bad_model_config_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="model_type"):
        build.load_config(str(p))
    with pytest.raises(FileNotFoundError, match="model.config"):
        build.load_config(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="vocab_size 32000 is smaller"):
        build.load_config("configs/demo_gla.json", vocab_size=50000)


def test_gla_varlen_equals_separate_documents():
    """What data.varlen feeds the model: packed documents + cu_seqlens act like separate sequences."""
    config = build.load_config({"model_type": "gla", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 1,
                                "expand_k": 0.5, "vocab_size": VOCAB, "fuse_cross_entropy": False})
    model = build.build_model(config, "cpu", seed=0).eval()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (20, 7, 37)]
    cu = torch.tensor([0, 20, 27, 64], dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=torch.cat(docs)[None], cu_seqlens=cu).logits[0]
        for doc, a in zip(docs, cu[:-1].tolist()):
            torch.testing.assert_close(packed[a:a + len(doc)], model(input_ids=doc[None]).logits[0],
                                       atol=1e-4, rtol=1e-4)


def test_unfused_loss_of_bf16_logits_is_computed_in_fp32():
    """Where FLA's fused cross entropy is off (a CPU, a model JSON without it), its loss is nn.CrossEntropyLoss over
    the logits as they come: on bf16 weights (train.precision=bf16) a loss rounded to bf16 (steps of 1/16 at 10)
    with its gradient in bf16. build.use_fp32_loss gives such a model the same loss over fp32 logits; fp32 logits
    (the CPU's default) get nn.CrossEntropyLoss bit for bit, and a fused loss is left alone."""
    model = tiny_transformer()
    x = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    fp32 = model(input_ids=x, labels=x).loss
    assert build.use_fp32_loss(model)
    assert torch.equal(model(input_ids=x, labels=x).loss, fp32)  # fp32 logits: nn.CrossEntropyLoss itself
    model.to(torch.bfloat16)
    out = model(input_ids=x, labels=x)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss, want)
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16  # the logits' gradient cast back for the bf16 GEMM
    assert "criterion" not in "".join(model.state_dict())  # nothing new in checkpoints or exports
    fused = tiny_transformer()
    fused.config.fuse_cross_entropy = True
    assert not build.use_fp32_loss(fused) and fused.criterion is None
