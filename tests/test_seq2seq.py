"""Encoder-decoder training (T5, BART): padded micro-batches, the exact loss and gradient against the model's own
forward one sample at a time, 1 vs 2 processes, the planner's padded packing, exports, LoRA, and refusals.

The truth is always the Hugging Face model's own `loss` (its forward with `labels`: the mean CE over the sample's
target tokens), computed here sample by sample; rows are written by this file (stage 1 is tested elsewhere).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import ROOT
from tests.tiny_models import build_tiny_seq2seq, seq2seq_zoo

BATCH = 8


def write_rows(path: Path, num_samples: int, vocab: int, seed: int = 0) -> Path:
    """Seq2seq rows as process_data.py writes them: input_ids = the source, labels = the target (all trained)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(num_samples):
            source = rng.integers(3, vocab, int(rng.integers(3, 30))).tolist()
            target = rng.integers(3, vocab, int(rng.integers(2, 14))).tolist()
            f.write(json.dumps({"input_ids": source, "labels": target, "len": len(source), "target_len": len(target),
                                "num_loss_counted_tokens": len(target)}) + "\n")
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("seq2seq")
    built = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_seq2seq(arch, root, tokenizer_dir("chatml"))
        return built[arch]

    return get


def own_losses(lm, rows: list[dict]):
    """Each sample's target-token count and the model's own loss (mean CE over its target), one sample at a time."""
    import torch

    out = []
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        out.append((len(row["labels"]), lm(input_ids=ids, labels=labels, use_cache=False).loss))
    return out


def config_for(model_dir: Path, data: Path, out: Path, **kw):
    import train

    args = dict(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(out), batch_size=BATCH,
                max_tokens_per_gpu=96, activation_checkpointing=False, save_dtype="float32")
    return train.TrainConfig(**{**args, **kw})


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("reduction", ["tokens", "sequences"])
def test_padded_micro_batches_give_the_loss_and_gradient_of_one_sample_at_a_time(tmp_path, seq2seq_dir, arch,
                                                                                  reduction):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.objectives import build_objective
    from sampler import pack_step

    model_dir = seq2seq_dir(arch)
    data = write_rows(tmp_path / "rows.jsonl", BATCH, vocab=700)
    config = config_for(model_dir, data, tmp_path / "out", loss_reduction=reduction)
    world = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, world, vocab_size=720)
    lm_config = AutoModelForSeq2SeqLM.from_pretrained(model_dir).config
    objective = build_objective(config, lm_config)
    indices = np.arange(BATCH)
    packs = [micro[0] for micro in pack_step(objective.costs(cache)[indices], 1, 96)]
    assert len(packs) >= 3 and sorted(np.concatenate(packs).tolist()) == list(range(BATCH))  # several, each padded
    assert any(cache.padded_tokens(p) > cache.lengths[p].sum() for p in packs)
    model = build_model(config, world)
    units = objective.step_units(cache, indices)
    loss = train.forward_backward(model, objective, cache, packs, units, 1, world.device)[0].item() / units

    lm = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    losses = own_losses(lm, rows_of(data))
    if reduction == "tokens":
        truth = sum(n * own for n, own in losses) / sum(n for n, _ in losses)
    else:
        truth = sum(own for _, own in losses) / len(losses)
    truth.backward()
    assert loss == pytest.approx(truth.item(), rel=1e-5)
    trained = dict(model.lm.named_parameters())
    floor = 1e-4 * max(p.grad.abs().max().item() for p in lm.parameters() if p.grad is not None)  # see grad_worker
    compared = 0
    for name, p in lm.named_parameters():
        if p.grad is None:
            continue
        assert trained[name].grad is not None, name
        err = (trained[name].grad - p.grad).abs().max().item()
        assert err <= 1e-5 * max(p.grad.abs().max().item(), floor), (name, err)
        compared += 1
    assert compared > 10


SKEWED = [[[0, 1, 2], [3, 4]], [[5, 6, 7], []]]  # rank 0: two padded micro-batches; rank 1: one and a dummy


