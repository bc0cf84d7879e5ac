"""models/kernels/gla.py under the Triton interpreter: GLA's chunked attention through FLA's own kernels, without the
output's zero fill and the fp32 -> bf16 casts of dq, dk and dg, gives FLA's chunk_gla bit for bit (fp32, equal lengths
and cu_seqlens), and with bf16 inputs hands back gradients of the inputs' dtype with no cast in its backward.

bf16 values are not compared bit for bit here (the interpreter's fp32 sums run in another order than a GPU's);
bench/gla_check.py compares the two on a GPU, bit for bit, and tests/test_fused.py the whole bf16 model's gradients.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models.kernels import gla  # noqa: E402


def inputs(B, T, H, K, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g).to(dtype).requires_grad_()
    gk = (F.logsigmoid(torch.randn(B, T, H, K, generator=g)) / 16).to(dtype).requires_grad_()
    do = torch.randn(B, T, H, V, generator=g).to(dtype)
    return q, k, v, gk, do


def run(fn, q, k, v, gk, do, cu_seqlens=None):
    for t in (q, k, v, gk):
        t.grad = None
    o = fn(q, k, v, gk, cu_seqlens)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad, gk.grad]


def ours(q, k, v, g, cu_seqlens, saved_states=None, intra="fla"):
    """Our chunk_gla with FLA's intra-chunk kernels unless told (ours change values at fp32 rounding: tested below)."""
    return gla.chunk_gla(q, k, v, g, cu_seqlens=cu_seqlens, saved_states=saved_states, intra=intra, fwd_intra="fla")


def flas(q, k, v, g, cu_seqlens):
    from fla.ops.gla import chunk_gla
    return chunk_gla(q, k, v, g, state_v_first=True, cu_seqlens=cu_seqlens)[0]


@pytest.mark.parametrize("saved_states", gla.STATE_CHOICES)
@pytest.mark.parametrize("shape,cu_seqlens", [((2, 100, 2, 16, 32), None), ((1, 150, 2, 16, 32), [0, 40, 150]),
                                              ((1, 80, 1, 80, 160), None)],
                         ids=["batch", "cu_seqlens", "blocks"])
def test_same_bits_as_flas_chunk_gla(shape, cu_seqlens, saved_states):
    """"blocks": K 80 and V 160 take three key and three value blocks each, the last partial (the interpreter's
    launch: BK 32, BV 64), as GLA 340M's K 128 and V 256 take several on a GPU; the other shapes fit one block."""
    tensors = inputs(*shape, torch.float32)
    cu = torch.tensor(cu_seqlens) if cu_seqlens is not None else None
    got = run(lambda *a: ours(*a, saved_states=saved_states), *tensors, cu)
    want = run(flas, *tensors, cu)
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: max abs diff {(a - b).abs().max().item():.3g}"


def test_bf16_gradients_come_back_in_bf16_without_casts():
    q, k, v, gk, do = inputs(2, 100, 2, 16, 32, torch.bfloat16)
    o = ours(q, k, v, gk, None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        o.backward(do)
    casts = [e.key for e in prof.key_averages() if e.key in ("aten::_to_copy", "aten::to_copy")]
    assert casts == [], f"casts in the backward: {casts}"
    assert [t.grad.dtype for t in (q, k, v, gk)] == [torch.bfloat16] * 4

    o = flas(q, k, v, gk, None)  # the claim's baseline: FLA's backward does cast (dq, dk, and dg through autograd)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        o.backward(do)
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy") >= 3


def test_cpu_tensors_without_the_interpreter_take_flas_function(monkeypatch):
    calls = []
    monkeypatch.setattr(gla._ChunkGLAFunction, "apply", lambda *a: calls.append(1))
    tensors = inputs(1, 70, 1, 16, 16, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not gla.covers(tensors[0])
    got = run(ours, *tensors)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    want = run(flas, *tensors)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_shapes_are_named():
    q, k, v, gk, _ = inputs(2, 70, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"q, k, g must be \[B, T, H, K\]"):
        gla.chunk_gla(q, k[:, :60], v, gk)
    with pytest.raises(ValueError, match="batch dimension must be 1"):
        gla.chunk_gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 70]))


