"""The GPU benches' own logic that runs without a GPU: kernel categories and the top-kernels table of
bench/gpu_profile.py, the case names of bench/train_bench.py and the runs and gaps of bench/precision_curve.py."""
import dataclasses

import pytest

from bench.gpu_profile import (category, gap_table, gaps_before, gaps_before_table, idle_gaps, is_annotation,
                               kernel_times, report, top_kernels, trace_intervals)
from bench.precision_curve import compare, labels, parse_run, run_modifiers
from bench.train_bench import case_graphs, case_sync, kernels_override, parse_case
from trainer.config import ModelConfig


@pytest.mark.parametrize("name, cat", [
    ("_rmsnorm_fwd_kernel", "norms"),  # ours (models/kernels/rmsnorm.py)
    ("_gated_rmsnorm_bwd_kernel", "norms"),  # ours (models/kernels/gated_norm.py)
    ("fused_add_rmsnorm_bwd_kernel", "norms"),
    ("layer_norm_bwd_kernel", "norms"),  # FLA's
    ("layer_norm_gated_fwd_kernel", "norms"),
    ("chunk_gla_bwd_kernel_dA", "GLA chunk"),
    ("chunk_local_cumsum_scalar_kernel", "GLA chunk"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_NNT", "GEMM"),
    ("cross_entropy_fwd_kernel", "cross entropy"), ("_cross_entropy_kernel", "cross entropy"),  # FLA's, ours
    # PyTorch's reductions hold "ce_" (reduce_kernel): not cross entropy
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float, float, "
     "float>, unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::NormTwoOps<float, float, float>, "
     "unsigned int, float, 4, 4>)", "grad norm / clip"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
     "at::native::sum_functor<float, float, float>::operator()>, unsigned int, float, 4, 4> >", "elementwise / copies"),
    ("swiglu_fwdbwd_kernel", "SwiGLU"),
    # ours, that replace FLA's chunk kernels (models/kernels/gla*.py), under their names and the names that traces
    # written before 2026-12-07 carry (they were counted as "other": 18.4% outside GEMM + GLA read as 27.0%)
    ("_gla_bwd_intra_kernel", "GLA chunk"), ("_gla_bwd_inter_kernel", "GLA chunk"),
    ("_gla_fwd_intra_kernel", "GLA chunk"), ("_bwd_intra_kernel", "GLA chunk"), ("_bwd_inter_kernel", "GLA chunk"),
    ("_fwd_intra_kernel", "GLA chunk"),
    ("some_new_kernel", "other"),
])
def test_kernel_categories(name, cat):
    assert category(name) == cat


def test_top_kernels_lists_the_largest_per_step_with_category_and_cut_name():
    long = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, " + "x" * 200
    kernels = {"chunk_gla_fwd_kernel_o": (3000.0, 72), long: (9000.0, 363), "_rmsnorm_bwd_kernel": (6000.0, 147),
               "tiny": (3.0, 3)}
    lines = top_kernels(kernels, steps=3, count=3, width=80).splitlines()
    rows = lines[2:]
    assert len(rows) == 3  # the 3 largest, largest first; "tiny" left out
    assert rows[0].split()[:3] == ["3.00", "50.0%", "121.0"]  # 9000 us / 3 steps, share of all, calls per step
    assert "elementwise / copies" in rows[0] and rows[0].endswith(long[:80])
    assert rows[1].split()[:3] == ["2.00", "33.3%", "49.0"] and "norms" in rows[1]
    assert "GLA chunk" in rows[2] and rows[2].endswith("chunk_gla_fwd_kernel_o")


