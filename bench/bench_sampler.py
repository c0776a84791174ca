"""Packing quality and speed of sampler.py against two simple baselines, measured in the same run.

    python bench/bench_sampler.py            # ~2-3 min on 2 CPU cores; writes bench/RESULTS_sampler.md

For each length mix, batch size B and world size R, one epoch of `num_samples` samples is shuffled
once; every packer packs the same steps (the same B-slices of that shuffle):
  - ours:        sampler._pack_step (what MultipackPlanner.plan runs)
  - first-fit:   greedy first-fit on the shuffled order; packs dealt to (micro-step, rank) in order
  - lpt:         LPT over the step's samples into M * R bins, M from the token lower bound upwards
                 until no bin is over budget (the mini_trainer approach)
Figures per packer: micro-steps / lower bound ceil(step tokens / (R * T)) per step (mean, max), rank
imbalance max/mean tokens across ranks per micro-step (mean, max), utilisation tokens / (micro-steps *
R * T), and the packing time for the whole epoch after warm-up. Separately: MultipackPlanner.plan()
for a whole epoch (shuffle and plan objects included), numba compile time, and peak memory.
"""

import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numba
import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sampler  # noqa: E402

MAX_TOKENS = 8192  # T, --max-tokens-per-gpu
MIX_SEED = 1234


def length_mixes(n: int) -> dict[str, np.ndarray]:
    """Synthetic token lengths, all in 1..MAX_TOKENS, drawn with a fixed seed."""
    rng = np.random.default_rng(MIX_SEED)
    T = MAX_TOKENS

    def lognormal(median, sigma, size):
        return rng.lognormal(np.log(median), sigma, size)

    short = lognormal(350, 0.9, n)  # chat turns: median 350 tokens, a few thousand at most
    tail_long = rng.random(n) < 0.15  # 15% reasoning / long-context samples, log-uniform in [T/4, T]
    tail = np.where(tail_long, np.exp(rng.uniform(np.log(T / 4), np.log(T), n)), lognormal(500, 1.0, n))
    bi_long = rng.random(n) < 0.5  # half short chat, half long documents of 45-95% of T
    bimodal = np.where(bi_long, rng.uniform(0.45 * T, 0.95 * T, n), lognormal(250, 0.6, n))
    return {
        name: np.clip(x, 1, T).astype(np.int64)
        for name, x in (("short chat", short), ("long-tail", tail), ("bimodal", bimodal))
    }


@njit(cache=True)
def _grouped(pack_of, num_packs):
    """(positions, offsets) in sampler._pack_step's format from each sample's pack number."""
    offsets = np.zeros(num_packs + 1, np.int64)
    for p in pack_of:
        offsets[p + 1] += 1
    offsets = np.cumsum(offsets)
    fill = offsets[:-1].copy()
    positions = np.empty(pack_of.shape[0], np.int64)
    for i in range(pack_of.shape[0]):
        positions[fill[pack_of[i]]] = i
        fill[pack_of[i]] += 1
    return positions, offsets


@njit(cache=True)
def first_fit(lengths, num_ranks, cap):
    """Each sample, in shuffled order, into the first open pack with room; pack b -> micro b // R, rank b % R."""
    loads = np.zeros(lengths.shape[0], np.int64)
    pack_of = np.empty(lengths.shape[0], np.int64)
    num_bins = 0
    for i in range(lengths.shape[0]):
        b = 0
        while b < num_bins and loads[b] + lengths[i] > cap:
            b += 1
        num_bins = max(num_bins, b + 1)
        loads[b] += lengths[i]
        pack_of[i] = b
    num_micro = (num_bins + num_ranks - 1) // num_ranks
    return _grouped(pack_of, num_micro * num_ranks)


