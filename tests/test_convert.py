"""`python -m convert` (issue 4): HF <-> JAX (orbax) <-> PyTorch, bit-exact round trips, variants, safety.

Most cases call `convert.main(argv)` in-process; the CLI itself runs in a subprocess for the error path and the
kill-while-writing cases. The 320M-sized memory case is marked slow (benchmarks/convert_memory.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import (
    TINY,
    TINY_MOE,
    hf_logits,
    make_hf_model,
    max_abs_diff,
    save_hf,
    unique_ids,
    write_legacy_checkpoint,
)
from safetensors import safe_open

from convert import main
from doge_jax import DogeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = np.dtype(ml_dtypes.bfloat16)


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def _tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (safetensors, single or sharded), as numpy (bf16 via ml_dtypes)."""
    out = {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for f in files:
        with safe_open(os.path.join(path, f), framework="np") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _assert_bit_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def _cfg(path) -> DogeConfig:
    return DogeConfig.from_json_file(os.path.join(path, "config.json"))


def _add_tokenizer_files(path) -> None:
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "BPE"}}, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)


# ---- lossless round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["jax", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_roundtrip_bit_exact(tmp_path, via, dtype):
    """HF -> jax|torch -> HF reproduces every tensor bit for bit, the config, and the side files."""
    hf = make_hf_model(dtype=torch.bfloat16 if dtype == "bfloat16" else None, attention_bias=True,
                       **TINY_MOE)
    src = save_hf(hf, tmp_path / "src")
    _add_tokenizer_files(src)
    assert _run(src, tmp_path / "mid", "--to", via) == 0
    assert _run(tmp_path / "mid", tmp_path / "back", "--to", "hf") == 0
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert next(iter(a.values())).dtype == (BF16 if dtype == "bfloat16" else np.float32)
    _assert_bit_equal(a, b)
    assert _cfg(src) == _cfg(tmp_path / "back") == _cfg(tmp_path / "mid")
    assert json.load(open(tmp_path / "back" / "config.json"))["dtype"] == dtype
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(src, f)).read() == open(tmp_path / "back" / f).read(), f


def test_jax_output_loads_and_matches(tmp_path):
    from doge_jax import DogeForCausalLM

    hf = make_hf_model(tie_word_embeddings=True)
    src = save_hf(hf, tmp_path / "src")
    assert _run(src, tmp_path / "jax", "--to", "jax") == 0
    assert os.path.isdir(tmp_path / "jax" / "params")
    ids = unique_ids(2, 20, 128, seed=1)
    ours = np.asarray(DogeForCausalLM.from_pretrained(str(tmp_path / "jax"))(ids).logits)
    ref = np.asarray(DogeForCausalLM.from_pretrained(src)(ids).logits)
    assert np.array_equal(ours, ref)  # same weights, same function: identical logits
    assert max_abs_diff(ours, hf_logits(hf, ids)) <= 1e-4  # and transformers' (test_jax_model tolerance)


def test_torch_output_is_a_state_dict_and_an_hf_dir(tmp_path):
    import transformers

    import doge_torch

    hf = make_hf_model(tie_word_embeddings=True)
    src = save_hf(hf, tmp_path / "src")
    assert _run(src, tmp_path / "pt", "--to", "torch") == 0
    sd = torch.load(tmp_path / "pt" / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in sd  # tied: doge_torch has no lm_head (transformers re-ties on load)
    cfg = _cfg(tmp_path / "pt")
    model = doge_torch.DogeForCausalLM(cfg).eval()
    model.load_state_dict(sd, strict=True)
    ids = unique_ids(2, 20, 128, seed=2)
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        assert max_abs_diff(model(torch.as_tensor(ids)).logits.numpy(), ref) <= 1e-4
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pt", attn_implementation="eager").eval()
    assert np.array_equal(hf_logits(back, ids), ref)  # bit-identical weights -> identical logits


def test_hf_output_native_loads_in_transformers_sharded_bf16(tmp_path):
    import transformers

    hf = make_hf_model(**TINY_MOE)
    src = save_hf(hf, tmp_path / "src")
    _add_tokenizer_files(src)
    out = tmp_path / "out"
    assert _run(src, out, "--to", "hf", "--dtype", "bfloat16", "--shard-size", "100KB") == 0
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert os.path.isfile(out / "tokenizer.json") and os.path.isfile(out / "generation_config.json")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # as mkdir would make it, not mkdtemp's 0700
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert back.dtype == torch.bfloat16
    # the cast equals torch's round-to-nearest-even bf16 cast, bit for bit
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k].view(torch.int16), v.to(torch.bfloat16).view(torch.int16)), k


