"""Memory traffic of doge_jax's training step as XLA compiles it for a GPU, without a GPU.

Compiles the step (exactly what benchmarks/gpu_check.py times: `doge_jax.train.make_steps`, bf16 compute, the
fused attention path) for an H100 (sm_90) on this machine through the CUDA plugin's compiler ("deviceless" AOT: no
driver, no device), then reads the optimized HLO: for every kernel it launches, the bytes it reads (its operands;
only the slice of an operand it only slices, also through a convert) and writes (its result), summed by model area
and by kind, with the time each would take at a given bandwidth. Nothing here is timed: it says where the bytes
go, so a change to the model can be judged on a CPU machine before a GPU confirms it (gpu_check's profile shows the
kernels' times under the same names).

  pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # the compiler (~6 GB installed)
  python benchmarks/hlo_traffic.py                              # Doge-160M, 16 x 2048 tokens, as gpu_check
  python benchmarks/hlo_traffic.py --fold v --loss-chunk 4096   # compare a variant
  python benchmarks/hlo_traffic.py --fewer-bytes                # doge_jax's byte-saving variants on
  python benchmarks/hlo_traffic.py --hlo jax_step_hlo.txt.gz    # a real GPU's compile (gpu_check --sections profile)
  python benchmarks/hlo_traffic.py --hlo jax_step_hlo.txt.gz --trace jax_step.xplane.pb.gz   # + measured times
  python benchmarks/hlo_traffic.py --cpu --config configs/tiny.yaml --rows 2 --seq 128   # the CPU compile (tests)

Byte model: each kernel reads each operand once and writes its result once (no cache reuse, no re-reads inside a
kernel); kernels inside loops count once per trip, of a conditional only the branch lax.cond takes when its
predicate holds (doge_jax's expected path: the value fold's, not its fallback); cuBLAS/cuDNN scratch buffers and the
untouched part of an in-place update are not traffic. Without a device there is no autotuning: XLA picks matmul
kernels by heuristics, so `--gemm cublas` (all cuBLAS) and `--gemm triton` (XLA's default: Triton GEMM fusions, which
may absorb an elementwise producer) bracket what a real compile does.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# GpuTargetConfigProto (text) of an H100 SXM: the device facts XLA's GPU compiler needs (from NVIDIA's specs, as in
# XLA's own gpu_specs/h100_sxm.txtpb) plus the cuDNN version the cuDNN attention custom call is built for.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# instructions that launch nothing
FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all", "opt-barrier", "partition-id",
        "replica-id", "add-dependency", "domain"}
CONTROL = {"while", "conditional", "call"}
SLICING = {"slice", "dynamic-slice", "gather"}
MOVES = {"concatenate", "pad", "slice", "dynamic-slice", "copy", "transpose", "convert", "broadcast", "reshape",
         "bitcast", "iota", "parameter", "constant", "tuple"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuples summed ('(bf16[16,2048]{1,0}, s8[4]{0})')."""
    total = 0
    for dtype, dims in ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES.get(dtype, 0)
    return total


def _balanced(s: str, start: int) -> int:
    """Index just past the bracket group opening at s[start]."""
    depth = 0
    for i in range(start, len(s)):
        depth += s[i] in "({"
        depth -= s[i] in ")}"
        if depth == 0:
            return i + 1
    return len(s)


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list[str]
    inner: str  # the text between the parentheses (a parameter's number)
    attrs: str
    root: bool


def parse_instr(line: str) -> Instr | None:
    """One HLO instruction line ('%name = shape op(%a, %b), attrs'), or None."""
    m = re.match(r"\s*(ROOT )?%?([\w.\-]+) = ", line)
    if not m:
        return None
    rest = line[m.end():]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"[\w\-$.]+", rest)
    if not op or rest[op.end():op.end() + 1] != "(":
        return None
    close = _balanced(rest, op.end())
    inner = rest[op.end() + 1:close - 1]
    return Instr(m.group(2), shape, op.group(0), re.findall(r"%([\w.\-]+)", inner), inner, rest[close:],
                 bool(m.group(1)))


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    entry: str
    frames: dict[int, tuple[str, str, int, int]]  # stack frame id -> (file, function, line, parent frame id)


