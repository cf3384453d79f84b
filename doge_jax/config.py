"""DogeConfig: the one configuration used by doge_jax, doge_torch and convert (spec §1).

Plain data (a frozen dataclass), no JAX or torch import, so every package can use it. Reads and writes
Hugging Face `config.json` (both the 5.x `rope_parameters` form and the legacy `rope_theta`/`rope_scaling`,
`hidden_bias`, `dynamic_mask_ratio` keys) and our YAML configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

VARIANTS = ("native", "small_doge")
ROPE_TYPES = ("default", "dynamic")
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "fused", "pallas")
REMAT_POLICIES = ("none", "full", "dots_saveable")
RUNTIME_FIELDS = ("attention_impl", "remat", "scan_layers")  # how to run the model: not in any checkpoint
# Keys of old Hub configs that carry no meaning any more (spec §1.1); accepted and dropped.
_DEAD_HF_KEYS = {
    "expert_retrieval_size", "num_cdmmoe_experts", "num_cdmmoe_heads", "num_cdmmoe_experts_per_head",
    "num_cdmoe_experts", "num_cdmoe_heads", "num_cdmoe_experts_per_head", "patch_size", "num_channels",
}
# Generic transformers PretrainedConfig keys we do not model; accepted and dropped when reading config.json.
_HF_GENERIC_KEYS = {
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "tie_encoder_decoder", "use_return_dict",
    "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "task_specific_params", "torchscript", "pruned_heads",
    "is_decoder", "tf_legacy_loss", "use_bfloat16", "_attn_implementation_autoset", "attn_implementation",
    "rope_theta", "rope_scaling", "hidden_bias", "dynamic_mask_ratio", "doge_variant", "use_sliding_window",
}


class ConfigError(ValueError):
    """A configuration field has a bad value; the message names the field."""


def has_type(v: Any, annotation: str) -> bool:
    """Whether `v` fits a config field annotation (int, float, bool, str, list, dict, X | None,
    int | tuple[int, ...]); ints pass for floats, bools never pass for numbers."""
    kinds = [k.strip() for k in annotation.split("|")]
    if v is None:
        return "None" in kinds
    if isinstance(v, bool):
        return "bool" in kinds
    if isinstance(v, numbers.Integral):
        return "int" in kinds or "float" in kinds
    if isinstance(v, numbers.Real):
        return "float" in kinds
    if isinstance(v, str):
        return "str" in kinds
    if isinstance(v, tuple) and "tuple[int, ...]" in kinds:
        return all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v)
    return (isinstance(v, list) and "list" in kinds) or (isinstance(v, dict) and "dict" in kinds)


def as_model_option(error: Exception) -> str:
    """A ConfigError's text for a trainer's command line: "DogeConfig.FIELD=..." as the option's name, "model.FIELD"
    (as train.FIELD errors read); other messages (a checkpoint's config.json, named by its path) as they are."""
    msg = str(error)
    return "model." + msg[len("DogeConfig."):] if msg.startswith("DogeConfig.") else msg


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from a file; unreadable or malformed files give a ConfigError naming the file."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{os.fspath(path)}: unreadable JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{os.fspath(path)}: expected a JSON object, got {type(d).__name__}")
    return d