@pytest.mark.parametrize("case, expect", [
    ("ours", ("auto", "fused")), ("ours-bf16", ("bf16", "fused")), ("ours-bf16-fused", ("bf16", "fused")),
    ("ours-bf16-fla", ("bf16", "fla")), ("ours-autocast-fla", ("autocast", "fla")), ("ours-fla", ("auto", "fla")),
    ("ours-fp32", ("fp32", "fused")), ("ours-bf16-graphs", ("bf16", "fused")),
    ("ours-bf16-fla-graphs", ("bf16", "fla")), ("ours-bf16-sync", ("bf16", "fused")),
    ("ours-bf16-graphs-sync", ("bf16", "fused")), ("ours-autocast-fla-sync", ("autocast", "fla")),
    ("ours-bf16-cat", ("bf16", "fused")), ("ours-bf16-split-graphs-sync", ("bf16", "fused")),
    ("ours-bf16-gatesplit-flachunk-mulclip", ("bf16", "fused")), ("ours-bf16-keepz", ("bf16", "fused")),
    ("ours-bf16-mulclip-nokeepz-graphs", ("bf16", "fused")), ("ours-bf16-flachunk-graphs", ("bf16", "fused")),
    ("ours-bf16-hnone", ("bf16", "fused")), ("ours-bf16-nokeepz-hbf16-graphs", ("bf16", "fused")),
    ("ours-bf16-hbf16-intra", ("bf16", "fused")), ("ours-bf16-flaintra-graphs", ("bf16", "fused")),
    ("ours-bf16-fsdp", ("bf16", "fused")), ("ours-bf16-fsdp-hostcheck-sync", ("bf16", "fused")),
    ("ours-bf16-fwdintra", ("bf16", "fused")), ("ours-bf16-hnone-flaintra-fwdintra-sync", ("bf16", "fused")),
    ("ours-bf16-flace", ("bf16", "fused")), ("ours-bf16-ce", ("bf16", "fused")),
    ("ours-bf16-mlpmerged-flace", ("bf16", "fused")), ("ours-bf16-slab-fladv-gnorm", ("bf16", "fused")), ("ours-bf16-split-flagnorm", ("bf16", "fused")), ("ours-bf16-dvtf32x3-graphs", ("bf16", "fused")),
    ("ours-bf16-gnorm", ("bf16", "fused")), ("ours-bf16-mlpmerged-flace-gnorm-graphs", ("bf16", "fused")), ("ours-bf16-mlpgemm-flace-graphs", ("bf16", "fused")),
    ("ours-bf16-gnbwd", ("bf16", "fused")), ("ours-bf16-gnorm-gnbwd-fsdp-sync", ("bf16", "fused")),
    ("ours-bf16-approxlog", ("bf16", "fused")), ("ours-bf16-gnbwd-approxlog-graphs", ("bf16", "fused")),
])
def test_train_bench_cases(case, expect):
    assert parse_case(case) == expect
    assert case_graphs(case) == ("-graphs" in case)
    assert case_sync(case) == case.endswith("-sync")


@pytest.mark.parametrize("case", ["ours-bf17", "ours-fla-bf16", "ours-bf16-fla-x", "theirs-bf16", "ours-",
                                  "ours-graphs-bf16", "ours-bf16-graphs-fla", "ours-bf16-sync-graphs",
                                  "ours-sync-bf16", "ours-bf16-cat-split", "ours-bf16-split-cat", "ours-cat-bf16",
                                  "ours-bf16-graphs-cat", "ours-bf16-flachunk-gatesplit", "ours-bf16-graphs-mulclip",
                                  "ours-bf16-keepz-nokeepz", "ours-bf16-hfp32-hbf16",
                                  "ours-bf16-intra-flaintra", "ours-bf16-intra-hbf16", "ours-bf16-flace-mlpgemm",
                                  "ours-bf16-mlpgemm-mlpmerged", "ours-bf16-hostcheck-fsdp", "ours-bf16-fsdp-graphs",
                                  "ours-bf16-ce-flace", "ours-bf16-flace-ce", "ours-bf16-cat-slab", "ours-slab-split", "ours-bf16-gnorm-flagnorm", "ours-bf16-fladv-dvtf32x3",
                                  "ours-bf16-flagnorm-gnbwd", "ours-bf16-gnbwd-gnorm", "ours-bf16-gatesplit-approxlog",
                                  "ours-bf16-approxlog-gnbwd"])
def test_train_bench_rejects_other_cases(case):
    with pytest.raises(ValueError, match="ours\\[-PRECISION\\]\\[-KERNELS\\]\\[-split\\|-cat\\|-slab\\]\\[-gatesplit\\]"):
        parse_case(case)


