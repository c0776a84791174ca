"""Run a script with Liger's kernels under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton imports).

`run(script, *args)` first proves the interpreter itself works here (a one-line Triton kernel): only if *that* fails is
the test skipped. Any later failure — Liger's kernel, or minitrain's own Liger path (a TypeError in its call, say) —
fails the test with the script's stderr.

Two shims make the interpreter run what compiled Triton runs, so that Liger's softcap branch can be tested on CPU:
- compiled Triton passes a Python float argument as an fp32 scalar; the interpreter passes the bare float, and
  `softcap.to(tl.float32)` in Liger's kernel raises AttributeError. The shim converts it as the compiler does.
- Liger's softcap calls libdevice's `tanh`, an extern the interpreter cannot run (it returns None). The shim swaps in
  tanh(x) = 2 sigmoid(2x) - 1, the same function, for that one module global. Everything else is Liger's own code.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = "TRITON-INTERPRETER-READY"

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


def run(script: str, *args: str, timeout: int = 400) -> str:
    """stdout of `script` run after PRELUDE under TRITON_INTERPRET=1; skips only if the interpreter itself fails."""
    pytest.importorskip("liger_kernel")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PRELUDE + script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if READY not in done.stdout:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"Triton's interpreter cannot run a kernel here: {last}")
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stdout
