"""benchmarks/gpu_check.py: its CPU fallback runs every section's code path at tiny sizes (issue 7)."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def test_gpu_check_cpu_fallback(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    before = open(results).read() if os.path.exists(results) else None
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "OUT": str(tmp_path)}
    sections = "parity,attention,train,generate,profile"
    # a budget no CPU run reaches: every row must run (a loaded machine must not turn rows into SKIPs)
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--sections", sections, "--budget", "3000"],
                          capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    table = out[out.index("| section | check | device | measured | target | status |"):]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert all(r[2] == "cpu-fallback" for r in rows)
    smoke = [r for r in rows if r[0] == "| setup"]
    assert len(smoke) == 2 and all("smoke test" in r[1] and r[-1] == "PASS |" for r in smoke), smoke
    parity = [r for r in rows if r[0] == "| parity" and "host syncs" not in r[1]]
    assert len(parity) >= 12 and all(r[-1] == "PASS |" for r in parity), parity
    assert sum("MoE" in r[1] for r in parity) == 5, parity  # both frameworks' CDMoE, fp32 and torch bf16
    assert sum("ties (A=0" in r[1] for r in parity) == 4, parity  # torch auto (no Triton on CPU), jax x 3
    # the value-side fold: torch fp32 logits + gradients (unpadded and padded) and bf16 autocast, jax fp32 (unpadded
    # and padded) and bf16
    assert sum("v-side fold" in r[1] for r in parity) == 8, parity
    # the folds with padding keys: torch fp32 (both folds: logits + gradients) and bf16 autocast, jax fp32 both folds
    assert sum("T<=keep_window, padding)" in r[1] or r[1].endswith("logits, padding") for r in parity) == 7, parity
    syncs = [r for r in rows if r[0] == "| parity" and "host syncs" in r[1]]  # counted on CUDA only
    assert len(syncs) == 1 and syncs[0][-1] == "SKIP |" and "the step ran" in syncs[0][3], syncs
    for section in ("train", "attention", "generate", "profile"):
        got = [r for r in rows if r[0] == f"| {section}"]
        assert got and all(r[-1] in ("- |", "MET |", "MISSED |") for r in got), (section, got)
    prof = {r[1]: r[3] for r in rows if r[0] == "| profile"}
    jprof = [m for c, m in prof.items() if "doge_jax bf16 step profile" in c]  # read back from jax.profiler's trace
    assert len(jprof) == 1 and "XLA fusion" in jprof[0] and "ms per step untraced" in jprof[0], prof
    assert "-- doge_jax step: top kernels by device time" in out
    # what the device tool brings back from $OUT: plain files at the top (the trace and HLO gzipped)
    assert sorted(os.listdir(tmp_path)) == ["jax_step.xplane.pb.gz", "jax_step_hlo.txt.gz", "profile_jax.txt",
                                            "profile_torch.txt"]
    with gzip.open(tmp_path / "jax_step_hlo.txt.gz", "rt") as f:
        assert f.read().startswith("HloModule jit_train_step")
    assert any("pallas" in r[1] for r in rows), "the doge_jax Pallas kernel (interpret mode) is checked"
    gen = [r for r in rows if r[0] == "| generate"]
    assert any(r[1].startswith("transformers") for r in gen), "generation has the transformers baseline"
    assert all("x transformers" in r[3] for r in gen if r[1].startswith(("doge_jax", "doge_torch"))), gen
    train = [r for r in rows if r[0] == "| train"]
    hf = [r for r in train if " transformers " in r[1]]
    assert len(hf) == 1 and all("the baseline" in r[3] for r in hf), "training has the transformers baseline"
    main = [r for r in train if r[1].endswith("x 2 rows") and "[" not in r[1] and " doge_" in r[1]]
    assert len(main) == 2 and all("x transformers" in r[3] for r in main), main
    assert not any("[" in r[1] for r in train), train  # the probe rows: only with --probes
    assert any("Triton kernel" in r[1] for r in rows), "the doge_torch Triton kernel (interpreter) is checked"
    assert "all checks passed (1 row SKIP: not run)" in out  # the host-sync count (CUDA only)
    assert re.search(r"\(kernel smoke tests \d+s, parity \d+s, attention \d+s, train \d+s, generate \d+s, "
                     r"profile \d+s\); all checks passed", out), out[-500:]  # each section's seconds
    after = open(results).read() if os.path.exists(results) else None
    assert after == before, "the CPU fallback must not append to RESULTS.md without --append"



def test_probe_rows_only_with_the_flag(monkeypatch):
    """Without --probes the train and attention sections run only the checks and targets (to fit the 8 minutes);
    with it also the exploratory rows (cells timed as 1 ms here: which rows run is the point)."""
    import torch

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    monkeypatch.setattr(gpu_check, "time_fn", lambda fn, reps, warmup=1: 1e-3)
    probed = []
    monkeypatch.setattr(gpu_check, "train_probes", lambda *a: probed.append(a[-5]))
    names = {}
    for probes in (False, True):
        report = gpu_check.Report("cpu-fallback")
        gpu_check.section_attention(report, gpu_check.Budget(600), True, torch.device("cpu"), probes)
        # (a --train-only filter no row matches: the section's own rows return at once)
        gpu_check.section_train(report, gpu_check.Budget(600), True, torch.device("cpu"), 1e12, "all",
                                ("no such row",), probes)
        names[probes] = [r[1] for r in report.rows]
    extra = [n for n in names[True] if n not in names[False]]
    assert set(names[False]) <= set(names[True])
    assert any("v-side fold" in n for n in extra) and not any("v-side fold" in n for n in names[False]), extra
    assert probed == ["tiny (as Doge-160M)"]  # the train probes: only with the flag, on the last config


def test_attention_core_rows_at_every_size_come_first(monkeypatch):
    """The attention section times the causal baselines and each framework's default DMA path at every T before any
    other row: a budget that runs out after those still measures every size (an H200 run spent the section on the
    16k comparisons and skipped 2k, 8k and 32k)."""
    import torch

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    monkeypatch.setattr(gpu_check, "time_fn", lambda fn, reps, warmup=1: 1e-3)

    class Cells(gpu_check.Budget):  # room for `n` cells (one left() check each), then none
        def __init__(self, n):
            super().__init__(600)
            self.n = n

        def left(self, core=False):
            self.n -= 1
            return 600 if self.n >= 0 else 0

    report = gpu_check.Report("cpu-fallback")
    gpu_check.section_attention(report, Cells(10), True, torch.device("cpu"))
    ran = [r[1] for r in report.rows if r[-1] != "SKIP"]
    # each row is in the table once timed (they were added after both passes: a fault lost the section's timings)
    calls = []

    def faulty(fn, reps, warmup=1):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return 1e-3

    monkeypatch.setattr(gpu_check, "time_fn", faulty)
    faulted = gpu_check.Report("cpu-fallback")
    gpu_check.section_attention(faulted, Cells(10), True, torch.device("cpu"))
    statuses = [r[-1] for r in faulted.rows if r[-1] != "SKIP"]
    assert statuses == ["-"] * 4 + ["ERROR"] + ["-"] * 5, faulted.rows
    skipped = [r[1] for r in report.rows if r[-1] == "SKIP"]
    assert len(ran) == 10 and skipped, (ran, skipped)
    for T in (256, 128):  # (the CPU sizes: 2 keep_windows, and one)
        at = [n for n in ran if n.startswith(f"T={T} ")]
        assert any(gpu_check.BASELINE_DEFAULT in n for n in at), at
        assert any("jax causal" in n for n in at), at
        assert any("doge_torch DMA" in n for n in at) and any("doge_jax DMA" in n for n in at), at
    assert not any("blockwise" in n or "dense" in n or "eager" in n for n in ran), ran  # comparisons: after


def test_core_rows_run_when_the_section_share_is_spent(monkeypatch):
    """A section that ran over its share costs the later sections their extra rows, not the rows issue 7 asks for:
    with the section's share spent but not the whole budget, the attention core rows and the train target rows run,
    the attention comparisons and the --probes rows are budget SKIPs (timings and steps faked: which rows run is the
    point). Each section's share used to gate every row, so one slow section turned later targets into SKIPs."""
    import types

    import torch

    import doge_torch.train

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    monkeypatch.setattr(gpu_check, "time_fn", lambda fn, reps, warmup=1: 1e-3)
    monkeypatch.setattr(gpu_check, "time_queued", lambda fn, steps, warmup=1: 1e-3)
    monkeypatch.setattr(gpu_check, "hf_train_rate", lambda *a: (1e3, "faked"))
    monkeypatch.setattr(gpu_check, "_jax_step", lambda *a: (lambda p, o, b: (p, o, {"loss": 1.0}), 0, 0, "faked"))
    opt = types.SimpleNamespace(defaults={})
    monkeypatch.setattr(gpu_check, "torch_train_setup", lambda *a: (None, None, opt))
    monkeypatch.setattr(doge_torch.train, "train_step", lambda *a, **k: {"loss": torch.tensor(1.0)})

    def spent():
        budget = gpu_check.Budget(600)
        budget.start(0.0, 1.0)  # this section's share: nothing
        assert budget.left() <= 0 < budget.left(core=True)
        return budget

    report = gpu_check.Report("cpu-fallback")
    gpu_check.section_attention(report, spent(), True, torch.device("cpu"), probes=True)
    gpu_check.section_train(report, spent(), True, torch.device("cpu"), 1e12, "all", (), probes=True)
    ran = [r[1] for r in report.rows if r[-1] != "SKIP"]
    skipped = [r[1] for r in report.rows if r[-1] == "SKIP"]
    assert all(r[3] == "budget" for r in report.rows if r[-1] == "SKIP"), report.rows
    for T in (256, 128):  # every size's core rows
        at = [n for n in ran if n.startswith(f"T={T} ")]
        assert any(gpu_check.BASELINE_DEFAULT in n for n in at) and any("jax causal" in n for n in at), at
        assert any("doge_torch DMA" in n for n in at) and any("doge_jax DMA" in n for n in at), at
    assert any("blockwise" in n for n in skipped) and not any("blockwise" in n for n in ran), (ran, skipped)
    train = [n for n in ran if not n.startswith("T=")]
    for fw in ("transformers", "doge_jax", "doge_torch"):  # the target rows (one config on the CPU), each framework
        assert any(n.startswith(f"tiny (as Doge-160M) {fw}") for n in train), (fw, train)
    assert not any("[" in n for n in train) and any("[" in n for n in skipped), (train, skipped)