def test_gnbwd_takes_the_gated_norm_launch_from_the_command_line(monkeypatch):
    """-gnbwd sets gated_norm.BACKWARD_CONFIG to --gated-norm-bwd's launch in the case's process, and needs one."""
    from bench.train_bench import apply_modifiers
    from models.kernels import gated_norm
    from models.kernels.rmsnorm import BackwardConfig, parse_backward_config
    monkeypatch.setattr(gated_norm, "BACKWARD_CONFIG", None)
    assert parse_backward_config(" 8, 4,2 ,1") == BackwardConfig(8, 4, 2, True)
    assert parse_backward_config("16,4,4,1,128") == BackwardConfig(16, 4, 4, True, 128)
    assert BackwardConfig(16, 4, 4, True, 128).launch() == {"num_warps": 4, "maxnreg": 128}
    assert BackwardConfig(16, 4, 4, True).launch() == {"num_warps": 4}
    for bad in ("8,4,2", "8,4,2,2", "0,4,2,1", "a,4,2,1", "8,4,2,1,x", "8,4,2,1,128,3"):
        with pytest.raises(ValueError, match="BT,WARPS,PER_SM,PREFETCH"):
            parse_backward_config(bad)
    with pytest.raises(ValueError, match="-gnbwd needs --gated-norm-bwd"):
        apply_modifiers("ours-bf16-gnbwd")
    apply_modifiers("ours-bf16", BackwardConfig(8, 4, 2, True))
    assert gated_norm.BACKWARD_CONFIG is None
    apply_modifiers("ours-bf16-gnbwd", BackwardConfig(8, 4, 2, True))
    assert gated_norm.BACKWARD_CONFIG == BackwardConfig(8, 4, 2, True)


def test_approxlog_sets_the_gate_kernels_log(monkeypatch):
    from bench.train_bench import apply_modifiers
    from models.kernels import gate
    monkeypatch.setattr(gate, "LOG", "exact")
    apply_modifiers("ours-bf16-approxlog")
    assert gate.LOG == "approx"


def test_kernels_override_follows_the_trainer_config():
    """With model.gpu_kernels in the trainer config the bench sets it; without it (before models/fused.py) FLA's
    modules are all the trainer runs, so fla needs no override and fused is refused with the fix."""
    if any(f.name == "gpu_kernels" for f in dataclasses.fields(ModelConfig)):
        assert kernels_override("fla") == ["model.gpu_kernels=fla"]
        assert kernels_override("fused") == ["model.gpu_kernels=fused"]
    else:
        assert kernels_override("fla") == []
        with pytest.raises(SystemExit, match="suffix -fla"):
            kernels_override("fused")


def test_precision_curve_runs_and_labels():
    assert parse_run("autocast-fla") == ("autocast", "fla", 0)
    assert parse_run("bf16-fused") == ("bf16", "fused", 0)
    assert parse_run("bf16") == ("bf16", None, 0)  # the trainer's default kernels
    assert parse_run("autocast-fla@1") == ("autocast", "fla", 1)  # model.seed: another init, the same batches
    assert parse_run("bf16@12") == ("bf16", None, 12)
    assert parse_run("bf16-fused-fwdintra-mlpgemm@2") == ("bf16", "fused", 2)
    assert run_modifiers("bf16-fused-fwdintra-mlpgemm@2") == ["fwdintra", "mlpgemm"]
    assert run_modifiers("bf16-fused") == [] and run_modifiers("bf16") == []
    for bad in ("bf16-triton", "half", "bf16-fla-x", "bf16-fla@", "bf16-fla@x", "bf16-fla@-1", "bf16-fused-sync",
                "bf16-mlpgemm-fused"):
        with pytest.raises(ValueError, match="PRECISION\\[-KERNELS\\]\\[-MODIFIER...\\]\\[@SEED\\]"):
            parse_run(bad)
    assert labels(["autocast-fla", "autocast-fla", "bf16-fused", "autocast-fla"]) == [
        "autocast-fla", "autocast-fla#2", "bf16-fused", "autocast-fla#3"]
    assert labels(["autocast-fla", "autocast-fla@1"]) == ["autocast-fla", "autocast-fla@1"]


