"""train.py, except that after the first step this process runs, the rank named by $WAIT_FOR_SIGNAL_RANK prints
"waiting for a stop signal" and waits until a stop signal has reached it, so that a test's signal lands after a
known step whatever the machine's speed (the other ranks wait for it in the step boundary's agreement).
Test-only: production code has no such hook.

    WAIT_FOR_SIGNAL_RANK=1 torchrun --nproc-per-node 2 tests/train_waiting_for_signal.py <train.py flags>
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from minitrain.training import checkpoint  # noqa: E402

WAITING_RANK = int(os.environ["WAIT_FOR_SIGNAL_RANK"])
agreed = checkpoint.StopSignals.agreed
waited = False


def agreed_after_a_signal(self, device):
    global waited
    if not waited and int(os.environ.get("RANK", "0")) == WAITING_RANK:
        waited = True
        print(f"rank {WAITING_RANK}: waiting for a stop signal", flush=True)
        while not self.received:
            time.sleep(0.02)
    return agreed(self, device)


checkpoint.StopSignals.agreed = agreed_after_a_signal
if __name__ == "__main__":  # not in a spawned child (the memory estimate's), which imports this file too
    sys.exit(train.main())