def grad_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSeq2SeqLM

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import cleanup_distributed, init_distributed
    from minitrain.training.model import build_model
    from minitrain.training.objectives import build_objective

    d = init_distributed("auto")
    config = config_for(Path(model_dir), Path(data_path), Path(out_dir))
    cache = load_data(config, d, vocab_size=720)
    lm = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    objective = build_objective(config, lm.config)
    units = objective.step_units(cache, np.arange(BATCH))
    report = {}
    if d.is_main:  # the truth: the model's own loss, one sample at a time, token-weighted
        losses = own_losses(lm, rows_of(Path(data_path)))
        truth = sum(n * own for n, own in losses) / units
        truth.backward()
        report["truth"] = truth.item()
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
        model = build_model(replace(config, fsdp_sharding_strategy=strategy), d)
        # every rank decodes with the checkpoint's generation_config.json (the test gives it a forced first token)
        report.setdefault("forced_bos", []).append(model.lm.generation_config.forced_bos_token_id)
        packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[d.rank]]
        local = train.forward_backward(model, objective, cache, packs, units, d.world_size, d.device)
        dist.all_reduce(local)
        grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
        if d.is_main:
            # relative to each parameter's own gradient, floored at 1e-4 of the largest: a key projection's bias
            # has a zero true gradient (softmax ignores a shift common to a query's scores), only rounding noise
            floor = 1e-4 * max(p.grad.abs().max().item() for p in lm.parameters() if p.grad is not None)
            rel = [((grads[n] - p.grad).abs().max() / max(p.grad.abs().max().item(), floor)).item()
                   for n, p in lm.named_parameters() if p.grad is not None]
            report[strategy] = {"loss": local.item() / units, "max_rel": max(rel), "compared": len(rel)}
    forced = [None] * d.world_size
    dist.all_gather_object(forced, report["forced_bos"])
    if d.is_main:
        report["forced_bos"] = forced
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_two_ranks_with_skewed_padded_micro_batches_give_the_single_process_gradient(tmp_path, seq2seq_dir, arch,
                                                                                      two_ranks):
    import shutil

    data = write_rows(tmp_path / "rows.jsonl", BATCH, vocab=700, seed=1)
    model_dir = shutil.copytree(seq2seq_dir(arch), tmp_path / arch)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**generation, "forced_bos_token_id": 7}))
    run = two_ranks.run(__name__, "grad_worker", [model_dir, data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["forced_bos"] == [[7, 7, 7], [7, 7, 7]]  # rank 1 too: it generates its share of the predictions
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
        r = report[strategy]
        assert r["compared"] > 10 and r["loss"] == pytest.approx(report["truth"], rel=1e-5), (strategy, r)
        assert r["max_rel"] < 1e-5, (strategy, r)


def test_padded_planning_fits_the_budget_groups_similar_lengths_and_covers_every_sample():
    from sampler import MultipackPlanner

    rng = np.random.default_rng(0)
    lengths = np.stack([rng.integers(1, 200, 500), rng.integers(1, 60, 500)], axis=1)
    planner = MultipackPlanner(lengths, 64, 1024, 2, seed=3)
    padded = sorted_padding = 0
    for step in range(planner.steps_per_epoch):
        plan = planner.plan(step)
        seen = np.concatenate([p for micro in plan.micro_batches for p in micro])
        assert len(seen) == plan.num_samples == len(set(seen.tolist()))
        for micro in plan.micro_batches:
            assert len(micro) == 2  # every rank has a pack in every micro-step
            for p in micro:
                cost = len(p) * int(lengths[p].max(axis=0).sum()) if len(p) else 0
                assert cost <= 1024
                padded += cost
        # against packing the same samples in their shuffled order (no grouping by length)
        batch, longest = [], np.zeros(2, np.int64)
        for i in planner.epoch_permutation(0)[step * 64 : (step + 1) * 64]:
            grown = np.maximum(longest, lengths[i])
            if batch and (len(batch) + 1) * grown.sum() > 1024:
                sorted_padding += len(batch) * int(longest.sum())
                batch, grown = [], lengths[i]
            batch.append(i)
            longest = grown
        sorted_padding += len(batch) * int(longest.sum())
    real = int(lengths.sum())
    assert padded < sorted_padding  # grouping similar lengths pads less than taking them as they come
    assert real / padded > 0.7, real / padded
    with pytest.raises(Exception, match="longer than --max-tokens-per-gpu"):
        MultipackPlanner(np.array([[900, 200]]), 1, 1024, 1)  # 1,100 tokens alone


def run_train(args: list[str], capsys) -> tuple[int, str]:
    """train.py's main(args) in this process (the command line is what these tests are about, not a new interpreter
    importing torch): its exit code and stderr."""
    import train

    capsys.readouterr()
    code = train.main(args)
    return code, capsys.readouterr().err


def test_train_cli_step_loss_is_the_models_own_and_the_export_loads_and_generates(tmp_path, seq2seq_dir, capsys):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = seq2seq_dir("t5")
    data = write_rows(tmp_path / "rows.jsonl", 24, vocab=700, seed=2)
    out = tmp_path / "out"
    code, err = run_train(["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
                           "--batch-size", "8", "--max-tokens-per-gpu", "128", "--max-steps", "3", "--learning-rate",
                           "1e-3", "--save-dtype", "float32"], capsys)
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows_of(data)
    lm = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    first = [rows[line - 1] for line in records[0]["sample_lines"]]
    with torch.no_grad():  # step 1: the model's own loss over the step's samples (its token mean, all of them)
        losses = own_losses(lm, first)
    truth = sum(n * own.item() for n, own in losses) / sum(n for n, _ in losses)
    assert records[0]["loss"] == pytest.approx(truth, rel=1e-5)
    assert records[0]["trained_tokens"] == sum(len(r["labels"]) for r in first)
    # each step's padded tokens: its micro-batches (the same seeded plan) x (longest source + longest target)
    from sampler import MultipackPlanner

    sizes = np.array([[len(r["input_ids"]), len(r["labels"])] for r in rows])
    planner = MultipackPlanner(sizes, 8, 128, 1, seed=42)
    for r in records:
        plan = planner.plan(r["step"] - 1)
        padded = sum(len(p) * int(sizes[p].max(axis=0).sum()) for micro in plan.micro_batches for p in micro)
        assert r["padded_tokens"] == padded and r["tokens"] == int(sizes[np.concatenate(plan.rank_packs(0))].sum())
        assert r["padding"] == pytest.approx(1 - r["tokens"] / padded) and r["padding"] > 0
    assert records[-1]["loss"] < records[0]["loss"]

    export = out / "hf_format" / "samples_24"
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(export)
    assert reloaded.generation_config.decoder_start_token_id == lm.config.decoder_start_token_id
    tokenizer = AutoTokenizer.from_pretrained(export)
    generated = reloaded.generate(torch.tensor([rows[0]["input_ids"]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 6)  # decoder start + 5 tokens (a random model does not stop early)
    # transformers 5 removed the summarization/translation pipelines; what they did is this: encode, generate, decode
    encoded = tokenizer(["a b c", "d e"], return_tensors="pt", padding=True)
    texts = tokenizer.batch_decode(reloaded.generate(**encoded, max_new_tokens=4, do_sample=False),
                                   skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_lora_trains_only_adapters_on_t5_and_exports_a_seq2seq_adapter(tmp_path, seq2seq_dir, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    model_dir = seq2seq_dir("t5")
    data = write_rows(tmp_path / "rows.jsonl", 16, vocab=700, seed=3)
    out = tmp_path / "out"
    code, err = run_train(["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
                           "--batch-size", "8", "--max-tokens-per-gpu", "128", "--max-steps", "2", "--learning-rate",
                           "1e-2", "--lora", "--lora-r", "4", "--save-dtype", "float32"], capsys)
    assert code == 0, err[-3000:]
    export = out / "hf_format" / "samples_16"
    adapter_config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_2_SEQ_LM"
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([rows_of(data)[0]["input_ids"]])
    labels = torch.tensor([rows_of(data)[0]["labels"]])
    with torch.no_grad():
        base_loss = base(input_ids=ids, labels=labels).loss.item()
        peft_loss = PeftModel.from_pretrained(base, export / "adapter")(input_ids=ids, labels=labels).loss.item()
        merged = AutoModelForSeq2SeqLM.from_pretrained(export, dtype=torch.float32)
        merged_loss = merged(input_ids=ids, labels=labels).loss.item()
    assert abs(peft_loss - base_loss) > 1e-4  # the adapters changed the model
    assert merged_loss == pytest.approx(peft_loss, rel=1e-5)


def test_refusals_name_the_problem_in_one_line(tmp_path, seq2seq_dir, tiny_model_dir, capsys):
    import train

    t5 = seq2seq_dir("t5")
    seq2seq_rows = write_rows(tmp_path / "rows.jsonl", 4, vocab=700)
    causal_rows = tmp_path / "causal.jsonl"
    causal_rows.write_text(json.dumps({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "len": 4}) + "\n")
    masked = tmp_path / "masked.jsonl"
    masked.write_text(json.dumps({"input_ids": [5, 6], "labels": [7, -100], "len": 2, "target_len": 2}) + "\n")
    common = ["--batch-size", "2", "--max-tokens-per-gpu", "128", "--max-steps", "1"]
    cases = [
        ([str(causal_rows), str(t5)], [], "causal-LM samples"),
        ([str(seq2seq_rows), str(tiny_model_dir("llama"))], [], "encoder-decoder (source-target) samples"),
        ([str(seq2seq_rows), str(t5)], ["--objective", "simpo"], "--objective simpo trains causal LMs"),
        ([str(masked), str(t5)], [], "masked.jsonl:1: 'labels' must be token ids"),
    ]
    for k, ((data, model), extra, expected) in enumerate(cases):  # in this process: an exception fails the test
        code = train.main(["--data-path", data, "--model-name-or-path", model, "--output-dir",
                           str(tmp_path / f"o{k}"), *common, *extra])
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (expected, lines)


def example_task(tmp_path: Path, train_rows: int, valid_rows: int) -> tuple[Path, Path, Path]:
    """examples/seq2seq_t5's small T5 and synthetic task, through process_data.py: (model, train rows, valid rows)."""
    import importlib.util

    import process_data

    spec = importlib.util.spec_from_file_location("make_example", ROOT / "examples" / "seq2seq_t5" / "make_example.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    make.main(tmp_path)
    paths = []
    for name, count in (("train", train_rows), ("valid", valid_rows)):
        pairs = tmp_path / f"{name}_head.jsonl"
        pairs.write_text("".join((tmp_path / f"{name}.jsonl").read_text().splitlines(keepends=True)[:count]))
        rows = tmp_path / f"{name}_rows.jsonl"
        try:  # in this process: the run is what these tests are about, not the interpreter's start
            process_data.main(["--input-file", str(pairs), "--output-file", str(rows), "--model-name-or-path",
                               str(tmp_path / "tiny-t5"), "--source-prefix", "summarize: ", "--max-source-tokens",
                               "64", "--max-target-tokens", "32", "--num-workers", "1"])
        except SystemExit as e:
            assert e.code in (0, None), e
        paths.append(rows)
    return tmp_path / "tiny-t5", *paths


def test_rouge_of_a_t5_run_is_rouge_score_on_its_saved_predictions_on_1_and_2_processes(tmp_path, capsys, two_ranks):
    from rouge_score import rouge_scorer

    import train

    model, train_rows, valid_rows = example_task(tmp_path, 640, 24)
    args = ["--data-path", str(train_rows), "--validation-data-path", str(valid_rows),
            "--model-name-or-path", str(model), "--batch-size", "32", "--max-tokens-per-gpu", "1024",
            "--learning-rate", "3e-3", "--num-warmup-steps", "5", "--max-steps", "30", "--eval-every-samples", "480",
            "--eval-metric", "rouge", "--num-eval-generations", "0", "--early-stopping-metric", "rougeL",
            "--early-stopping-patience", "5",
            "--save-dtype", "float32"]
    assert train.main([*args, "--output-dir", str(tmp_path / "one")]) == 0, capsys.readouterr().err[-3000:]
    two = two_ranks.train([*args, "--output-dir", str(tmp_path / "two")], tmp_path)  # the shared 2-rank job
    assert two.returncode == 0, two.stderr[-3000:]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for out in ("one", "two"):
        records = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        evaluated = [r for r in records if "validation_rougeL" in r]
        assert [r["samples_seen"] for r in evaluated] == [480, 960]
        for r in evaluated:
            saved = [json.loads(line) for line in
                     (tmp_path / out / "predictions" / f"samples_{r['samples_seen']}.jsonl").read_text().splitlines()]
            assert len(saved) == 24
            scores = [scorer.score(p["reference"], p["prediction"]) for p in saved]
            for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
                expected = 100 * sum(s[key].fmeasure for s in scores) / len(scores)
                assert r[f"validation_{key}"] == pytest.approx(expected, abs=1e-9), (out, key)
        assert evaluated[-1]["validation_rougeL"] > 10  # it learned something (12-14), so the comparison is not of 0s
    first, second = ([json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
                     for out in ("one", "two"))
    # the same losses on 2 FSDP2 ranks; rounding differences (~1e-7) grow at this learning rate, so the first steps
    assert all(b["loss"] == pytest.approx(a["loss"], rel=1e-5) for a, b in zip(first[:10], second[:10]))
    # The predictions are what the exported model (the weights evaluated last) generates, one source at a time
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    sources = [row["input_ids"] for row in rows_of(valid_rows)]
    for out in ("one", "two"):
        lm = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / out / "hf_format" / "samples_960", dtype=torch.float32)
        saved = [json.loads(line)["prediction"] for line in
                 (tmp_path / out / "predictions" / "samples_960.jsonl").read_text().splitlines()]
        with torch.no_grad():
            alone = [tokenizer.decode(lm.generate(torch.tensor([s]), max_new_tokens=32, do_sample=False)[0],
                                      skip_special_tokens=True) for s in sources]
        assert saved == alone, out

def padded_batch_losses(model, lm, vocab: int):
    """(plain CE of each target token with each sample alone through lm's own forward, the trainer's CE of each
    target token on the same samples as one padded micro-batch)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    shapes = ((6, 4), (11, 8), (3, 6))  # (source, target) tokens: every row of the batch padded somewhere
    samples = [(torch.randint(8, vocab, (s,), generator=g), torch.randint(8, vocab, (t,), generator=g))
               for s, t in shapes]
    pad = lm.config.pad_token_id
    ids = torch.full((len(shapes), max(s for s, _ in shapes)), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(shapes), max(t for _, t in shapes)), -100)
    for row, (source, target) in enumerate(samples):
        ids[row, : len(source)], mask[row, : len(source)], labels[row, : len(target)] = source, 1, target
    flat = torch.nonzero(labels.reshape(-1) != -100)[:, 0]
    model.eval()
    with torch.no_grad():
        trainer = torch.full((len(flat),), float("nan"))
        total = model(ids, mask, labels, flat, labels.reshape(-1)[flat], row_ce_out=trainer)
        truth = torch.cat([F.cross_entropy(lm(input_ids=source[None], labels=target[None], use_cache=False)
                                           .logits[0].float(), target, reduction="none") for source, target in samples])
    torch.testing.assert_close(total, truth.sum(), rtol=1e-5, atol=1e-4)
    return truth, trainer


@pytest.mark.parametrize("family", sorted(seq2seq_zoo(300)))
def test_every_encoder_decoder_family_passes_the_probe_and_a_wrong_head_is_refused(family):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from minitrain.training.families import LogitTransform, ModelError
    from minitrain.training.seq2seq import Seq2SeqLM, check_loss_is_the_models_own

    torch.manual_seed(0)
    lm = AutoModelForSeq2SeqLM.from_config(seq2seq_zoo(300)[family])
    model = Seq2SeqLM(lm)
    result = check_loss_is_the_models_own(model, torch.device("cpu"))
    assert result.trainer_loss == pytest.approx(result.own_loss, rel=1e-5)
    # The truth, computed here rather than taken from the probe: each sample alone through the model's own forward
    # (its logits: head, scaling and bias as it applies them), then plain cross-entropy, per target token, against
    # the trainer on a padded batch. The head is scaled first until the logits are trained-size (std ~4, far from
    # uniform), so that a wrong logit, token or sample shows in the loss.
    probe_ids = torch.arange(8, 20)[None]
    with torch.no_grad():
        for _ in range(4):
            std = lm(input_ids=probe_ids, labels=probe_ids, use_cache=False).logits.float().std().item()
            lm.get_output_embeddings().weight.mul_(min(4.0 / std, 50.0))
        if getattr(lm, "final_logits_bias", None) is not None:  # BART family: zeros until trained
            lm.final_logits_bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    truth, trainer = padded_batch_losses(model, lm, vocab=300)
    assert truth.std() > 1.0, truth  # per-token losses far apart
    torch.testing.assert_close(trainer, truth, rtol=1e-5, atol=1e-5)
    wrong = LogitTransform(scale=0.5 * model.head_loss.transform.scale)
    model.head_loss.transform = wrong  # a family rule minitrain got wrong: the probe must say so
    with pytest.raises(ModelError, match=f"model type .*{lm.config.model_type}.*on a padded probe batch"):
        check_loss_is_the_models_own(model, torch.device("cpu"))


if __name__ == "__main__":  # torchrun entry for the two-rank test
    grad_worker(*sys.argv[1:4])