def test_pytorch_bin_and_state_dict_file_sources(tmp_path, capsys):
    hf = make_hf_model()
    src = save_hf(hf, tmp_path / "src")
    # an HF directory holding pytorch_model.bin
    bindir = tmp_path / "bin"
    bindir.mkdir()
    torch.save(hf.state_dict(), bindir / "pytorch_model.bin")
    os.link(os.path.join(src, "config.json"), bindir / "config.json")
    assert _run(bindir, tmp_path / "a", "--to", "hf") == 0
    _assert_bit_equal(_tensors(src), _tensors(tmp_path / "a"))
    # the legacy (non-zip) torch.save format, which transformers reads too: it cannot be memory-mapped
    torch.save(hf.state_dict(), bindir / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert _run(bindir, tmp_path / "a2", "--to", "jax") == 0
    assert _run(tmp_path / "a2", tmp_path / "a3", "--to", "hf") == 0
    _assert_bit_equal(_tensors(src), _tensors(tmp_path / "a3"))
    torch.save(hf.state_dict(), bindir / "pytorch_model.bin")
    # a bare .pt file: config.json beside it is not there -> clear error; --config fixes it
    pt = tmp_path / "loose" / "weights.pt"
    pt.parent.mkdir()
    torch.save(hf.state_dict(), pt)
    assert _run(pt, tmp_path / "b", "--to", "hf") == 2
    assert "pass --config" in capsys.readouterr().err
    # the side files come from the config's directory (the model's), not from where the weight file lies
    _add_tokenizer_files(src)
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, 7], "pad_token_id": 2, "do_sample": True, "top_p": 0.9}, f)
    (pt.parent / "tokenizer_config.json").write_text('{"stray": true}')
    assert _run(pt, tmp_path / "b", "--to", "jax", "--config", os.path.join(src, "config.json")) == 0
    assert _run(tmp_path / "b", tmp_path / "c", "--to", "hf") == 0
    _assert_bit_equal(_tensors(src), _tensors(tmp_path / "c"))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "c" / name).read_text() == open(os.path.join(src, name)).read(), name
    # with one of our YAML configs (a configs/ directory holds no model's files) they come from beside the weights
    import dataclasses

    import yaml

    model = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(_cfg(src)).items()}
    yml = tmp_path / "cfgs" / "m.yaml"
    yml.parent.mkdir()
    yml.write_text(yaml.safe_dump({"model": model}))
    _add_tokenizer_files(pt.parent)
    assert _run(pt, tmp_path / "d", "--to", "hf", "--config", yml) == 0
    _assert_bit_equal(_tensors(src), _tensors(tmp_path / "d"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "d" / name).read_text() == (pt.parent / name).read_text(), name


def test_yaml_config_without_token_ids_keeps_the_models(tmp_path, capsys):
    """--config in our YAML (configs/*.yaml leave bos/eos/pad_token_id null: the trainers take the tokenizer's):
    the unset ids come from SRC's own config.json, else from the tokenizer beside the weights, with a note. They
    were dropped silently: config.json and generation_config.json without EOS, a model that never stops."""
    import dataclasses

    import yaml
    from tokenizers import Tokenizer, models

    hf = make_hf_model(bos_token_id=3, eos_token_id=4, pad_token_id=5)
    src = save_hf(hf, tmp_path / "src")
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(_cfg(src)).items()}
    model.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    yml = tmp_path / "m.yaml"
    yml.write_text(yaml.safe_dump({"model": model}))
    assert _run(src, tmp_path / "a", "--to", "hf", "--config", yml) == 0
    cfg = json.load(open(tmp_path / "a" / "config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (3, 4, 5)
    assert json.load(open(tmp_path / "a" / "generation_config.json"))["eos_token_id"] == 4
    assert "leaves bos_token_id, eos_token_id, pad_token_id unset; taken from" in capsys.readouterr().err
    # an orbax source: its config.json beside params/
    assert _run(src, tmp_path / "j", "--to", "jax") == 0
    assert _run(tmp_path / "j", tmp_path / "j2", "--to", "hf", "--config", yml) == 0
    cfg = json.load(open(tmp_path / "j2" / "config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (3, 4, 5)
    # a bare weights file with no config.json beside it: the tokenizer there names them
    loose = tmp_path / "loose"
    loose.mkdir()
    os.link(os.path.join(src, "model.safetensors"), loose / "model.safetensors")
    vocab = {f"t{i}": i for i in range(128)} | {"<s>": 7, "</s>": 8, "<pad>": 9}
    vocab = {k: v for k, v in vocab.items() if k not in ("t7", "t8", "t9")}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(loose / "tokenizer.json"))
    model["eos_token_id"] = 4  # one the config does set stays
    yml.write_text(yaml.safe_dump({"model": model}))
    assert _run(loose / "model.safetensors", tmp_path / "b", "--to", "hf", "--config", yml) == 0
    cfg = json.load(open(tmp_path / "b" / "config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (7, 4, 9)
    assert "leaves bos_token_id, pad_token_id unset; taken from" in capsys.readouterr().err
    # a config.json beside the weights with some of them: those, the rest from the tokenizer
    own = json.load(open(os.path.join(src, "config.json")))
    own.update(bos_token_id=None, pad_token_id=6)
    json.dump(own, open(loose / "config.json", "w"))
    model["eos_token_id"] = None
    yml.write_text(yaml.safe_dump({"model": model}))
    assert _run(loose / "model.safetensors", tmp_path / "c", "--to", "hf", "--config", yml) == 0
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (7, 4, 6)
    # ids the model cannot hold: an error naming them, not a silent drop
    vocab["<pad>"] = 200
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(loose / "tokenizer.json"))
    os.remove(loose / "config.json")
    capsys.readouterr()
    assert _run(loose / "model.safetensors", tmp_path / "d", "--to", "hf", "--config", yml) == 2
    assert "pad_token_id" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_mixed_layer_dtypes_are_widened_not_rounded(tmp_path, capsys):
    """A checkpoint whose layers hold one tensor in different dtypes (layer 0's A bfloat16, the others float32):
    --to jax and doge_jax.from_pretrained stack each tensor in one array, which took the first layer's dtype and
    rounded the float32 layers to bfloat16. Now the widest dtype, every value exact (the plan says so)."""
    from doge_jax import DogeForCausalLM

    hf = make_hf_model()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}  # (layer 0 first: its narrower dtype arrives first)
    sd["model.layers.0.self_attn.A"] = sd["model.layers.0.self_attn.A"].bfloat16()
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"].half()
    src = tmp_path / "mix"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    hf.config.to_json_file(src / "config.json")
    assert _run(src, tmp_path / "j", "--to", "jax", "--dry-run") == 0
    assert "dtype  : bfloat16, float16, float32 -> float32" in capsys.readouterr().out
    assert _run(src, tmp_path / "j", "--to", "jax") == 0 and _run(tmp_path / "j", tmp_path / "h", "--to", "hf") == 0
    back = _tensors(tmp_path / "h")
    for k, v in sd.items():
        if k in back:
            assert back[k].dtype == np.float32 and np.array_equal(back[k], v.float().numpy()), k
    layers = DogeForCausalLM.from_pretrained(str(src)).model.layers
    assert layers.self_attn.A[...].dtype == np.float32
    for i in range(hf.config.num_hidden_layers):
        want = sd[f"model.layers.{i}.self_attn.A"].float().numpy()
        assert np.array_equal(np.asarray(layers.self_attn.A[...][i]), want)


# ---- orbax sources -----------------------------------------------------------------------------------------------

def _training_run(tmp_path, hf_dir):
    """RUN/config.json + RUN/checkpoints/{10,20}/{params,opt_state}/ (step 20 = step 10 with scaled weights)."""
    import jax

    from doge_jax import DogeForCausalLM
    from doge_jax.checkpoint import save_param_tree
    from doge_jax.hf import flat_params

    model = DogeForCausalLM.from_pretrained(hf_dir)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model.config.save_json(str(run / "config.json"))
    trees = {}
    for step, scale in ((10, 1.0), (20, 2.0)):
        tree: dict = {}
        for path, a in flat_params(model).items():
            node = tree
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = np.asarray(a) * np.float32(scale)
        trees[step] = tree
        save_param_tree(str(run / "checkpoints" / str(step) / "params"), tree)
        save_param_tree(str(run / "checkpoints" / str(step) / "opt_state"),
                        jax.tree.map(lambda a: np.zeros_like(a), tree))
    (run / "checkpoints" / "30.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save is ignored
    return run, trees


def test_training_run_and_step_dirs(tmp_path, capsys):
    from doge_jax import DogeForCausalLM
    from doge_jax.hf import flat_params

    src = save_hf(make_hf_model(), tmp_path / "src")
    run, trees = _training_run(tmp_path, src)
    assert _run(run, tmp_path / "latest", "--to", "hf", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "step 20; optimizer state dropped" in out
    # a Flax kernel is shown as stored ([in, out] = [hidden, kv heads x head dim]) and said to be transposed (it was
    # shown in the HF layout, with no note)
    kv = TINY["num_key_value_heads"] * TINY["hidden_size"] // TINY["num_attention_heads"]
    assert re.search(rf"k_proj\.kernel\[\{{0\.\.1\}}\] \[{TINY['hidden_size']}, {kv}\] float32\n\s+-> "
                     r"model\.layers\.\{0\.\.1\}\.self_attn\.k_proj\.weight  \(transposed\)", out), out
    assert re.search(r"embed_tokens\.embedding \[128, 64\] float32\n\s+-> model\.embed_tokens\.weight\n", out)
    assert not os.path.exists(tmp_path / "latest")
    capsys.readouterr()
    assert _run(run, tmp_path / "latest", "--to", "hf") == 0
    assert _run(run, tmp_path / "s10", "--to", "torch", "--step", "10") == 0
    assert _run(run / "checkpoints" / "10", tmp_path / "s10dir", "--to", "hf") == 0
    # the line it ends with says which step it converted (a run holds several)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wrote ")]
    assert [re.sub(r" in [0-9.]+ s$", "", line.split(") from the ")[1]) for line in said] == [
        "orbax training run (step 20; optimizer state dropped)",
        "orbax training run (step 10; optimizer state dropped)",
        "orbax training-run step directory (step 10; optimizer state dropped)"], said
    _assert_bit_equal(_tensors(src), _tensors(tmp_path / "s10dir"))
    for d, step in ((tmp_path / "latest", 20), (tmp_path / "s10", 10)):
        got = flat_params(DogeForCausalLM.from_pretrained(str(d)))
        want = trees[step]
        for path, a in got.items():
            w = want
            for k in path:
                w = w[k]
            assert np.array_equal(np.asarray(a), w), (d, path)
    assert _run(run, tmp_path / "x", "--to", "hf", "--step", "15") == 2
    assert "no checkpoint for step 15 (have [10, 20])" in capsys.readouterr().err
    # a doge_torch.train run directory: its checkpoint-N directory named (it said "only applies to a training run")
    trun = tmp_path / "trun"
    for d in ("checkpoint-5", "checkpoint-10", "final"):
        (trun / d).mkdir(parents=True)
    assert _run(trun, tmp_path / "y", "--to", "jax", "--step", "5") == 2
    assert (f"--step only applies to a doge_jax.train run directory; it is a doge_torch.train run: pass its "
            f"checkpoint directory, {trun / 'checkpoint-5'}") in capsys.readouterr().err
    assert _run(trun, tmp_path / "y", "--to", "jax", "--step", "7") == 2
    assert "pass one of its model directories, final/ or checkpoint-10/" in capsys.readouterr().err


# ---- variants ----------------------------------------------------------------------------------------------------

def _small_doge_and_legacy(tmp_path):
    """A small_doge doge_torch model saved as HF, and the same weights under legacy names (+ a router bias)."""

    import doge_torch

    cfg = DogeConfig(variant="small_doge", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, keep_window_size=64,
                     is_moe=True, num_experts=16, num_experts_per_tok=4, tie_word_embeddings=True)
    tmodel = doge_torch.DogeForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in tmodel.named_parameters():
            if n.endswith(".A"):
                p.normal_()
    sd_dir = save_hf(tmodel, tmp_path / "sd")
    legacy = write_legacy_checkpoint(tmodel, tmp_path / "legacy",
                                     {"auto_map": {"AutoConfig": "configuration_doge.DogeConfig"}})
    return tmodel, sd_dir, legacy


def test_legacy_renames_to_small_doge(tmp_path, capsys):
    import doge_torch

    tmodel, sd_dir, legacy = _small_doge_and_legacy(tmp_path)
    assert _run(legacy, tmp_path / "dry", "--to", "hf", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "model.word_embed.weight" in out and "-> model.embed_tokens.weight" in out
    assert "skip model.layers.0.feed_forward.router_gate.bias" in out
    assert _run(legacy, tmp_path / "renamed", "--to", "hf") == 0
    _assert_bit_equal(_tensors(sd_dir), _tensors(tmp_path / "renamed"))
    cfg = _cfg(tmp_path / "renamed")
    assert cfg.variant == "small_doge" and cfg == _cfg(sd_dir)
    again = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "renamed")).eval()
    ids = torch.as_tensor(unique_ids(2, 20, 128, seed=3))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tmodel(ids).logits)
    # small_doge -> jax -> hf keeps the variant
    assert _run(legacy, tmp_path / "j", "--to", "jax", "--variant", "legacy") == 0
    assert _run(tmp_path / "j", tmp_path / "j2", "--to", "hf") == 0
    _assert_bit_equal(_tensors(sd_dir), _tensors(tmp_path / "j2"))


def test_native_small_doge_conversion_refused(tmp_path, capsys):
    _, sd_dir, legacy = _small_doge_and_legacy(tmp_path)
    native = save_hf(make_hf_model(), tmp_path / "native")
    for src, ask in ((sd_dir, "native"), (legacy, "native"), (native, "small_doge"), (native, "legacy")):
        assert _run(src, tmp_path / "out", "--to", "hf", "--variant", ask) == 2
        err = capsys.readouterr().err
        assert "refusing to convert" in err and "different functions" in err, err
        assert not os.path.exists(tmp_path / "out")
    # a config that contradicts the weights is refused the same way (orbax: config.json says small_doge)
    assert _run(native, tmp_path / "j", "--to", "jax") == 0
    cfg = json.load(open(tmp_path / "j" / "config.json"))
    cfg["doge_variant"] = "small_doge"
    json.dump(cfg, open(tmp_path / "j" / "config.json", "w"))
    assert _run(tmp_path / "j", tmp_path / "out", "--to", "hf") == 2
    assert "says variant 'small_doge'" in capsys.readouterr().err


# ---- safety ------------------------------------------------------------------------------------------------------

def test_existing_dst_dry_run_and_overwrite(tmp_path, capsys):
    src = save_hf(make_hf_model(), tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert _run(src, dst, "--to", "hf") == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert _run(src, dst, "--to", "torch", "--dry-run") == 0
    assert "needs --overwrite" in capsys.readouterr().out and os.listdir(dst) == ["keep.txt"]
    empty = tmp_path / "empty"  # a folder made for the output: still --overwrite (it is replaced, not filled)
    empty.mkdir()
    assert _run(src, empty, "--to", "hf") == 2 and "exists (an empty folder); pass --overwrite" in \
        capsys.readouterr().err
    # --overwrite replaces DST's model files and keeps the rest (it deleted the whole folder: other files, other
    # models, `convert SRC . --overwrite` a working directory), as save_pretrained does
    (dst / "model-00001-of-00002.safetensors").write_text("stale shard")
    (dst / "params").mkdir()
    (dst / "other_model").mkdir()
    (dst / "other_model" / "config.json").write_text("{}")
    (dst / "tokenizer.json").write_text("{}")  # the old model's tokenizer goes with it (src has none)
    assert _run(src, dst, "--to", "hf", "--overwrite") == 0
    assert sorted(os.listdir(dst)) == ["config.json", "generation_config.json", "keep.txt", "model.safetensors",
                                       "other_model"]
    assert (dst / "keep.txt").read_text() == "x" and (dst / "other_model" / "config.json").read_text() == "{}"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst")]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a training run's folder is never replaced
    assert _run(src, tmp_path / "run", "--to", "hf", "--overwrite") == 2
    assert "holds a training run" in capsys.readouterr().err and os.listdir(tmp_path / "run") == ["checkpoints"]
    # --dry-run lists every file the run writes (the copied tokenizer files were left out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "src" / name).write_text("{}")
    for to, weights in (("hf", "model.safetensors"), ("torch", "pytorch_model.bin"), ("jax", "params/")):
        assert _run(src, tmp_path / to, "--to", to, "--dry-run") == 0
        listed = capsys.readouterr().out.split("files  : ")[1].splitlines()[0].split(", ")
        assert weights in listed and len(listed) == 5, listed
        assert _run(src, tmp_path / to, "--to", to) == 0
        assert sorted(listed) == sorted(f + "/" if os.path.isdir(tmp_path / to / f) else f
                                        for f in os.listdir(tmp_path / to))


def test_key_and_shape_problems_are_listed(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = save_hf(make_hf_model(), tmp_path / "src")
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd.pop("model.layers.1.self_attn.k_norm.weight")
    sd["model.layers.0.extra"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(3)
    save_file(sd, f, metadata={"format": "pt"})
    for to in ("hf", "jax", "torch"):
        assert _run(src, tmp_path / "out", "--to", to) == 2
        err = capsys.readouterr().err
        assert "missing keys (1): model.layers.1.self_attn.k_norm.weight" in err
        assert "unexpected keys (1): model.layers.0.extra" in err
        assert "model.norm.weight: expected (64,), got (3,)" in err
        assert not os.path.exists(tmp_path / "out")


def _cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "convert", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, **kw)


def test_cli_corrupt_safetensors_one_line_error(tmp_path):
    src = save_hf(make_hf_model(), tmp_path / "src")
    f = os.path.join(src, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    r = _cli(src, tmp_path / "out", "--to", "torch")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "corrupt or truncated safetensors" in lines[0]
    assert not os.path.exists(tmp_path / "out")
    with open(f, "wb") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = _cli(src, tmp_path / "out", "--to", "hf")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "header is not valid JSON" in r.stderr


def test_bad_input_exits_2_a_failed_write_1(tmp_path, monkeypatch, capsys):
    """Bad input (a missing source, an existing DST) exits 2 as train and generate do (it was 1, as a failed
    write is); a write that fails (here: the disk is full) exits 1 and leaves no DST."""
    import errno

    import convert.safetensors_io as sio

    src = save_hf(make_hf_model(), tmp_path / "src")
    assert _run(tmp_path / "nowhere", tmp_path / "out", "--to", "hf") == 2
    assert _run(src, src, "--to", "hf") == 2 and "DST is the source" in capsys.readouterr().err

    def full(fd, buf, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio.os, "pwrite", full)
    assert _run(src, tmp_path / "out", "--to", "hf") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]


_FULL_DISK = """
import builtins, errno, io, sys
import convert.torch_io as t
class Full(io.FileIO):
    written = 0
    def write(self, b):
        Full.written += len(b)
        if Full.written > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)
t.open = lambda path, mode: Full(path, mode)
from convert import main
sys.exit(main(sys.argv[1:]))
"""


def test_torch_target_full_disk_exits_1(tmp_path):
    """--to torch on a full disk: the zip writer raised, then its destructor wrote the archive's end, raised again
    and aborted the process (exit 134, a C++ terminate message); now the first error, exit 1, no DST."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(src), str(tmp_path / "out"), "--to", "torch"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    out = os.path.abspath(tmp_path / "out")
    assert r.stderr.strip().splitlines()[-1] == f"error: writing {out} failed: No space left on device"
    assert "terminate" not in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]


_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from convert import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("to", ["jax", "hf"])
def test_failed_write_is_one_line_naming_dst_exit_1(tmp_path, to):
    """A write that fails in the writer (here: files may not pass 20 kB) exits 1 with one line naming DST, for
    every target: --to jax exited 2 (orbax raises tensorstore's ValueError, read as bad input) after ~100 lines
    of orbax worker-thread tracebacks."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    r = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, str(src), str(tmp_path / "out"), "--to", to],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("Writing model shards")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert f"writing {os.path.abspath(tmp_path / 'out')} failed: " in lines[0]
    # the cause, also after TensorStore's long paths (--to jax cut the line at 200 characters, inside a path)
    assert "File too large" in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["src"]


_SLOW_WRITER = """
import sys, time
import convert.safetensors_io as s
put = s.SafetensorsWriter.put
def slow(self, name, arr):
    put(self, name, arr)
    print("wrote", name, flush=True)
    time.sleep(0.2)
s.SafetensorsWriter.put = slow
from convert import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_mid_write_leaves_no_dst(tmp_path, sig):
    """A catchable signal is acted on after the current tensor (raised from the handler it could land in a garbage
    collection callback, where Python drops it: Ctrl-C was lost and the write finished, exit 0)."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    dst = tmp_path / "dst"
    # as from a terminal: Ctrl-C interrupts (a test run started in the background has SIGINT ignored, and a child
    # inherits that: Python then installs no KeyboardInterrupt handler)
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, src, str(dst), "--to", "hf"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline().startswith("wrote ")  # a tensor is in the temporary directory
        assert [n for n in os.listdir(tmp_path) if n.startswith(".dst.tmp-")]
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode != 0 and not dst.exists()
    if sig != signal.SIGKILL:  # a catchable signal also removes the temporary directory
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".dst")]
        assert p.returncode == 128 + sig
        why = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"  # (SIGTERM: said nothing)
        assert f"error: {why}; nothing written" in p.stderr.read()
    else:  # SIGKILL cannot be caught: the next write to the same place removes what the dead writer left
        assert [n for n in os.listdir(tmp_path) if n.startswith(".dst.tmp-")]
        live = tmp_path / f".dst.tmp-{socket.gethostname()}.{os.getpid()}-x"
        live.mkdir()  # a live writer's directory (this process) stays
        assert main([src, str(dst), "--to", "hf"]) == 0
        assert dst.is_dir() and [n for n in os.listdir(tmp_path) if n.startswith(".dst")] == [live.name]


def test_stale_temporary_dirs_locked_or_restored(tmp_path):
    """What a dead writer left is judged by its lock, not only its pid (a pid from another PID namespace looks
    dead here): a locked directory stays; a writer killed between its two renames gets the previous output put
    back; other hosts' directories are never touched."""
    from doge_jax import hf_io

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    host = socket.gethostname()
    locked = tmp_path / f".out.tmp-{host}.{dead}-abc"  # "dead" pid, but a live process (this one) holds the lock
    locked.mkdir()
    fd = hf_io._lock(str(locked))
    stale = tmp_path / f".out.tmp-{host}.{dead}-def"
    stale.mkdir()
    old = tmp_path / f".out.old-{host}.{dead}-ghi"  # killed after moving the previous output aside
    (old / "x").mkdir(parents=True)
    (old / "x" / "weights").write_text("previous")
    other = tmp_path / f".out.tmp-{host}x.{dead}-jkl"  # another host's name
    other.mkdir()
    try:
        hf_io.remove_stale(str(tmp_path), "out")
        assert (tmp_path / "out" / "weights").read_text() == "previous"
        assert sorted(os.listdir(tmp_path)) == sorted([locked.name, other.name, "out"])
        with hf_io.atomic_output_dir(tmp_path / "out") as t:
            open(os.path.join(t, "weights"), "w").write("new")
        assert (tmp_path / "out" / "weights").read_text() == "new"
        assert sorted(os.listdir(tmp_path)) == sorted([locked.name, other.name, "out"])
    finally:
        hf_io._unlock(fd)
    hf_io.remove_stale(str(tmp_path), "out")  # unlocked now: its writer is gone
    assert sorted(os.listdir(tmp_path)) == sorted([other.name, "out"])


def test_atomic_file_whole_or_nothing(tmp_path):
    """Run files other hosts read (config.json, tokenizer files, train_config.yaml): a reader sees the old content
    or the whole new one; a failed write leaves the old file and no temporary behind."""
    from doge_jax import hf_io

    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), hf_io.atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        assert path.read_text() == "old" and socket.gethostname() in tmp
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]
    with hf_io.atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


def test_save_pretrained_keeps_other_files(tmp_path):
    """As transformers' save_pretrained: saving into a directory keeps its tokenizer and other files and drops old
    weight files (here 2 shards + index that the new single file replaces); before, the directory was replaced
    whole and the tokenizer lost."""
    import doge_torch
    from doge_jax import DogeForCausalLM
    from doge_jax.checkpoint import save_model

    src = save_hf(make_hf_model(), tmp_path / "src")
    want = _tensors(src)
    for name, load in (("jax", DogeForCausalLM.from_pretrained), ("torch", doge_torch.DogeForCausalLM.from_pretrained)):
        d = tmp_path / name
        make_hf_model().save_pretrained(str(d), max_shard_size="100KB")  # shards + index
        assert "model.safetensors.index.json" in os.listdir(d)
        _add_tokenizer_files(d)
        (d / "README.md").write_text("card")
        (d / "notes").mkdir()
        (d / "notes" / "a.txt").write_text("a")
        load(src).save_pretrained(str(d))
        assert sorted(os.listdir(d)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                         "notes", "tokenizer.json", "tokenizer_config.json"], name
        assert (d / "notes" / "a.txt").read_text() == "a" and (d / "README.md").read_text() == "card"
        _assert_bit_equal(want, _tensors(d))
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f".{name}")]
    # an orbax save into an HF directory keeps the tokenizer and drops the HF weights
    save_model(DogeForCausalLM.from_pretrained(src), str(tmp_path / "jax"))
    assert sorted(os.listdir(tmp_path / "jax")) == ["README.md", "config.json", "generation_config.json", "notes",
                                                    "params", "tokenizer.json", "tokenizer_config.json"]


