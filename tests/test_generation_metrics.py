"""--eval-metric rouge: a prediction for every validation sample, batched (causal and encoder-decoder), scored with
ROUGE; early stopping and the best export following a ROUGE figure; 1 process and 2 (FSDP2, gloo) agreeing.

The truth is computed here independently: rouge_score on the saved prediction strings, the plain Hugging Face
model's one-prompt-at-a-time `generate` for the predictions and their lengths, the raw pairs file for the references.
"""

import contextlib
import io
import json
import random
import types
from pathlib import Path

import numpy as np
import pytest


WORDS = "the cat sat on a mat and the dog ran to the park with a red ball".split()
# Replies of words that are one token each (with or without a leading space) of the test tokenizer: a few steps
# teach the tiny model to reply with some of them, so ROUGE is not zero.
REPLY_WORDS = ("the", "on", "you", "is", "the")
NEW_TOKENS = 8
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_truth(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ROUGE_KEYS}


def hf_generate(lm, prompt: np.ndarray, eos: int, num_beams: int = 1) -> list[int]:
    """One prompt alone (no padding) through the plain model's generate; cut after the first end token."""
    import torch

    ids = torch.from_numpy(np.asarray(prompt, dtype=np.int64))[None]
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, num_beams=num_beams, eos_token_id=eos, pad_token_id=eos)
    reply = out[0, 1 if lm.config.is_encoder_decoder else ids.shape[1] :].tolist()
    return reply[: reply.index(eos) + 1] if eos in reply else reply


# ---------------------------------------------------------------------------------------------------------------
# A short causal run on prompt/reply pairs through process_data.py, in 1 process (a fixture shared by two tests)


def write_pairs(path: Path, rows: int) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(rows):
        source = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        target = " ".join(rng.choice(REPLY_WORDS) for _ in range(rng.randint(2, 5)))
        lines.append(json.dumps({"source": f"say {source}", "target": target}) + "\n")
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, tiny_model_dir):
    import process_data
    import train

    root = tmp_path_factory.mktemp("pairs_run")
    raw = write_pairs(root / "pairs.jsonl", 21)
    data = root / "data.jsonl"
    args = ["--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")), "--batch-size", "4",
            "--max-tokens-per-gpu", "160", "--max-steps", "4", "--learning-rate", "3e-3", "--save-dtype", "float32",
            "--validation-split", "0.25", "--eval-every-samples", "8", "--min-samples-per-checkpoint", "8",
            "--num-eval-generations", "0", "--eval-metric", "rouge", "--eval-max-new-tokens", str(NEW_TOKENS),
            "--no-activation-checkpointing"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        process_data.main(["--input-file", str(raw), "--output-file", str(data), "--model-name-or-path",
                           str(tiny_model_dir("llama")), "--max-sample-num-tokens", "4096", "--num-workers", "1"])
        code = train.main([*args, "--output-dir", str(root / "out")])
    assert code == 0, stdout.getvalue()[-3000:]
    return types.SimpleNamespace(root=root, raw=raw, data=data, args=args, out=root / "out", stdout=stdout.getvalue())


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def predictions_of(out: Path, samples: int) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions" / f"samples_{samples}.jsonl").read_text().splitlines()]


