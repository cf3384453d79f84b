"""Tests for doge_jax.optim against transformers / torch: WSD schedule, weight-decay mask, clipped AdamW."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from doge_jax.optim import decay_mask, hf_name_decayed, make_optimizer, path_to_hf_name, wsd_schedule

TYPES = ("linear", "cosine", "1-sqrt")
PEAK = 3e-4


def _torch_lrs(num_steps: int, peak: float = PEAK, **kwargs) -> np.ndarray:
    """Learning rate of transformers' LambdaLR WSD schedule at steps 0..num_steps-1 (float64)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = transformers.get_wsd_schedule(opt, **kwargs)
        lrs = []
        for _ in range(num_steps):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
    return np.asarray(lrs, dtype=np.float64)


def _check_schedule(extra: int = 7, **kwargs) -> float:
    """Compare wsd_schedule with transformers at every step (plus `extra` past the end); return max rel error."""
    stable = kwargs.get("num_stable_steps")
    if stable is None:
        stable = kwargs["num_training_steps"] - kwargs["num_warmup_steps"] - kwargs["num_decay_steps"]
    n = kwargs["num_warmup_steps"] + stable + kwargs["num_decay_steps"] + extra
    want = _torch_lrs(n, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = wsd_schedule(PEAK, **kwargs)
    got = np.asarray(jax.jit(sched)(jnp.arange(n, dtype=jnp.int32)), dtype=np.float64)
    assert got.shape == want.shape
    # Exact zeros must stay exact zeros; everything else within float32 relative accuracy.
    np.testing.assert_array_equal(got == 0, want == 0)
    rel = np.abs(got - want) / np.where(want == 0, 1.0, np.abs(want))
    assert rel.max() <= 1e-6, (kwargs, int(rel.argmax()), got[rel.argmax()], want[rel.argmax()])
    print(f"max rel error {rel.max():.2e} for {kwargs}")
    return float(rel.max())


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
@pytest.mark.parametrize("decay_type", TYPES)
@pytest.mark.parametrize("warmup_type", TYPES)
def test_wsd_schedule_types(warmup_type: str, decay_type: str, min_lr_ratio: float) -> None:
    _check_schedule(num_warmup_steps=13, num_decay_steps=37, num_training_steps=80, warmup_type=warmup_type,
                    decay_type=decay_type, min_lr_ratio=min_lr_ratio)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_warmup_steps=10, num_decay_steps=40, num_training_steps=60, num_cycles=1.5),
        dict(num_warmup_steps=10, num_decay_steps=40, num_training_steps=60, num_cycles=2.0, min_lr_ratio=0.1),
        dict(num_warmup_steps=10, num_decay_steps=30, num_training_steps=60, num_cycles=0.3),
        dict(num_warmup_steps=0, num_decay_steps=20, num_training_steps=30, warmup_type="cosine"),
        dict(num_warmup_steps=0, num_decay_steps=0, num_training_steps=5),
        dict(num_warmup_steps=15, num_decay_steps=0, num_training_steps=30, warmup_type="1-sqrt", min_lr_ratio=0.1),
        dict(num_warmup_steps=5, num_decay_steps=25, num_training_steps=30, decay_type="1-sqrt"),
        dict(num_warmup_steps=5, num_decay_steps=10, num_stable_steps=7, decay_type="linear"),
        dict(num_warmup_steps=5, num_decay_steps=10, num_stable_steps=7, num_training_steps=1000),  # stable wins
        dict(num_warmup_steps=1, num_decay_steps=1, num_training_steps=2, min_lr_ratio=0.1),
        # Realistic lengths: float32 progress stays relatively accurate near the ends of the phases.
        dict(num_warmup_steps=2000, num_decay_steps=3000, num_training_steps=6000, warmup_type="cosine"),
        dict(num_warmup_steps=1000, num_decay_steps=3000, num_training_steps=4500, warmup_type="1-sqrt",
             decay_type="1-sqrt"),
    ],
)
def test_wsd_schedule_cases(kwargs: dict) -> None:
    _check_schedule(**kwargs)


def test_wsd_schedule_scalar_inputs() -> None:
    sched = wsd_schedule(1e-3, num_warmup_steps=4, num_decay_steps=4, num_training_steps=12)
    want = _torch_lrs(20, peak=1e-3, num_warmup_steps=4, num_decay_steps=4, num_training_steps=12)
    for step in (0, 3, 6, 9, 19):
        for arg in (step, jnp.int32(step), jnp.asarray(step, jnp.int64 if jax.config.x64_enabled else jnp.int32)):
            out = sched(arg)
            assert out.dtype == jnp.float32 and out.shape == ()
            np.testing.assert_allclose(float(out), want[step], rtol=1e-6)


def test_wsd_schedule_errors() -> None:
    with pytest.raises(ValueError, match="num_training_steps or num_stable_steps"):
        wsd_schedule(1.0, 1, 1)
    with pytest.raises(ValueError, match="warmup_type"):
        wsd_schedule(1.0, 1, 1, 10, warmup_type="exp")
    with pytest.raises(ValueError, match="decay_type"):
        wsd_schedule(1.0, 1, 1, 10, decay_type="sqrt")
    with pytest.raises(ValueError, match="stable phase"):
        wsd_schedule(1.0, 8, 8, num_training_steps=10)
    with pytest.warns(UserWarning, match="num_stable_steps"):
        wsd_schedule(1.0, 1, 1, num_training_steps=10, num_stable_steps=3)


def _tiny_hf_doge() -> torch.nn.Module:
    cfg = transformers.DogeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, is_moe=True, num_experts=16, num_experts_per_tok=4, attention_bias=True,
        mlp_bias=True)
    return transformers.DogeForCausalLM(cfg)


