"""Data parallel + FSDP for doge_jax over one `jax.sharding.Mesh` with axes ("data", "fsdp") (design.md §2).

- `make_mesh({"data": -1, "fsdp": 1})`: the mesh from config (-1 = all remaining devices).
- `PARAM_RULES`: the one logical-rule table, dotted Flax path -> which dims may be sharded over "fsdp".
  Parameters are sharded over "fsdp" and replicated over "data" (hybrid sharded data parallel); the batch is
  split over both axes, so every device sees its own rows.
- `param_shardings` / `shard_params`, `opt_state_shardings` (optimizer state follows the parameter it mirrors),
  `batch_sharding` / `shard_batch`, `make_train_step` (a jitted step with in/out shardings).
- `init_distributed()`: `jax.distributed.initialize()` for multi-host runs (env vars or SLURM), else a no-op;
  `any_process(flag)`: one flag agreed by every process (a stop request seen by one host), read without a wait.

The same code runs on 1 CPU, 8 simulated CPU devices (tests), one GPU or many hosts.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every device

# The logical-rule table: (regex searched in the dotted Flax path, dims that may be sharded over "fsdp", in order of
# preference). Dims count from the end, so a rule fits stacked ([L, ...], under nnx.scan) and unstacked layers alike,
# and the leading layer axis is never sharded (each scan step needs its whole layer). The first listed dim whose size
# divides the fsdp size is sharded; if none divides, the parameter is replicated (correct, only less memory-saving).
# () = always replicated: small vectors (norms, residual scales, A, biases). Every parameter must match a rule, so
# a new parameter fails loudly (`UnmatchedParameter`) instead of being silently replicated.
PARAM_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"embed_tokens\.embedding$", (-2, -1)),            # [V, d]: vocab, else hidden
    (r"^lm_head\.kernel$", (-1, -2)),                   # [d, V]: vocab, else hidden
    (r"mlp\.(up|down)_embed\.embedding$", (-2, -1)),    # [L, E, d]: experts, else hidden
    (r"(q_proj|gate_proj|up_proj)\.kernel$", (-1, -2)),  # [L, d, out], out >= d: output, else input
    (r"(k_proj|v_proj)\.kernel$", (-2, -1)),            # [L, d, kv*D], GQA: input (the larger), else output
    (r"(o_proj|down_proj)\.kernel$", (-2, -1)),         # [L, in, d], in >= d: input, else output
    (r"(dt_proj|router_gate)\.kernel$", (-2,)),         # [L, in, few]: input only (the output is tiny)
    (r"(norm\.weight|_residual|\.A|\.bias)$", ()),      # vectors: replicated
)
_COMPILED_RULES = tuple((re.compile(p), dims) for p, dims in PARAM_RULES)


class UnmatchedParameter(ValueError):
    """A parameter path that no rule of PARAM_RULES matches."""


# ---- mesh -----------------------------------------------------------------------------------------------------------
def make_mesh(mesh_cfg: dict | None = None, devices: list | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp") from a config dict such as {"data": -1, "fsdp": 1} (the default).

    One axis may be -1: it takes all the devices the other leaves; a missing "data" is -1 (unless fsdp is), a missing
    "fsdp" 1. The product must equal the device count.
    Devices are laid out in `jax.devices()` order (process-major), "fsdp" the inner axis, so an fsdp group stays
    within one host whenever fsdp divides the devices per host; "data" then spans hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    cfg = {"data": -1, "fsdp": 1} if mesh_cfg is None else dict(mesh_cfg)
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.{unknown[0]}: unknown mesh axis (the axes are {', '.join(MESH_AXES)})")
    # an axis left out: 1, except "data" beside a fixed fsdp, which takes the remaining devices ({fsdp: 4} on 8)
    sizes = {"data": cfg.get("data", 1 if cfg.get("fsdp") == -1 else -1), "fsdp": cfg.get("fsdp", 1)}
    for a, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{a}: must be a positive integer or -1 (all remaining devices), got {v!r}")
    auto = [a for a, v in sizes.items() if v == -1]
    if len(auto) > 1:
        raise ValueError(f"mesh.{auto[1]}: only one mesh axis may be -1 (mesh.{auto[0]} already is)")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if auto:
        if n % fixed:
            raise ValueError(f"mesh.{auto[0]}: -1 needs the device count {n} to be a multiple of the other axes' "
                             f"product {fixed}")
        sizes[auto[0]] = n // fixed
    elif fixed != n:
        have = f"{n} device is" if n == 1 else f"{n} devices are"
        raise ValueError(f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} = {fixed} devices, but {have} "
                         "available (the product must equal the device count; use -1 for one axis)")
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"]), MESH_AXES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


# ---- parameters -----------------------------------------------------------------------------------------------------
def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: tuple) -> tuple[str, ...]:
    """A pytree key path as names; the trailing 'value' of an nnx Variable leaf is dropped."""
    names = tuple(_key_name(k) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def param_spec(name: str, shape: tuple[int, ...], fsdp_size: int) -> P:
    """PartitionSpec of the parameter with this dotted Flax path and shape, for an fsdp axis of `fsdp_size`."""
    dims = next((dims for pattern, dims in _COMPILED_RULES if pattern.search(name)), None)
    if dims is None:
        raise UnmatchedParameter(f"{name} {tuple(shape)}: no rule in doge_jax.sharding.PARAM_RULES matches this "
                                 f"parameter; add one")
    # Stacked decoder layers ("model.layers.<name>", not "model.layers.<N>.") carry the leading layer axis.
    first = 1 if re.match(r"model\.layers\.(?!\d)", name) else 0
    spec = [None] * len(shape)
    if fsdp_size > 1:
        for d in dims:
            axis = d % len(shape) if -len(shape) <= d < len(shape) else None
            if axis is not None and axis >= first and shape[axis] % fsdp_size == 0:
                spec[axis] = "fsdp"
                break
    return P(*spec)


def param_specs(params: Any, fsdp_size: int) -> Any:
    """Tree of PartitionSpecs shaped like `params` (arrays or jax.ShapeDtypeStruct leaves)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_spec(".".join(path_names(path)), x.shape, fsdp_size), params)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """Tree of NamedShardings shaped like `params`: sharded over "fsdp" by PARAM_RULES, replicated over "data"."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh.shape["fsdp"]),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(params placed on the mesh, their shardings). `params` must hold the same values on every host."""
    shardings = param_shardings(params, mesh)
    if jax.process_count() > 1:  # arrays committed to a local device (a restored checkpoint) cannot be put onto a
        params = jax.device_get(params)  # sharding spanning other hosts' devices: go through host memory
    return jax.device_put(params, shardings), shardings