@pytest.mark.parametrize("saved_states", gla.STATE_CHOICES)
def test_saved_states_spare_the_backward_its_recomputation(saved_states, monkeypatch):
    """With the states kept the backward launches no chunk_fwd_h and no cumsum of the gate; "none" does both (FLA's
    way). bf16 inputs: the kept gate cumsum is the fp32 one, whatever the gate's dtype. The state gradients are fp32
    but with "bf16"."""
    from fla.ops.common import chunk_h
    q, k, v, gk, do = inputs(1, 70, 1, 16, 16, torch.bfloat16)
    o = ours(q, k, v, gk, None, saved_states=saved_states)
    calls = []
    real_h, real_dh, real_cumsum = chunk_h.chunk_fwd_h, chunk_h.chunk_bwd_dh, gla._cumsum
    monkeypatch.setattr(chunk_h, "chunk_fwd_h", lambda *a, **kw: calls.append("h") or real_h(*a, **kw))
    monkeypatch.setattr(chunk_h, "chunk_bwd_dh",
                        lambda *a, **kw: calls.append(f"dh fp32 {kw['states_in_fp32']}") or real_dh(*a, **kw))
    monkeypatch.setattr(gla, "_cumsum", lambda *a, **kw: calls.append("cumsum") or real_cumsum(*a, **kw))
    o.backward(do)
    assert calls == {"fp32": ["dh fp32 True"], "bf16": ["dh fp32 False"],
                     "none": ["cumsum", "h", "dh fp32 True"]}[saved_states]
    assert [t.grad.dtype for t in (q, k, v, gk)] == [torch.bfloat16] * 4


def test_bad_saved_states_is_named():
    q, k, v, gk, _ = inputs(1, 70, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="saved_states='gpu'.*fp32"):
        gla.chunk_gla(q, k, v, gk, saved_states="gpu")


def test_our_intra_kernel_in_the_chunk_gives_flas_values_within_fp32_rounding():
    """intra="ours" (models/kernels/gla_intra.py, tested on its own in tests/test_gla_intra_kernel.py) in place of
    FLA's intra-chunk dq, dk: o and dv are FLA's bits (the forward and dv do not use it), dq, dk and dg agree to fp32
    rounding."""
    tensors = inputs(1, 150, 2, 16, 32, torch.float32)
    cu = torch.tensor([0, 40, 150])
    got = run(lambda *a: gla.chunk_gla(*a[:4], cu_seqlens=a[4], intra="ours"), *tensors, cu)
    want = run(flas, *tensors, cu)
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], got, want):
        if name in ("o", "dv"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
    with pytest.raises(ValueError, match="intra='triton'"):
        gla.chunk_gla(*tensors[:4], intra="triton")


def test_our_forward_intra_kernel_in_the_chunk_gives_flas_values_within_fp32_rounding():
    """fwd_intra="ours" (models/kernels/gla_fwd_intra.py, tested on its own in tests/test_gla_fwd_intra_kernel.py):
    the whole chunk's output and gradients agree with FLA's to fp32 rounding."""
    tensors = inputs(1, 150, 2, 16, 32, torch.float32)
    cu = torch.tensor([0, 40, 150])
    got = run(lambda *a: gla.chunk_gla(*a[:4], cu_seqlens=a[4], intra="fla", fwd_intra="ours"), *tensors, cu)
    want = run(flas, *tensors, cu)
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
    with pytest.raises(ValueError, match="fwd_intra='x'"):
        gla.chunk_gla(*tensors[:4], fwd_intra="x")


def _naive_gla(q, k, v, g, scale):
    """GLA as its recurrence, h_t = exp(g_t) * h_{t-1} + k_t v_t^T, o_t = scale * q_t h_t (the float64 reference)."""
    B, T, H, K = q.shape
    h = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
    out = []
    for t in range(T):
        h = h * g[:, t].exp()[..., None] + k[:, t][..., None] * v[:, t][..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, h))
    return torch.stack(out, 1)


