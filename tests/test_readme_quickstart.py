"""The README's Quickstart, run as written (slow: ~2 minutes on 2 cores).

Its commands are read from README.md itself, so an edit that breaks one fails here (a UAT run found the PyTorch
step failing with "no training data"). Only the length of the first training run is changed (a few steps instead
of 400) and both trainers' caches are kept in the test's directory; every command runs from a scratch directory.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_commands() -> list[list[str]]:
    """The command lines of the README's Quickstart code block (continuations joined, comments dropped)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_quickstart_commands_run_as_written(tmp_path):
    commands = quickstart_commands()
    assert [c[:3] for c in commands] == [
        ["python", "-m", "doge_jax.train"], ["python", "-m", "doge_jax.generate"], ["python", "-m", "convert"],
        ["python", "-c", commands[3][2]], ["python", "-m", "doge_torch.train"], ["python", "-m", "convert"]]
    cache = str(tmp_path / "cache")
    short = ["--train.num_training_steps", "6", "--train.num_warmup_steps", "1", "--train.num_decay_steps", "2",
             "--train.eval_every", "3", "--train.eval_batches", "1", "--train.checkpoint_every", "3"]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    for cmd in commands:
        args = [sys.executable, *cmd[1:]]
        if cmd[2] == "doge_jax.train":
            args += [*short, "--train.cache_dir", cache]
        elif cmd[2] == "doge_torch.train":
            args += ["--train.cache_dir", cache]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
        if cmd[2] == "doge_torch.train":
            assert "saved runs/tiny_torch/final (the model at step 50)" in proc.stdout, proc.stdout[-2000:]
        if cmd[1] == "-c":  # transformers loads the converted model: its parameter count
            assert int(proc.stdout.split()[-1]) > 0
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "runs" / "tiny_jax"))