def test_rouge_in_the_metrics_is_rouge_score_of_the_saved_predictions_which_the_model_generates(pairs_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitrain.tools import plot_run
    from minitrain.training.validation import split_validation

    out = pairs_run.out
    evaluated = [r for r in records_of(out) if "validation_loss" in r]
    assert [r["samples_seen"] for r in evaluated] == [8, 16]
    rows = [json.loads(line) for line in pairs_run.data.read_text().splitlines()]
    raw = [json.loads(line) for line in pairs_run.raw.read_text().splitlines()]
    _, held_out = split_validation(len(rows), 0.25)
    tokenizer = AutoTokenizer.from_pretrained(out / "hf_format" / "samples_16")
    eos = tokenizer.eos_token_id
    for record in evaluated:
        samples = record["samples_seen"]
        saved = predictions_of(out, samples)
        # Every held-out sample (each has a prompt), its reference the pairs file's own target text.
        assert [p["data_line"] for p in saved] == [int(i) + 1 for i in held_out]
        assert [p["reference"] for p in saved] == [raw[p["data_line"] - 1]["target"] for p in saved]
        truth = rouge_truth([p["prediction"] for p in saved], [p["reference"] for p in saved])
        for key in ROUGE_KEYS:
            assert record[f"validation_{key}"] == pytest.approx(truth[key], rel=1e-12, abs=1e-12)
        # The model exported at this evaluation, one prompt at a time: the same predictions and their length.
        lm = AutoModelForCausalLM.from_pretrained(out / "hf_format" / f"samples_{samples}", dtype=torch.float32)
        replies = []
        for i in held_out:
            labels = rows[i]["labels"]
            first = next(t for t, label in enumerate(labels) if label != -100)
            replies.append(hf_generate(lm, np.array(rows[i]["input_ids"][:first]), eos))
        assert [p["prediction"] for p in saved] == [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        assert record["validation_gen_len"] == pytest.approx(np.mean([len(r) for r in replies]))
        assert f"samples {samples} | " in pairs_run.stdout and f"| rougeL {record['validation_rougeL']:.2f}" in \
            pairs_run.stdout
    assert any(r["validation_rouge1"] > 0 for r in evaluated)  # the figures are not trivially zero
    assert "ROUGE on 5 of them" in pairs_run.stdout

    assert plot_run.main([str(out)]) == 0
    png = (out / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_two_ranks_give_the_same_predictions_and_rouge_as_one(pairs_run, two_ranks):
    # 5 validation prompts of 52..68 tokens, at most 2 per batch (160 tokens): rank 0 generates 3 in 2 batches, rank
    # 1 generates 2 in 1 batch and runs a dummy one.
    out = pairs_run.root / "two_ranks"
    run = two_ranks.train([*pairs_run.args, "--output-dir", str(out)], pairs_run.root / "two_ranks_run")  # shared job
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = records_of(pairs_run.out), records_of(out)
    assert len(one) == len(two) and sum("validation_rougeL" in r for r in one) == 2
    losses = [(a.get("loss"), b.get("loss")) for a, b in zip(one, two)]
    assert all((x is None) == (y is None) for x, y in losses) and sum(x is not None for x, _ in losses) >= 2
    assert [y for _, y in losses if y is not None] == pytest.approx([x for x, _ in losses if x is not None], rel=1e-5)
    for a, b in zip(one, two):
        for key in ("validation_loss", "validation_gen_len", *(f"validation_{k}" for k in ROUGE_KEYS)):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    for samples in (8, 16):
        assert predictions_of(out, samples) == predictions_of(pairs_run.out, samples)


# ---------------------------------------------------------------------------------------------------------------
# Batched generation against one prompt at a time


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_left_padded_causal_predictions_equal_one_prompt_at_a_time(tmp_path, tiny_model_dir, num_beams):
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.training.data import build_token_cache, open_token_cache
    from minitrain.training.validation import (
        Predictions,
        generation_batches,
        generation_prompts,
    )
    from tests.test_train import write_data

    build_token_cache(write_data(tmp_path / "data.jsonl", 10, vocab=700, seed=11), tmp_path / "cache")
    cache = open_token_cache(tmp_path / "cache")
    prompts = generation_prompts(cache, np.arange(len(cache)))
    lengths = [len(p.prompt) for p in prompts]
    budget = 4 * num_beams * (max(lengths) + NEW_TOKENS)
    batches = generation_batches(lengths, budget, NEW_TOKENS, num_beams)
    assert len(set(lengths)) > 3 and max(len(b) for b in batches) > 2  # batches of prompts of different lengths
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), dtype=torch.float32).eval()
    eos = lm.generation_config.eos_token_id
    predictions = Predictions(prompts, cache.lines, tokenizer=None, max_tokens=budget, num_beams=num_beams)
    batched = predictions.generate(types.SimpleNamespace(lm=lm), NEW_TOKENS, [eos], torch.device("cpu"))
    assert batched == [hf_generate(lm, p.prompt, eos, num_beams) for p in prompts]
    assert len({tuple(r) for r in batched}) == len(batched)  # distinct replies: the comparison means something


def test_batched_right_padded_encoder_decoder_predictions_equal_one_source_at_a_time(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from minitrain.training.data import TokenCache
    from minitrain.training.validation import (
        Predictions,
        generation_batches,
        generation_prompts,
    )
    from tests.tiny_models import build_tiny_seq2seq

    lm = AutoModelForSeq2SeqLM.from_pretrained(build_tiny_seq2seq("t5", tmp_path, tokenizer_dir("chatml")),
                                               dtype=torch.float32).eval()
    torch.manual_seed(0)  # an untied random head: the tied one only echoes the decoder's start (= end) token
    lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.lm_head.weight))
    eos = lm.config.eos_token_id
    rng = np.random.default_rng(5)
    sources = [rng.integers(3, 700, n) for n in (4, 15, 7, 11, 3, 9)]
    targets = [np.append(rng.integers(3, 700, n), eos) for n in (3, 2, 5, 4, 2, 3)]
    input_ids = np.concatenate([np.concatenate([s, t]) for s, t in zip(sources, targets)]).astype(np.int32)
    labels = np.concatenate([np.concatenate([np.full(len(s), -100), t]) for s, t in zip(sources, targets)])
    lengths = [len(s) + len(t) for s, t in zip(sources, targets)]
    cache = TokenCache(input_ids=input_ids, labels=labels.astype(np.int32), offsets=np.cumsum([0, *lengths]),
                       trained=np.array([len(t) for t in targets]), lines=np.arange(1, 7), max_token_id=700,
                       skipped_lines=(), content_hash="", source_lengths=np.array([len(s) for s in sources]))
    prompts = generation_prompts(cache, np.arange(6))
    assert all(np.array_equal(p.prompt, s) and np.array_equal(p.reference, t)
               for p, s, t in zip(prompts, sources, targets))
    budget = 3 * (15 + NEW_TOKENS)
    assert max(len(b) for b in generation_batches([len(s) for s in sources], budget, NEW_TOKENS)) == 3
    predictions = Predictions(prompts, cache.lines, tokenizer=None, max_tokens=budget)
    batched = predictions.generate(types.SimpleNamespace(lm=lm), NEW_TOKENS, [eos], torch.device("cpu"))
    assert batched == [hf_generate(lm, s, eos) for s in sources]
    assert len({tuple(r) for r in batched}) == len(batched)


