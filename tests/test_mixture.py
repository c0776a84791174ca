"""Data mixtures (--data-path a.jsonl:0.7 b.jsonl:0.3 or a.jsonl b.jsonl:2x): what each epoch draws, exactly."""

import json

import numpy as np
import pytest

from minitrain.training.data import DataError
from minitrain.training.mixture import Mixture, Source, parse_sources
from sampler import MultipackPlanner
from tests.test_train import write_data


def test_specs_parse_into_weights_or_epochs_and_bad_mixtures_are_one_line():
    assert parse_sources(["a.jsonl"]) == [Source("a.jsonl")]
    assert parse_sources(["a.jsonl:0.7", "dir:x/b.jsonl:3"]) == [Source("a.jsonl", 0.7), Source("dir:x/b.jsonl", 3.0)]
    assert parse_sources(["a.jsonl", "b.jsonl:2x", "c:0.5x"]) == [
        Source("a.jsonl"), Source("b.jsonl", epochs=2.0), Source("c", epochs=0.5)]
    with pytest.raises(DataError, match="b.jsonl have no weight while others do; give every file a weight"):
        parse_sources(["a.jsonl:0.7", "b.jsonl"])
    with pytest.raises(DataError, match="must be positive"):
        parse_sources(["a.jsonl:0", "b.jsonl:1"])
    with pytest.raises(DataError, match="names a file twice"):
        parse_sources(["a.jsonl:1x", "a.jsonl:2x"])
    with pytest.raises(DataError, match="names a file twice"):  # the same file, spelled another way
        parse_sources(["a.jsonl", "./a.jsonl"])
    for specs in (["a.jsonl:1e400"], ["a.jsonl:0.5", "b.jsonl:1e400"], ["a.jsonl:1e400x"]):  # inf: a traceback later
        with pytest.raises(DataError, match="weights and epochs must be positive finite numbers"):
            parse_sources(specs)
    with pytest.raises(DataError, match=r"a.jsonl:1e\+12x: an epoch of the mixture would hold 4,000,000,000,000 "
                                        r"samples, more than 2,147,483,648; lower the epochs"):
        Mixture(parse_sources(["a.jsonl:1e12x"]), members(4), seed=0)
    for sources in ([Source("a", 0.5), Source("b", 0.5)], [Source("a"), Source("b", epochs=2.0)]):
        # every sample of b held out for validation: in passes it trained "0 per epoch (of 0)" without a word
        with pytest.raises(DataError, match="--data-path b: no training sample left in it; drop it from the mixture"):
            Mixture(sources, [np.arange(4), np.zeros(0, np.int64)], seed=0)


