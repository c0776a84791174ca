"""Every CPU benchmark, one after the other, into one table: bench/RESULTS.md.

    python bench/run_all.py               # ~20 min on 2 CPU cores
    python bench/run_all.py sampler       # re-run one area, then rejoin every area's table

Runs bench_process_data.py (stage 1 vs a bare apply_chat_template pool), bench_sampler.py (our planner vs
first-fit and LPT), bench_train.py (training throughput vs a padded baseline, loss memory vs full logits) and
bench_lora.py (LoRA vs full fine-tuning: peak memory per rank, tokens/s).
Each writes its own RESULTS_<area>.md; this script joins them under one header with the machine and the date.
Each figure is compared with its baseline measured in the same run, because these machines are shared and noisy.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
AREAS = ("process_data", "sampler", "train", "lora")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import torch

    return f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("areas", nargs="*", choices=[[], *AREAS], default=list(AREAS), help="default: all")
    args = parser.parse_args()
    started = time.time()
    timings = {}
    for area in args.areas:
        t0 = time.time()
        print(f"\n##### bench_{area}.py", flush=True)
        subprocess.run([sys.executable, str(BENCH / f"bench_{area}.py")], check=True, cwd=BENCH.parent)
        timings[area] = time.time() - t0
    header = [
        "# minitrain benchmarks",
        "",
        f"{datetime.date.today().isoformat()}; {machine()}. Command: `python bench/run_all.py` "
        f"({(time.time() - started) / 60:.1f} min: "
        + ", ".join(f"{a} {s / 60:.1f} min" for a, s in timings.items()) + ").",
        "Every ratio compares with a baseline measured in the same run on the same machine.",
        "",
    ]
    # Each area's headings go one level down under this page's title.
    sections = [re.sub(r"^(#+) ", r"#\1 ", (BENCH / f"RESULTS_{area}.md").read_text(), flags=re.M) for area in AREAS]
    text = "\n".join(header) + "\n" + "\n".join(sections)
    (BENCH / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