def parse_module(text: str) -> Module:
    """Computations and the stack-frame table of an optimized HLO module's text (`compiled.as_text()`)."""
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    computations: dict[str, list[Instr]] = {}
    entry, current, section = "", None, None
    for line in text.splitlines():
        head = re.match(r"(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if head:
            current, section = head.group(2), None
            computations[current] = []
            entry = head.group(2) if head.group(1) else entry
        elif line == "}":
            current = None
        elif current is not None:
            ins = parse_instr(line)
            if ins:
                computations[current].append(ins)
        elif line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif section and line.strip():
            key, _, value = line.partition(" ")
            tables[section][int(key)] = value
    ints = lambda s: dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", s))  # noqa: E731
    frames = {}
    for fid, value in tables["StackFrames"].items():
        f = ints(value)
        loc = ints(tables["FileLocations"].get(f["file_location_id"], ""))
        frames[fid] = (tables["FileNames"].get(loc.get("file_name_id"), "").strip('"'),
                       tables["FunctionNames"].get(loc.get("function_name_id"), "").strip('"'),
                       loc.get("line", 0), f.get("parent_frame_id", 0))
    return Module(computations, entry, frames)


def project_frame(module: Module, attrs: str) -> tuple[str, str, int] | None:
    """The innermost stack frame in doge_jax or optax of an instruction's metadata: (file, function, line)."""
    m = re.search(r"stack_frame_id=(\d+)", attrs)
    fid, seen = int(m.group(1)) if m else 0, set()
    while fid in module.frames and fid not in seen:
        seen.add(fid)
        file, func, line, parent = module.frames[fid]
        if "/doge_jax/" in file or "/optax/" in file:
            return file, func, line
        fid = parent
    return None


def kind(module: Module, ins: Instr) -> str:
    """What a kernel does: matmul, attention, reduce, elementwise, data movement (concat/pad/slice/copy), ..."""
    if ins.op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.attrs).group(1)
        if "fmha" in target:
            return "attention (cuDNN)"
        return "matmul" if "matmul" in target or "gemm" in target else f"custom-call {target}"
    if ins.op != "fusion":
        return "matmul" if ins.op in ("dot", "convolution") else f"unfused {ins.op}"
    body = module.computations.get(_called(ins), [])
    ops = {b.op for b in body}
    if "__triton_gemm" in ins.attrs or "gemm_fusion" in ins.name or ops & {"dot", "convolution"}:
        return "matmul"
    if "kind=kCustom" in ins.attrs:
        return "fusion (custom)"
    root = next((b for b in body if b.root), None)
    if root is not None and root.op == "dynamic-update-slice":
        return "in-place update"
    if ops <= MOVES:
        return "data movement" if ops - {"parameter", "constant", "tuple", "bitcast"} - {"convert"} else "convert"
    return "reduce" if "reduce" in ops or "kind=kInput" in ins.attrs else "elementwise"


def _called(ins: Instr) -> str:
    m = re.search(r"calls=%([\w.\-]+)", ins.attrs)
    return m.group(1) if m else ""


def _operand_bytes(module: Module, ins: Instr, shapes: dict[str, str]) -> list[int]:
    """Bytes each operand costs: its size, or for a fusion parameter used only through slices the slices'."""
    full = [shape_bytes(shapes.get(o, "")) for o in ins.operands]
    if ins.op != "fusion":
        return full
    body = module.computations.get(_called(ins), [])
    users = collections.defaultdict(list)
    for b in body:
        for o in b.operands:
            users[o].append(b)

    def read(name: str, size: int, depth: int = 0) -> int:
        if not users[name] or depth > 4:
            return size
        total = 0
        for u in users[name]:
            if u.op in SLICING and u.operands[0] == name:
                total += shape_bytes(u.shape)
            elif u.op == "bitcast":
                total += read(u.name, size, depth + 1)
            elif u.op == "convert" and shape_bytes(u.shape):  # a converted stack sliced: the slice's source bytes
                converted = shape_bytes(u.shape)
                total += read(u.name, converted, depth + 1) * size // converted
            else:
                return size
        return min(total, size)

    params = {int(b.inner): b.name for b in body if b.op == "parameter" and b.inner.isdigit()}
    return [read(params[i], size) if i in params else size for i, size in enumerate(full)]


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str
    read: int
    written: int
    launches: int
    frame: tuple[str, str, int] | None  # (file, function, line) of the root's innermost project frame
    shape: str