def test_states_stored_in_bf16_cost_less_than_the_outputs_own_bf16_rounding(monkeypatch):
    """SAVED_STATES="bf16" stores h and dh rounded to bf16. Emulated here in fp32 (so that the float64 comparison is
    tight): every h and dh the chunk kernels hand on is rounded to bf16 and back, so every product that reads them sees
    the rounding (on a GPU the dq, dk, dv, o products cast them to bf16 in FLA's own path anyway). Against the float64
    recurrence over 4 chunks, o and every gradient stay within half a bf16 ulp of the largest value (2^-9), the
    rounding a bf16 output has by itself; with fp32 states, fp32 rounding."""
    from fla.ops.common import chunk_h
    gen = torch.Generator().manual_seed(0)
    T, K, V = 256, 16, 32
    q, k = torch.randn(1, T, 1, K, generator=gen), torch.randn(1, T, 1, K, generator=gen)
    v, do = torch.randn(1, T, 1, V, generator=gen), torch.randn(1, T, 1, V, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, 1, K, generator=gen)) / 16
    scale = K ** -0.5
    leaves = [t.double().requires_grad_() for t in (q, k, v, g)]
    o = _naive_gla(*leaves, scale)
    o.backward(do.double())
    exact = [o.detach()] + [t.grad for t in leaves]
    real_h, real_dh = chunk_h.chunk_fwd_h, chunk_h.chunk_bwd_dh

    def errors(round_states: bool) -> dict:
        def fwd_h(*a, **kw):
            h, ht = real_h(*a, **kw)
            return (h.bfloat16().float() if round_states else h), ht

        def bwd_dh(*a, **kw):
            dh, dh0 = real_dh(*a, **kw)
            return (dh.bfloat16().float() if round_states else dh), dh0
        monkeypatch.setattr(chunk_h, "chunk_fwd_h", fwd_h)
        monkeypatch.setattr(chunk_h, "chunk_bwd_dh", bwd_dh)
        got = run(lambda *a: ours(*a, saved_states="fp32"), q.clone().requires_grad_(), k.clone().requires_grad_(),
                  v.clone().requires_grad_(), g.clone().requires_grad_(), do)
        return {name: ((a.double() - e).abs().max() / e.abs().max()).item()
                for name, a, e in zip(["o", "dq", "dk", "dv", "dg"], got, exact)}
    fp32, rounded = errors(False), errors(True)
    assert max(fp32.values()) < 1e-5, fp32
    assert max(rounded.values()) < 2 ** -9, rounded
    assert min(rounded.values()) > 1e-5, rounded  # the emulation did round the states