def test_generation_on_a_model_set_up_with_the_varlen_training_kernel_runs_on_sdpa_and_puts_it_back(tiny_model_dir):
    """minitrain_varlen (the CUDA default) attends within one packed row given its boundaries; generate passes none."""
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.training import attention
    from minitrain.training.validation import generate_replies

    model_dir = tiny_model_dir("qwen2")
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention.VARLEN)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos = plain.generation_config.eos_token_id
    prompts = [np.arange(3, 12), np.arange(40, 44)]
    replies = generate_replies(types.SimpleNamespace(lm=lm), [prompts], NEW_TOKENS, [eos], torch.device("cpu"))
    assert replies == [hf_generate(plain, p, eos) for p in prompts]
    assert lm.config._attn_implementation == attention.VARLEN  # training goes on with its kernel


def test_batches_keep_batch_times_beams_times_longest_prompt_plus_new_tokens_within_the_budget():
    from minitrain.training.validation import generation_batches

    lengths = [5, 30, 12, 30, 7, 50, 1]
    for budget, beams in ((60, 1), (100, 1), (200, 2), (10, 1)):
        batches = generation_batches(lengths, budget, 10, beams)
        assert sorted(k for b in batches for k in b) == list(range(len(lengths)))  # each prompt once
        for b in batches:
            assert len(b) == 1 or len(b) * beams * (max(lengths[k] for k in b) + 10) <= budget
    assert generation_batches(lengths, 100, 10) == [[5], [1, 3], [2, 4, 0, 6]]  # longest first, then greedy


# ---------------------------------------------------------------------------------------------------------------
# Early stopping and the best export following a ROUGE figure


def fake_validator(metric: str, patience: int, min_delta: float, results: list[tuple[float, float]]):
    """A Validator whose evaluations give these (validation loss, rougeL) figures, in turn."""
    from minitrain.training.validation import EarlyStopping, ValidationResult, Validator

    figures = iter(results)

    class Set:
        def evaluate(self, model, device):
            loss, rouge = next(figures)
            return ValidationResult(loss, 10, [], {"rougeL": rouge, "rouge1": rouge})

    return Validator(Set(), 1, EarlyStopping(patience, min_delta, metric), metric)