@njit(cache=True)
def lpt(lengths, num_ranks, cap):
    """LPT (sampler._lpt) into M * R bins, M = token bound, +1 until every bin fits; bin b -> micro b // R."""
    order = np.argsort(-lengths, kind="mergesort")
    sizes = lengths[order]
    num_micro = max(1, (sizes.sum() + num_ranks * cap - 1) // (num_ranks * cap))
    while True:
        bin_of, loads = sampler._lpt(sizes, num_micro * num_ranks)
        if loads.max() <= cap:
            break
        num_micro += 1
    pack_of = np.empty(lengths.shape[0], np.int64)
    pack_of[order] = bin_of
    return _grouped(pack_of, num_micro * num_ranks)


PACKERS = {"ours": sampler._pack_step, "first-fit": first_fit, "lpt": lpt}


def step_bounds(lengths: np.ndarray, perm: np.ndarray, batch_size: int, num_ranks: int) -> np.ndarray:
    """Per step: (token bound ceil(tokens / (R * T)), L2 bound ceil(L2 / R)) on the micro-steps."""
    bounds = []
    for start in range(0, len(perm), batch_size):
        sizes = np.sort(lengths[perm[start : start + batch_size]])[::-1].copy()
        by_tokens = max(1, -(-int(sizes.sum()) // (num_ranks * MAX_TOKENS)))
        bounds.append((by_tokens, -(-sampler._min_bins(sizes, MAX_TOKENS) // num_ranks)))
    return np.array(bounds)


def pack_epoch(packer, lengths: np.ndarray, perm: np.ndarray, batch_size: int, num_ranks: int,
               bounds: np.ndarray) -> dict:
    """Pack every step of one epoch; time only the packer calls; return the quality figures."""
    seconds = 0.0
    micro_steps, imbalances = [], []
    tokens = slots = 0
    for start in range(0, len(perm), batch_size):
        step_lengths = lengths[perm[start : start + batch_size]]
        t0 = time.perf_counter()
        positions, offsets = packer(step_lengths, num_ranks, MAX_TOKENS)
        seconds += time.perf_counter() - t0
        cumulative = np.concatenate(([0], np.cumsum(step_lengths[positions])))
        loads = (cumulative[offsets[1:]] - cumulative[offsets[:-1]]).reshape(-1, num_ranks)  # (micro, rank)
        assert loads.max() <= MAX_TOKENS and loads.sum() == step_lengths.sum()
        micro_steps.append(len(loads))
        imbalances.append(loads.max(axis=1) / loads.mean(axis=1))
        tokens += int(step_lengths.sum())
        slots += loads.size * MAX_TOKENS
    ratios = np.array(micro_steps)[:, None] / bounds  # (step, bound)
    imbalance = np.concatenate(imbalances)
    return {
        "micro_steps": sum(micro_steps),
        "ratio_mean": ratios.mean(axis=0),
        "ratio_max": ratios.max(axis=0),
        "imb_mean": float(imbalance.mean()),
        "imb_max": float(imbalance.max()),
        "util": tokens / slots,
        "seconds": seconds,
    }


def plan_epoch_seconds(lengths: np.ndarray, batch_size: int, num_ranks: int) -> float:
    """MultipackPlanner.plan() over one whole epoch (its shuffle included), after warm-up."""
    planner = sampler.MultipackPlanner(lengths, batch_size, MAX_TOKENS, num_ranks, seed=0)
    planner.plan(0)
    t0 = time.perf_counter()
    for step in range(planner.steps_per_epoch, 2 * planner.steps_per_epoch):  # epoch 1: a fresh shuffle
        planner.plan(step)
    return time.perf_counter() - t0


def plan_epoch_peak_bytes(lengths: np.ndarray, batch_size: int, num_ranks: int) -> int:
    """Peak memory traced (numpy and Python objects) while a fresh planner plans one epoch."""
    tracemalloc.start()
    planner = sampler.MultipackPlanner(lengths, batch_size, MAX_TOKENS, num_ranks, seed=0)
    for step in range(planner.steps_per_epoch):
        planner.plan(step)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def compile_seconds() -> tuple[float, float]:
    """Import sampler and plan one step in a fresh process: with an empty numba cache, then with it warm."""
    code = (
        "import time; t = time.perf_counter(); import sampler; "
        "sampler.MultipackPlanner([3, 5, 8, 2], 2, 8, 2).plan(0); print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                               check=True) for _ in range(2)]
    cold, warm = (float(r.stdout.strip().splitlines()[-1]) for r in runs)
    return cold, warm


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, numpy {np.__version__}, "
            f"numba {numba.__version__}")


def main(num_samples=1_000_000, batch_sizes=(32, 128, 1024), world_sizes=(1, 8, 64), out=None,
         measure_compile=True) -> str:
    """Run the whole bench, printing the markdown report as it goes; write it to `out` (if given)."""
    lines = []

    def emit(*new_lines):
        lines.extend(new_lines)
        print(*new_lines, sep="\n", flush=True)

    mixes = length_mixes(num_samples)
    perm = np.random.default_rng(0).permutation(num_samples)
    for packer in PACKERS.values():  # compile outside the timings
        packer(mixes["bimodal"][:64], 2, MAX_TOKENS)

    emit(
        "# sampler.py bench",
        "",
        f"{datetime.date.today().isoformat()}; {machine()}. Command: `python bench/bench_sampler.py`.",
        "",
        f"T = {MAX_TOKENS} tokens per rank and micro-step; {num_samples:,} samples per mix, drawn with seed "
        f"{MIX_SEED} (see `length_mixes`): short chat = lognormal, median 350, sigma 0.9; long-tail = 85% "
        "lognormal median 500 sigma 1.0 + 15% log-uniform in [T/4, T]; bimodal = 50% lognormal median 250 "
        "sigma 0.6 + 50% uniform in [0.45 T, 0.95 T]; all clipped to [1, T]. One epoch (one shuffle, every "
        "step) per row; all packers pack the same steps.",
        "",
        "Packers: ours = `sampler._pack_step` (what `MultipackPlanner.plan` runs); first-fit = each sample "
        "in shuffled order into the first pack with room, packs dealt to (micro-step, rank) in order; lpt = "
        "LPT over the step's samples into M * R bins, M from the token bound up until every bin fits (the "
        "mini_trainer approach).",
        "",
        "ms/LB: micro-steps per optimizer step / ceil(step tokens / (R * T)). ms/LB2: the same against "
        "ceil(L2 / R), L2 = Martello-Toth lower bound on bins of size T (`sampler._min_bins`; unlike the "
        "token bound it sees that samples over T/2 cannot share a pack). imb: max / mean tokens across ranks "
        "per micro-step (when a step has few samples per rank, a few long ones set the max: B = 32 on 64 "
        "ranks must leave ranks idle). util: tokens / (micro-steps * R * T). time: seconds to pack the whole "
        "epoch (packer calls only, after warm-up). vs x: ours / x, for total micro-steps (lower is better) "
        "and for time.",
        "",
        "| mix | B | R | packer | ms/LB mean | ms/LB max | ms/LB2 mean | ms/LB2 max | imb mean | imb max | "
        "util | time s | micro-steps vs first-fit | vs lpt | time vs first-fit | vs lpt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    )
    for mix, lengths in mixes.items():
        for batch_size in batch_sizes:
            for world_size in world_sizes:
                bounds = step_bounds(lengths, perm, batch_size, world_size)
                results = {name: pack_epoch(packer, lengths, perm, batch_size, world_size, bounds)
                           for name, packer in PACKERS.items()}
                ours, ff, lp = results["ours"], results["first-fit"], results["lpt"]
                for name, r in results.items():
                    vs = " | | | "
                    if name == "ours":
                        vs = (f"{ours['micro_steps'] / ff['micro_steps']:.3f} | "
                              f"{ours['micro_steps'] / lp['micro_steps']:.3f} | "
                              f"{ours['seconds'] / ff['seconds']:.2f} | {ours['seconds'] / lp['seconds']:.2f}")
                    emit(
                        f"| {mix} | {batch_size} | {world_size} | {name} | {r['ratio_mean'][0]:.3f} | "
                        f"{r['ratio_max'][0]:.3f} | {r['ratio_mean'][1]:.3f} | {r['ratio_max'][1]:.3f} | "
                        f"{r['imb_mean']:.3f} | {r['imb_max']:.3f} | {r['util']:.3f} | {r['seconds']:.3f} | {vs} |"
                    )

    long_tail = mixes["long-tail"]
    emit(
        "",
        f"## MultipackPlanner.plan() for one whole epoch of {num_samples:,} samples (long-tail mix)",
        "",
        "The epoch's shuffle, packing and the StepPlan objects included, after warm-up.",
        "",
        "| B | R | plan() s / epoch |",
        "|---|---|---|",
    )
    for batch_size in batch_sizes:
        for world_size in world_sizes:
            emit(f"| {batch_size} | {world_size} | {plan_epoch_seconds(long_tail, batch_size, world_size):.3f} |")

    batch_size, world_size = batch_sizes[-1], world_sizes[-1]
    emit(
        "",
        f"Peak memory while a fresh planner plans one epoch (B = {batch_size}, R = {world_size}; tracemalloc: "
        "numpy arrays and Python objects; numba's per-step scratch, O(B), is not traced):",
        "",
        "| samples | peak MiB |",
        "|---|---|",
    )
    for n in (num_samples // 10, num_samples):
        emit(f"| {n:,} | {plan_epoch_peak_bytes(long_tail[:n], batch_size, world_size) / 2**20:.1f} |")

    if measure_compile:
        cold, warm = compile_seconds()
        emit("", f"numba: import + first plan in a fresh process: {cold:.1f} s with an empty cache (compile), "
                 f"{warm:.2f} s with the cache that run left (`cache=True`).")

    report = "\n".join(lines) + "\n"
    if out is not None:
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(report)
        tmp.replace(out)
    return report


if __name__ == "__main__":
    main(out=Path(__file__).resolve().parent / "RESULTS_sampler.md")
