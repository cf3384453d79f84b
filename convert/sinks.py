"""Output writers, one per target. Each is created with the plan (all names, shapes and dtypes), receives
tensors one at a time in any order (`put`), and completes the directory in `finish`.

Layouts written into DST (all carry config.json, generation_config.json and the source's tokenizer files):
- hf:    model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above --shard-size
- torch: pytorch_model.bin, what `torch.save(doge_torch_model.state_dict())` writes less a tied lm_head.weight
         (as transformers' .bin files leave it out); DST is also an HF directory that transformers and doge_torch load
- jax:   params/ (orbax parameter tree, doge_jax.checkpoint model-only layout)
"""

from __future__ import annotations

import json
import os

import numpy as np

from doge_jax import hf_io
from doge_jax.config import GenerationConfig
from doge_jax.hf_names import hf_to_flax

from .plan import Plan
from .safetensors_io import SafetensorsWriter
from .torch_io import TorchStateDictWriter

TORCH_FILE = "pytorch_model.bin"


def shard_layout(plan: Plan, shard_size) -> list[list[str]]:
    """Names per shard (sorted names, a new shard when the next tensor would pass the limit), as
    hf_io.write_safetensors does."""
    limit = hf_io.parse_size(shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, e in plan.entries.items():
        nbytes = int(np.prod(e.shape, dtype=np.int64)) * e.dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [hf_io.SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def output_files(plan: Plan, shard_size) -> list[str]:
    """The files the target will hold (for --dry-run)."""
    if plan.target == "hf":
        n = len(shard_layout(plan, shard_size))
        main = shard_names(n) + ([hf_io.SAFE_INDEX] if n > 1 else [])
    elif plan.target == "torch":
        main = [TORCH_FILE]
    else:
        main = ["params/"]
    side = plan.source.side_dir  # the tokenizer files copied with it (write_side_files)
    copied = [n for n in hf_io.SIDE_FILES
              if n != "generation_config.json" and side and os.path.isfile(os.path.join(side, n))]
    return ["config.json", *main, "generation_config.json", *copied]


def write_side_files(plan: Plan, out_dir: str) -> list[str]:
    """config.json, generation_config.json (copied, else made from the token ids) and tokenizer files."""
    plan.config.save_json(os.path.join(out_dir, "config.json"), dtype=plan.dtype_name)
    copied = hf_io.copy_side_files(plan.source.side_dir, out_dir) if plan.source.side_dir else []
    if "generation_config.json" not in copied:
        hf_io.write_generation_config(out_dir, GenerationConfig.from_config(plan.config))
    return copied


class HFSink:
    def __init__(self, plan: Plan, out_dir: str, shard_size):
        self.plan, self.out_dir = plan, out_dir
        layout = shard_layout(plan, shard_size)
        self.files = shard_names(len(layout))
        self.writers, self.where = [], {}
        for fname, names in zip(self.files, layout):
            specs = [(n, plan.entries[n].shape, plan.entries[n].dtype) for n in names]
            w = SafetensorsWriter(os.path.join(out_dir, fname), specs)
            self.writers.append(w)
            self.where.update({n: (w, fname) for n in names})

    def put(self, name: str, arr: np.ndarray) -> None:
        self.where[name][0].put(name, arr)

    def finish(self) -> None:
        for w in self.writers:
            w.close()
        if len(self.files) > 1:
            total = sum(int(np.prod(e.shape, dtype=np.int64)) * e.dtype.itemsize for e in self.plan.entries.values())
            index = {"metadata": {"total_size": total}, "weight_map": {n: f for n, (_, f) in self.where.items()}}
            with open(os.path.join(self.out_dir, hf_io.SAFE_INDEX), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        write_side_files(self.plan, self.out_dir)


class TorchSink:
    def __init__(self, plan: Plan, out_dir: str, shard_size=None):
        self.plan, self.out_dir = plan, out_dir
        specs = [(n, e.shape, e.dtype) for n, e in plan.entries.items()]
        self.writer = TorchStateDictWriter(os.path.join(out_dir, TORCH_FILE), specs)

    def put(self, name: str, arr: np.ndarray) -> None:
        self.writer.put(name, arr)

    def finish(self) -> None:
        self.writer.close()
        write_side_files(self.plan, self.out_dir)


class JaxSink:
    """Stacks per-layer tensors into the Flax tree ([L, ...], kernels [in, out]) in preallocated arrays (the one
    full copy this target needs: orbax writes a whole tree), then saves it with orbax."""

    def __init__(self, plan: Plan, out_dir: str, shard_size=None):
        self.plan, self.out_dir = plan, out_dir
        self.L = plan.config.num_hidden_layers
        self.arrays: dict[tuple[str, ...], np.ndarray] = {}
        self.pending = set(plan.entries)

    def put(self, name: str, arr: np.ndarray) -> None:
        fpath, layer, transpose = hf_to_flax(name)
        a = arr.T if transpose else arr
        if layer is None:
            self.arrays[fpath] = np.ascontiguousarray(a)
        else:  # (the plan gave every layer of a tensor one dtype; stack_layer would widen otherwise)
            hf_io.stack_layer(self.arrays, fpath, self.L, layer, a)
        self.pending.discard(name)

    def finish(self) -> None:
        from doge_jax import checkpoint

        if self.pending:
            raise RuntimeError(f"tensors never received: {sorted(self.pending)}")
        tree: dict = {}
        for fpath, a in self.arrays.items():
            node = tree
            for k in fpath[:-1]:
                node = node.setdefault(k, {})
            node[fpath[-1]] = a
        checkpoint.save_param_tree(os.path.join(self.out_dir, checkpoint.PARAMS), tree)
        self.arrays.clear()
        write_side_files(self.plan, self.out_dir)


SINKS = {"hf": HFSink, "torch": TorchSink, "jax": JaxSink}
