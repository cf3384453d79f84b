"""DogeConfig (spec §1): validation, config.json round trips, agreement with transformers, legacy configs."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers
from conftest import TINY, TINY_MOE

from doge_jax.config import ConfigError, DogeConfig

# ---- validation: every error names the offending field ----------------------------------------------------------

BAD_FIELDS = [
    ("hidden_size", dict(hidden_size=66, num_attention_heads=4)),
    ("num_experts", dict(is_moe=True, num_experts=15, num_experts_per_tok=4)),
    ("keep_window_size", dict(keep_window_size=0)),
    ("keep_window_size", dict(keep_window_size=-3)),
    ("variant", dict(variant="legacy")),
    ("rope_type", dict(rope_type="yarn")),
    ("rope_factor", dict(rope_type="dynamic")),
    ("num_key_value_heads", dict(num_attention_heads=4, num_key_value_heads=3)),
    ("vocab_size", dict(vocab_size=0)),
    ("num_experts_per_tok", dict(is_moe=True, num_experts=16, num_experts_per_tok=17)),
    ("sliding_window", dict(sliding_window=0)),
    ("eos_token_id", dict(vocab_size=128, eos_token_id=128)),
    ("pad_token_id", dict(vocab_size=128, pad_token_id=-1)),
    ("hidden_dropout", dict(hidden_dropout=1.5)),
    ("hidden_act", dict(hidden_act="gelu")),
    ("head_dim", dict(head_dim=15)),
    # wrong types name the field too (before: a TypeError from the comparisons)
    ("rms_norm_eps", dict(rms_norm_eps=None)),
    ("hidden_dropout", dict(hidden_dropout=None)),
    ("rope_theta", dict(rope_theta="1e4")),
    ("num_experts_per_tok", dict(num_experts_per_tok=None)),
    ("tie_word_embeddings", dict(tie_word_embeddings="yes")),
    ("vocab_size", dict(vocab_size=128.0)),
    ("eos_token_id", dict(eos_token_id=[1, None])),
    ("is_moe", dict(is_moe=1)),
    # non-finite or negative floats that used to pass and fail later as a NaN loss, naming nothing
    ("initializer_range", dict(initializer_range=float("nan"))),
    ("initializer_range", dict(initializer_range=-0.02)),
    ("router_aux_loss_coef", dict(router_aux_loss_coef=float("inf"))),
    ("router_aux_loss_coef", dict(router_aux_loss_coef=-1e-3)),
    ("rope_theta", dict(rope_theta=float("inf"))),
    ("rms_norm_eps", dict(rms_norm_eps=float("inf"))),
    ("rope_factor", dict(rope_type="dynamic", rope_factor=float("inf"))),
]


@pytest.mark.parametrize("field,kwargs", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
def test_validation_names_field(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        DogeConfig(**{**TINY, **kwargs})
    assert issubclass(ConfigError, ValueError)


def test_swish_is_silu(tmp_path):
    """transformers' "swish" is SiLU (ACT2FN): a checkpoint saying so loads and gives transformers' logits."""
    from conftest import hf_logits, make_hf_model, max_abs_diff, save_hf, unique_ids

    from doge_jax import DogeForCausalLM

    hf = make_hf_model(hidden_act="swish")
    model = DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "m"))
    assert model.config.hidden_act == "swish" and model.config.to_hf_dict()["hidden_act"] == "swish"
    ids = unique_ids(1, 8, 128, seed=3)
    assert type(hf.model.layers[0].mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
    assert max_abs_diff(model(ids).logits, hf_logits(hf, ids)) <= 1e-4


def test_numpy_numbers_are_numbers():
    import numpy as np

    cfg = DogeConfig(**{**TINY, "vocab_size": np.int64(128), "rope_theta": np.float32(1e4),
                        "eos_token_id": [np.int32(1)], "is_moe": np.bool_(False)})
    assert cfg.vocab_size == 128 and cfg.eos_token_id == (1,) and type(cfg.eos_token_id[0]) is int
    assert type(cfg.vocab_size) is int and type(cfg.rope_theta) is float
    json.dumps(cfg.to_hf_dict())


def test_unreadable_files_named(tmp_path):
    j, y = tmp_path / "config.json", tmp_path / "c.yaml"
    for path, text, read, want in ((j, "[1, 2]", DogeConfig.from_json_file, "expected a JSON object, got list"),
                                   (j, "{", DogeConfig.from_json_file, "unreadable JSON"),
                                   (y, "model: [1, 2", DogeConfig.from_yaml, "unreadable YAML"),
                                   (y, "model: [1, 2]", DogeConfig.from_yaml, "expected a mapping of model fields")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"{path}: {want}"):
            read(path)


def test_replace_validates():
    cfg = DogeConfig(**TINY)
    with pytest.raises(ConfigError, match="keep_window_size"):
        cfg.replace(keep_window_size=0)


def test_from_dict_unknown_field():
    with pytest.raises(ConfigError, match="hidden_szie"):
        DogeConfig.from_dict({**TINY, "hidden_szie": 64})
    cfg = DogeConfig(**TINY, **TINY_MOE)
    assert DogeConfig.from_dict(cfg.to_dict()) == cfg


def test_rope_written_in_both_forms():
    """Older readers (transformers < 5, small-doge remote code) read rope_theta/rope_scaling; 5.23 reads both
    forms alike."""
    for kw in (dict(rope_type="dynamic", rope_factor=4.0, rope_theta=40000.0), dict(rope_theta=20000.0)):
        d = DogeConfig(**{**TINY, **kw}).to_hf_dict()
        assert d["rope_theta"] == d["rope_parameters"]["rope_theta"] == kw["rope_theta"]
        if kw.get("rope_type") == "dynamic":
            assert d["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0}
        else:
            assert d["rope_scaling"] is None
        legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
        assert DogeConfig.from_hf_dict(legacy) == DogeConfig.from_hf_dict(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert transformers.DogeConfig(**d).rope_parameters == transformers.DogeConfig(**legacy).rope_parameters


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    """A config.json with both keys (rope_scaling added to a 5.x file to extend its context): transformers 5.23 runs
    the rope_scaling one; so do we (the 5.x dict used to win: another RoPE past max_position_embeddings)."""
    base = DogeConfig(**{**TINY, "rope_theta": 20000.0}).to_hf_dict()
    cases = ({"rope_type": "dynamic", "factor": 3.0}, {"type": "dynamic", "factor": 2.0, "rope_theta": 50000.0},
             None, {})
    for scaling in cases:
        d = {**base, "rope_scaling": scaling}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = transformers.DogeConfig(**d).rope_parameters
        ours = DogeConfig.from_hf_dict(d)
        assert (ours.rope_type, ours.rope_theta) == (theirs["rope_type"], theirs["rope_theta"]), (scaling, theirs)
        assert ours.rope_factor == theirs.get("factor", ours.rope_factor if ours.rope_type == "default" else None)
        if scaling:
            assert ours.rope_type == "dynamic"


def test_from_hf_dict_bad_rope_type():
    d = DogeConfig(**TINY).to_hf_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ConfigError, match="rope"):
        DogeConfig.from_hf_dict(d)
    with pytest.raises(ConfigError, match="model_type"):
        DogeConfig.from_hf_dict({**DogeConfig(**TINY).to_hf_dict(), "model_type": "llama"})


def test_defaults_match_transformers():
    ours, theirs = DogeConfig(), transformers.DogeConfig()
    for k, v in ours.to_hf_dict().items():
        if k in ("architectures", "rope_parameters", "rope_theta", "rope_scaling"):  # RoPE: 5.x folds them
            continue
        assert getattr(theirs, k) == v, k
    assert ours.num_dt_heads == ours.num_key_value_heads == 8 and ours.head_size == 128


# ---- config.json round trips ------------------------------------------------------------------------------------

CONFIGS = {
    "tiny": dict(TINY),
    "moe": dict(TINY, **TINY_MOE, norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01),
    "dynamic_rope": dict(TINY, rope_type="dynamic", rope_factor=4.0, rope_theta=40000.0),
    "small_doge": dict(TINY, variant="small_doge", tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                       pad_token_id=2),
    "misc": dict(TINY, attention_bias=True, mlp_bias=True, sliding_window=7, head_dim=32, hidden_dropout=0.1,
                 attention_dropout=0.05, eos_token_id=[1, 2], rms_norm_eps=1e-5, use_cache=False),
    "doge_20m": dict(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, rope_type="dynamic",
                     rope_factor=4.0, bos_token_id=0, eos_token_id=1, pad_token_id=2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_dict_roundtrip(name, tmp_path):
    cfg = DogeConfig(**CONFIGS[name])
    assert DogeConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    # through a file, as config.json (JSON turns nothing into something else)
    cfg.save_json(tmp_path / "config.json", dtype="float32")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    assert DogeConfig.from_json_file(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_accepts_hf_dict(name):
    cfg = DogeConfig(**CONFIGS[name])
    d = cfg.to_hf_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.DogeConfig(**d)
    for k, v in d.items():
        if k not in ("rope_theta", "rope_scaling"):  # folded into rope_parameters (checked below)
            assert getattr(theirs, k) == v, k
    # the fields transformers derives agree with ours
    assert theirs.num_key_value_heads == cfg.num_key_value_heads
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert head_dim == cfg.head_size
    assert theirs.rope_parameters["rope_type"] == cfg.rope_type
    assert theirs.rope_parameters["rope_theta"] == cfg.rope_theta
    if cfg.rope_type == "dynamic":
        assert theirs.rope_parameters["factor"] == cfg.rope_factor
    # and transformers' own config.json dict reads back to the same config (variant hint kept)
    assert DogeConfig.from_hf_dict(theirs.to_dict()) == cfg


def test_transformers_config_dict_reads_back():
    """A config.json written by transformers (no hint) is the native variant with the same fields."""
    theirs = transformers.DogeConfig(**TINY, **TINY_MOE, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e4})
    cfg = DogeConfig.from_hf_dict(theirs.to_dict())
    assert cfg == DogeConfig(**TINY, **TINY_MOE, tie_word_embeddings=True, rope_type="dynamic", rope_factor=2.0,
                             rope_theta=5e4)
    assert cfg.variant == "native"


# ---- legacy (small-doge remote code) config.json ----------------------------------------------------------------

def legacy_dict(**changes) -> dict:
    """A config.json of the published base models (SD@8eec8cc configuration_doge.py keys), tiny sizes."""
    d = {
        "architectures": ["DogeForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_doge.DogeConfig",
                     "AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"},
        "model_type": "doge", "transformers_version": "4.47.1", "torch_dtype": "float32",
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "hidden_bias": True, "hidden_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "rms_norm_eps": 1e-06, "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        "tie_word_embeddings": True, "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048},
        "num_attention_heads": 4, "num_key_value_heads": 2, "attention_dropout": 0.0, "keep_window_size": 2048,
        "dynamic_mask_ratio": 0.0, "is_moe": False, "num_experts": 16384, "num_experts_per_tok": 64,
        "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        # dead keys of very old configs (spec §1.1)
        "expert_retrieval_size": 64, "num_cdmoe_experts": 16348, "num_cdmoe_heads": 4,
    }
    d.update(changes)
    return d


def test_legacy_config_fields():
    cfg = DogeConfig.from_hf_dict(legacy_dict())
    assert cfg.variant == "small_doge"
    assert cfg.attention_bias and cfg.mlp_bias  # hidden_bias -> both
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("dynamic", 4.0, 10000.0)
    assert cfg.max_position_embeddings == 2048  # original_max_position_embeddings is ignored (spec §3.3)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (128, 64, 2, True)
    assert cfg.num_dt_heads == cfg.num_attention_heads == 4
    # transformers 5.23 folds the same legacy keys into the same RoPE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.DogeConfig(**legacy_dict())
    assert theirs.rope_parameters["rope_type"] == cfg.rope_type
    assert theirs.rope_parameters["factor"] == cfg.rope_factor
    assert theirs.rope_parameters["rope_theta"] == cfg.rope_theta


def test_legacy_config_variants():
    cfg = DogeConfig.from_hf_dict(legacy_dict(hidden_bias=False, rope_scaling=None, rope_theta=40000.0))
    assert not cfg.attention_bias and not cfg.mlp_bias
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("default", None, 40000.0)
    # an explicit variant wins over the hints
    assert DogeConfig.from_hf_dict(legacy_dict(), variant="native").variant == "native"
    # a legacy config re-saved by us is a current one with the same fields
    assert DogeConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_a_transformers_config_object_is_taken(tmp_path):
    """transformers.DogeConfig where a config goes (model classes, from_pretrained(config=)): read as its
    config.json dict (it failed with "'DogeConfig' object has no attribute 'head_size'"); others are named."""
    import numpy as np
    import torch
    from conftest import make_hf_model, save_hf

    import doge_jax
    import doge_torch

    hf_cfg = transformers.DogeConfig(**TINY_MOE, **{k: v for k, v in TINY.items() if k not in TINY_MOE})
    want = DogeConfig.from_hf_dict(hf_cfg.to_dict())
    assert DogeConfig.coerce(hf_cfg) == want and DogeConfig.coerce(want) is want
    assert doge_torch.DogeForCausalLM(hf_cfg).config == want
    assert doge_jax.DogeForCausalLM(hf_cfg).config == want
    hf = make_hf_model()
    d = save_hf(hf, tmp_path / "m")
    tm = doge_torch.DogeForCausalLM.from_pretrained(d, config=hf.config)
    jm = doge_jax.DogeForCausalLM.from_pretrained(d, config=hf.config)
    ids = np.arange(1, 9)[None]
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(tm(torch.as_tensor(ids)).logits.detach().numpy() - ref).max() <= 1e-5
    assert np.abs(np.asarray(jm(ids).logits) - ref).max() <= 1e-5
    with pytest.raises(ConfigError, match="config: expected a DogeConfig .* got dict"):
        doge_torch.DogeForCausalLM(dict(TINY))
    with pytest.raises(ConfigError, match="got LlamaConfig"):
        doge_jax.DogeForCausalLM(transformers.LlamaConfig())