def kernels(module: Module) -> list[Kernel]:
    """Every kernel the entry computation launches (loop bodies once per known trip), with its bytes."""
    shapes = {i.name: i.shape for body in module.computations.values() for i in body}
    out, todo = [], [(module.entry, 1)]
    while todo:  # (HLO has no recursion: a computation called from two places counts at both)
        comp, times = todo.pop()
        for ins in module.computations.get(comp, []):
            if ins.op in FREE or ins.op.endswith(("-done", "-update")):
                continue
            if ins.op in CONTROL:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
                for sub in re.findall(r"(?:body|to_apply|calls)=%([\w.\-]+)", ins.attrs):
                    todo.append((sub, times * (int(trips.group(1)) if trips else 1)))
                # a conditional: the branch lax.cond runs when its predicate holds (the path doge_jax expects;
                # a many-way lax.switch is not modelled: its last branch counts)
                branch = re.search(r"true_computation=%([\w.\-]+)", ins.attrs)
                cases = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)  # (lax.cond's as [false, true])
                cases = re.findall(r"%([\w.\-]+)", cases.group(1)) if cases else []
                if branch or cases:
                    todo.append((branch.group(1) if branch else cases[-1], times))
                continue
            k = kind(module, ins)
            operands = _operand_bytes(module, ins, shapes)
            read, written = sum(operands), shape_bytes(ins.shape)
            if ins.op == "custom-call":  # cuBLAS / cuDNN workspace: scratch, not traffic
                written -= sum(shape_bytes(f"{d}[{s}]") for d, s in ARRAY.findall(ins.shape) if d in ("s8", "u8"))
            if k == "in-place update" and operands:  # only the update moves; the buffer is aliased
                read = written = read - max(operands)
            root = next((b for b in module.computations.get(_called(ins), []) if b.root), ins)
            frame = project_frame(module, root.attrs) or project_frame(module, ins.attrs)
            out.append(Kernel(ins.name, k, read * times, written * times, times, frame, ins.shape))
    return out


def area(k: Kernel) -> str:
    """The part of the model a kernel belongs to, from the function of its innermost project frame."""
    file, func, _ = k.frame or ("", "", 0)
    base = os.path.basename(file)
    if k.kind == "attention (cuDNN)":
        return "attention kernels (cuDNN)"
    if base == "loss.py":
        return "loss: matmuls" if k.kind == "matmul" else "loss: logits passes"
    if k.kind == "matmul":
        return "matmuls: layers"
    if "/optax/" in file or base == "optim.py":
        return "optimizer"
    if func.startswith("RMSNorm."):
        return "RMSNorm"
    if func.startswith(("DogeMLP.", "DogeCDMoE.", "DogeMoE")) or func in ("silu", "fused_linears"):
        return "MLP"
    if base in ("attention.py", "pallas_attention.py"):
        return "attention: bias fold, padding"
    if func.startswith("DogeAttention.") or func in ("rotate_half", "rotary_cos_sin", "softplus_torch"):
        return "attention: rope, dt"
    if func.startswith("DogeDecoderLayer."):
        return "residual"
    if "cast" in func or func.startswith("DogeForCausalLM."):
        return "parameter cast, embedding"
    return "other"


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def trace_times(path: str, ks: list[Kernel]) -> tuple[dict[str, float], int, float]:
    """Device seconds per step of each HLO op in a jax.profiler trace (.xplane.pb, gzipped too) of the same
    compiled step: the GPU planes' "XLA Ops" line, divided by the steps traced (the number of times the kernels
    outside loops ran). Also the steps and the traced op time per step that no kernel of `ks` accounts for."""
    from jax.profiler import ProfileData

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = ProfileData.from_serialized_xspace(f.read())
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for plane in data.planes:
        if plane.name.lower().startswith("/device:gpu"):
            for line in plane.lines:
                if line.name.lower() == "xla ops":
                    for e in line.events:
                        total[e.name] += e.duration_ns / 1e9
                        count[e.name] += 1
    if not total:
        sys.exit(f"error: {path}: no \"XLA Ops\" line on a GPU plane (a jax.profiler trace of the step on a GPU?)")
    once = collections.Counter(count[k.name] for k in ks if k.launches == 1 and count[k.name])
    steps = once.most_common(1)[0][0] if once else 1
    names = {k.name for k in ks}
    unmatched = sum(t for n, t in total.items() if n not in names) / steps
    return {n: t / steps for n, t in total.items()}, steps, unmatched


