"""Token cache and packs: exact contents, FILE:LINE errors, atomic builds, the label shift inside each sample."""

import json

import numpy as np
import pytest

from minitrain.training.data import (
    IGNORE,
    DataError,
    build_token_cache,
    cache_dir_for,
    make_pack,
    open_token_cache,
)

ROWS = [
    {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    {"input_ids": [8, 9], "labels": [8, -100]},  # only the first token is labelled: nothing left after the shift
    {"input_ids": [10, 11, 12, 13, 14], "labels": [10, 11, -100, 13, 14]},
]


def write_rows(path, rows, blank_line_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def cache_of(tmp_path, rows, **kw):
    data = write_rows(tmp_path / "data.jsonl", rows, **kw)
    cache_dir = cache_dir_for(data, tmp_path / "cache")
    build_token_cache(data, cache_dir)
    return open_token_cache(cache_dir)


def test_cache_holds_every_trainable_row_exactly_and_reports_the_dropped_one(tmp_path):
    cache = cache_of(tmp_path, ROWS, blank_line_after=1)  # blank line 2 is skipped, rows are on lines 1, 3, 4, 5
    kept = [ROWS[0], ROWS[1], ROWS[3]]
    assert len(cache) == 3
    assert cache.input_ids.tolist() == sum((r["input_ids"] for r in kept), [])
    assert cache.labels[0:len(cache.labels)].tolist() == sum((r["labels"] for r in kept), [])
    # the labels are stored as a one-byte trained mask beside the int32 ids
    tokens = len(cache.input_ids)
    assert (cache.directory / "trained_mask.bin").stat().st_size == tokens
    assert (cache.directory / "input_ids.bin").stat().st_size == 4 * tokens
    assert not (cache.directory / "labels.bin").exists()
    assert cache.lengths.tolist() == [4, 3, 5]
    assert cache.trained.tolist() == [2, 2, 3]  # labels[0] is never predicted after the shift
    assert cache.lines.tolist() == [1, 3, 5]
    assert cache.skipped_lines == (4,)
    assert cache.max_token_id == 14


BAD_ROWS = [
    ('{"input_ids": [1, 2]}', "no 'labels' field"),
    ('{"labels": [1, 2]}', "no 'input_ids' field"),
    ('{"input_ids": [1, 2, 3], "labels": [1, 2]}', "3 input_ids but 2 labels"),
    ('{"input_ids": [1, 2.5], "labels": [1, 2]}', "'input_ids' must be a non-empty list of integers"),
    ('{"input_ids": [], "labels": []}', "non-empty list of integers"),
    ('{"input_ids": [1, 2], "labels": [1, 2], "len": 3}', "'len' is 3"),
    ('{"input_ids": [1, 2], "labels": [-100, 5]}', "labels[1] = 5 but input_ids[1] = 2"),
    ('{"input_ids": [-1, 2], "labels": [-100, 2]}', "input_ids must be in"),
    ('{"input_ids": [[5], [6, 7]], "labels": [[5], [6, 7]]}', "'input_ids' must be a non-empty list of integers"),
    ('{"input_ids": [[5, 6], [7, 8]], "labels": [-100, 6]}', "'input_ids' must be a non-empty list of integers"),
    ('{"input_ids": [5, 6], "labels": [[-100], [6]]}', "'labels' must be a non-empty list of integers"),
    ('{"input_ids": [true, 1], "labels": [-100, 1]}', "'input_ids' must be a non-empty list of integers"),
    ('{"input_ids": [5, "6"], "labels": [-100, 6]}', "'input_ids' must be a non-empty list of integers"),
    ('{"input_ids": [5, 6], "labels": [-100, 18446744073709551615]}', "'labels' holds an integer outside"),
    ('[1, 2]', "expected a JSON object"),
    ('{"input_ids": [1, 2', "not valid JSON"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_row_names_file_and_line_and_leaves_no_cache(tmp_path, bad, message):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + bad + "\n")
    cache_dir = cache_dir_for(data, tmp_path / "cache")
    with pytest.raises(DataError) as e:
        build_token_cache(data, cache_dir)
    assert str(e.value).startswith(f"{data}:2: ") and message in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written cache, no temp folder


def test_content_hash_follows_the_tokens_not_only_the_lengths(tmp_path):
    same_shape = [dict(r, input_ids=[t + 1 if lab == IGNORE else t for t, lab in zip(r["input_ids"], r["labels"])])
                  for r in ROWS]  # every prompt token changed; lengths, labels and trained counts kept
    relabelled = [dict(ROWS[0], labels=[-100, 2, 3, 4]), *ROWS[1:]]  # one more trained token
    hashes = []
    for name, rows in (("a", ROWS), ("b", ROWS), ("c", same_shape), ("d", relabelled)):
        (tmp_path / name).mkdir()
        hashes.append(cache_of(tmp_path / name, rows).content_hash)
    assert hashes[0] == hashes[1]  # a deterministic function of the rows
    assert len(set(hashes[1:])) == 3


def test_no_trainable_sample_at_all_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no sample has any trained token"):
        cache_of(tmp_path, [ROWS[2]])


def test_cache_key_follows_the_data_file(tmp_path):
    data = write_rows(tmp_path / "data.jsonl", ROWS)
    before = cache_dir_for(data, tmp_path)
    write_rows(data, ROWS[:2])
    assert cache_dir_for(data, tmp_path) != before


def test_pack_restarts_positions_and_shifts_labels_inside_each_sample(tmp_path):
    cache = cache_of(tmp_path, ROWS)  # samples: rows 0, 1, 3
    pack = make_pack(cache, np.array([1, 0, 2]))
    assert pack.input_ids.tolist() == [[5, 6, 7, 1, 2, 3, 4, 10, 11, 12, 13, 14]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]]
    # position t predicts labels[t + 1] of its own sample; the last token of a sample (positions 2, 6, 11) predicts
    # nothing, in particular not the first token of the next sample.
    assert pack.positions.tolist() == [0, 1, 4, 5, 7, 9, 10]
    assert pack.targets.tolist() == [6, 7, 3, 4, 11, 13, 14]
    assert pack.num_tokens == 12
    assert len(pack.targets) == int(cache.trained[[1, 0, 2]].sum())


def test_dummy_pack_is_one_token_with_no_target(tmp_path):
    pack = make_pack(cache_of(tmp_path, ROWS), np.array([], dtype=np.int64))
    assert pack.input_ids.shape == (1, 1) and pack.positions.numel() == 0 and pack.num_tokens == 0
    assert IGNORE not in pack.targets.tolist()


def test_any_failure_while_building_the_cache_is_one_data_error_line(tmp_path, monkeypatch):
    import torch

    import minitrain.training.data
    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World

    def fails(data_path, cache_dir):
        raise RuntimeError("an unforeseen failure\nover two lines")

    # Every rank must get an error it reports, never a traceback that leaves the others in a collective.
    monkeypatch.setattr(minitrain.training.data, "build_token_cache", fails)
    data = write_rows(tmp_path / "data.jsonl", ROWS)
    config = train.TrainConfig(str(data), "m", str(tmp_path / "out"), batch_size=4, max_tokens_per_gpu=64)
    with pytest.raises(DataError) as e:
        load_data(config, World(0, 0, 1, 1, torch.device("cpu")), vocab_size=100)
    assert str(e.value).startswith("cannot build the token cache in ") and f"from {data}: " in str(e.value)
    assert str(e.value).endswith("RuntimeError: an unforeseen failure over two lines")
