"""Properties of the multipack planner, on the MultipackPlanner that train.py calls."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampler import FIX_TOO_LONG, MultipackPlanner, SamplerError, _min_bins, _order_longest_first, pack_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_sampler  # noqa: E402  (bench/ is not a package)

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def planner_args(draw, max_world_size=64):
    cap = draw(st.integers(1, 4096))
    n = draw(st.integers(1, 300))
    # Mostly short samples with some near the budget, like real chat data.
    lengths = draw(st.lists(st.one_of(st.integers(1, max(1, cap // 8)), st.integers(1, cap)), min_size=n, max_size=n))
    batch_size = draw(st.integers(1, 2 * n))
    world_size = draw(st.integers(1, max_world_size))
    seed = draw(st.integers(0, 2**32))
    return np.array(lengths), batch_size, cap, world_size, seed


def check_step(planner: MultipackPlanner, plan) -> np.ndarray:
    """Assert the invariants of one step's plan; return its sample indices in plan order."""
    R, T = planner.world_size, planner.max_tokens_per_rank
    assert plan.num_micro_steps >= 1
    packs = []
    for micro in plan.micro_batches:
        assert len(micro) == R  # every rank gets a pack (maybe empty) in every micro-step
        assert sum(len(p) for p in micro) > 0  # no micro-step in which every rank idles
        for pack in micro:
            assert pack.dtype == np.int64 and pack.ndim == 1
            assert planner.lengths[pack].sum() <= T
            packs.append(pack)
    for rank in range(R):
        assert len(plan.rank_packs(rank)) == plan.num_micro_steps
        assert all(a is b for a, b in zip(plan.rank_packs(rank), (m[rank] for m in plan.micro_batches)))
    indices = np.concatenate(packs)
    assert len(indices) == plan.num_samples  # empty packs add no samples to the count
    # The step holds exactly its slice of the epoch's shuffle.
    start = plan.step_in_epoch * planner.batch_size
    expected = planner.epoch_permutation(plan.epoch)[start : start + planner.batch_size]
    assert np.array_equal(np.sort(indices), np.sort(expected))
    # Lower bound on micro-steps from the token total.
    assert plan.num_micro_steps >= -(-planner.lengths[indices].sum() // (R * T))
    return indices


@PROPERTY
@given(planner_args())
def test_every_sample_exactly_once_per_epoch_and_packs_fit(args):
    lengths, B, T, R, seed = args
    planner = MultipackPlanner(lengths, B, T, R, seed)
    for epoch in range(2):
        seen = []
        for k in range(planner.steps_per_epoch):
            step = epoch * planner.steps_per_epoch + k
            plan = planner.plan(step)
            assert (plan.step, plan.epoch, plan.step_in_epoch) == (step, epoch, k)
            seen.append(check_step(planner, plan))
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(lengths)))


@PROPERTY
@given(planner_args(), st.integers(0, 50))
def test_resume_equals_uninterrupted_stream(args, start):
    lengths, B, T, R, seed = args
    stream = list(itertools.islice(MultipackPlanner(lengths, B, T, R, seed).iter_steps(0), start + 3))
    resumed = MultipackPlanner(lengths, B, T, R, seed)  # a fresh process: nothing cached
    for got, want in zip(resumed.iter_steps(start), stream[start:]):
        assert_same_plan(got, want)
    # Any order, any time: jumping around does not change a step's plan.
    for step in (start + 2, 0, start):
        assert_same_plan(resumed.plan(step), stream[step])


def assert_same_plan(a, b):
    assert (a.step, a.epoch, a.step_in_epoch, a.num_samples) == (b.step, b.epoch, b.step_in_epoch, b.num_samples)
    assert len(a.micro_batches) == len(b.micro_batches)
    for ma, mb in zip(a.micro_batches, b.micro_batches):
        assert len(ma) == len(mb)
        assert all(np.array_equal(pa, pb) for pa, pb in zip(ma, mb))