def test_a_step_without_params_is_named(tmp_path, capsys):
    """A run whose newest step folder lost its params/ loads the newest finished step with a warning naming the
    skipped one (it loaded step 10 silently); that step folder itself is named as such (it said "no
    model.safetensors ... found"), also by convert."""
    from doge_jax import DogeForCausalLM
    from doge_jax.hf_names import CheckpointError

    src = save_hf(make_hf_model(), tmp_path / "src")
    run, trees = _training_run(tmp_path, src)
    shutil.rmtree(run / "checkpoints" / "20" / "params")
    with pytest.warns(UserWarning, match=r"step 20 has no params/ \(damaged or unfinished\): loading step 10"):
        m = DogeForCausalLM.from_pretrained(str(run))
    np.testing.assert_array_equal(np.asarray(m.model.norm.weight[...]), trees[10]["model"]["norm"]["weight"])
    with pytest.raises(CheckpointError, match=r"a training step without params/ \(damaged or unfinished\); the "
                                              r"run's finished steps: \[10\]"):
        DogeForCausalLM.from_pretrained(str(run / "checkpoints" / "20"))
    assert _run(run / "checkpoints" / "20", tmp_path / "out", "--to", "hf") == 2
    assert "a training step without params/" in capsys.readouterr().err


def test_saving_a_model_into_a_training_run_is_refused(tmp_path):
    """A run's checkpoints/ would stay and win over the saved weights in from_pretrained (and replacing the
    directory would delete the run): every model save refuses it."""
    import doge_torch
    from doge_jax import DogeForCausalLM
    from doge_jax.checkpoint import save_model

    src = save_hf(make_hf_model(), tmp_path / "src")
    run, _ = _training_run(tmp_path, src)
    before = sorted(os.listdir(run))
    for save in (DogeForCausalLM.from_pretrained(src).save_pretrained,
                 doge_torch.DogeForCausalLM.from_pretrained(src).save_pretrained,
                 lambda p: save_model(DogeForCausalLM.from_pretrained(src), p)):
        with pytest.raises(FileExistsError, match="holds a training run"):
            save(str(run))
        assert sorted(os.listdir(run)) == before
        # nor into its checkpoints/ or a step there (a save into a step replaced its params/: the step was lost)
        for where in (run / "checkpoints", run / "checkpoints" / "20", run / "checkpoints" / "40"):
            with pytest.raises(FileExistsError, match=r"inside the training run's checkpoints/"):
                save(str(where))
            assert sorted(os.listdir(run)) == before and not (run / "checkpoints" / "40").exists()
        assert sorted(os.listdir(run / "checkpoints" / "20")) == ["opt_state", "params"]
    # a project folder with a config.json and its own checkpoints/ of saved models is not a run
    proj = tmp_path / "project"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "config.json").write_text("{}")
    DogeForCausalLM.from_pretrained(src).save_pretrained(str(proj / "checkpoints" / "my-model"))
    assert (proj / "checkpoints" / "my-model" / "model.safetensors").is_file()