def report(ks: list[Kernel], bandwidth: float, top: int, times: dict[str, float] | None = None) -> str:
    """Markdown tables: by area, by kind, and the `top` kernel groups outside matmuls and attention; with `times`
    (seconds per step by kernel name, trace_times) also the measured ms and the bandwidth each achieved."""
    total = sum(k.read + k.written for k in ks)
    ms = lambda b: f"{b / bandwidth * 1e3:.2f}"  # noqa: E731
    lines = [f"{sum(k.launches for k in ks)} kernel launches, {gib(total)} read + written = {ms(total)} ms at "
             f"{bandwidth / 1e12:g} TB/s" + (f"; measured {1e3 * sum(times.get(k.name, 0.0) for k in ks):.2f} ms "
                                              "of kernel time per step" if times else ""), ""]
    extra_head, extra_rule = (" | measured ms | achieved TB/s", "---:|---:|") if times else ("", "")

    def extra(group: list[Kernel], b: float) -> str:
        if not times:
            return ""
        t = sum(times.get(k.name, 0.0) for k in group)
        return f" {1e3 * t:.2f} | {b / t / 1e12:.2f} |" if t else " - | - |"

    for title, key in (("area", area), ("kind", lambda k: k.kind)):
        groups = collections.defaultdict(list)
        for k in ks:
            groups[key(k)].append(k)
        lines += [f"| {title} | launches | bytes | share | ms{extra_head} |", "|---|---:|---:|---:|---:|" + extra_rule]
        for name, g in sorted(groups.items(), key=lambda kv: -sum(k.read + k.written for k in kv[1])):
            b = sum(k.read + k.written for k in g)
            lines.append(f"| {name} | {sum(k.launches for k in g)} | {gib(b)} | {100 * b / max(total, 1):.1f}% | "
                         f"{ms(b)} |{extra(g, b)}")
        lines.append("")
    groups = collections.defaultdict(list)  # one row for the same kernel in every layer
    for k in ks:
        if k.kind not in ("matmul", "attention (cuDNN)"):
            src = f"{os.path.basename(k.frame[0])}:{k.frame[2]} {k.frame[1]}" if k.frame else "?"
            groups[(k.kind, re.sub(r"\{[^}]*\}", "", k.shape), src)].append(k)
    lines += [f"| top {top} outside matmuls and attention | kernels | bytes each | total | ms{extra_head} | result |",
              "|---|---:|---:|---:|---:|" + extra_rule + "---|"]
    for (kd, shape, src), g in sorted(groups.items(), key=lambda kv: -sum(k.read + k.written for k in kv[1]))[:top]:
        b, n = sum(k.read + k.written for k in g), sum(k.launches for k in g)
        lines.append(f"| {kd}: {src} | {n} | {gib(b / n)} | {gib(b)} | {ms(b)} |{extra(g, b)} `{shape[:70]}` |")
    return "\n".join(lines)


def pretend_gpu() -> None:
    """Make doge_jax pick its GPU code paths while tracing on a CPU-only machine: attention's backend test, and
    JAX's cuDNN wrapper's trace-time check of the local GPU (answered for compute capability 9.0)."""
    from doge_jax import attention

    attention.platform = lambda: "gpu"
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError:
        return
    version = lambda c: tuple(int(x) for x in c.split("."))  # noqa: E731
    cudnn.check_compute_capability = lambda c: (9, 0) >= version(c)
    cudnn.is_cuda_compute_capability_equal = lambda c: (9, 0) == version(c)