def test_precision_curve_gap_skips_the_warm_up_steps():
    ref = [10.0, 8.0, 5.0, 4.0, 4.0]
    run = [9.0, 4.0, 5.1, 4.0, 3.96]  # the big early gaps fall before --skip
    gap = compare(ref, run, skip=2)
    assert gap["max_rel_gap"] == pytest.approx(0.02) and gap["at_step"] == 2
    assert gap["mean_rel_gap"] == pytest.approx((0.02 + 0 + 0.01) / 3)
    with pytest.raises(ValueError, match="no steps to compare"):
        compare(ref, run, skip=5)


def test_idle_gaps_buckets_the_time_between_merged_kernels():
    """Gaps are measured between the union of busy intervals (overlapping kernels of two streams leave none), put
    in buckets by length, and nothing before the first kernel or after the last one counts."""
    intervals = [(0, 10), (12, 20), (15, 30),  # 2 us gap, then an overlap: no gap
                 (40, 50),                     # 10 us
                 (100, 110),                   # 50 us
                 (2000, 2010), (2010, 2020)]   # 1890 us, then back to back: no gap
    gaps = idle_gaps(intervals)
    assert [(n, t) for _, n, t in gaps] == [(1, 2.0), (1, 10.0), (1, 50.0), (0, 0.0), (1, 1890.0)]
    assert [label for label, _, _ in gaps] == ["< 5 us", "5-20 us", "20-100 us", "100-1000 us", ">= 1000 us"]
    assert idle_gaps(list(reversed(intervals))) == gaps
    assert idle_gaps([]) == [(label, 0, 0.0) for label, _, _ in gaps]
    text = gap_table(gaps, steps=2)
    assert text.splitlines()[-1].split() == ["all", "2.0", "0.98"]
    # the names ride along as a third element: the same buckets
    named = [(a, b, f"k{i}") for i, (a, b) in enumerate(intervals)]
    assert idle_gaps(named) == gaps


def test_gaps_before_names_the_kernel_that_ended_each_long_gap():
    """Gaps of 20 us or more, summed by the kernel after them (category: name) and the one that ended last before
    them (a kernel overlapping a longer one does not count as last), largest first; shorter gaps and overlaps
    leave nothing."""
    intervals = [(0, 10, "nvjet_gemm"), (12, 20, "_rms_fwd_kernel"),   # 2 us: below the threshold
                 (60, 70, "chunk_gla_fwd_kernel_o"),                   # 40 us before a GLA kernel
                 (65, 80, "nvjet_gemm"),                               # overlaps: no gap
                 (300, 310, "chunk_gla_fwd_kernel_o"),                 # 220 us before the same kernel
                 (330, 340, "_rms_fwd_kernel")]                        # 20 us: counts
    rows = gaps_before(intervals)
    assert rows == [("GLA chunk: chunk_gla_fwd_kernel_o  (after: nvjet_gemm)", 1, 220.0),
                    ("GLA chunk: chunk_gla_fwd_kernel_o  (after: _rms_fwd_kernel)", 1, 40.0),
                    ("norms: _rms_fwd_kernel  (after: chunk_gla_fwd_kernel_o)", 1, 20.0)]
    assert gaps_before(list(reversed(intervals))) == rows
    text = gaps_before_table(rows, steps=2).splitlines()
    assert text[2].split()[:2] == ["0.11", "0.5"] and text[2].endswith("(after: nvjet_gemm)")


def test_annotations_are_told_from_kernels_whose_names_hold_a_hash():
    """The GPU-side range of an optimizer step is not a kernel; a dtype cast whose name holds `{lambda()#1}` is (it
    was dropped from every table from 2026-11-29 to 2026-12-06: ~3.5 ms a step of GLA 340M's kernels on an H200)."""
    assert is_annotation("Optimizer.step#AdamW.step") and is_annotation("Optimizer.zero_grad#AdamW.zero_grad")
    cast = ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at::"
            "TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul> >")
    assert not is_annotation(cast) and category(cast) == "elementwise / copies"
    assert not is_annotation("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT")