def test_one_file_with_epochs_draws_them(tmp_path, capsys, tiny_model_dir):
    """--data-path data.jsonl:2x alone: each epoch holds every sample twice (it stopped with "the mixture draws no
    sample per epoch": a single file's cache says no file per sample)."""
    import train

    data = write_data(tmp_path / "a.jsonl", 6, vocab=700, seed=1)
    out = tmp_path / "out"
    capsys.readouterr()
    code = train.main(["--data-path", f"{data}:2x", "--model-name-or-path", str(tiny_model_dir("llama")),
                       "--output-dir", str(out), "--batch-size", "4", "--max-tokens-per-gpu", "256",
                       "--max-steps", "3", "--save-dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [line for r in records for line in r["sample_lines"]]
    assert len(lines) == 12 and sorted(lines) == sorted(list(range(1, 7)) * 2)  # the 12-sample epoch: each twice
    # a batch larger than the epoch: each step is the whole epoch, and the run says so
    code = train.main(["--data-path", f"{data}:2x", "--model-name-or-path", str(tiny_model_dir("llama")),
                       "--output-dir", str(tmp_path / "big"), "--batch-size", "16", "--max-tokens-per-gpu", "256",
                       "--max-steps", "1", "--save-dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "note: --batch-size 16 is more than an epoch's 12 samples: each step trains on the whole epoch" in out
    (record,) = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(record["sample_lines"]) == sorted(list(range(1, 7)) * 2)


def members(*sizes):
    starts = np.cumsum([0, *sizes])
    return [np.arange(a, b) for a, b in zip(starts, starts[1:])]


def test_each_epoch_draws_the_asked_counts_without_replacement_and_differs_per_epoch():
    m = Mixture([Source("a", 0.75), Source("b", 0.25)], members(30, 10), seed=1)
    assert m.counts.tolist() == [30, 10] and m.epoch_size == 40  # 75% / 25% of the 40 samples of both
    m = Mixture([Source("a", 0.5), Source("b", 0.5)], members(30, 10), seed=1)
    assert m.counts.tolist() == [20, 20]
    first, second = m.epoch_samples(0), m.epoch_samples(1)
    a, b = first[first < 30], first[first >= 30]
    assert len(a) == 20 and len(set(a.tolist())) == 20  # a subsample of a, no repeats
    assert sorted(np.bincount(b - 30, minlength=10).tolist()) == [2] * 10  # b twice over, every sample twice
    assert not np.array_equal(first, second) and np.array_equal(first, m.epoch_samples(0))  # a pure function
    m = Mixture([Source("a", epochs=1.0), Source("b", epochs=0.5)], members(30, 10), seed=1)
    assert m.counts.tolist() == [30, 5]
    drawn = m.epoch_samples(3)
    assert sorted(drawn[drawn < 30].tolist()) == list(range(30))  # all of a once
    b = drawn[drawn >= 30] - 30
    assert len(b) == 5 and len(set(b.tolist())) == 5 and b.max() < 10  # half of b's samples, no repeats


def test_the_mixture_is_the_same_for_any_world_size():
    m = Mixture([Source("a", 0.6), Source("b", 0.4)], members(12, 7), seed=3)
    lengths = np.random.default_rng(0).integers(5, 30, 19)
    plans = [MultipackPlanner(lengths, 5, 64, world, seed=3, mixture=m) for world in (1, 2, 3)]
    assert plans[0].steps_per_epoch == 4  # 19 samples a epoch, 5 per step
    for step in range(9):
        samples = [sorted(np.concatenate([i for micro in p.plan(step).micro_batches for i in micro]).tolist())
                   for p in plans]
        assert samples[0] == samples[1] == samples[2]


def test_a_mixture_run_logs_each_files_samples_and_its_exact_loss(tmp_path, capsys, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    import train
    from minitrain.training.data import IGNORE

    a = write_data(tmp_path / "a.jsonl", 12, vocab=700, seed=1)
    b = write_data(tmp_path / "b.jsonl", 4, vocab=700, seed=2)
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "out"
    capsys.readouterr()
    code = train.main(["--data-path", f"{a}:0.5", f"{b}:0.5", "--model-name-or-path", str(model_dir),
                       "--output-dir", str(out), "--batch-size", "4", "--max-tokens-per-gpu", "256",
                       "--max-steps", "4", "--learning-rate", "1e-3", "--save-dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["samples_seen/a.jsonl"] + records[-1]["samples_seen/b.jsonl"] == 16
    assert records[-1]["samples_seen/b.jsonl"] == 8  # half of a 16-sample epoch from b's 4 samples: twice each
    # Step 1's per-file loss against the model's own forward + plain cross-entropy, one sample at a time.
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = {0: a.read_text().splitlines(), 1: b.read_text().splitlines()}
    sums, counts = {0: 0.0, 1: 0}, {0: 0, 1: 0}
    for source, line in records[0]["sample_lines"]:
        row = json.loads(rows[source][line - 1])
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = lm(input_ids=ids, use_cache=False).logits[0, :-1]
        sums[source] += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
        counts[source] += int((labels != IGNORE).sum())
    assert counts[0] and counts[1], records[0]["sample_lines"]  # step 1 trains on both files (seeded draw)
    for source, name in ((0, "a.jsonl"), (1, "b.jsonl")):
        assert records[0][f"loss/{name}"] == pytest.approx(sums[source] / counts[source], rel=1e-5)
    total = (sums[0] + sums[1]) / (counts[0] + counts[1])
    assert records[0]["loss"] == pytest.approx(total, rel=1e-5)


def test_resuming_with_other_weights_is_refused_since_the_fingerprint_covers_the_mixture(tmp_path, capsys,
                                                                                          tiny_model_dir):
    import train

    a = write_data(tmp_path / "a.jsonl", 8, vocab=700, seed=1)
    b = write_data(tmp_path / "b.jsonl", 4, vocab=700, seed=2)
    args = ["--model-name-or-path", str(tiny_model_dir("llama")), "--output-dir", str(tmp_path / "out"),
            "--batch-size", "4", "--max-tokens-per-gpu", "256", "--max-steps", "2", "--save-dtype", "float32"]
    assert train.main(["--data-path", f"{a}:0.5", f"{b}:0.5", *args]) == 0
    capsys.readouterr()
    assert train.main(["--data-path", f"{a}:0.75", f"{b}:0.25", *args, "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "mixture 6/8, 6/4" in err and "mixture 9/8, 3/4" in err, err
    # With a third file, allowed: the per-file counts start over (they indexed past the checkpoint's two: a crash
    # after the first resumed step)
    c = write_data(tmp_path / "c.jsonl", 4, vocab=700, seed=3)
    assert train.main(["--data-path", str(a), str(b), str(c), *args, "--max-steps", "3", "--lr-scheduler", "constant",
                       "--allow-config-change"]) == 0, capsys.readouterr().err
    assert "per-file samples seen count from 0: the checkpoint's 2 data files are 3 now" in capsys.readouterr().out
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and sum(last[f"samples_seen/{n}.jsonl"] for n in "abc") == 4  # step 3's alone


def test_a_mixture_resumed_mid_run_trains_what_the_uninterrupted_run_does(tmp_path, capsys, tiny_model_dir):
    import train

    a = write_data(tmp_path / "a.jsonl", 8, vocab=700, seed=1)
    b = write_data(tmp_path / "b.jsonl", 4, vocab=700, seed=2)
    base = ["--data-path", f"{a}:0.6", f"{b}:0.4", "--model-name-or-path", str(tiny_model_dir("llama")),
            "--batch-size", "4", "--max-tokens-per-gpu", "256", "--learning-rate", "1e-3", "--save-dtype", "float32"]
    assert train.main([*base, "--output-dir", str(tmp_path / "whole"), "--max-steps", "5"]) == 0
    for steps in ("2", "5"):  # stopped after 2 steps, then the same command with the longer run: resumes
        assert train.main([*base, "--output-dir", str(tmp_path / "cut"), "--max-steps", steps]) == 0
    assert "resumed from" in capsys.readouterr().out
    whole, cut = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                  for name in ("whole", "cut"))
    assert [r["sample_lines"] for r in cut] == [r["sample_lines"] for r in whole]  # 5 steps cross into epoch 2
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    assert cut[-1]["samples_seen/b.jsonl"] == whole[-1]["samples_seen/b.jsonl"] > 0
