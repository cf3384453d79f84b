"""benchmarks/hlo_traffic.py: the byte model on a hand-written optimized HLO module, and the CPU compile end to end
(the GPU compile needs the CUDA plugin, which CI does not install: its absence is a named error)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("hlo_traffic", os.path.join(ROOT, "benchmarks", "hlo_traffic.py"))
ht = sys.modules["hlo_traffic"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ht)

# as XLA prints a scheduled GPU module: stack-frame tables, fused computations, then ENTRY with a while loop
MODULE = """HloModule jit_train_step, is_scheduled=true

FileNames
1 "/x/doge_jax/model.py"
2 "/x/doge_jax/loss.py"
3 "/x/doge_jax/train.py"

FunctionNames
1 "RMSNorm.__call__"
2 "_ce_chunks.<locals>.body"
3 "make_steps.<locals>.train_step"

FileLocations
1 {file_name_id=1 function_name_id=1 line=61 end_line=61 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=74 end_line=74 column=1 end_column=9}
3 {file_name_id=3 function_name_id=3 line=170 end_line=170 column=1 end_column=9}

StackFrames
1 {file_location_id=3 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}
3 {file_location_id=2 parent_frame_id=1}

%fused_norm (param_0.1: bf16[4,8], param_1.2: f32[8]) -> f32[4,8] {
  %param_0.1 = bf16[4,8]{1,0} parameter(0)
  %convert.1 = f32[4,8]{1,0} convert(%param_0.1)
  %param_1.2 = f32[8]{0} parameter(1)
  %broadcast.1 = f32[4,8]{1,0} broadcast(%param_1.2), dimensions={1}
  ROOT %multiply.1 = f32[4,8]{1,0} multiply(%convert.1, %broadcast.1), metadata={op_name="mul" stack_frame_id=2}
}

%fused_slice_exp (param_0.3: f32[64,8], param_1.4: s32[]) -> f32[2,8] {
  %param_0.3 = f32[64,8]{1,0} parameter(0)
  %param_1.4 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  %dynamic-slice.1 = f32[2,8]{1,0} dynamic-slice(%param_0.3, %param_1.4, %constant.1), dynamic_slice_sizes={2,8}
  ROOT %exponential.1 = f32[2,8]{1,0} exponential(%dynamic-slice.1), metadata={op_name="exp" stack_frame_id=3}
}

%fused_dus (param_0.5: f32[64,8], param_1.6: f32[2,8], param_2.7: s32[]) -> f32[64,8] {
  %param_0.5 = f32[64,8]{1,0} parameter(0)
  %param_1.6 = f32[2,8]{1,0} parameter(1)
  %param_2.7 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[64,8]{1,0} dynamic-update-slice(%param_0.5, %param_1.6, %param_2.7, %constant.2)
}

%body (p.1: (s32[], f32[64,8], f32[64,8])) -> (s32[], f32[64,8], f32[64,8]) {
  %p.1 = (s32[], f32[64,8]{1,0}, f32[64,8]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%p.1), index=0
  %gte.1 = f32[64,8]{1,0} get-tuple-element(%p.1), index=1
  %gte.2 = f32[64,8]{1,0} get-tuple-element(%p.1), index=2
  %loop_exp_fusion = f32[2,8]{1,0} fusion(%gte.1, %gte.0), kind=kLoop, calls=%fused_slice_exp, \
metadata={op_name="exp" stack_frame_id=3}
  %loop_dus_fusion = f32[64,8]{1,0} fusion(%gte.2, %loop_exp_fusion, %gte.0), kind=kLoop, calls=%fused_dus
  ROOT %tuple.1 = (s32[], f32[64,8]{1,0}, f32[64,8]{1,0}) tuple(%gte.0, %gte.1, %loop_dus_fusion)
}

%cond (p.2: (s32[], f32[64,8], f32[64,8])) -> pred[] {
  %p.2 = (s32[], f32[64,8]{1,0}, f32[64,8]{1,0}) parameter(0)
  ROOT %constant.3 = pred[] constant(true)
}

%fused_layer_cast (param_0.9: f32[24,8], param_1.10: s32[]) -> bf16[1,8] {
  %param_0.9 = f32[24,8]{1,0} parameter(0)
  %convert.2 = bf16[24,8]{1,0} convert(%param_0.9)
  %param_1.10 = s32[] parameter(1)
  %constant.5 = s32[] constant(0)
  ROOT %dynamic-slice.2 = bf16[1,8]{1,0} dynamic-slice(%convert.2, %param_1.10, %constant.5), \
dynamic_slice_sizes={1,8}
}

%on_true (p.3: f32[8]) -> f32[8] {
  %p.3 = f32[8]{0} parameter(0)
  ROOT %loop_true_fusion = f32[8]{0} fusion(%p.3), kind=kLoop, calls=%fused_neg
}

%on_false (p.4: f32[8]) -> f32[8] {
  %p.4 = f32[8]{0} parameter(0)
  ROOT %loop_false_fusion = f32[8]{0} fusion(%p.4), kind=kLoop, calls=%fused_neg
}