def abstract_sharded(tree: Any, shardings: Any) -> Any:
    """jax.ShapeDtypeStruct leaves carrying `shardings`: the restore target for orbax (restores straight into the
    mesh, whatever device count the checkpoint was saved from)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---- optimizer state ------------------------------------------------------------------------------------------------
def opt_state_shardings(opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Tree of NamedShardings shaped like `opt_state` (arrays or abstract leaves).

    Optax states hold trees shaped like the params (Adam's mu/nu, MultiSteps' accumulators) plus scalars (counts).
    A state leaf whose key path ends with a parameter's path (and whose rank matches and divides) gets that
    parameter's sharding; everything else (counts, factored statistics) is replicated.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params_shardings)
    by_path = {path_names(p): s for p, s in flat}
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        names = path_names(path)
        for i in range(len(names)):  # longest suffix first
            s = by_path.get(names[i:])
            if s is not None:
                ok = len(s.spec) == len(leaf.shape) and _fits(s.spec, leaf.shape, mesh)
                return s if ok else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def _fits(spec: P, shape: tuple[int, ...], mesh: Mesh) -> bool:
    return all(ax is None or shape[i] % mesh.shape[ax] == 0 for i, ax in enumerate(spec))


def init_opt_state(optimizer: optax.GradientTransformation, params: Any, params_shardings: Any,
                   mesh: Mesh) -> tuple[Any, Any]:
    """(optimizer state created directly in its shardings, those shardings)."""
    shardings = opt_state_shardings(jax.eval_shape(optimizer.init, params), params_shardings, mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(params), shardings


# ---- activations ----------------------------------------------------------------------------------------------------
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("doge_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """While a step function is traced: the model pins its [batch, ...] activations to rows split over every device
    (`constrain_rows`). Without it XLA's propagation mixed the parameters' fsdp layout into the activations on
    meshes with data > 1 and fsdp > 1 ("Involuntary full rematerialization": activations replicated, then split)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain_rows(x: jax.Array) -> jax.Array:
    """`x` [batch, ...] constrained to rows split over ("data", "fsdp") under `activation_mesh`; else `x` itself."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1 or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES, *[None] * (x.ndim - 1))))


# ---- batches --------------------------------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh, batch_axis: int = 0, ndim: int | None = None) -> NamedSharding:
    """Sharding that splits `batch_axis` over all devices (("data", "fsdp")); other axes are whole."""
    spec = [None] * batch_axis + [BATCH_AXES]
    if ndim is not None:
        spec += [None] * (ndim - batch_axis - 1)
    return NamedSharding(mesh, P(*spec))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch") -> None:
    if global_batch % mesh.size:
        raise ValueError(f"{what}: global batch of {global_batch} rows does not divide over the {mesh.size} devices "
                         f"of mesh {describe(mesh)}; use a multiple of {mesh.size}")


def shard_batch(local_batch: Any, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """Global jax.Array from this host's rows (`process_count` hosts each pass their own slice, in process order;
    with one host the local batch is the global batch)."""
    local_batch = np.asarray(local_batch)
    shape = list(local_batch.shape)
    shape[batch_axis] *= jax.process_count()
    check_batch_size(shape[batch_axis], mesh)
    sharding = batch_sharding(mesh, batch_axis, local_batch.ndim)
    return jax.make_array_from_process_local_data(sharding, local_batch, tuple(shape))


# ---- train step -----------------------------------------------------------------------------------------------------
def model_loss(graphdef) -> Callable[[Any, jax.Array], jax.Array]:
    """loss_fn(params, ids) of a DogeForCausalLM graphdef: mean next-token CE (+ MoE aux loss) with labels = ids."""
    from flax import nnx

    def loss_fn(params, ids):
        return nnx.merge(graphdef, params)(ids, labels=ids).loss

    return loss_fn


def make_train_step(optimizer: optax.GradientTransformation, loss_fn: Callable[[Any, Any], jax.Array],
                    params_shardings: Any, opt_shardings: Any, batch_shardings: Any, donate: bool = True):
    """jit of step(params, opt_state, batch) -> (params, opt_state, loss) with these in/out shardings.

    `loss_fn(params, batch)` sees the global batch (jit is global-view); XLA inserts the all-gathers of the fsdp
    shards and the reduce-scatter of the gradients. The gradients are constrained to the parameter shardings so
    the optimizer update runs shard-local.
    """
    def step(params, opt_state, batch):
        with activation_mesh(mesh):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        grads = jax.lax.with_sharding_constraint(grads, params_shardings)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    mesh = jax.tree.leaves(params_shardings)[0].mesh
    return jax.jit(step, in_shardings=(params_shardings, opt_shardings, batch_shardings),
                   out_shardings=(params_shardings, opt_shardings, NamedSharding(mesh, P())),
                   donate_argnums=(0, 1) if donate else ())


# ---- multi-host -----------------------------------------------------------------------------------------------------
def init_distributed() -> bool:
    """Call jax.distributed.initialize() when this is one process of a multi-host run; returns whether it did.

    Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (JAX_LOCAL_DEVICE_IDS optional).
    SLURM (srun, one process per host): detected by jax itself from SLURM_JOB_ID etc. Must run before anything
    touches a device. Otherwise (a single process) it does nothing.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES"):
        missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ConfigError(f"multi-host run: {', '.join(missing)} not set (need JAX_COORDINATOR_ADDRESS=host:port, "
                              "JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        n, i = (env["JAX_NUM_PROCESSES"].strip(), env["JAX_PROCESS_ID"].strip())
        if not (n.isdigit() and i.isdigit() and int(i) < int(n)):
            raise ConfigError(f"multi-host run: JAX_NUM_PROCESSES={n!r} and JAX_PROCESS_ID={i!r} must be integers, "
                              "the process id in [0, JAX_NUM_PROCESSES)")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(n), int(i))
        return True
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


