"""Training metrics: FLOPs/MFU, metrics.jsonl + TensorBoard logging, and the loss-curve plot.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices), where the model FLOPs per trained token are

    6 * N_matmul                      (forward 2 + backward 4 FLOPs per weight of every matmul a token uses:
                                       the decoder layers' projections, incl. dt_proj and the MoE router and the
                                       k routed experts' 2 * d weights, and the lm_head d * V, tied or not;
                                       embedding lookups and norms/residual scales are not counted)
  + 6 * L * H * D * S              (causal attention: QK^T and PV are 2 * 2 * H * D FLOPs per (query, key)
                                       pair forward, S / 2 keys per query on average, x3 for training)

with L layers, H query heads, head size D and sequence length S (PaLM appendix B, halved for causality).
Remat recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys

# Peak dense FLOP/s per device for MFU, by (platform or device kind, dtype). CPU: ~470 GFLOP/s is what XLA's
# own matmuls reach on the 2-core development machine (design.md §7), used as its "peak". Override with
# --train.peak_flops.
PEAK_FLOPS = {
    ("cpu", "float32"): 4.7e11, ("cpu", "bfloat16"): 4.7e11,
    ("h100", "bfloat16"): 989e12, ("h100", "float32"): 494e12,  # float32 matmuls run as TF32 by default
    ("h200", "bfloat16"): 989e12, ("h200", "float32"): 494e12,
    ("a100", "bfloat16"): 312e12, ("a100", "float32"): 156e12,
    ("l40s", "bfloat16"): 362e12, ("l40s", "float32"): 183e12,
    ("l40", "bfloat16"): 181e12, ("l40", "float32"): 90e12,
    ("l4", "bfloat16"): 121e12, ("l4", "float32"): 60e12,
    ("4090", "bfloat16"): 165e12, ("4090", "float32"): 83e12,  # RTX 4090, bf16 with float32 accumulation
    ("gpu", "bfloat16"): 312e12, ("gpu", "float32"): 156e12,  # unknown GPU: A100 numbers
    ("tpu", "bfloat16"): 197e12, ("tpu", "float32"): 197e12,  # v5e
}


def matmul_params_per_token(cfg) -> int:
    """Weights of every matmul one token passes through (see the module docstring)."""
    d, H, G, D, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, \
        cfg.num_hidden_layers
    attn = d * H * D + 2 * d * G * D + G * D * cfg.num_dt_heads + H * D * d
    mlp = 3 * d * cfg.intermediate_size
    if cfg.is_moe:
        mlp += d * 2 * cfg.num_keys + 2 * cfg.num_experts_per_tok * d
    return L * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 N_matmul + 6 L H D S (causal attention)."""
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_size * seq_len
    return 6.0 * matmul_params_per_token(cfg) + attn


def peak_flops(device, dtype: str, override: float | None = None) -> float:
    """Peak FLOP/s of one device for `dtype`, from the override or the PEAK_FLOPS table."""
    if override:
        return float(override)
    words = set(re.findall(r"[a-z0-9]+", str(getattr(device, "device_kind", "")).lower()))  # whole words: L40S != L4
    for name in ("h200", "h100", "a100", "l40s", "l40", "l4", "4090"):
        if name in words:
            return PEAK_FLOPS[(name, dtype)]
    return PEAK_FLOPS.get((device.platform, dtype), PEAK_FLOPS[("cpu", dtype)])


class MetricsLogger:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard event files under RUN/tb.

    Neither may stop a long run: a write that fails (a full disk, a file size limit) turns that output off with one
    warning, and training goes on (its checkpoints are what a run needs; their own failures end it). TensorBoard
    writes through a background thread that dies on such an error, after which every event would block in its
    queue: the thread is checked before each record."""

    def __init__(self, run_dir: str, resume_step: int = 0, enabled: bool = True, warn=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled  # False on the non-primary hosts of a multi-host run: log() does nothing
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        self.file = self.tb = None
        if not enabled:
            return
        try:  # (a metrics.jsonl that cannot be opened or rewritten: the same warning as a failed write)
            self._truncate_after(resume_step)
            self.file = open(self.path, "a")
        except OSError as e:
            self.warn(f"opening {self.path} failed ({e}); metrics.jsonl is off for the rest of the run")
        try:
            from tensorboardX import SummaryWriter

            # steps after the restored one (all of them when no checkpoint was restored) are dropped, as above;
            # a long queue: a record's events never wait on the writer thread
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1, max_queue=1000)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None
        except OSError as e:
            self._tb_off(e)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the restored checkpoint (they are trained again); the file is
        replaced whole (a failure leaves the old one)."""
        from .hf_io import atomic_file

        if not os.path.isfile(self.path):
            return
        keep = [json.dumps(r) + "\n" for r in read_metrics(os.path.dirname(self.path)) if r.get("step", 0) <= step]
        with atomic_file(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)

    def _tb_off(self, error) -> None:
        self.warn(f"TensorBoard logging under {os.path.dirname(self.path)}/tb failed ({error}); it is off for the "
                  "rest of the run (metrics.jsonl goes on)")
        self.tb = None

    def _tb_alive(self) -> bool:
        """False once a TensorBoard writer thread has died (tensorboardX ends it at a failed write)."""
        for fw in (getattr(self.tb, "all_writers", None) or {}).values():
            worker = getattr(getattr(fw, "event_writer", None), "_worker", None)
            if worker is not None and not worker.is_alive():
                return False
        return True

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                self.warn(f"writing {self.path} failed ({e}); metrics.jsonl is off for the rest of the run")
                with contextlib.suppress(OSError):
                    self.file.close()
                self.file = None
        if self.tb is not None and not self._tb_alive():
            self._tb_off("its writer thread stopped: a failed write")
        if self.tb is not None:
            step = record["step"]
            try:
                for k, v in record.items():
                    if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                        self.tb.add_scalar(("val/" if k.startswith("val_") else "train/") + k, v, step)
            except OSError as e:
                self._tb_off(e)

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self.warn(f"closing {self.path} failed ({e})")
            self.file = None
        if self.tb is not None:
            tb, self.tb = self.tb, None
            try:
                tb.close()
            except OSError as e:
                self.warn(f"closing the TensorBoard files under {os.path.dirname(self.path)}/tb failed ({e})")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a killed run (the next resume rewrites the file without it)
                continue
    return out


def plot_loss(run_dir: str) -> str:
    """RUN/loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "loss.png")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:  # written aside and renamed: an interrupted or failed write leaves the old plot, not half a file
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