def test_hf_name_decayed_matches_trainer() -> None:
    model = _tiny_hf_doge()
    hf_decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in model.named_parameters()]
    assert len(names) > 50
    for name in names:
        assert hf_name_decayed(name) == (name in hf_decayed), name
    # The Doge-specific expectations, spelled out.
    not_decayed = {n.split(".", 3)[-1] for n in names if not hf_name_decayed(n) and ".layers." in n}
    assert not_decayed == {
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
        "self_attn.k_norm.weight", *(f"{m}.bias" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj", "self_attn.dt_proj",
                                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                            "mlp.down_proj"))}
    assert not hf_name_decayed("model.norm.weight")
    for name in ("model.layers.0.self_attn.A", "model.layers.0.input_residual", "model.embed_tokens.weight",
                 "lm_head.weight", "model.layers.1.mlp.router_gate.weight", "model.layers.1.mlp.down_embed.weight",
                 "model.layers.1.mlp.up_embed.weight", "model.layers.0.post_attention_residual"):
        assert hf_name_decayed(name), name


def _flax_like_params(key: jax.Array) -> dict:
    """A small nested dict with our Flax model's leaf paths (layers stacked, no layer index)."""
    shapes = {
        "model": {
            "embed_tokens": {"embedding": (16, 8)},
            "layers": {
                "input_residual": (8,), "post_attention_residual": (8,),
                "input_layernorm": {"weight": (8,)}, "post_attention_layernorm": {"weight": (8,)},
                "self_attn": {"A": (2,), "q_proj": {"kernel": (8, 8), "bias": (8,)}, "q_norm": {"weight": (4,)},
                              "k_norm": {"weight": (4,)}, "dt_proj": {"kernel": (4, 2)}},
                "mlp": {"router_gate": {"kernel": (8, 4)}, "down_embed": {"embedding": (16, 8)},
                        "up_proj": {"kernel": (8, 12), "bias": (12,)}},
            },
            "norm": {"weight": (8,)},
        },
        "lm_head": {"kernel": (8, 16)},
    }
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


NOT_DECAYED = {"model.layers.input_layernorm.weight", "model.layers.post_attention_layernorm.weight",
               "model.layers.self_attn.q_proj.bias", "model.layers.self_attn.q_norm.weight",
               "model.layers.self_attn.k_norm.weight", "model.layers.mlp.up_proj.bias", "model.norm.weight"}


def test_decay_mask_flax_paths() -> None:
    params = _flax_like_params(jax.random.key(0))
    mask = decay_mask(params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    names = {path_to_hf_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert {n for n, m in names.items() if not m} == NOT_DECAYED
    # Lists (SequenceKey) and attribute keys also work.
    listed = decay_mask({"layers": [{"norm": {"weight": 1.0}, "proj": {"kernel": 1.0}}]})
    assert listed == {"layers": [{"norm": {"weight": False}, "proj": {"kernel": True}}]}


def test_decay_mask_nnx_state() -> None:
    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.q_proj = nnx.Linear(4, 4, use_bias=True, rngs=rngs)
            self.q_norm = nnx.RMSNorm(4, rngs=rngs)
            self.input_residual = nnx.Param(jnp.ones(4))

    state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
    mask = decay_mask(state)
    flat = {path_to_hf_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat == {"q_proj.weight": True, "q_proj.bias": False, "q_norm.weight": False, "input_residual": True}
    # optax accepts the State-shaped mask.
    tx = make_optimizer(1e-2, mask=decay_mask)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, state), tx.init(state), state)
    upd = {path_to_hf_name(p): u for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    assert np.all(np.asarray(upd["q_norm.weight"]) == 0) and np.all(np.asarray(upd["q_proj.weight"]) != 0)


@pytest.mark.parametrize("grad_scale, clipped", [(10.0, True), (0.01, False)])
def test_make_optimizer_matches_torch(grad_scale: float, clipped: bool) -> None:
    sched_kwargs = dict(num_warmup_steps=2, num_decay_steps=2, num_training_steps=5, warmup_type="cosine",
                        min_lr_ratio=0.1)
    peak, steps = 1e-2, 5
    params = _flax_like_params(jax.random.key(1))
    tx = make_optimizer(wsd_schedule(peak, **sched_kwargs), weight_decay=0.01, mask=decay_mask)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)

    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [path_to_hf_name(p) for p, _ in paths_leaves]
    t_params = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for _, x in paths_leaves]
    groups = [{"params": [p for n, p in zip(names, t_params) if n not in NOT_DECAYED], "weight_decay": 0.01},
              {"params": [p for n, p in zip(names, t_params) if n in NOT_DECAYED], "weight_decay": 0.0}]
    t_opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), eps=1e-8)
    t_sched = transformers.get_wsd_schedule(t_opt, **sched_kwargs)

    max_rel = 0.0
    for i in range(steps):
        grads = jax.tree.map(lambda x, k: grad_scale * jax.random.normal(k, x.shape),
                             params, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), list(
                                 jax.random.split(jax.random.key(100 + i), len(names)))))
        for tp, g in zip(t_params, jax.tree_util.tree_leaves(grads)):
            tp.grad = torch.tensor(np.asarray(g))
        total_norm = float(torch.nn.utils.clip_grad_norm_(t_params, 1.0))
        assert (total_norm > 1.0) == clipped
        t_opt.step()
        t_sched.step()

        updates, opt_state = update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for (_, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], t_params):
            got, want = np.asarray(got, np.float64), want.detach().numpy().astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
            max_rel = max(max_rel, float(np.max(np.abs(got - want) / np.abs(want))))
    print(f"max param rel error (clipped={clipped}): {max_rel:.2e}")
