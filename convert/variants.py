"""Which Doge variant a checkpoint is, and why native <-> small_doge conversion is refused (spec §2)."""

from __future__ import annotations

from doge_jax.hf_names import CheckpointError

VARIANT_CHOICES = ("native", "small_doge", "legacy")

_WHAT = {
    "native": "transformers-native (q_norm/k_norm weights present)",
    "small_doge": "small-doge remote code (no q_norm/k_norm)",
    "legacy": "legacy small-doge remote code (old key names; loads as small_doge after a rename)",
}

WHY = ("native and small_doge are different functions: native normalises q and k per head (q_norm/k_norm) and "
       "sizes A and dt_proj by the key/value heads, small_doge has no q/k norm and sizes them by the query heads. "
       "No weight conversion turns one into the other (spec §2.3). Legacy names are small_doge renamed.")


class VariantError(CheckpointError):
    """A requested or configured variant contradicts the checkpoint's weights."""


def function_of(variant: str) -> str:
    """The function a variant computes: legacy is small_doge under other names."""
    return "small_doge" if variant == "legacy" else variant


def resolve_variant(requested: str | None, detected: str, where: str, cfg_hint: str | None = None) -> str:
    """The variant (native | small_doge) to convert as; refuse a request that contradicts the weights."""
    chosen = function_of(detected)
    if requested is None or function_of(requested) == chosen:
        return chosen
    asked = f"{cfg_hint} says variant {requested!r}" if cfg_hint else f"--variant {requested} was requested"
    raise VariantError(f"{where}: refusing to convert: {asked}, but the weights are {_WHAT[detected]}. {WHY} "
                       f"Leave out --variant to convert the checkpoint as the {chosen} variant it is.")