def test_our_gla_kernels_have_names_the_profile_counts_as_gla_chunk():
    """The kernels themselves, not only the table: a rename that drops "gla" would send them to "other" again."""
    pytest.importorskip("triton")
    from models.kernels import gla, gla_fwd_intra, gla_intra
    for kernel in (gla._gla_bwd_inter_kernel, gla_intra._gla_bwd_intra_kernel, gla_fwd_intra._gla_fwd_intra_kernel):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        assert category(name) == "GLA chunk", name


def test_from_trace_reads_a_saved_chrome_trace_as_the_live_run_does(tmp_path):
    """--from-trace: the kernels, memcpys and memsets of a trace as torch.profiler exports it (gzip or not), the
    GPU-side annotation ranges and host events left out; the tables are those of the same intervals live."""
    import gzip
    import json
    events = [
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 100.0, "dur": 50.0},
        {"ph": "X", "cat": "kernel", "name": "_gla_bwd_intra_kernel", "ts": 160.0, "dur": 20.0},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 180.0, "dur": 1.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 181.0, "dur": 3.0},
        {"ph": "X", "cat": "kernel", "name": "_swiglu_bwd_kernel", "ts": 300.0, "dur": 10.0},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 100.0, "dur": 210.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 90.0, "dur": 5.0},
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "ts": 95.0},
    ]
    plain, packed = tmp_path / "t.json", tmp_path / "t.json.gz"
    plain.write_text(json.dumps({"traceEvents": events}))
    with gzip.open(packed, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = trace_intervals(str(plain))
    assert got == [(100.0, 150.0, "nvjet_sm90_tst_256x128"), (160.0, 180.0, "_gla_bwd_intra_kernel"),
                   (180.0, 181.0, "Memset (Device)"), (181.0, 184.0, "Memcpy HtoD (Pageable -> Device)"),
                   (300.0, 310.0, "_swiglu_bwd_kernel")]
    assert trace_intervals(str(packed)) == got
    assert kernel_times(got)["_gla_bwd_intra_kernel"] == (20.0, 1)
    text = report(got, steps=1, wall_s=210e-6, top=3)
    # outside GEMM + GLA: the swiglu 10, the memset 1 and the memcpy 3 of 84 us
    assert "outside GEMM + GLA chunk kernels: 0.01 ms/step = 16.7% of kernel time" in text
    assert "top 3 kernels" in text


def test_from_trace_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        trace_intervals(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a trace"}')
    with pytest.raises(SystemExit, match="not a Chrome trace"):
        trace_intervals(str(bad))


def test_roofline_reads_gla_shapes_off_a_meta_model(tmp_path):
    """bench/roofline.py: the sizes its byte counts use come from the model built on the meta device."""
    from bench.roofline import model_shapes
    from tests.train_support import tiny_model_json
    path = tiny_model_json(str(tmp_path / "gla.json"))
    s = model_shapes(path, batch=3, seq_len=64)
    import json
    cfg = json.load(open(path))
    assert (s.N, s.L, s.D, s.V) == (192, cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"])
    assert s.Dk == int(cfg["hidden_size"] * cfg.get("expand_k", 0.5)) and s.Dv == cfg["hidden_size"]
    assert s.F > s.D and s.R > 0 and s.P > s.V * s.D
    assert (s.H, s.BT) == (cfg["num_heads"], 64)
    # one [K, V] bf16 state per chunk of 64 tokens and head
    assert s.states == 3 * s.H * (s.Dk // s.H) * (s.Dv // s.H) * 2
    with pytest.raises(SystemExit, match="not a GLA model"):
        model_shapes(tiny_model_json(str(tmp_path / "tr.json"), "transformer"), batch=1, seq_len=64)


def test_roofline_floor_puts_each_modeled_kernel_at_the_bandwidth():
    """The floor: modeled kernels at bytes / bandwidth, GEMM, GLA and unmodeled kernels as measured; a kernel
    measured faster than its bytes allow is named (the byte model is wrong)."""
    from bench.roofline import Shapes, report, rows, spec_bandwidth
    s = Shapes(N=1000, L=2, D=100, F=300, Dk=50, Dv=100, R=4, V=500, P=10_000)
    # swiglu bwd: 2 layers x 5 tensors x 1000 x 300 bf16 = 6 MB; at 1 TB/s 6 us a step
    kernels = {"nvjet_gemm": (100.0, 4), "_swiglu_bwd_kernel": (12.0, 2), "Memset (Device)": (8.0, 3)}
    (r,) = rows(kernels, steps=1, shapes=s, tbps=1.0)
    assert (r.name, r.calls, r.gb) == ("_swiglu_bwd_kernel", 2, 0.006)
    assert r.roof_ms == pytest.approx(0.006) and r.ms == pytest.approx(0.012)
    text = report(kernels, 1, s, 1.0, "card")
    # outside: swiglu 12 + memset 8 = 20 of 120 us; at the roof swiglu takes 6: 14 of 114
    assert "outside 0.02 (16.7%; 0.01 ms of it not modeled" in text
    assert "outside 0.01 ms = 12.3% of 0.11 ms" in text
    assert "WARNING" not in text
    assert "WARNING: _swiglu_bwd_kernel ran faster" in report({"_swiglu_bwd_kernel": (3.0, 2)}, 1, s, 1.0, "card")
    # our GLA backward kernels are listed apart: inside GEMM + GLA, they do not move the floor
    with_inter = report({**kernels, "_gla_bwd_inter_kernel": (50.0, 2)}, 1, s, 1.0, "card")
    assert "our GLA chunk backward kernels" in with_inter and "_gla_bwd_inter_kernel" in with_inter
    assert spec_bandwidth("NVIDIA H100 80GB HBM3") == 3.35 and spec_bandwidth("NVIDIA H200") == 4.8
    assert spec_bandwidth("some card") is None


def test_path_check_compares_paths_gradients_and_probes_causality(tmp_path):
    """bench/path_check.py --cpu on a tiny GLA: each run in its own process, the fused bf16 path against FLA's fp32
    blocks (cosines near 1, norms within a few percent, the causality probe 0), and a bad run name refused first."""
    import json
    import os
    import subprocess
    import sys
    from tests.train_support import ROOT, env, tiny_model_json
    model = tiny_model_json(str(tmp_path / "gla.json"), num_hidden_layers=2, hidden_size=64, num_heads=2)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "path_check.py"), "--cpu", "--model", model, "--batch", "1",
           "--seq-len", "96", "--dir", str(tmp_path / "out")]
    out = subprocess.run(cmd + ["--runs", "fp32-fla,bf16-fused"], env=env(str(tmp_path)), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    row = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert row["run"] == "bf16-fused" and row["leak"] == 0.0
    assert row["median_cos"] > 0.999 and abs(row["norm_ratio"] - 1) < 0.05, row
    bad = subprocess.run(cmd + ["--runs", "fp32-fla,bf17-fused"], env=env(str(tmp_path)), capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "bf17-fused" in bad.stderr


def test_roofline_reads_a_saved_trace_and_its_card(tmp_path):
    """bench/roofline.py end to end on a trace as torch.profiler writes it: the card from deviceProperties gives
    the datasheet bandwidth, the modeled kernel gets its row."""
    import gzip
    import json
    import os
    import subprocess
    import sys
    from tests.train_support import ROOT, env, tiny_model_json
    trace = {"deviceProperties": [{"id": 0, "name": "NVIDIA H100 80GB HBM3"}], "traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 0.0, "dur": 50.0},
        {"ph": "X", "cat": "kernel", "name": "_swiglu_bwd_kernel", "ts": 60.0, "dur": 10.0}]}
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    model = tiny_model_json(str(tmp_path / "gla.json"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "roofline.py"), "--from-trace", str(path),
                          "--steps", "1", "--model", model, "--batch", "1", "--seq-len", "64"],
                         env=env(str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NVIDIA H100 80GB HBM3: 3.35 TB/s" in out.stdout and "_swiglu_bwd_kernel" in out.stdout


def test_cross_eval_scores_trained_weights_under_each_path(tmp_path):
    """bench/cross_eval.py --cpu: a run's final checkpoint is exported and evaluated under FLA's fp32 forward, our
    fused bf16 forward and the CPU's default bf16 forward on the same held-out sequences. Each path's own loss equals the cross entropy of its logits,
    the two paths agree to bf16 rounding, and the trained weights beat the untrained model's log(V)."""
    import json
    import math
    import os
    import subprocess
    import sys
    from tests.train_support import ROOT, VOCAB, env, make_shards, run_trainer, tiny_model_json, write_toml
    shards = make_shards(str(tmp_path / "shards"), sequences=32, seq_len=64)
    val = make_shards(str(tmp_path / "val"), sequences=8, seq_len=64, seed=1)
    model = tiny_model_json(str(tmp_path / "gla.json"), hidden_size=64, num_heads=2)
    cfg = write_toml(str(tmp_path / "run.toml"), {
        "model": {"config": model}, "data": {"shards": shards, "global_batch": 4},
        "train": {"max_steps": 12}, "optim": {"lr": 1e-2, "warmup": 1},
        "checkpoint": {"every": 0}, "run": {"out_dir": str(tmp_path / "out"), "progress": False}})
    run_trainer(str(tmp_path), cfg)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cross_eval.py"), "--cpu", "--weights",
                          str(tmp_path / "out"), "--paths", "fp32-fla,bf16-fused,bf16", "--shards", val, "--sequences", "4",
                          "--micro-batch", "2"], env=env(str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    cells = {c["path"]: c for c in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(cells) == {"fp32-fla", "bf16-fused", "bf16"} and cells["fp32-fla"]["weights"] == str(tmp_path / "out")
    assert os.path.isfile(tmp_path / "out" / "export" / "config.json")
    fp32, bf16 = cells["fp32-fla"], cells["bf16-fused"]
    assert fp32["sequences"] == 4 and fp32["tokens"] == 4 * 63
    assert abs(fp32["own"] - fp32["xent"]) < 1e-4 * fp32["xent"], fp32
    assert abs(bf16["own"] - bf16["xent"]) < 1e-2 * bf16["xent"], bf16
    assert abs(bf16["xent"] - fp32["xent"]) < 2e-2 * fp32["xent"], cells
    # a path without KERNELS is the trainer's default there: on a CPU FLA's modules with the PyTorch ops (it ran
    # our fused blocks, which the trainer never does on a CPU)
    default = cells["bf16"]
    assert abs(default["own"] - default["xent"]) < 1e-2 * default["xent"], default
    assert abs(default["xent"] - fp32["xent"]) < 2e-2 * fp32["xent"] and default["xent"] != bf16["xent"], cells
    assert fp32["xent"] < math.log(VOCAB) - 0.5, fp32
    assert "weights / path (xent / own)" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cross_eval.py"), "--weights", str(tmp_path / "out"),
                          "--paths", "fp32-fla,bf17-fused", "--shards", val], env=env(str(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "bf17-fused" in bad.stderr  # refused before anything is exported or run


@pytest.mark.slow
def test_train_bench_runs_a_gnbwd_case_on_the_cpu(tmp_path):
    """train_bench -gnbwd --gated-norm-bwd end to end on the CPU: the case process parses the launch only after it
    turned the Triton interpreter on (parsing it imports triton; before, that case failed at its start), and the
    trainer runs with it."""
    import json
    import os
    import subprocess
    import sys
    from tests.train_support import ROOT, env
    e = env(str(tmp_path))
    e.pop("TRITON_INTERPRET")  # as a user runs it: the case process turns the interpreter on itself
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_bench.py"), "--cases", "ours-fp32-gnbwd",
                          "--gated-norm-bwd", "16,4,2,1,128", "--steps", "1", "--warmup", "1", "--batch", "1",
                          "--seq-len", "64", "--model", os.path.join(ROOT, "configs", "demo_gla.json"),
                          "--dir", str(tmp_path / "out")], env=e, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["ours-fp32-gnbwd"] and rows[0]["timed_steps"] == 1