def test_results_entry_also_lands_in_out(tmp_path):
    """The RESULTS.md entry is also appended under $OUT, the one folder the device tool brings back (the append
    to the GPU machine's copy of RESULTS.md was lost with the machine)."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    results, out = tmp_path / "RESULTS.md", tmp_path / "out"
    results.write_text("# earlier\n")
    assert gpu_check.save_entry("\n## run 1\n", str(results), None) == [str(results)]
    out.mkdir()
    assert gpu_check.save_entry("\n## run 2\n", str(results), str(out)) == [str(results),
                                                                            str(out / "gpu_check_results.md")]
    assert results.read_text() == "# earlier\n\n## run 1\n\n## run 2\n"
    assert (out / "gpu_check_results.md").read_text() == "\n## run 2\n"


def test_device_events_reads_kernels_from_gpu_stream_lines():
    """The profile's GPU branch on a synthetic GPU trace: kernels only from the "Stream #" lines (not CUPTI's
    overhead line nor the derived "Async XLA Ops"), HLO ops from "XLA Ops"; a trace without kernels names its
    lines."""
    import pytest
    from jax.profiler import ProfileData

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    def line(i, name, evs):
        return f"lines {{ id: {i} name: {name!r} timestamp_ns: 0 " + " ".join(
            f"events {{ metadata_id: {m} offset_ps: {o} duration_ps: {d} }}" for m, o, d in evs) + " }"

    names = {1: "nvjet_tst_128x256_gemm", 2: "loop_add_fusion", 3: "Activity Buffer Request", 4: "copy-start",
             5: "dot.1"}
    meta = " ".join(f"event_metadata {{ key: {k} value {{ id: {k} name: {v!r} }} }}" for k, v in names.items())

    def trace(lines):
        text = 'planes { id: 1 name: "/device:GPU:0" ' + " ".join(lines) + " " + meta + " }"
        return ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(text))

    lines = [line(7, "Stream #7(Kernel,Memset)", [(1, 0, 5_000_000), (2, 6_000_000, 3_000_000)]),
             line(8, "CUPTI overhead", [(3, 0, 4_000_000)]), line(9, "Async XLA Ops", [(4, 0, 2_000_000)]),
             line(10, "XLA Ops", [(5, 0, 5_000_000)])]
    kernels, ops = gpu_check.device_events(trace(lines), cpu=False)
    assert kernels == [("nvjet_tst_128x256_gemm", 5000.0), ("loop_add_fusion", 3000.0)]
    assert ops == [("dot.1", 5000.0)]
    assert gpu_check.kernel_categories(kernels) == {"matmul": 5000.0, "XLA fusion": 3000.0}
    with pytest.raises(RuntimeError, match="CUPTI overhead"):
        gpu_check.device_events(trace(lines[1:]), cpu=False)


def test_host_sync_count_ignores_the_prototype_notice():
    """torch 2.11's sync debug mode warns once that it "does not yet detect all synchronizing operations" when it is
    switched on: that notice is not a sync (an H200 run reported 1 sync and FAIL on it alone); a real report is."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    notice = ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
              "operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:885.)")
    real = "called a synchronizing CUDA operation (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:150.)"
    assert gpu_check.sync_warnings([notice]) == []
    assert gpu_check.sync_warnings([notice, real, "some other warning"]) == [real]