_ANY_PROCESS: dict = {}


def any_process(flag: bool) -> jax.Array:
    """Whether any process of the run passed True, as a replicated scalar on the device, without a host wait
    (read it later). Processes that act on a local event (a SIGTERM on one host) must act together: a host that
    checkpoints or exits while the others run their next step leaves every host waiting in a collective."""
    if not _ANY_PROCESS:
        mesh = Mesh(np.array(jax.devices()), ("all",))
        _ANY_PROCESS["sharding"] = NamedSharding(mesh, P("all"))
        _ANY_PROCESS["max"] = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, P()))
    local = np.full(jax.local_device_count(), int(flag), np.int32)
    votes = jax.make_array_from_process_local_data(_ANY_PROCESS["sharding"], local, (jax.device_count(),))
    return _ANY_PROCESS["max"](votes)


class OtherHostFailed(RuntimeError):
    """Another process of a multi-host run failed (its own log says why)."""


@contextlib.contextmanager
def all_or_none(what: str):
    """Run a block that can fail on one host only (its files, its disk) so that every host stops when any does:
    each host votes once on leaving the block. The failing host re-raises its own error, the others raise
    OtherHostFailed, instead of waiting in the run's first collective until jax.distributed times out."""
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except BaseException:  # Ctrl-C and SystemExit too: the others must not wait for this host
        jax.device_get(any_process(True))  # waited for: the others must learn of it before this process exits
        raise
    if bool(jax.device_get(any_process(False))):
        raise OtherHostFailed(f"another host failed while {what}; its log says why")

