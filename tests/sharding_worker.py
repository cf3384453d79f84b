"""Subprocess side of tests/test_sharding.py: one JAX process with however many devices its environment gives
(XLA_FLAGS=--xla_force_host_platform_device_count=N is set by the test before this imports jax).

    python tests/sharding_worker.py rules OUT.json
    python tests/sharding_worker.py train OUT_DIR MESH_JSON|none [--restore RUN_DIR EXPECT.npz] [--no-train]
                                    [--models dense,moe]

`rules` places the tiny dense and MoE models (params + AdamW state) on three 8-device meshes and reports every
shard shape. `train` runs 3 optimizer steps of both models (float32, highest matmul precision) on the mesh (`none`:
a plain unsharded jit, the single-device reference), writes losses.json and final.npz (params + opt_state), and
saves params + opt_state with doge_jax.checkpoint.TrainCheckpointer under OUT_DIR/<model>/. With --restore it
first restores RUN_DIR/<model>/ into its own mesh and checks every value bit for bit against EXPECT.npz
(--no-train: only that).
Multi-host: run it once per process with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import process_allgather

from doge_jax import sharding as S

JAX_DISTRIBUTED = S.init_distributed()

import jax.numpy as jnp  # noqa: E402

from doge_jax.checkpoint import TrainCheckpointer  # noqa: E402
from doge_jax.config import DogeConfig  # noqa: E402
from doge_jax.model import DogeForCausalLM  # noqa: E402
from doge_jax.optim import decay_mask, make_optimizer  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, keep_window_size=64)
MODELS = {"dense": TINY, "moe": {**TINY, "is_moe": True, "num_experts": 16, "num_experts_per_tok": 4}}
MESHES = {"data2_fsdp4": {"data": 2, "fsdp": 4}, "data8": {"data": 8}, "fsdp8": {"fsdp": 8}}
STEPS, BATCH, SEQ, LR = 3, 8, 16, 3e-3


def build(kind: str):
    model = DogeForCausalLM(DogeConfig(**MODELS[kind]), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(S.path_names(p)): np.asarray(x if x.is_fully_addressable else process_allgather(x, tiled=True))
            for p, x in leaves}


def rules(out: str) -> None:
    tx = make_optimizer(LR, mask=decay_mask)
    report = {}
    for kind in MODELS:
        _, params = build(kind)
        for name, cfg in MESHES.items():
            mesh = S.make_mesh(cfg)
            placed, psh = S.shard_params(params, mesh)
            osh = S.opt_state_shardings(jax.eval_shape(tx.init, params), psh, mesh)
            opt = jax.device_put(tx.init(params), osh)
            rows = {}
            for tree in (placed, opt):
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    shards = {tuple(s.data.shape) for s in x.addressable_shards}
                    assert len(x.addressable_shards) == mesh.size and shards == {x.sharding.shard_shape(x.shape)}
                    rows["/".join(S.path_names(p))] = {"shape": list(x.shape), "shard": list(shards.pop()),
                                                       "spec": str(x.sharding.spec)}
            report[f"{kind}/{name}"] = rows
    report["mesh_default"] = dict(S.make_mesh(None).shape)
    report["mesh_fsdp_auto"] = dict(S.make_mesh({"fsdp": -1}).shape)
    report["mesh_fsdp_only"] = dict(S.make_mesh({"fsdp": 4}).shape)
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    try:
        S.shard_batch(np.zeros((6, 4), np.int32), mesh)
    except ValueError as e:
        report["batch_error"] = str(e)
    report["batch_spec"] = str(S.shard_batch(np.zeros((8, 4), np.int32), mesh).sharding.spec)
    with open(out, "w") as f:
        json.dump(report, f)


def train(out_dir: str, mesh_arg: str, restore: tuple[str, str] | None, do_train: bool, models: list[str]) -> None:
    ids = np.random.default_rng(0).integers(0, 128, size=(STEPS, BATCH, SEQ), dtype=np.int32)
    tx = make_optimizer(LR, mask=decay_mask)
    result, final = {}, {}
    for kind in models:
        graphdef, params = build(kind)
        loss_fn = S.model_loss(graphdef)
        if mesh_arg == "none":  # the single-device reference: no mesh, no shardings
            mesh, opt_state = S.make_mesh(None, jax.devices()[:1]), tx.init(params)
            psh = S.param_shardings(params, mesh)
            osh = S.opt_state_shardings(opt_state, psh, mesh)

            def step(p, o, b, loss_fn=loss_fn):
                loss, g = jax.value_and_grad(loss_fn)(p, b)
                u, o = tx.update(g, o, p)
                return jax.tree.map(jnp.add, p, u), o, loss

            step = jax.jit(step)
            batches = [jnp.asarray(b) for b in ids]
        else:
            mesh = S.make_mesh(json.loads(mesh_arg))
            params, psh = S.shard_params(params, mesh)
            opt_state, osh = S.init_opt_state(tx, params, psh, mesh)
            step = S.make_train_step(tx, loss_fn, psh, osh, S.batch_sharding(mesh))
            n = jax.process_count()  # each process feeds its own rows, as a per-host data loader would
            rows = BATCH // n
            batches = [S.shard_batch(b[jax.process_index() * rows:(jax.process_index() + 1) * rows], mesh) for b in ids]
        ckpt_dir = os.path.join(out_dir, kind)
        if restore is not None:
            ck = TrainCheckpointer(os.path.join(restore[0], kind), async_save=False)
            got = ck.restore_latest(S.abstract_sharded(params, psh), S.abstract_sharded(opt_state, osh))
            ck.close()
            assert got is not None, f"nothing to restore in {restore[0]}/{kind}"
            rp, ro = got[1], got[2]
            expect = np.load(restore[1])
            have = flat({"params": rp, "opt_state": ro})
            for k, v in have.items():
                e = expect[f"{kind}/{k}"]
                assert v.dtype == e.dtype and v.shape == e.shape and np.array_equal(v, e), f"restore differs: {k}"
            same = jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim), (rp, ro), (psh, osh))
            assert all(jax.tree.leaves(same)), "restored with other shardings than asked for"
            result[f"{kind}_restored"] = len(have)
        if not do_train:
            continue
        losses = []
        with jax.default_matmul_precision("highest"):
            for b in batches:
                params, opt_state, loss = step(params, opt_state, b)
                losses.append(float(loss))
        result[kind] = losses
        result[f"{kind}_param_specs"] = {k: str(x.sharding.spec) for k, x in
                                         zip(flat(params), jax.tree.leaves(params))} if mesh_arg != "none" else {}
        ck = TrainCheckpointer(ckpt_dir, async_save=False)
        ck.save(STEPS, params, opt_state, {"pos": STEPS}, {"step": STEPS})
        ck.close()
        final.update({f"{kind}/{k}": v for k, v in flat({"params": params, "opt_state": opt_state}).items()})
    result["devices"] = jax.device_count()
    result["processes"] = jax.process_count()
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "final.npz"), **final)
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("rules", "train"))
    ap.add_argument("out")
    ap.add_argument("mesh", nargs="?", default="none")
    ap.add_argument("--restore", nargs=2, metavar=("RUN_DIR", "EXPECT_NPZ"))
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    if a.mode == "rules":
        rules(a.out)
    else:
        train(a.out, a.mesh, a.restore, not a.no_train, a.models.split(","))