@pytest.mark.slow  # ~1.5 min of CPU; the default rows run in the default suite (test_gpu_check_cpu_fallback)
def test_gpu_check_cpu_probes():
    """--probes on the CPU fallback: the exploratory train and attention rows run (none fails), both frameworks'
    v-side fold among them."""
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--sections", "attention,train", "--budget", "3000",
                           "--no-append", "--probes"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    table = out[out.index("| section | check | device | measured | target | status |"):]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    train = [r for r in rows if r[0] == "| train"]
    assert all(r[-1] == "- |" for r in rows if r[0] in ("| train", "| attention")), rows
    for probe in ("[pallas/Triton kernels]", "[sdpa cuDNN first]", "[v-side fold]", "[unrolled layers]",
                  "[FlexAttention, no fold] doge_torch"):
        assert any(probe in r[1] for r in train), (probe, train)
    assert sum("[v-side fold] doge_" in r[1] for r in train) == 2, train  # both frameworks
    assert sum("[FlexAttention, no fold]" in r[1] for r in train) == 1, train  # doge_torch only
    for probe in ("[loss_chunk 4096]", "[fewer bytes]"):  # doge_jax only
        want = f"tiny (as Doge-160M) {probe} doge_jax bf16 fused seq 128 x 2 rows"
        assert [r[1] for r in train if probe in r[1]] == [want], train
    assert sum("v-side fold" in r[1] for r in rows if r[0] == "| attention") == 2  # (T <= keep_window: both)
    assert "with --probes" in out


