"""convert: move Doge checkpoints between HF, JAX (orbax) and PyTorch (`python -m convert SRC DST --to ...`).

One name table (doge_jax.hf_names) maps every key; tensors stream one at a time from the source to the target
(no full copy except the stacked JAX tree), bit for bit unless --dtype casts; DST is built in a temporary
sibling directory and renamed into place at the end. Modules, one job each:
sources (detect + read SRC), variants (native / small_doge / legacy), plan (mapping + checks + --dry-run text),
safetensors_io / torch_io (streaming file formats), sinks (the three targets), core (convert()), cli (main).
"""

from .cli import main
from .core import convert

__all__ = ["convert", "main"]
