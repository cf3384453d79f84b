import os
import sys

from .cli import main

code = main()
if code == 141:  # (stdout's reader is gone: the interpreter's last flush of it would fail again, loudly)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
sys.exit(code)
