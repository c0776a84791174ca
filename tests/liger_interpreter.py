"""Run a script with Liger's kernels under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton imports).

`run(script, *args)` first proves the interpreter itself works here (a one-line Triton kernel): only if *that* fails is
the test skipped. Any later failure — Liger's kernel, or minitrain's own Liger path (a TypeError in its call, say) —
fails the test with the script's traceback and stderr. One interpreter serves a whole test session (started on first
use): the scripts run in it one after another, each in fresh globals with its own sys.argv and its stdout captured, so
the tests pay for importing torch, transformers, Triton and Liger once.

Two shims make the interpreter run what compiled Triton runs, so that Liger's softcap branch can be tested on CPU:
- compiled Triton passes a Python float argument as an fp32 scalar; the interpreter passes the bare float, and
  `softcap.to(tl.float32)` in Liger's kernel raises AttributeError. The shim converts it as the compiler does.
- Liger's softcap calls libdevice's `tanh`, an extern the interpreter cannot run (it returns None). The shim swaps in
  tanh(x) = 2 sigmoid(2x) - 1, the same function, for that one module global. Everything else is Liger's own code.
"""

import atexit
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = "TRITON-INTERPRETER-READY"
REPLY = "LIGER-SCRIPT-DONE "

PRELUDE = r"""
import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _double(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2, mask=mask)


_x = torch.arange(5, dtype=torch.float32)
_double[(1,)](_x, 5, BLOCK=8)
assert _x.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0], _x
print("%s", flush=True)

from triton.runtime import interpreter as _interpreter

_implicit_cvt = _interpreter._implicit_cvt


def _float_as_fp32(arg):
    if isinstance(arg, float):
        return tl.tensor(_interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
    return _implicit_cvt(arg)


_interpreter._implicit_cvt = _float_as_fp32


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


import liger_kernel.ops.cross_entropy as _liger_ce

_liger_ce.tanh = _tanh
""" % READY


SERVE = f"_REPLY = {REPLY!r}\n" + r"""
import contextlib as _contextlib
import io as _io
import json as _json
import traceback as _traceback

for _line in sys.stdin:
    _request = _json.loads(_line)
    _out = _io.StringIO()
    sys.argv = ["-c", *_request["args"]]
    try:
        with _contextlib.redirect_stdout(_out):
            exec(compile(_request["script"], "<liger script>", "exec"), {"__name__": "__main__"})
        _reply = {"stdout": _out.getvalue(), "error": None}
    except BaseException:  # noqa: BLE001 (reported to the test)
        _reply = {"stdout": _out.getvalue(), "error": _traceback.format_exc()}
    sys.__stdout__.write(_REPLY + _json.dumps(_reply) + "\n")
    sys.__stdout__.flush()
"""


class Interpreter:
    """The session's interpreter: PRELUDE, then SERVE reading one JSON request {"script", "args"} a line."""

    def __init__(self):
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed with the session)
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + PRELUDE + SERVE], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the interpreter ended

    def next_line(self, prefix: str, timeout: float) -> str | None:
        """The next stdout line starting with prefix (others are skipped); None if the interpreter ended first."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))  # queue.Empty past the deadline
            if line is None or line.startswith(prefix):
                return line

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_interpreter: Interpreter | None = None
_not_ready: str | None = None  # why the interpreter cannot run a kernel here (the tests skip)


def _ready_interpreter(timeout: float) -> Interpreter:
    global _interpreter, _not_ready
    if _not_ready is not None:
        pytest.skip(_not_ready)
    if _interpreter is None or _interpreter.proc.poll() is not None:
        _interpreter = Interpreter()
        atexit.register(_interpreter.close)
        try:
            ready = _interpreter.next_line(READY, timeout)
        except queue.Empty:
            _interpreter.proc.kill()
            raise TimeoutError(f"the Triton interpreter did not start in {timeout} s") from None
        if ready is None:
            last = (_interpreter.stderr_text().strip().splitlines() or ["(no output)"])[-1]
            _not_ready = f"Triton's interpreter cannot run a kernel here: {last}"
            pytest.skip(_not_ready)
    return _interpreter


def run(script: str, *args: str, timeout: int = 400) -> str:
    """stdout of `script` run after PRELUDE under TRITON_INTERPRET=1 (in the session's interpreter, with sys.argv
    ["-c", *args]); skips only if the interpreter itself fails."""
    global _interpreter
    pytest.importorskip("liger_kernel")
    interpreter = _ready_interpreter(timeout)
    interpreter.proc.stdin.write(json.dumps({"script": script, "args": list(args)}) + "\n")
    interpreter.proc.stdin.flush()
    try:
        line = interpreter.next_line(REPLY, timeout)
    except queue.Empty:
        line = None
        interpreter.proc.kill()
    if line is None:  # it died or hung: the next script gets a fresh one
        _interpreter = None
        raise AssertionError("the Liger interpreter ended or hung:\n" + interpreter.stderr_text()[-6000:])
    reply = json.loads(line[len(REPLY):])
    assert reply["error"] is None, reply["error"][-6000:] + "\nstderr:\n" + interpreter.stderr_text()[-3000:]
    return reply["stdout"]