@PROPERTY
@given(planner_args(max_world_size=1), st.sampled_from([2, 3, 8, 64]))
def test_step_samples_do_not_depend_on_world_size(args, other_world_size):
    lengths, B, T, _, seed = args
    one = MultipackPlanner(lengths, B, T, 1, seed)
    many = MultipackPlanner(lengths, B, T, other_world_size, seed)
    for step in range(min(one.steps_per_epoch + 1, 6)):
        a, b = check_step(one, one.plan(step)), check_step(many, many.plan(step))
        assert np.array_equal(np.sort(a), np.sort(b))


def test_deterministic_for_a_seed_and_different_across_seeds_and_epochs():
    lengths = np.random.default_rng(0).integers(1, 500, 1000)
    a = MultipackPlanner(lengths, 100, 2048, 4, seed=7)
    b = MultipackPlanner(lengths, 100, 2048, 4, seed=7)
    for step in (0, 5, 10, 23):
        assert_same_plan(a.plan(step), b.plan(step))
    other_seed = MultipackPlanner(lengths, 100, 2048, 4, seed=8)
    assert not np.array_equal(a.epoch_permutation(0), other_seed.epoch_permutation(0))
    assert not np.array_equal(a.epoch_permutation(0), a.epoch_permutation(1))
    first_steps = [np.sort(np.concatenate(a.plan(e * a.steps_per_epoch).micro_batches[0])) for e in range(3)]
    assert not np.array_equal(first_steps[0], first_steps[1])
    assert not np.array_equal(first_steps[1], first_steps[2])


def test_the_packing_order_is_numpys_stable_descending_sort():
    """sampler's own merge sort (runs of 32 by insertion, then merges) against np.argsort(-x, kind="stable"):
    lengths with many ties (equal samples must keep their shuffled order), every size around the runs' edges."""
    rng = np.random.default_rng(5)
    for n in [*range(0, 70), 95, 96, 97, 128, 129, 1000, 4099]:
        for high in (2, 5, 10_000):
            keys = rng.integers(1, high, n).astype(np.int64)
            assert np.array_equal(_order_longest_first(keys), np.argsort(-keys, kind="stable")), (n, high)


def test_world_sizes_1_to_64():
    lengths = np.random.default_rng(1).integers(1, 3000, 700)
    for world_size in range(1, 65):
        planner = MultipackPlanner(lengths, 128, 4096, world_size, seed=3)
        seen = [check_step(planner, planner.plan(k)) for k in range(planner.steps_per_epoch)]
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(lengths)))


def test_batch_smaller_than_world_size_gives_dummy_packs():
    planner = MultipackPlanner(np.full(10, 100), batch_size=3, max_tokens_per_rank=1000, world_size=8)
    plan = planner.plan(0)
    assert plan.num_micro_steps == 1 and plan.num_samples == 3
    sizes = sorted(len(p) for p in plan.micro_batches[0])
    assert sizes == [0] * 5 + [1] * 3  # one sample per busy rank, five dummy packs
    assert all(p.dtype == np.int64 for p in plan.micro_batches[0])


def test_one_sample():
    planner = MultipackPlanner([5], batch_size=4, max_tokens_per_rank=5, world_size=2)
    assert planner.steps_per_epoch == 1
    for step in range(3):  # the same single sample every epoch
        plan = planner.plan(step)
        assert plan.epoch == step and plan.num_samples == 1
        assert [len(p) for p in plan.micro_batches[0]] == [1, 0]


def test_all_samples_of_length_budget_get_one_pack_each():
    planner = MultipackPlanner(np.full(50, 256), batch_size=20, max_tokens_per_rank=256, world_size=3)
    assert planner.steps_per_epoch == 3
    plans = [planner.plan(k) for k in range(3)]
    assert [p.num_micro_steps for p in plans] == [7, 7, 4]  # ceil(20/3), ceil(20/3), ceil(10/3)
    assert [p.num_samples for p in plans] == [20, 20, 10]  # the last, smaller batch is kept
    for plan in plans:
        check_step(planner, plan)
        assert all(len(p) <= 1 for m in plan.micro_batches for p in m)