def _inter_inputs(states_dtype, seed=0, T=150, cu_seqlens=None):
    """The inputs of the backward's last kernel for one head: fp32 q, k, v, do, the intra-chunk dq, dk, the gate's
    chunk-local cumsum, and states h, dh [chunks, H, V, K] (V-first) in `states_dtype`."""
    from fla.ops.utils import prepare_chunk_indices
    gen = torch.Generator().manual_seed(seed)
    H, K, V = 2, 16, 32
    q, k = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, K, generator=gen)
    v, do = torch.randn(1, T, H, V, generator=gen), torch.randn(1, T, H, V, generator=gen)
    g = gla._cumsum(F.logsigmoid(torch.randn(1, T, H, K, generator=gen)) / 16, 64, cu_seqlens)
    dq, dk = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, K, generator=gen)
    chunk_indices = prepare_chunk_indices(cu_seqlens, 64) if cu_seqlens is not None else None
    n = len(chunk_indices) if cu_seqlens is not None else -(-T // 64)
    h = (torch.randn(n, H, V, K, generator=gen) * 30).to(states_dtype)
    dh = (torch.randn(n, H, V, K, generator=gen) * 30).to(states_dtype)
    return q, k, v, h, g, do, dh, dq, dk, K ** -0.5, cu_seqlens, 64, chunk_indices


@pytest.mark.parametrize("cu_seqlens", [None, [0, 40, 150]], ids=["batch", "cu_seqlens"])
def test_our_inter_kernel_computes_flas_sums(cu_seqlens):
    """`_gla_bwd_inter_kernel` (ours, for low-precision states) against FLA's chunk_gla_bwd_kernel_inter on fp32 states:
    the same dq, dk, dg to fp32 rounding."""
    args = _inter_inputs(torch.float32, cu_seqlens=torch.tensor(cu_seqlens) if cu_seqlens else None)
    ours_out = gla._backward_dqkg(*args, torch.float32, inter="ours")
    flas_out = gla._backward_dqkg(*args, torch.float32, inter="fla")
    for name, a, b in zip(["dq", "dk", "dg"], ours_out, flas_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("inter", gla.INTER_CHOICES)
@pytest.mark.parametrize("cu_seqlens", [None, [0, 40, 150]], ids=["batch", "cu_seqlens"])
def test_dq_dk_go_into_column_blocks_of_a_wider_gradient(inter, cu_seqlens):
    """dq_out / dk_out as column blocks of one [tokens, 3 * H * K + 5] gradient (models/fused.py's GradSlab): our kernel
    writes them there, FLA's result is copied there; the same bits as new tensors, the other columns untouched."""
    args = _inter_inputs(torch.float32, cu_seqlens=torch.tensor(cu_seqlens) if cu_seqlens else None)
    q = args[0]
    B, T, H, K = q.shape
    wide = torch.full((B * T, 3 * H * K + 5), float("nan"))
    dq_out = wide[:, H * K:2 * H * K].view(B, T, H, K)
    dk_out = wide[:, 2 * H * K + 5:].view(B, T, H, K)
    assert gla._row_strided(dq_out, q) is dq_out
    want = gla._backward_dqkg(*args, torch.float32, inter=inter)
    got = gla._backward_dqkg(*args, torch.float32, inter=inter, dq_out=dq_out, dk_out=dk_out)
    assert got[0] is dq_out and got[1] is dk_out
    for name, a, b in zip(["dq", "dk", "dg"], got, want):
        assert torch.equal(a, b), name
    assert wide[:, :H * K].isnan().all() and wide[:, 2 * H * K:2 * H * K + 5].isnan().all()
    # places the kernel cannot index (heads not packed in a row): computed elsewhere, then copied there
    odd = [torch.full((B, T, K, H), float("nan")).transpose(2, 3) for _ in range(2)]
    assert gla._row_strided(odd[0], q) is None
    got = gla._backward_dqkg(*args, torch.float32, inter=inter, dq_out=odd[0], dk_out=odd[1])
    assert got[0] is odd[0] and got[1] is odd[1] and torch.equal(odd[0], want[0]) and torch.equal(odd[1], want[1])


@pytest.mark.parametrize("cu_seqlens", [None, [0, 40, 150]], ids=["batch", "cu_seqlens"])
def test_our_dv_kernel_computes_flas_dv_into_a_column_block(cu_seqlens):
    """`_gla_bwd_dv_kernel` (gla.DV = "ours") against FLA's chunk_gla_bwd_dv on the same inputs: dv to fp32 rounding,
    written into a column block of a wider gradient with the other columns untouched."""
    from fla.ops.gla.chunk import chunk_gla_bwd_dv, chunk_gla_fwd_intra_gk
    q, k, v, h, g, do, dh, dq, dk, scale, cu, chunk, chunk_indices = _inter_inputs(
        torch.float32, cu_seqlens=torch.tensor(cu_seqlens) if cu_seqlens else None)
    A = chunk_gla_fwd_intra_gk(q=q, k=k, g=g, scale=scale, cu_seqlens=cu, chunk_size=chunk, chunk_indices=chunk_indices)
    want = chunk_gla_bwd_dv(k=k, g=g, A=A, do=do, dh=dh, cu_seqlens=cu, chunk_size=chunk, chunk_indices=chunk_indices,
                            state_v_first=True)
    B, T, H, V = do.shape
    wide = torch.full((B * T, H * V + 3), float("nan"))
    place = wide[:, 3:].view(B, T, H, V)
    got = gla._backward_dv(k, g, A, do, dh, cu, chunk, chunk_indices, place)
    assert got is place and wide[:, :3].isnan().all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(gla._backward_dv(k, g, A, do, dh, cu, chunk, chunk_indices), got)
    for dot in gla.DV_DOTS:  # the tensor-core forms (the interpreter computes every form in fp32)
        assert torch.equal(gla._backward_dv(k, g, A, do, dh, cu, chunk, chunk_indices, dot=dot), got), dot
    with pytest.raises(ValueError, match="dv dot 'fp16': use one of"):
        gla._backward_dv(k, g, A, do, dh, cu, chunk, chunk_indices, dot="fp16")


@pytest.mark.parametrize("shape", [(2, 100, 2, 16, 32), (1, 80, 1, 80, 160)], ids=["one-block", "blocks"])
@pytest.mark.parametrize("dv", [*gla.DV_CHOICES, None])
def test_chunk_gla_hands_back_gradients_where_it_is_told(dv, shape, monkeypatch):
    """grads_into: the backward calls it for dq's, dk's and dv's places and returns those tensors, holding the values
    a call without it computes (bit for bit, fp32; our inter kernel, as bf16 states run it; dv by FLA's kernel then
    copied, or by ours straight there, as DV = None does where a place is given)."""
    monkeypatch.setattr(gla, "INTER", "ours")
    monkeypatch.setattr(gla, "DV", dv)
    tensors = inputs(*shape, torch.float32)
    B, T, H, K = tensors[0].shape
    V = tensors[2].shape[-1]
    want = run(ours, *tensors)
    wide = torch.full((B * T, 2 * H * K + H * V + 3), float("nan"))
    places = [wide[:, :H * K].view(B, T, H, K), wide[:, H * K + 3:2 * H * K + 3].view(B, T, H, K),
              wide[:, 2 * H * K + 3:].view(B, T, H, V)]
    asked = []

    def place(i):
        asked.append(i)
        return places[i]
    got = run(lambda q, k, v, g, cu: gla.chunk_gla(q, k, v, g, cu_seqlens=cu, intra="fla", fwd_intra="fla",
                                                   grads_into=[lambda i=i: place(i) for i in range(3)]), *tensors)
    assert sorted(asked) == [0, 1, 2]
    for name, a, b, p in zip(["dq", "dk", "dv"], got[1:4], want[1:4], places):
        assert torch.equal(p, a), name
        if name == "dv" and dv is None and K > 32:
            # ours into the place, FLA's kernel without one: the same products, but the interpreter's first launch
            # of FLA's kernel takes key blocks of 16 where ours takes 32, so the fp32 sums over them round apart
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
        else:
            assert torch.equal(a, b), name
    assert wide[:, H * K:H * K + 3].isnan().all()
    assert torch.equal(got[0], want[0]) and torch.equal(got[4], want[4])


def test_bf16_states_are_summed_in_fp32():
    """With bf16 states, sum(h * dh) (dg's share of the state's decay) in FLA's kernel is a bf16 product reduced in
    bf16 (Triton's tl.sum keeps its input's dtype); ours takes both to fp32 first. Reference: FLA's kernel on the same
    bf16 values held in fp32. Ours (what chunk_gla picks for bf16 states) matches it to fp32 rounding. FLA's kernel on
    the bf16 states, what chunk_gla ran before, is off by bf16 rounding (5.0e-3 of the largest value here, the
    interpreter adding pairs and rounding each to bf16 as models/cpu_triton.py has it; a GPU's tree may differ)."""
    args = list(_inter_inputs(torch.bfloat16))
    exact_args = list(args)
    exact_args[3], exact_args[6] = args[3].float(), args[6].float()  # h, dh: the same values, in fp32
    want = gla._backward_dqkg(*exact_args, torch.float32, inter="fla")[2]
    ours_dg = gla._backward_dqkg(*args, torch.float32)[2]  # None: ours, for bf16 states
    flas_dg = gla._backward_dqkg(*args, torch.float32, inter="fla")[2]
    rel = lambda a: ((a - want).abs().max() / want.abs().max()).item()  # noqa: E731
    assert rel(ours_dg) < 1e-6, rel(ours_dg)
    assert 1e-3 < rel(flas_dg) < 5e-2, rel(flas_dg)


@pytest.mark.slow
def test_every_config_the_gpus_autotuner_may_pick_gives_glas_recurrence(tmp_path):
    """The tests above run each autotuned kernel at its first config only (models/cpu_triton.py); on a GPU the
    autotuner picks any config its pruning keeps, and the pick may differ between cards. bench/tile_sweep.py --device
    cpu runs chunk_gla as the fused blocks run it once per other tile of every autotuned kernel it launches (FLA's
    config lists built as on an H100; the interpreter ignores warps and stages), that kernel pinned to it, against
    GLA's recurrence in float64. A bug in the BV=128 tiles only (`i_v * 64` for `i_v * BV` in our inter kernel) passes
    every test above and fails here (dq, dk, dg errors of ~0.5). Head dims 80 / 160 keep the tiles GLA 340M's 128 / 256
    keep (and leave partial last blocks); two sequences by cu_seqlens, one of them with a partial chunk."""
    import json
    import subprocess
    import sys
    from tests.train_support import ROOT, env
    def tiles(K, V):
        return {(c.kwargs["BK"], c.kwargs["BV"]) for c in gla._prune_inter(gla._gla_bwd_inter_kernel.configs,
                                                                            {"K": K, "V": V})}
    assert tiles(80, 160) == tiles(128, 256) == {(32, 64), (32, 128), (64, 64), (64, 128)}
    report = tmp_path / "sweep.json"
    out = subprocess.run([sys.executable, f"{ROOT}/bench/tile_sweep.py", "--device", "cpu", "--paths", "ours",
                          "--batch", "1", "--seq-len", "130", "--heads", "1", "--key-dim", "80", "--value-dim", "160",
                          "--cu-seqlens", "0,40,130", "--json", str(report)],
                         env=env(str(tmp_path)), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(report.read_text())
    assert summary["failures"] == [] and summary["skipped"] == 0
    kernels = {k["kernel"]: k for k in summary["paths"][0]["kernels"]}
    for name in ("_gla_bwd_inter_kernel", "_gla_bwd_dv_kernel", "chunk_fwd_kernel_h", "chunk_bwd_kernel_dh",
                 "chunk_gla_fwd_kernel_o"):
        assert len(kernels[name]["configs"]) == 4, (name, kernels[name]["configs"])  # BK 32/64 x BV (64/128 or 32/64)
        assert sorted(kernels[name]["errors"]) == sorted(kernels[name]["configs"][1:]), name
    assert "BK=64,BV=128" in kernels["_gla_bwd_inter_kernel"]["errors"]
    assert max(summary["paths"][0]["first"].values()) < 1e-6


def test_tile_sweep_skips_a_config_the_card_cannot_run_as_the_autotuner_does(monkeypatch):
    """A config whose launch raises OutOfResources (too much shared memory on that card) is one triton's autotuner
    skips: bench/tile_sweep.py lists it as not runnable, not as a failure, and goes on to the next."""
    from triton.runtime.errors import OutOfResources

    from bench import tile_sweep
    tensors = inputs(1, 70, 1, 16, 32, torch.float32)
    exact = tile_sweep.recurrence(*tensors, None, 16 ** -0.5)
    real, calls = tile_sweep.forward_backward, []

    def flaky(fn, t, cu):
        calls.append(1)
        if len(calls) == 2:  # the first config after the baseline run
            raise OutOfResources(232448 * 2, 232448, "shared memory")
        return real(fn, t, cu)
    monkeypatch.setattr(tile_sweep, "forward_backward", flaky)
    report = tile_sweep.sweep("ours", tensors, None, exact, True, "fp32", float("inf"), lambda *a: None)
    unrunnable = {k["kernel"]: k["unrunnable"] for k in report["kernels"] if k["unrunnable"]}
    assert len(unrunnable) == 1 and "OutOfResources" in next(iter(next(iter(unrunnable.values())).values()))
    assert report["failures"] == [] and report["runs"] == len(calls) - 2 > 0


def test_tile_sweep_baseline_takes_the_first_config_the_card_can_run(monkeypatch):
    """Where a kernel's first config cannot run on the card, the baseline run takes the next one (as the autotuner
    would) and the refused config is not swept."""
    import triton.runtime.autotuner as autotuner
    from triton.runtime.errors import OutOfResources

    from bench import tile_sweep
    real, refused = autotuner.Autotuner.run, []

    def picky(self, *args, **kwargs):
        first = self.configs[0]
        if self.base_fn.__name__ == "chunk_fwd_kernel_h" and first.kwargs == {"BK": 16, "BV": 16}:
            refused.append(first)
            raise OutOfResources(10 ** 6, 232448, "shared memory")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(autotuner.Autotuner, "run", picky)
    tensors = inputs(1, 70, 1, 16, 32, torch.float32)
    exact = tile_sweep.recurrence(*tensors, None, 16 ** -0.5)
    report = tile_sweep.sweep("ours", tensors, None, exact, True, "fp32", float("inf"), lambda *a: None)
    h = next(k for k in report["kernels"] if k["kernel"] == "chunk_fwd_kernel_h")
    assert refused and "BK=16,BV=16" not in h["configs"] and len(h["configs"]) == 3
    assert sorted(h["errors"]) == sorted(h["configs"][1:]) and report["failures"] == []


@pytest.mark.slow
def test_tile_sweep_runs_from_a_plain_shell_and_checks_the_tf32x3_dv_path(tmp_path):
    """bench/tile_sweep.py --device cpu started without TRITON_INTERPRET in the environment (as a user types it): it
    turns the interpreter on itself, before triton is imported. The ours-dvtf32x3 path (the dv kernel's product in
    tf32x3, gla.DV_DOT) gives the recurrence at every tile (V 160: the dv kernel keeps BV 64 and 128)."""
    import json
    import subprocess
    import sys
    from tests.train_support import ROOT, env
    e = env(str(tmp_path))
    e.pop("TRITON_INTERPRET")
    out = subprocess.run([sys.executable, f"{ROOT}/bench/tile_sweep.py", "--device", "cpu", "--paths", "ours-dvtf32x3",
                          "--batch", "1", "--seq-len", "70", "--heads", "1", "--key-dim", "16", "--value-dim", "160",
                          "--json", str(tmp_path / "s.json")], env=e, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["failures"] == [] and summary["runs"] > 5
    dv = next(k for k in summary["paths"][0]["kernels"] if k["kernel"] == "_gla_bwd_dv_kernel")
    assert len(dv["errors"]) == len(dv["configs"]) - 1 > 0
