"""The one name table: Hugging Face state-dict keys <-> Flax parameter paths, variant detection, legacy renames.

Used by doge_jax.from_pretrained/save_pretrained, doge_torch (legacy renames) and the convert CLI (spec §2,
design.md §1). Flax kernels are HF Linear weights transposed ([in, out]); layers are stacked on a leading axis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Module names by kind: a Linear's HF `weight` is the Flax `kernel` (transposed), an Embedding's is `embedding`.
LINEAR_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "dt_proj", "gate_proj", "up_proj", "down_proj", "router_gate", "lm_head"}
)
EMBED_MODULES = frozenset({"embed_tokens", "down_embed", "up_embed"})

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Legacy remote-code names (variant c) -> current names (spec §2.2 c). Applied in order, first match wins.
LEGACY_RENAMES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^model\.word_embed\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^model\.final_layernorm\.weight$"), "model.norm.weight"),
    (re.compile(r"^(model\.layers\.\d+)\.pre_layernorm\.weight$"), r"\1.input_layernorm.weight"),
    (re.compile(r"^(model\.layers\.\d+)\.pre_residual\.weight$"), r"\1.input_residual"),
    (re.compile(r"^(model\.layers\.\d+)\.post_layernorm\.weight$"), r"\1.post_attention_layernorm.weight"),
    (re.compile(r"^(model\.layers\.\d+)\.post_residual\.weight$"), r"\1.post_attention_residual"),
    (re.compile(r"^(model\.layers\.\d+)\.feed_forward\.router_gate\.bias$"), ""),  # dropped (spec §2.2 c)
    (re.compile(r"^(model\.layers\.\d+)\.feed_forward\.(.+)$"), r"\1.mlp.\2"),
)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message lists what is wrong."""


class CheckpointWriteError(OSError):
    """A training checkpoint could not be written (a full disk, a file size limit, permissions): the trainers end
    the run with this one line (exit 1); the checkpoints written before it are intact."""

    @classmethod
    def of(cls, which: str, where: str, why: str) -> CheckpointWriteError:
        """`which` ("checkpoint step 4") into `where` failed for the one-line reason `why`."""
        return cls(f"writing {which} into {where} failed ({why}); the checkpoints before it are intact: re-run the "
                   "same command to resume from the newest once the cause (disk space?) is fixed")


def is_legacy(keys: Iterable[str]) -> bool:
    return any(k.startswith("model.word_embed.") or ".pre_layernorm." in k or ".feed_forward." in k for k in keys)


def rename_legacy(key: str) -> str | None:
    """Current HF name of a legacy (variant c) key; None for keys that are dropped."""
    for pat, repl in LEGACY_RENAMES:
        if pat.match(key):
            new = pat.sub(repl, key)
            return new or None
    return key


def detect_variant(keys: Iterable[str]) -> str:
    """'legacy', 'native' or 'small_doge' from the state-dict keys alone (spec §2.3 rules 1-3)."""
    keys = list(keys)
    if is_legacy(keys):
        return "legacy"
    if any(".self_attn.q_norm.weight" in k for k in keys):
        return "native"
    return "small_doge"


def hf_to_flax(key: str) -> tuple[tuple[str, ...], int | None, bool]:
    """(Flax path, layer index or None, transpose?) of an HF key (current names)."""
    layer = None
    m = _LAYER_RE.match(key)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        prefix: tuple[str, ...] = ("model", "layers")
    else:
        rest, prefix = key, ()
    parts = rest.split(".")
    transpose = False
    if len(parts) >= 2 and parts[-1] == "weight":
        module = parts[-2]
        if module in LINEAR_MODULES:
            parts[-1], transpose = "kernel", True
        elif module in EMBED_MODULES:
            parts[-1] = "embedding"
    return prefix + tuple(parts), layer, transpose


def flax_to_hf(path: tuple[str, ...], layer: int | None = None) -> tuple[str, bool]:
    """(HF key, transpose?) of a Flax path; `layer` indexes the stacked layer axis for paths under model.layers."""
    parts = list(path)
    transpose = False
    if parts[-1] == "kernel":
        parts[-1], transpose = "weight", True
    elif parts[-1] == "embedding":
        parts[-1] = "weight"
    if parts[:2] == ["model", "layers"]:
        if layer is None:
            raise ValueError(f"layer index needed for {'.'.join(path)}")
        parts = ["model", "layers", str(layer)] + parts[2:]
    return ".".join(parts), transpose


def expected_hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every HF key and its torch shape for a DogeConfig (the contract both packages load against)."""
    d, inter, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
    H, G, V, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size, cfg.num_experts
    n_dt = cfg.num_dt_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (d,), "input_residual": (d,),
            "self_attn.q_proj.weight": (H * D, d), "self_attn.k_proj.weight": (G * D, d),
            "self_attn.v_proj.weight": (G * D, d), "self_attn.A": (n_dt,),
            "self_attn.dt_proj.weight": (n_dt, G * D), "self_attn.o_proj.weight": (d, H * D),
            "post_attention_layernorm.weight": (d,), "post_attention_residual": (d,),
            "mlp.gate_proj.weight": (inter, d), "mlp.up_proj.weight": (inter, d), "mlp.down_proj.weight": (d, inter),
        }
        if cfg.variant == "native":
            layer["self_attn.q_norm.weight"] = (D,)
            layer["self_attn.k_norm.weight"] = (D,)
        if cfg.attention_bias:
            layer.update({"self_attn.q_proj.bias": (H * D,), "self_attn.k_proj.bias": (G * D,),
                          "self_attn.v_proj.bias": (G * D,), "self_attn.o_proj.bias": (d,),
                          "self_attn.dt_proj.bias": (n_dt,)})
        if cfg.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (d,)})
        if cfg.is_moe:
            layer.update({"mlp.router_gate.weight": (2 * cfg.num_keys, d), "mlp.down_embed.weight": (E, d),
                          "mlp.up_embed.weight": (E, d)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


def check_keys(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], where: str = "checkpoint",
               allow_missing: Iterable[str] = ()) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    allow = set(allow_missing)
    missing = sorted(k for k in expected if k not in got and k not in allow)
    unexpected = sorted(k for k in got if k not in expected)
    wrong = sorted(f"{k}: expected {tuple(expected[k])}, got {tuple(got[k])}"
                   for k in expected if k in got and tuple(got[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        lines = [f"{where} does not match the model config:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                more = " ..." if len(items) > 50 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:50]) + more)
        raise CheckpointError("\n".join(lines))
