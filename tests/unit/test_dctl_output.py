"""`controller.dctl.output`: while a dctl command runs, stdout carries only what the command echoes.

Run in a child process with real pipes, because what is checked is file descriptors: bytes written
straight to fd 1 (as HiGHS's C++ banner is), Python prints of third-party code, and a child process that
inherits fd 1 must all land on stderr; the command's echo must land on stdout, in order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1].parent

CHILD = r"""
import os, subprocess, sys
from controller.dctl import output

with output.reserved_stdout():
    os.write(1, b"C-LEVEL CHATTER\n")
    print("PYTHON CHATTER")
    subprocess.run([sys.executable, "-c", "print('CHILD CHATTER')"], check=True)
    output.echo('{"result": 1}')
    output.echo("second line", flush=True)
print("AFTER", flush=True)  # stdout is stdout again once the block is over
"""


def _child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_only_the_echo_reaches_stdout() -> None:
    done = _child(CHILD)
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"result": 1}\nsecond line\nAFTER\n'
    for chatter in ("C-LEVEL CHATTER", "PYTHON CHATTER", "CHILD CHATTER"):
        assert chatter in done.stderr


def test_a_reader_that_went_away_is_silenced_not_reported() -> None:
    code = (
        "import os, sys\n"
        "from controller.dctl.main import main\n"
        "r, w = os.pipe(); os.close(r); os.dup2(w, 1); os.close(w)\n"  # stdout: a pipe nobody reads
        "sys.exit(main(['profile', 'show', 'controller/profile_data/llama2-70b_h100-sxm.json']))\n"
    )
    done = _child(code)
    assert done.returncode == 141
    assert done.stderr == ""