@dataclasses.dataclass(frozen=True)
class DogeConfig:
    """Every field of spec §1.1 (same names and defaults as transformers' DogeConfig) plus the variant."""

    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    hidden_dropout: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float | None = None  # dynamic NTK factor (rope_type "dynamic")
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None -> num_attention_heads
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = None
    keep_window_size: int = 2048
    is_moe: bool = False
    num_experts: int = 16384
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # lists are stored as tuples (hashable config)
    # "native" = transformers DogeForCausalLM (q/k norm, dynamic-mask heads = kv heads);
    # "small_doge" = small-doge remote code (no q/k norm, dynamic-mask heads = query heads). Spec §2.
    variant: str = "native"
    # Runtime choice, not part of the checkpoint: reference | blockwise | fused | auto (issue 5).
    attention_impl: str = "auto"
    # Runtime choice: rematerialise each layer in the backward pass (none | full | dots_saveable).
    remat: str = "none"
    # Runtime choice: run the decoder layers as one lax.scan body (True: compile time independent of depth) or
    # unrolled (False: XLA may fuse and schedule across layers; longer compiles). CPU, Doge-20M 4 x 512: a bf16
    # training step 5-9% faster unrolled, a float32 one no faster (benchmarks/RESULTS.md); gpu_check times both.
    scan_layers: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy scalars -> Python numbers (plain data, JSON-serialisable)
            v = getattr(self, f.name)
            if not isinstance(v, bool | int | float | str | tuple | list) and callable(getattr(v, "item", None)):
                try:
                    object.__setattr__(self, f.name, v.item())
                except (TypeError, ValueError):  # not a scalar: validate() names the field
                    pass
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list | tuple):
            eos = tuple(int(e) if isinstance(e, numbers.Integral) and not isinstance(e, bool) else e
                        for e in self.eos_token_id)
            object.__setattr__(self, "eos_token_id", eos)
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_keys(self) -> int:
        """Number of product keys of CDMoE (spec §3.8)."""
        return math.isqrt(self.num_experts)

    @property
    def num_dt_heads(self) -> int:
        """Heads of the dynamic-mask bias: kv heads (native) or query heads (small_doge), spec §2.1."""
        return self.num_key_value_heads if self.variant == "native" else self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else [self.eos_token_id]

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ConfigError(f"DogeConfig.{field}={getattr(self, field)!r}: {why}")

        for f in dataclasses.fields(self):  # types first: the checks below compare numbers
            if not has_type(getattr(self, f.name), f.type):
                bad(f.name, f"must be {f.type.replace(' | ', ' or ').replace('tuple[int, ...]', 'a list of int')}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, "must be a positive integer")
        if not isinstance(self.keep_window_size, int) or self.keep_window_size < 1:
            bad("keep_window_size", "must be an integer >= 1")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"must be a multiple of num_attention_heads={self.num_attention_heads}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 2):
            bad("head_dim", "must be an integer >= 2")
        if self.head_size % 2:
            bad("head_dim", f"head size {self.head_size} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        for f in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= float(getattr(self, f)) < 1.0:
                bad(f, "must be in [0, 1)")
        if self.hidden_act not in ("silu", "swish"):  # transformers maps both to x * sigmoid(x)
            bad("hidden_act", "only 'silu' (or its alias 'swish') is supported")
        for f in ("rms_norm_eps", "rope_theta"):
            if not (math.isfinite(getattr(self, f)) and getattr(self, f) > 0):
                bad(f, "must be finite and > 0")
        for f in ("initializer_range", "router_aux_loss_coef"):  # (a negative aux coefficient rewards imbalance)
            if not (math.isfinite(getattr(self, f)) and getattr(self, f) >= 0):
                bad(f, "must be finite and >= 0")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"must be one of {ROPE_TYPES}")
        if self.rope_type == "dynamic" and (self.rope_factor is None or not 1.0 <= self.rope_factor < math.inf):
            bad("rope_factor", "dynamic RoPE needs a finite factor >= 1")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            bad("sliding_window", "must be None or an integer >= 1")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"must be one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"must be one of {REMAT_POLICIES}")
        if self.variant not in VARIANTS:
            bad("variant", f"must be one of {VARIANTS}")
        if self.is_moe:
            if self.num_experts < 1 or math.isqrt(self.num_experts) ** 2 != self.num_experts:
                bad("num_experts", "must be a perfect square (CDMoE product keys, spec §3.8)")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                bad("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
        for f in ("pad_token_id", "bos_token_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(f, f"must be in [0, vocab_size={self.vocab_size})")
        for e in self.eos_token_ids:
            if not 0 <= e < self.vocab_size:
                bad("eos_token_id", f"must be in [0, vocab_size={self.vocab_size})")

    def replace(self, **changes: Any) -> DogeConfig:
        return dataclasses.replace(self, **changes)

    def resized_vocab(self, new_num_tokens: int | None, pad_to_multiple_of: int | None) -> int | None:
        """The vocabulary size `resize_token_embeddings(new_num_tokens, pad_to_multiple_of)` makes, as transformers
        reads its arguments (None: nothing asked); bad arguments are a ValueError naming them."""
        for name, v in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if new_num_tokens is None and pad_to_multiple_of is None:
            return None
        n = int(new_num_tokens if new_num_tokens is not None else self.vocab_size)
        if pad_to_multiple_of is not None:
            n = -(-n // int(pad_to_multiple_of)) * int(pad_to_multiple_of)
        try:
            self.replace(vocab_size=n)
        except ConfigError as e:  # a pad/BOS/EOS id the smaller vocabulary would lose
            raise ConfigError(f"cannot resize the vocabulary to {n} tokens: {e}") from None
        return n

    # ---- plain dict / YAML ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DogeConfig:
        """Build from our own field names; an unknown key is an error that names it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown DogeConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DogeConfig:
        """Read the `model:` section of one of our YAML configs (or a flat YAML of fields)."""
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{os.fspath(path)}: unreadable YAML ({e})") from None
        if isinstance(data, dict) and "model" in data:
            data = data["model"] or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)}: expected a mapping of model fields, got {type(data).__name__}")
        return cls.from_dict(data)

    # ---- Hugging Face config.json ---------------------------------------------------------------------------
    @classmethod
    def coerce(cls, config: Any) -> DogeConfig:
        """`config` itself, or a transformers `DogeConfig` object read as its config.json dict; anything else is a
        ConfigError naming its type (it failed later on a missing attribute)."""
        if isinstance(config, cls):
            return config
        if getattr(config, "model_type", None) == "doge" and callable(getattr(config, "to_dict", None)):
            return cls.from_hf_dict(config.to_dict())
        raise ConfigError(f"config: expected a DogeConfig (doge_jax's, doge_torch's or transformers'), got "
                          f"{type(config).__name__}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], variant: str | None = None) -> DogeConfig:
        """Read a transformers/small-doge `config.json` dict (5.x or legacy keys)."""
        d = dict(d)
        mt = d.get("model_type", "doge")
        if mt not in ("doge", None):
            raise ConfigError(f"config.json model_type={mt!r}: not a Doge checkpoint")
        out: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_type", "rope_factor", "variant",
                                                             *RUNTIME_FIELDS}
        for k in names:
            if k in d:
                out[k] = d[k]
        # RoPE as transformers 5.23 reads it: a non-empty legacy `rope_scaling` wins over 5.x `rope_parameters`
        # (a context extension added to a 5.x config.json), the top-level rope_theta filling in a missing theta.
        rp = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        if "type" in rp and "rope_type" not in rp:
            rp["rope_type"] = rp.pop("type")
        rp.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rp.get("rope_type", "default")
        out["rope_theta"] = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        out["rope_type"] = rope_type
        if rope_type == "dynamic":
            out["rope_factor"] = float(rp.get("factor", 1.0))
        elif rope_type not in ROPE_TYPES:
            raise ConfigError(f"config.json rope type {rope_type!r} is not supported (default, dynamic)")
        # Legacy (variant c) keys: hidden_bias means biases everywhere (spec §1.1).
        if d.get("hidden_bias"):
            out["attention_bias"] = True
            out["mlp_bias"] = True
        if variant is None:
            variant = d.get("doge_variant")
            if variant is None:
                legacy = "hidden_bias" in d or "dynamic_mask_ratio" in d or "auto_map" in d
                variant = "small_doge" if legacy else "native"
        out["variant"] = variant
        if out.get("attention_dropout") is None:
            out["attention_dropout"] = 0.0
        return cls(**out)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers 5.23 reads (native) and older readers understand too (RoPE in both
        the 5.x `rope_parameters` and the legacy `rope_theta`/`rope_scaling` keys)."""
        d = self.to_dict()
        for k in ("rope_theta", "rope_type", "rope_factor", "variant", "head_dim", *RUNTIME_FIELDS):
            d.pop(k)
        if self.head_dim is not None:
            d["head_dim"] = self.head_dim
        rp: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "dynamic":
            rp["factor"] = self.rope_factor
        d["rope_parameters"] = rp
        # the same RoPE in the legacy keys, for transformers < 5 and the small-doge remote code (5.23 reads both
        # forms alike; ours prefers rope_parameters)
        d["rope_theta"] = self.rope_theta
        dynamic = self.rope_type == "dynamic"
        d["rope_scaling"] = {"rope_type": "dynamic", "factor": self.rope_factor} if dynamic else None
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["model_type"] = "doge"
        d["architectures"] = ["DogeForCausalLM"]
        if self.variant != "native":
            d["doge_variant"] = self.variant
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, variant: str | None = None) -> DogeConfig:
        return cls.from_hf_dict(read_json(path), variant=variant)

    def save_json(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        d = self.to_hf_dict()
        if dtype is not None:
            d["dtype"] = dtype
        from .hf_io import atomic_file  # (hf_io imports this module)

        with atomic_file(path) as tmp, open(tmp, "w") as f:  # a reader (another host of a run) never sees half
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# generate's sampling defaults a generation_config.json may set (transformers' GenerationConfig defaults)
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": None, "min_p": None}
# every generate default a generation_config.json may set (None max_new_tokens: generate's own default)
GENERATION_DEFAULTS = {**SAMPLING_DEFAULTS, "repetition_penalty": 1.0, "max_new_tokens": None, "min_new_tokens": None,
                       "min_length": None, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                       "length_penalty": 1.0, "early_stopping": False, "typical_p": None, "epsilon_cutoff": None,
                       "eta_cutoff": None, "return_dict_in_generate": False, "output_scores": False,
                       "output_logits": False, "bad_words_ids": None, "suppress_tokens": None,
                       "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                       "exponential_decay_length_penalty": None, "remove_invalid_values": None,
                       "sequence_bias": None}
TOKEN_RULE_FIELDS = ("sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                     "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
                     "remove_invalid_values")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What `generate` uses for the arguments a call does not give: transformers' `model.generation_config`
    (generation_config.json's ids, else config.json's; its do_sample / temperature / top_k / top_p / min_p /
    repetition_penalty / max_new_tokens / min_new_tokens / min_length / no_repeat_ngram_size, and beam search's
    num_beams / num_return_sequences / length_penalty / early_stopping, the typical_p / epsilon_cutoff / eta_cutoff
    sampling warpers; return_dict_in_generate / output_scores / output_logits; the TOKEN_RULE_FIELDS processors).
    The model's own pad
    id (embedding pad row, label masking) stays config.json's. `extra` holds the file's other fields as read
    (written back by save_pretrained; generate warns about those that would change transformers' output). Frozen:
    replace it (`dataclasses.replace`) rather than assign its fields."""

    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    bad_words_ids: tuple | None = None
    suppress_tokens: tuple | None = None
    begin_suppress_tokens: tuple | None = None
    forced_bos_token_id: int | tuple | None = None
    forced_eos_token_id: int | tuple | None = None
    exponential_decay_length_penalty: tuple | None = None
    remove_invalid_values: bool | None = None
    sequence_bias: tuple | None = None
    # (not part of equality or the hash: the config is a static attribute of the model, and extra fields never
    # change what the model computes)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:  # lists as tuples: the config is a static (hashed) attribute of the model
        def frozen(x):
            if isinstance(x, dict):  # (sequence_bias as a dict {ids: bias}: its pairs)
                return tuple((frozen(k), v) for k, v in x.items())
            return tuple(frozen(i) for i in x) if isinstance(x, list | tuple) else x

        for k in ("eos_token_id", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                  "forced_eos_token_id", "exponential_decay_length_penalty", "sequence_bias"):
            if isinstance(getattr(self, k), list | tuple | dict):
                object.__setattr__(self, k, frozen(getattr(self, k)))

    @classmethod
    def from_config(cls, cfg: DogeConfig) -> GenerationConfig:
        return cls(**{k: getattr(cfg, k) for k in SPECIAL_IDS})

    def to_dict(self) -> dict[str, Any]:
        """generation_config.json's content: the extra fields, the ids that are set and the settings that are not
        transformers' defaults (an EOS tuple as a list)."""
        out = dict(self.extra)
        out.update({k: list(v) if isinstance(v, tuple) else v for k in SPECIAL_IDS
                    if (v := getattr(self, k)) is not None})
        out.update({k: v for k, d in GENERATION_DEFAULTS.items() if (v := getattr(self, k)) != d})
        return out


def _frozen_field(how: str):
    """__setattr__ for a frozen config: dataclasses' FrozenInstanceError, saying how to change the field instead
    (transformers users assign `model.config.x` / `model.generation_config.x`)."""
    def refuse(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen; "
                                              + how.format(name=name))
    return refuse


DogeConfig.__setattr__ = _frozen_field(
    "make a changed copy, config.replace({name}=...) (runtime fields such as attention_impl: "
    "doge_jax.model.with_attention_impl / doge_torch.model.with_attention_impl)")
GenerationConfig.__setattr__ = _frozen_field(
    "assign a changed copy, model.generation_config = dataclasses.replace(model.generation_config, {name}=...), "
    "or pass {name}= to generate")