def test_batch_larger_than_dataset_is_one_step_of_everything():
    planner = MultipackPlanner(np.arange(1, 11), batch_size=64, max_tokens_per_rank=20, world_size=2)
    assert planner.steps_per_epoch == 1
    assert np.array_equal(np.sort(check_step(planner, planner.plan(0))), np.arange(10))


def test_tight_step_reaches_the_lower_bound_through_best_fit():
    # 24 tokens, budget 8: only 7+1 | 5+3 | 4+2+2 fills three packs; the balanced first pass misses it.
    packs = pack_step(np.array([2, 7, 4, 1, 5, 2, 3]), 1, 8)
    assert len(packs) == 3
    assert sorted(np.array([2, 7, 4, 1, 5, 2, 3])[m[0]].sum() for m in packs) == [8, 8, 8]


def test_items_over_half_the_budget_each_get_a_pack():
    lengths = np.array([600] * 9 + [10] * 30)  # no two 600s share a 1000-token pack
    packs = pack_step(lengths, 4, 1000)
    assert len(packs) == 3  # ceil(9 / 4), not the token bound ceil(5700 / 4000) = 2
    for micro in packs:
        assert all(lengths[p].sum() <= 1000 for p in micro)


def test_many_short_samples_are_balanced_across_ranks():
    lengths = np.random.default_rng(2).integers(1, 200, 1024)
    packs = pack_step(lengths, 8, 4096)
    assert len(packs) == -(-lengths.sum() // (8 * 4096))
    for micro in packs:
        loads = np.array([lengths[p].sum() for p in micro])
        assert loads.max() / loads.mean() <= 1.02


def fewest_bins(sizes: list[int], cap: int) -> int:
    """Exact minimum number of bins, by exhaustive search (tiny inputs only)."""
    best = len(sizes)

    def place(i, loads):
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(sizes):
            best = len(loads)
            return
        for b in range(len(loads)):
            if loads[b] + sizes[i] <= cap:
                loads[b] += sizes[i]
                place(i + 1, loads)
                loads[b] -= sizes[i]
        place(i + 1, loads + [sizes[i]])

    place(0, [])
    return best


@st.composite
def tiny_bin_packing(draw):
    cap = draw(st.integers(2, 30))
    return cap, draw(st.lists(st.integers(1, cap), min_size=1, max_size=8))


@PROPERTY
@given(tiny_bin_packing())
def test_micro_step_lower_bound_never_exceeds_the_optimum(case):
    cap, lengths = case
    sizes = np.sort(np.array(lengths))[::-1].copy()
    optimum = fewest_bins(sizes.tolist(), cap)
    assert _min_bins(sizes, cap) <= optimum
    assert len(pack_step(np.array(lengths), 1, cap)) >= optimum  # the packing is valid, so never below it


def test_tiny_steps_are_packed_into_the_optimal_number_of_micro_steps_but_for_a_rare_one_more():
    """Exhaustive search as the truth on 2,000 generated tiny steps: the planner finds the optimum in all but a few
    (bin packing is NP-hard; its heuristics miss by one at most)."""
    rng = np.random.default_rng(0)
    extra = []
    for _ in range(2000):
        cap = int(rng.integers(2, 31))
        lengths = rng.integers(1, cap + 1, int(rng.integers(1, 9)))
        optimum = fewest_bins(np.sort(lengths)[::-1].tolist(), cap)
        extra.append(len(pack_step(lengths, 1, cap)) - optimum)
    assert min(extra) == 0 and max(extra) <= 1 and sum(extra) <= 2, sum(extra)  # 1 of 2,000 today


@pytest.mark.parametrize("mix", ["short chat", "long-tail", "bimodal"])
def test_fewest_micro_steps_within_a_bound_of_the_lower_bounds_on_generated_length_mixes(mix):
    """The README's "fewest micro-steps": on the bench's generated length mixes (T = 8192), every step's micro-steps
    against ceil(step tokens / (R x T)) and against ceil(L2 / R) (Martello-Toth L2, which sees that samples over T/2
    cannot share a pack), and never more micro-steps in all than first-fit or LPT (mini_trainer's packer)."""
    lengths = bench_sampler.length_mixes(4096)[mix]
    perm = np.random.default_rng(0).permutation(len(lengths))
    # today (4,096 samples): short chat 1.000, long-tail <= 1.003, bimodal <= 1.247 (L2 shows that is optimal)
    token_bound_mean = {"short chat": 1.001, "long-tail": 1.005, "bimodal": 1.25}[mix]
    for batch_size, num_ranks in itertools.product((32, 128, 1024), (1, 8)):
        bounds = bench_sampler.step_bounds(lengths, perm, batch_size, num_ranks)
        got = {name: bench_sampler.pack_epoch(packer, lengths, perm, batch_size, num_ranks, bounds)
               for name, packer in bench_sampler.PACKERS.items()}
        ours, case = got["ours"], (mix, batch_size, num_ranks)
        assert ours["ratio_mean"][0] <= token_bound_mean, (case, ours["ratio_mean"])
        # against L2: 1.000 in every case but long-tail B=128 R=1 (mean 1.003, one step 23 for 22)
        assert ours["ratio_mean"][1] <= 1.005 and ours["ratio_max"][1] <= 1.05, (case, ours["ratio_max"])
        assert ours["micro_steps"] <= min(got["first-fit"]["micro_steps"], got["lpt"]["micro_steps"]), (case, got)


def test_bench_smoke(tmp_path):
    out = tmp_path / "RESULTS_sampler.md"
    report = bench_sampler.main(num_samples=400, batch_sizes=(16,), world_sizes=(1, 3), out=out,
                                measure_compile=False)
    assert out.read_text() == report
    rows = [line for line in report.splitlines() if line.startswith("| short chat |")]
    assert [row.split(" | ")[3] for row in rows] == ["ours", "first-fit", "lpt"] * 2
    for row in rows:
        ratio_mean = float(row.split(" | ")[4])
        assert ratio_mean >= 1.0  # no packer beats the lower bound
        if row.split(" | ")[3] == "ours":
            assert ratio_mean <= 1.001, row  # short chat: the planner meets the lower bound


def test_too_long_samples_are_refused_with_count_longest_and_fix():
    with pytest.raises(SamplerError) as err:
        MultipackPlanner([10, 5000, 300, 4097], batch_size=2, max_tokens_per_rank=4096, world_size=1)
    message = str(err.value)
    assert "2 samples are longer than --max-tokens-per-gpu=4096" in message
    assert "longest: 5000 tokens" in message
    assert FIX_TOO_LONG in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "lengths, kwargs, expected",
    [
        ([], {}, "the dataset is empty"),
        ([[1, 2, 3]], {}, "1-D array"),
        ([1.5, 2.0], {}, "must be integers"),
        ([3, 0, 4], {}, "1 samples have fewer than 1 token"),
        ([1], {"batch_size": 0}, "batch size must be an integer >= 1, got 0; set --batch-size"),
        ([1], {"max_tokens_per_rank": 0}, "set --max-tokens-per-gpu"),
        ([1], {"world_size": 0}, "world size must be an integer >= 1"),
        ([1], {"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_inputs_are_refused_with_one_line(lengths, kwargs, expected):
    args = {"batch_size": 2, "max_tokens_per_rank": 8, "world_size": 1} | kwargs
    with pytest.raises(SamplerError, match=expected) as err:
        MultipackPlanner(lengths, **args)
    assert "\n" not in str(err.value)


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(SamplerError) as err:
        MultipackPlanner([], batch_size=0, max_tokens_per_rank=0, world_size=0)
    message = str(err.value)
    for part in ("dataset is empty", "batch size", "max tokens per rank", "world size"):
        assert part in message


def test_bad_step_is_refused():
    planner = MultipackPlanner([1, 2], batch_size=1, max_tokens_per_rank=2, world_size=1)
    with pytest.raises(SamplerError, match="step must be an integer >= 0"):
        planner.plan(-1)
