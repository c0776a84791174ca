"""train.py, except that rank 0 stops forever inside the full-state save of step $HANG_IN_SAVE_STEP, after every
shard is written and before COMPLETE, so that a test can kill the job in the middle of a save (the other ranks wait
for rank 0 in the save's last agreement). Test-only: production code has no such hook.

    torchrun --nproc-per-node 2 tests/train_hanging_in_save.py <train.py flags>
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from minitrain.training import checkpoint  # noqa: E402

STEP = int(os.environ["HANG_IN_SAVE_STEP"])
complete = checkpoint.complete


def hang_before_complete(tmp, final, trainer_state, config):
    while trainer_state["step"] == STEP:
        time.sleep(1)
    complete(tmp, final, trainer_state, config)


checkpoint.complete = hang_before_complete
if __name__ == "__main__":  # not in a spawned child (the memory estimate's), which imports this file too
    sys.exit(train.main())