def test_early_stopping_and_the_best_export_follow_rouge_higher_is_better(tmp_path):
    # The loss falls throughout; rougeL peaks at the second evaluation, and 40.3 is within min delta of 40.
    results = [(3.0, 20.0), (2.5, 40.0), (2.0, 30.0), (1.5, 40.3)]
    validator = fake_validator("rougeL", patience=2, min_delta=0.5, results=results)
    best, stopped_at = [], None
    for samples in (10, 20, 30, 40):
        validator.run(None, None, samples)
        if validator.export_saved(tmp_path / f"samples_{samples}", samples):
            best.append(samples)
        if validator.should_stop:
            stopped_at = samples
            break
    assert best == [10, 20, 40]  # the best export: higher rougeL (40.3 > 40.0 is a better export, not an improvement)
    assert stopped_at == 40 and (validator.stopper.best, validator.stopper.best_samples) == (40.0, 20)
    assert "the rougeL has not improved on its best (rougeL 40.00 at 20 samples) by more than 0.5" in \
        validator.stop_message(4)
    assert f"best checkpoint {tmp_path / 'samples_40'} (rougeL 40.30)" in validator.summary()
    assert validator.best_export_loss == 1.5  # the loss of the export chosen by rougeL

    # The same figures followed by the loss: every evaluation improves, the last export is the best.
    loss_validator = fake_validator("validation_loss", patience=2, min_delta=0.0, results=results)
    for samples in (10, 20, 30, 40):
        loss_validator.run(None, None, samples)
        loss_validator.export_saved(tmp_path / f"samples_{samples}", samples)
    assert not loss_validator.should_stop and loss_validator.best_export == str(tmp_path / "samples_40")

    # A checkpoint's state resumes the count; one written before --early-stopping-metric is read as the loss's.
    resumed = fake_validator("rougeL", patience=2, min_delta=0.5, results=[(1.0, 39.0)])
    resumed.load_state_dict(json.loads(json.dumps(validator.state_dict())))
    assert (resumed.stopper.best, resumed.stopper.evaluations_without_improvement) == (40.0, 2)
    old = {"last_samples": 30, "last_loss": 2.0, "best_checkpoint": "hf_format/samples_20", "best_checkpoint_loss": 2.5,
           "stopper": {"patience": 2, "min_delta": 0.0, "best_loss": 2.0, "best_samples": 30,
                       "evaluations_without_improvement": 0}}
    from_old = fake_validator("validation_loss", patience=2, min_delta=0.0, results=[(2.2, 0.0)])
    from_old.load_state_dict(old)
    assert (from_old.best_export, from_old.best_export_value, from_old.stopper.best) == ("hf_format/samples_20", 2.5,
                                                                                          2.0)
    from_old.run(None, None, 40)  # 2.2 is no improvement on 2.0 and no better export than 2.5's
    assert from_old.stopper.evaluations_without_improvement == 1
    assert from_old.export_saved(Path("hf_format/samples_40"), 40)  # 2.2 < 2.5
    # Followed by another metric now (--allow-config-change): that best starts over.
    switched = fake_validator("rougeL", patience=2, min_delta=0.0, results=[])
    switched.load_state_dict(old)
    assert switched.best_export is None and switched.stopper.best is None and switched.last_samples == 30


def test_a_rouge_stopping_metric_without_eval_metric_is_a_one_line_error_and_threshold_is_min_delta(tmp_path,
                                                                                                      capsys):
    import train
    from tests.test_train import write_data

    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    common = ["--data-path", str(data), "--model-name-or-path", str(tmp_path), "--output-dir", str(tmp_path / "out"),
              "--batch-size", "4", "--max-tokens-per-gpu", "64", "--validation-split", "0.5"]
    capsys.readouterr()
    assert train.main([*common, "--early-stopping-metric", "rougeL", "--eval-num-beams", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--early-stopping-metric rougeL needs --eval-metric rouge" in err
    assert "--eval-num-beams must be >= 1, got 0" in err
    assert not (tmp_path / "out").exists()

    config = train.parse_args([*common, "--early-stopping-threshold", "0.25", "--eval-metric", "rouge"])
    assert config.early_stopping_min_delta == 0.25 and config.eval_num_beams == 1
    assert config.early_stopping_metric == "validation_loss"

    # On resume: another stopping metric changes the run (its saved best is the old metric's); the eval flags do not.
    from dataclasses import asdict

    from minitrain.training import checkpoint

    saved = asdict(config)
    [problem] = checkpoint.config_problems(saved, {**saved, "early_stopping_metric": "rougeL"}, "x", "x", False)
    assert problem.startswith("--early-stopping-metric validation_loss -> rougeL: the resumed run would differ")
    assert checkpoint.config_problems(saved, {**saved, "eval_metric": None, "eval_num_beams": 4}, "x", "x", False) == []
    older = {k: v for k, v in saved.items() if k not in ("eval_metric", "eval_num_beams", "early_stopping_metric")}
    assert checkpoint.config_problems({**checkpoint.ADDED_LATER, **older}, saved, "x", "x", False) == []