def compile_step(config: str, rows: int, seq: int, fold: str, loss_chunk: int, cpu: bool,
                 fewer_bytes: bool = False) -> str:
    """The optimized HLO text of doge_jax's bf16 training step (fused attention) for an H100 (or this CPU)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    if cpu:
        mesh = jax.sharding.Mesh(jax.devices("cpu")[:1], ("x",))
    else:
        from jax.experimental import topologies

        try:
            topo = topologies.get_topology_desc(platform="cuda", topology_name="", topology="1x1x1",
                                                target_config=H100_TARGET)
        except Exception as e:  # (no CUDA plugin: its compiler is what is needed)
            sys.exit(f"error: no CUDA compiler for JAX ({type(e).__name__}: {str(e)[:200]}); install the plugin "
                     f"with  pip install \"jax[cuda12]=={jax.__version__}\"  or use --cpu")
        mesh = topologies.make_mesh(topo, (1,), ("x",))
        pretend_gpu()
    from doge_jax import attention, loss, model
    from doge_jax.config import DogeConfig
    from doge_jax.loss import DogeTrunk
    from doge_jax.optim import decay_mask, make_optimizer
    from doge_jax.train import make_steps
    from doge_jax.train_config import TrainConfig

    attention.FUSED_FOLD = fold
    attention.FUSED_V_UNPADDED = loss.ONE_PASS_LSE = model.FUSED_GATE_UP = fewer_bytes
    cfg = DogeConfig.from_yaml(config).replace(attention_impl="fused")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DogeTrunk(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(optax.constant_schedule(1e-3), mask=decay_mask)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
    tcfg = TrainConfig(seq_len=seq, global_batch_tokens=seq * rows, compute_dtype="bfloat16", loss_chunk=loss_chunk)
    step = make_steps(graphdef, tx, cfg, tcfg)[0]
    args = (abstract(params), abstract(jax.eval_shape(tx.init, params)),
            jax.ShapeDtypeStruct((1, rows, seq), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    return step.lower(*args).compile().as_text()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hlo", help="read this optimized HLO text (.gz too) instead of compiling")
    ap.add_argument("--trace", help="with --hlo: a jax.profiler trace (.xplane.pb, .gz too) of that compiled step on "
                                    "a GPU (gpu_check --sections profile saves both to $OUT): measured ms and the "
                                    "bandwidth each area achieved")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "doge-160m.yaml"))
    ap.add_argument("--rows", type=int, default=16, help="rows of --seq tokens per step (default 16)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--fold", choices=("qk", "v"), default="qk", help="the fused path's bias fold (FUSED_FOLD)")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="train.loss_chunk (tokens per CE chunk)")
    ap.add_argument("--fewer-bytes", action="store_true",
                    help="doge_jax's byte-saving variants on (attention.FUSED_V_UNPADDED, loss.ONE_PASS_LSE, "
                         "model.FUSED_GATE_UP)")
    ap.add_argument("--gemm", choices=("triton", "cublas"), default="cublas",
                    help="matmuls as XLA's Triton GEMM fusions or cuBLAS calls (no autotuning without a device)")
    ap.add_argument("--cpu", action="store_true", help="compile for this CPU instead (no CUDA plugin needed)")
    ap.add_argument("--bandwidth", type=float, default=4e12, help="bytes/s for the ms columns (default 4e12)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--save", help="write the optimized HLO here")
    ap.add_argument("--append", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    for name in ("rows", "seq", "top"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.loss_chunk < 0:
        ap.error("--loss-chunk must be >= 0 (0: plain logits loss)")
    if args.trace and not args.hlo:
        ap.error("--trace needs --hlo: the optimized HLO the traced step was compiled to")
    if args.hlo:
        opener = gzip.open if args.hlo.endswith(".gz") else open
        with opener(args.hlo, "rt") as f:
            text = f.read()
        what = f"{args.hlo} (as compiled where it was saved)"
    else:
        if not args.cpu and args.gemm == "cublas":
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # (the CUDA plugin is asked for a compiler, not a device)
        t0 = time.perf_counter()
        text = compile_step(args.config, args.rows, args.seq, args.fold, args.loss_chunk, args.cpu,
                            args.fewer_bytes)
        what = (f"{os.path.relpath(args.config, ROOT)}, {args.rows} x {args.seq} tokens, bf16, fused attention "
                f"(fold {args.fold}), loss_chunk {args.loss_chunk}, " + ("fewer-bytes variants, " if args.fewer_bytes
                                                                         else "")
                + ("this CPU" if args.cpu else f"H100 (sm_90), deviceless compile, {args.gemm} matmuls")
                + f"; compiled in {time.perf_counter() - t0:.0f}s")
    if args.save:
        with open(args.save, "w") as f:
            f.write(text)
    module = parse_module(text)
    if module.entry not in module.computations:
        print(f"error: no ENTRY computation in {args.hlo or 'the compiled module'}", file=sys.stderr)
        return 2
    ks = kernels(module)
    times = None
    if args.trace:
        times, steps, unmatched = trace_times(args.trace, ks)
        what += (f"; trace {args.trace}: {steps} steps, {1e3 * unmatched:.2f} ms per step of traced ops not among "
                 "the kernels")
    table = report(ks, args.bandwidth, args.top, times)
    print(f"{what}\n\n{table}")
    if args.append:
        import jax

        stamp = time.strftime("%Y-%m-%d %H:%M")
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(f"\n## hlo_traffic.py — {stamp} — bytes, not timings (jax {jax.__version__})\n\n{what}\n\n"
                    f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