@pytest.mark.slow  # ~1 min of CPU; the script's CPU fallback itself runs in the default suite
def test_failed_kernel_smoke_test_skips_only_that_frameworks_rows():
    """A framework whose kernels fail their smoke test (in a child process; here on purpose) gets a FAIL row and
    its kernel rows are not run in the main process (on a GPU a kernel fault poisons the CUDA context); the other
    framework's kernels and everything else still run. The same run checks --train-only TERMS (an A/B of one row,
    e.g. under other XLA_FLAGS): only the train rows whose name has every term run."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPU_CHECK_BREAK_KERNELS": "triton"}
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--sections", "attention,train", "--budget", "3000",
                           "--no-append", "--probes", "--train-only", "unrolled,JAX"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]  # the FAIL row
    table = out[out.index("| section | check | device | measured | target | status |"):]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    setup = {r[1]: r for r in rows if r[0] == "| setup"}
    assert [r[-1] for r in setup.values()] == ["FAIL |", "PASS |"], setup  # triton, pallas
    assert "broken on purpose" in next(iter(setup.values()))[3]
    triton = [r for r in rows if r[0] == "| attention" and "Triton" in r[1]]
    assert triton and all(r[-1] == "SKIP |" and "smoke test failed" in r[3] for r in triton), triton
    ran = [r for r in rows if r[0] == "| attention" and r[-1] == "- |"]
    assert any("pallas" in r[1] for r in ran) and any("blockwise" in r[1] for r in ran), ran
    train = [r for r in rows if r[0] == "| train"]
    assert len(train) == 1 and "[unrolled layers] doge_jax" in train[0][1] and "tok/s" in train[0][3], train

@pytest.mark.slow
def test_kernel_tune_cpu_check():
    """benchmarks/kernel_tune.py (the GPU block-size sweep of both kernels) runs its tiny CPU check end to end."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_tune.py"), "--reps", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| doge_")]
    assert len(rows) == 10 and all("error" not in r for r in rows), rows
    assert sum("sparse" in r for r in rows) == 5 and sum("skip-full-tile-mask" in r for r in rows) == 2, rows