%fused_neg (param_0.8: f32[8]) -> f32[8] {
  %param_0.8 = f32[8]{0} parameter(0)
  ROOT %negate.1 = f32[8]{0} negate(%param_0.8)
}

ENTRY %main (Arg_0.1: bf16[4,8], Arg_1.2: f32[8], Arg_2.3: f32[64,8], Arg_3.4: bf16[8,16], Arg_4.5: f32[24,8]) \
-> f32[64,8] {
  %Arg_4.5 = f32[24,8]{1,0} parameter(4)
  %layer.1 = s32[] constant(3)
  %loop_layer_fusion = bf16[1,8]{1,0} fusion(%Arg_4.5, %layer.1), kind=kLoop, calls=%fused_layer_cast
  %Arg_0.1 = bf16[4,8]{1,0} parameter(0)
  %Arg_1.2 = f32[8]{0} parameter(1)
  %Arg_2.3 = f32[64,8]{1,0} parameter(2)
  %Arg_3.4 = bf16[8,16]{1,0} parameter(3)
  %loop_multiply_fusion = f32[4,8]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kLoop, calls=%fused_norm, \
metadata={op_name="mul" stack_frame_id=1}
  %custom-call.1 = (f32[4,16]{1,0}, s8[4194304]{0}) custom-call(%Arg_0.1, %Arg_3.4), \
custom_call_target="__cublas$lt$matmul", metadata={op_name="dot" stack_frame_id=2}
  %constant.4 = s32[] constant(0)
  %tuple.2 = (s32[], f32[64,8]{1,0}, f32[64,8]{1,0}) tuple(%constant.4, %Arg_2.3, %Arg_2.3)
  %while.1 = (s32[], f32[64,8]{1,0}, f32[64,8]{1,0}) while(%tuple.2), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"32"}}
  %pred.1 = pred[] constant(true)
  %cond.1 = f32[8]{0} conditional(%pred.1, %Arg_1.2, %Arg_1.2), true_computation=%on_true, \
false_computation=%on_false
  %index.1 = s32[] constant(1)
  %cond.2 = f32[8]{0} conditional(%index.1, %Arg_1.2, %Arg_1.2), branch_computations={%on_false, %on_true}
  ROOT %gte.3 = f32[64,8]{1,0} get-tuple-element(%while.1), index=2
}
"""


def test_byte_model_on_a_hand_written_module():
    module = ht.parse_module(MODULE)
    assert module.entry == "main"
    ks = {k.name: k for k in ht.kernels(module)}
    # of each conditional the branch lax.cond takes when its predicate holds (true_computation, or the last of
    # branch_computations: lax.cond's [false, true]); here both name on_true: counted at each
    names = [k.name for k in ht.kernels(module)]
    assert names.count("loop_true_fusion") == 2 and "loop_false_fusion" not in names, names
    assert set(ks) == {"loop_multiply_fusion", "custom-call.1", "loop_exp_fusion", "loop_dus_fusion",
                       "loop_true_fusion", "loop_layer_fusion"}
    # one layer of a stacked float32 parameter, cast then sliced: its f32 row (32 bytes) + the index, not the stack
    assert (ks["loop_layer_fusion"].read, ks["loop_layer_fusion"].written) == (32 + 4, 16)
    norm = ks["loop_multiply_fusion"]  # reads bf16[4,8] + f32[8], writes f32[4,8]
    assert (norm.read, norm.written, norm.launches, norm.kind) == (64 + 32, 128, 1, "elementwise")
    # the root's frame (model.py RMSNorm), not the fusion's own (train.py)
    assert norm.frame == ("/x/doge_jax/model.py", "RMSNorm.__call__", 61) and ht.area(norm) == "RMSNorm"
    mm = ks["custom-call.1"]  # bf16[4,8] + bf16[8,16] in, f32[4,16] out; the s8 workspace is not traffic
    assert (mm.read, mm.written, mm.kind, ht.area(mm)) == (64 + 256, 256, "matmul", "matmuls: layers")
    # in the loop (32 trips): the f32[64,8] operand is only dynamic-sliced (2 rows = 64 bytes) + the s32 index
    exp = ks["loop_exp_fusion"]
    assert (exp.read, exp.written, exp.launches) == (32 * (64 + 4), 32 * 64, 32)
    assert ht.area(exp) == "loss: logits passes"
    dus = ks["loop_dus_fusion"]  # in place: only the f32[2,8] update and the index move, not the [64,8] buffer
    assert dus.kind == "in-place update" and dus.read == dus.written == 32 * (64 + 4)
    table = ht.report(list(ks.values()), 4e12, 3)
    total = sum(k.read + k.written for k in ks.values())
    assert f"{ht.gib(total)} read + written" in table and "| RMSNorm | 1 |" in table
    assert table.count("| elementwise: ") + table.count("| in-place update: ") == 3  # top 3 outside matmuls


def test_shapes_and_instruction_lines():
    assert ht.shape_bytes("(bf16[16,2048]{1,0}, /*index=1*/s8[4]{0}, f32[]{})") == 16 * 2048 * 2 + 4 + 4
    ins = ht.parse_instr('  ROOT %t = (f32[2]{0}, s32[]) tuple(%a.1, %b-2), metadata={op_name="x(y)"}')
    assert (ins.name, ins.op, ins.operands, ins.root) == ("t", "tuple", ["a.1", "b-2"], True)
    assert ht.parse_instr("}") is None


def test_cli_on_the_cpu_compile_and_a_saved_module(tmp_path):
    """--cpu compiles the tiny config's bf16 training step; --hlo reads a saved module (gzipped as gpu_check saves
    it) and gives the same tables."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    saved = tmp_path / "step.hlo"
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hlo_traffic.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    p = run("--cpu", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--rows", "2", "--seq", "64",
            "--save", str(saved))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "configs/tiny.yaml, 2 x 64 tokens, bf16, fused attention (fold qk), loss_chunk 1024, this CPU" in p.stdout
    for area in ("| loss: matmuls |", "| matmuls: layers |", "| RMSNorm |", "| optimizer |"):
        assert area in p.stdout, (area, p.stdout)
    with open(saved, "rb") as f, gzip.open(tmp_path / "step.hlo.gz", "wb") as g:
        g.write(f.read())
    for path in (saved, tmp_path / "step.hlo.gz"):
        q = run("--hlo", str(path))
        assert q.returncode == 0, q.stderr[-3000:]
        assert q.stdout.split("\n", 1)[1] == p.stdout.split("\n", 1)[1]  # same tables, other first line