def test_dst_containing_the_source_refused(tmp_path, capsys):
    """--overwrite of a DST that holds the source would delete the source after reading it (before: it did)."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    run, _ = _training_run(tmp_path, src)
    before = sorted(os.listdir(run))
    assert _run(run / "checkpoints" / "10", run, "--to", "hf", "--overwrite") == 2
    assert "DST contains the source" in capsys.readouterr().err and sorted(os.listdir(run)) == before
    assert _run(src, src, "--to", "hf", "--overwrite") == 2
    assert "DST is the source" in capsys.readouterr().err
    assert _run(src, tmp_path / "j", "--to", "torch") == 0
    assert _run(tmp_path / "j" / "pytorch_model.bin", tmp_path / "j", "--to", "hf", "--overwrite") == 2
    assert "DST contains the source" in capsys.readouterr().err and (tmp_path / "j" / "pytorch_model.bin").is_file()
    assert _run(run, run / "checkpoints", "--to", "hf", "--overwrite") == 2  # an existing part of the source
    assert "DST is inside the source" in capsys.readouterr().err and sorted(os.listdir(run)) == before
    assert _run(src, os.path.join(src, "jax"), "--to", "jax") == 0  # a new directory inside it is fine
    # ... but not inside a training run's checkpoints/: RUN/checkpoints/500 became the run's newest "step"
    shutil.copytree(src, run / "exported")  # a model kept in the run's folder (README: the run "holds the source")
    before = sorted(os.listdir(run))
    for source in (run, run / "checkpoints" / "10", run / "exported", src):
        assert _run(source, run / "checkpoints" / "500", "--to", "jax") == 2
        assert "inside the training run's checkpoints/" in capsys.readouterr().err and sorted(os.listdir(run)) == before
    assert _run(run, run / "export", "--to", "hf") == 0  # elsewhere in the run it cannot pass for a step
    (tmp_path / "notes.txt").write_text("notes")
    assert _run(src, tmp_path / "notes.txt", "--to", "hf", "--overwrite") == 2
    assert "is a file, not a directory" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "notes"
    os.symlink(tmp_path / "gone", tmp_path / "dangling")  # (was "is a file")
    assert _run(src, tmp_path / "dangling", "--to", "hf", "--overwrite") == 2
    assert f"dangling is a broken symbolic link (to {tmp_path / 'gone'}), not a directory" in capsys.readouterr().err
    # a file on DST's path names that file (before: "[Errno 17] ...: cannot write there (File exists)")
    assert _run(src, tmp_path / "notes.txt" / "a" / "out", "--to", "hf") == 2
    err = capsys.readouterr().err
    assert f"cannot write there ({tmp_path / 'notes.txt'} is a file, not a directory)" in err and "Errno" not in err


def test_no_overwrite_never_replaces(tmp_path):
    """overwrite=False holds at the end of the write too: a killed writer's previous output that the cleanup puts
    back, or a directory another writer finished meanwhile, is not replaced (before: both were deleted)."""
    from doge_jax import hf_io

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    old = tmp_path / f".out.old-{socket.gethostname()}.{dead}-abc"
    (old / "x").mkdir(parents=True)
    (old / "x" / "weights").write_text("previous")
    with pytest.raises(FileExistsError, match="exists"), hf_io.atomic_output_dir(tmp_path / "out", overwrite=False):
        pass
    assert (tmp_path / "out" / "weights").read_text() == "previous"
    with pytest.raises(FileExistsError, match="appeared while writing"):
        with hf_io.atomic_output_dir(tmp_path / "new", overwrite=False) as t:
            open(os.path.join(t, "weights"), "w").write("mine")
            (tmp_path / "new").mkdir()
            (tmp_path / "new" / "weights").write_text("theirs")
    assert (tmp_path / "new" / "weights").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["new", "out"]


def test_overwrite_through_a_symlink_replaces_its_target(tmp_path):
    """DST a symbolic link to a model folder: --overwrite writes the folder it points to and the link stays (before:
    the link became a real folder and the old weights stayed where it pointed, read by everything else using them)."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    target = tmp_path / "store" / "model"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"old weights")
    (target / "README.md").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert _run(src, link, "--to", "hf", "--overwrite") == 0
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert (target / "README.md").read_text() == "mine"
    assert (target / "model.safetensors").read_bytes() == (tmp_path / "src" / "model.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path / "store")) == ["model"]  # no leftover temporary folders


def test_torch_from_pretrained_keeps_the_recorded_dtype(tmp_path):
    """dtype=None: the config's dtype (as transformers), else the widest stored; before, the first tensor's dtype
    (here bf16) silently downcast float32 weights."""
    from safetensors.torch import load_file, save_file

    import doge_torch

    src = save_hf(make_hf_model(), tmp_path / "src")
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    want = {k: v.clone() for k, v in sd.items()}
    sd = {k: (v.to(torch.bfloat16) if k.startswith("model.layers.") and v.ndim == 2 else v) for k, v in sd.items()}
    save_file(sd, f, metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    assert cfg.get("dtype", "float32") == "float32"
    m = doge_torch.DogeForCausalLM.from_pretrained(src)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert torch.equal(m.state_dict()["model.norm.weight"], want["model.norm.weight"])
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    m = doge_torch.DogeForCausalLM.from_pretrained(src)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    cfg["dtype"] = "bfloat16"
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    assert {p.dtype for p in doge_torch.DogeForCausalLM.from_pretrained(src).parameters()} == {torch.bfloat16}


def test_unreadable_configs_and_dtypes_named(tmp_path, capsys):
    """One-line errors naming the file or field (before: TypeError / JSONDecodeError / YAML tracebacks)."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    cfg_file = os.path.join(src, "config.json")
    good = json.load(open(cfg_file))
    for bad, want in ((dict(good, rms_norm_eps=None), "DogeConfig.rms_norm_eps=None: must be float"),
                      (dict(good, num_experts_per_tok=None), "DogeConfig.num_experts_per_tok=None: must be int"),
                      (dict(good, eos_token_id=[1, "x"]), "DogeConfig.eos_token_id=(1, 'x'): must be int or a list"),
                      ([good], "expected a JSON object, got list")):
        json.dump(bad, open(cfg_file, "w"))
        assert _run(src, tmp_path / "out", "--to", "jax") == 2
        assert want in capsys.readouterr().err
    open(cfg_file, "w").write('{"vocab_size": 12')
    assert _run(src, tmp_path / "out", "--to", "jax") == 2
    assert f"{cfg_file}: unreadable JSON" in capsys.readouterr().err
    yml = tmp_path / "c.yaml"
    yml.write_text("model: {vocab_size: [1, 2\n")
    json.dump(good, open(cfg_file, "w"))
    assert _run(src, tmp_path / "out", "--to", "jax", "--config", yml) == 2
    assert f"{yml}: unreadable YAML" in capsys.readouterr().err
    # a valid safetensors file with a dtype convert does not read
    f = os.path.join(src, "model.safetensors")
    raw = open(f, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["dtype"] = "F8_E4M3"
    header["model.norm.weight"]["data_offsets"][1] = header["model.norm.weight"]["data_offsets"][0] + 64
    h = json.dumps(header).encode()
    open(f, "wb").write(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    assert _run(src, tmp_path / "out", "--to", "hf") == 2
    assert "tensor 'model.norm.weight' has dtype F8_E4M3, which convert does not read" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_weight_file_order_and_sharded_bin(tmp_path, capsys):
    """Weight files are found in transformers' order (a single model.safetensors before an index); from_pretrained
    reads a sharded pytorch_model.bin like convert does; a nested .pt names the key that is not a tensor."""
    import doge_torch
    from doge_jax import DogeForCausalLM

    hf = make_hf_model()
    src = save_hf(hf, tmp_path / "src")
    want = _tensors(src)
    d = tmp_path / "bin"  # two .bin shards + index, as older transformers wrote them
    d.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or k in want}
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        f = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, d / f)
        weight_map.update({k: f for k in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(d / "pytorch_model.bin.index.json", "w"))
    (d / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    for load in (DogeForCausalLM.from_pretrained, doge_torch.DogeForCausalLM.from_pretrained):
        load(str(d)).save_pretrained(str(tmp_path / "out"))
        _assert_bit_equal(want, _tensors(tmp_path / "out"))
    # both a single file and a (stale) index: the single file, as transformers
    stale = tmp_path / "both"
    make_hf_model(seed=1).save_pretrained(str(stale), max_shard_size="100KB")
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            os.link(os.path.join(src, f), stale / f)
    assert _run(stale, tmp_path / "c", "--to", "hf") == 0
    _assert_bit_equal(want, _tensors(tmp_path / "c"))
    torch.save({"model": hf.state_dict(), "step": 3}, tmp_path / "train.pt")
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    assert _run(tmp_path / "train.pt", tmp_path / "d", "--to", "hf") == 2
    assert "but 'model' holds OrderedDict (a training checkpoint?" in capsys.readouterr().err


def test_orbax_checkpoint_ignores_no_arguments(tmp_path):
    from doge_jax import DogeForCausalLM

    src = save_hf(make_hf_model(), tmp_path / "src")
    assert _run(src, tmp_path / "j", "--to", "jax") == 0
    with pytest.raises(ValueError, match="carries its own config.json"):
        DogeForCausalLM.from_pretrained(str(tmp_path / "j"), variant="small_doge")


def test_small_doge_output_for_transformers_gets_a_note(tmp_path, capsys):
    _, sd_dir, _ = _small_doge_and_legacy(tmp_path)
    assert _run(sd_dir, tmp_path / "out", "--to", "hf") == 0
    assert "transformers' built-in Doge would load it as the native layout" in capsys.readouterr().err
    assert _run(sd_dir, tmp_path / "j", "--to", "jax") == 0
    assert "built-in Doge" not in capsys.readouterr().err


# ---- 320M-sized memory case --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_320m_conversion_memory(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import convert_memory

    rows = convert_memory.run(str(tmp_path), targets=("hf", "torch", "jax"))
    for r in rows:
        assert r["rc"] == 0, r
        assert r["peak_rss"] < 2 * r["ckpt_bytes"], r  # issue 4: well under twice the checkpoint size


@pytest.fixture
def terminal_sigint():
    """Ctrl-C raises KeyboardInterrupt, as in a process started from a terminal (a test run started in the
    background has SIGINT ignored)."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_during_an_orbax_write_waits_for_it_and_leaves_nothing(tmp_path, monkeypatch, terminal_sigint):
    """orbax writes from background threads that Ctrl-C does not stop (`convert --to jax` left hundreds of MB in
    a temporary directory after printing "nothing written"): the interrupt waits for the write, then the output
    is removed whole."""
    import signal

    import orbax.checkpoint as ocp

    from doge_jax.checkpoint import save_param_tree
    from doge_jax.hf_io import atomic_output_dir

    real, done = ocp.Checkpointer.save, []

    def save(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the write starts
        real(self, *args, **kwargs)
        done.append(True)

    monkeypatch.setattr(ocp.Checkpointer, "save", save)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "out") as tmp:
            save_param_tree(os.path.join(tmp, "params"), {"w": np.ones((64, 64), np.float32)})
    assert done == [True] and os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_is_one_commands_and_a_second_ctrl_c_stops_a_deferred_write(tmp_path, monkeypatch, capsys):
    """convert.main forgets its signal when it returns (a later convert() call raised KeyboardInterrupt with no
    signal); a signal during --dry-run is an interruption, not "DST was complete"; inside an orbax write
    (sigint_deferred) a second Ctrl-C stops at once even under convert's own handler (it took a third)."""
    import signal

    import convert.core as core
    from doge_jax.checkpoint import sigint_deferred

    src = save_hf(make_hf_model(), tmp_path / "src")
    real = core.convert

    def signalled(*a, **k):
        out = real(*a, **k)
        core.STOP.append(signal.SIGINT)  # as if Ctrl-C came right after the rename
        return out

    monkeypatch.setattr(core, "convert", signalled)
    assert _run(src, tmp_path / "a", "--to", "hf") == 0 and core.STOP == []
    assert "came after" in capsys.readouterr().err and (tmp_path / "a").is_dir()
    assert _run(src, tmp_path / "b", "--to", "hf", "--dry-run") == 130 and core.STOP == []
    assert "interrupted; nothing written" in capsys.readouterr().err
    monkeypatch.setattr(core, "convert", real)
    from convert.cli import _on_signal

    old = signal.signal(signal.SIGINT, _on_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                assert core.STOP == []  # deferred
                os.kill(os.getpid(), signal.SIGINT)  # the second: at once
    finally:
        signal.signal(signal.SIGINT, old)
        core.STOP.clear()


def test_deferred_ctrl_c_keeps_an_ignored_sigint_and_custom_handlers(monkeypatch):
    """An ignored SIGINT (a background job) stays ignored: the write is kept; a custom handler is called after the
    block instead of a KeyboardInterrupt."""
    import signal

    from doge_jax.checkpoint import sigint_deferred

    seen = []
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_non_float_weights_refused(tmp_path, capsys):
    """An int32 weight was copied as int32 (doge_jax then kept an int32 parameter); every Doge weight is a float."""
    import safetensors.numpy

    src = save_hf(make_hf_model(), tmp_path / "src")
    f = os.path.join(src, "model.safetensors")
    sd = safetensors.numpy.load_file(f)
    sd["model.norm.weight"] = sd["model.norm.weight"].astype(np.int32)
    safetensors.numpy.save_file(sd, f, metadata={"format": "pt"})
    assert _run(src, tmp_path / "out", "--to", "jax") == 2
    assert "non-floating-point weights: model.norm.weight (int32)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tied_config_over_a_separate_head_is_refused(tmp_path, capsys):
    """config.json ties the head (tie_word_embeddings: true) but the weights hold an lm_head.weight of other values:
    dropping it silently changed every logit (transformers keeps that head). convert (also with --config), both
    packages' from_pretrained refuse it, naming the tensor; a head equal to the embedding is still taken."""
    import doge_torch
    from doge_jax import DogeForCausalLM
    from doge_jax.hf_names import CheckpointError

    untied = save_hf(make_hf_model(), tmp_path / "untied")
    tied = save_hf(make_hf_model(tie_word_embeddings=True), tmp_path / "tied")
    bad = tmp_path / "tiedcfg"
    os.makedirs(bad)
    for f in os.listdir(untied):
        os.link(os.path.join(untied, f), bad / f) if f != "config.json" else None
    cfg = json.load(open(os.path.join(untied, "config.json")))
    json.dump({**cfg, "tie_word_embeddings": True}, open(bad / "config.json", "w"))
    msg = "lm_head.weight differs from model.embed_tokens.weight, but the config ties them"
    for argv in ([bad, tmp_path / "o1", "--to", "torch"], [untied, tmp_path / "o2", "--to", "hf", "--config",
                                                              os.path.join(tied, "config.json")]):
        assert _run(*argv) == 2
        assert msg in capsys.readouterr().err and not os.path.exists(argv[1])
    with pytest.raises(CheckpointError, match=msg):
        DogeForCausalLM.from_pretrained(str(bad))
    assert _run(untied, tmp_path / "jx", "--to", "jax") == 0  # an orbax source too (its head was dropped)
    capsys.readouterr()
    assert _run(tmp_path / "jx", tmp_path / "o4", "--to", "hf", "--config", os.path.join(tied, "config.json")) == 2
    assert msg in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=msg):
        doge_torch.DogeForCausalLM.from_pretrained(str(bad))
    from doge_torch.train import init_from  # (doge_torch.train --init-from; doge_jax.train's goes through the above)

    with pytest.raises(CheckpointError, match=msg):
        init_from(str(bad), _cfg(bad))
    # the same weights with lm_head.weight = the embedding (a .bin of a tied model's state_dict holds both)
    sd = {k: torch.as_tensor(v) for k, v in _tensors(tied).items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    same = tmp_path / "same"
    os.makedirs(same)
    torch.save(sd, same / "pytorch_model.bin")
    os.link(os.path.join(tied, "config.json"), same / "config.json")
    assert _run(same, tmp_path / "o3", "--to", "hf") == 0
    ids = unique_ids(2, 8, TINY["vocab_size"])
    want = hf_logits(make_hf_model(tie_word_embeddings=True), ids)
    assert max_abs_diff(np.asarray(DogeForCausalLM.from_pretrained(str(same))(ids).logits), want) <= 1e-4
    assert max_abs_diff(doge_torch.DogeForCausalLM.from_pretrained(str(same))(torch.as_tensor(ids)).logits
                        .detach().numpy(), want) <= 1e-4


def test_damaged_orbax_checkpoint_and_missing_config_are_named(tmp_path, capsys):
    """An orbax model whose params/ lost _METADATA read as a native/small_doge clash ("Leave out --variant"); a run
    whose newest step is damaged now also points to --step; an orbax model without config.json named the parent
    folder's config.json."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    assert _run(src, tmp_path / "jx", "--to", "jax") == 0
    os.remove(tmp_path / "jx" / "params" / "_METADATA")
    capsys.readouterr()
    assert _run(tmp_path / "jx", tmp_path / "o", "--to", "hf") == 2
    err = capsys.readouterr().err
    assert "jx/params: no parameters in its orbax metadata" in err and "variant" not in err and "--step" not in err
    step = tmp_path / "run" / "checkpoints" / "7"  # a run's damaged newest step
    shutil.copytree(tmp_path / "jx", step)
    os.rename(step / "config.json", tmp_path / "run" / "config.json")
    assert _run(tmp_path / "run", tmp_path / "o", "--to", "hf") == 2
    assert "an older step of the run may be intact (--step" in capsys.readouterr().err
    assert _run(src, tmp_path / "jx2", "--to", "jax") == 0
    os.remove(tmp_path / "jx2" / "config.json")
    capsys.readouterr()
    assert _run(tmp_path / "jx2", tmp_path / "o", "--to", "hf") == 2
    assert f"{tmp_path / 'jx2' / 'config.json'}: config not found" in capsys.readouterr().err


def test_damaged_orbax_source_is_one_line_in_a_terminal(tmp_path):
    """An orbax source whose data files are empty: the one-line error and nothing after it (in about half of the
    runs TensorStore's leftover reads printed "Event loop is closed" tracebacks after it: 6-54 more lines)."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    assert _run(src, tmp_path / "jx", "--to", "jax") == 0
    for root, _, files in os.walk(tmp_path / "jx" / "params"):
        for f in files:
            if os.path.basename(root) == "d":  # (the array data files)
                open(os.path.join(root, f), "w").close()
    for _ in range(3):
        p = _cli(tmp_path / "jx", tmp_path / "o", "--to", "hf")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "error: " in p.stderr, p.stderr[-2000:]


def test_float16_overflow_is_named(tmp_path, capsys):
    """--dtype float16 of a weight beyond 65504: one warning naming the tensor (was numpy's RuntimeWarning from
    convert/plan.py only); the conversion still writes what torch's .to(float16) would (inf)."""
    hf = make_hf_model()
    with torch.no_grad():
        hf.model.norm.weight[3] = 1e5
    src = save_hf(hf, tmp_path / "src")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning would fail here
        assert _run(src, tmp_path / "f16", "--to", "hf", "--dtype", "float16") == 0
    err = capsys.readouterr().err
    assert "warning: 1 tensor(s) hold values beyond float16's range, now inf: model.norm.weight" in err, err
    assert np.isinf(_tensors(tmp_path / "f16")["model.norm.weight"][3])
    assert _run(src, tmp_path / "bf16", "--to", "hf", "--dtype", "bfloat16") == 0
    assert "warning" not in capsys.readouterr().err


def test_dry_run_into_a_closed_pipe_is_quiet(tmp_path, monkeypatch, capsys):
    """`convert ... --dry-run | head -2` on a big model: the reader goes away; exit 141 (SIGPIPE's) without a word,
    as generate does (was "error: [Errno 32] Broken pipe", exit 1)."""
    src = save_hf(make_hf_model(), tmp_path / "src")
    capsys.readouterr()

    class ClosedPipe:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert _run(src, tmp_path / "o", "--to", "jax", "--dry-run") == 141
    assert capsys.readouterr().err == "" and not os.path.exists(tmp_path / "o")