def test_sparse_tiles_counts_less_work_beyond_the_keep_window():
    """benchmarks/sparse_tiles.py: the sparse kernels' query-side tiles from real key lists; fewer than the dense
    kernels' at T = 8 keep_window, and every list within keep_window + superblock."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sparse_tiles.py"), "--seq", "1024",
                           "--keep", "128", "--superblocks", "64", "--no-append"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 1024 |")]
    assert len(row) == 1, proc.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[3]) < 0.5 and int(cells[5]) <= 128 + 64, row


@pytest.mark.slow
def test_auto_threshold_script_times_both_impls():
    """benchmarks/auto_threshold.py: a training step per attention impl and the impl `auto` picks at that size."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "auto_threshold.py"), "--config",
                           os.path.join(ROOT, "configs", "tiny.yaml"), "--sizes", "64x2", "--reps", "1", "--rounds",
                           "1", "--no-append"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 64 x 2 |")]
    cells = [c.strip() for c in row[-1].strip("|").split("|")]
    assert float(cells[1].replace(",", "")) > 0 and float(cells[2].replace(",", "")) > 0 and cells[4] == "reference"



@pytest.mark.slow
def test_moe_memory_benchmark_runs():
    """benchmarks/moe_memory.py: one MoE training step per implementation, each in its own process; doge_torch and
    transformers start from the same seeded init, so their first losses agree."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "moe_memory.py"), "--config",
                           os.path.join(ROOT, "configs", "doge-20m-moe.yaml"), "--seq", "16", "--aux", "--no-append"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {ln.split("|")[1].strip(): ln.split("|") for ln in proc.stdout.splitlines() if ln.startswith("| ")}
    assert {"transformers", "doge_torch", "doge_jax"} <= set(rows), proc.stdout
    losses = {k: float(rows[k][6]) for k in ("transformers", "doge_torch", "doge_jax")}
    assert abs(losses["doge_torch"] - losses["transformers"]) <= 1e-4, losses
    assert 9 < losses["doge_jax"] < 12, losses  # ~ln(32768) at init
    assert float(rows["doge_jax"][4]) > 0  # XLA's temporary bytes
    dense = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "moe_memory.py"), "--config",
                            os.path.join(ROOT, "configs", "tiny.yaml"), "--no-append"], capture_output=True, text=True,
                           timeout=120)
    assert dense.returncode == 2 and "not a MoE model (model.is_moe is false)" in dense.stderr, dense.stderr[-2000:]


def test_train_only_terms():
    """--train-only's matching (the run itself: test_failed_kernel_smoke_test_skips_only_that_frameworks_rows):
    every term and none of the ~terms, against the row's full name."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    main = "Doge-160M doge_jax seq 2048 x 16 rows"
    terms = ("160m", "doge_jax", "x 16 rows", "~[")
    assert gpu_check.train_row_wanted(main, terms)
    for other in ("Doge-160M [unrolled layers] doge_jax seq 2048 x 16 rows", "Doge-160M doge_jax seq 2048 x 32 rows",
                  "Doge-160M doge_torch seq 2048 x 16 rows", "Doge-20M doge_jax seq 2048 x 32 rows"):
        assert not gpu_check.train_row_wanted(other, terms), other
    assert gpu_check.train_row_wanted(main, ())  # no filter: every row


def test_budget_must_be_positive():
    """--budget -5 ran every section as if there were time (29 PASS, 28 SKIP, "all checks passed")."""
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--budget", "-5", "--no-append"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--budget -5.0: must be > 0 seconds" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("argv, msg", [
    (["--sections", ""], "--sections '': no section named"),
    (["--sections", "generate", "--train-only", "160m"], "--train-only '160m' filters the train section's rows"),
    (["--sections", "parity, bogus"], "unknown sections ['bogus']"),  # (' parity' was unknown: spaces kept)
])
def test_sections_argument_errors(argv, msg):
    """An empty --sections ran nothing and said "all checks passed"; --train-only without the train section was
    ignored (and named in the RESULTS.md title); a space after a comma made a valid name unknown."""
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--no-append", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