def test_gpu_compile_without_the_cuda_plugin_is_named(tmp_path):
    if importlib.util.find_spec("jax_cuda12_plugin") is not None:
        pytest.skip("the CUDA plugin is installed here")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hlo_traffic.py"), "--config",
                        os.path.join(ROOT, "configs", "tiny.yaml"), "--rows", "1", "--seq", "64"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 1 and 'pip install "jax[cuda12]==' in p.stderr and "--cpu" in p.stderr, p.stderr[-2000:]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hlo_traffic.py"), "--rows", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rows must be >= 1" in bad.stderr


def test_trace_join_gives_measured_time_and_bandwidth(tmp_path):
    """--trace: a profile of 2 steps of the hand-written module (GPU plane, "XLA Ops" line, as jax.profiler writes
    it): per-step ms by kernel name, the steps counted from the kernels outside loops, the bandwidth achieved, and
    the traced time no kernel accounts for (the while op spanning its body)."""
    from jax.profiler import ProfileData

    ks = ht.kernels(ht.parse_module(MODULE))
    # ns per event: the norm 1000, the matmul 3000, the loop's kernels 100 and 50 per trip; 2 steps
    per_event = {"loop_multiply_fusion": 1000, "custom-call.1": 3000, "loop_exp_fusion": 100, "loop_dus_fusion": 50,
                 "while.1": 20000}
    ids = {n: i for i, n in enumerate(per_event, 1)}
    events, t = [], 0
    for _ in range(2):
        for name, n in (("loop_multiply_fusion", 1), ("custom-call.1", 1), ("while.1", 1), ("loop_exp_fusion", 32),
                        ("loop_dus_fusion", 32)):
            for _ in range(n):
                ps = per_event[name] * 1000
                events.append(f"events {{ metadata_id: {ids[name]} offset_ps: {t} duration_ps: {ps} }}")
                t += ps
    meta = " ".join(f"event_metadata {{ key: {i} value {{ id: {i} name: {n!r} }} }}" for n, i in ids.items())
    text = (f'planes {{ id: 1 name: "/device:GPU:0" lines {{ id: 1 name: "XLA Ops" timestamp_ns: 0 '
            f'{" ".join(events)} }} {meta} }}')
    path = tmp_path / "step.xplane.pb.gz"
    with gzip.open(path, "wb") as f:
        f.write(ProfileData.text_proto_to_serialized_xspace(text))
    times, steps, unmatched = ht.trace_times(str(path), ks)
    assert steps == 2 and unmatched == pytest.approx(20e-6)
    assert times["loop_multiply_fusion"] == pytest.approx(1e-6) and times["loop_exp_fusion"] == pytest.approx(3.2e-6)
    table = ht.report(ks, 4e12, 3, times)
    norm = next(k for k in ks if k.name == "loop_multiply_fusion")
    bw = (norm.read + norm.written) / 1e-6 / 1e12
    assert f"| RMSNorm | 1 | {ht.gib(224)} | " in table and f"| 0.00 | {bw:.2f} |" in table, table
    assert "measured 0.01 ms of kernel time per step" in table  # 1 + 3 + 3.2 + 1.6 us
    with pytest.raises(SystemExit, match="no \"XLA Ops\" line"):
        ht.trace_times(str(_empty_trace(tmp_path)), ks)


def _empty_trace(tmp_path):
    from jax.profiler import ProfileData

    path = tmp_path / "empty.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace('planes { id: 1 name: "/host:CPU" }'))
    return path
