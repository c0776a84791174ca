"""Encoder-decoder edge cases, each a bug an independent review found (each test failed on the reviewed code):

1. A BART target longer than the model's learned positions crashes mid-run with a traceback (IndexError in the
   position embedding) instead of a one-line `train.py: error: FILE:LINE: ...` before training.
2. Stage 1 appends a second EOS after a tokenizer's target suffix that already holds EOS (mBART-cc25: `X </s>
   lang_code`), so the decoder start (mBART: the target's last token) becomes </s> instead of the language id.
3. --eval-num-beams 1 ("greedy") is overridden by the checkpoint's generation_config (num_beams,
   no_repeat_ngram_size, ...): transformers fills arguments left at their defaults from the model's own config.
4. ROUGE of an exact non-Latin prediction is 0 (rouge_score's default tokenizer keeps only [a-z0-9]), so ROUGE and
   early stopping on it are silently meaningless for mT5/mBART/Marian outputs in most languages.
"""

import json
import shutil

import numpy as np
import pytest

from tests.tiny_models import build_tiny_seq2seq


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory, tokenizer_dir):
    return build_tiny_seq2seq("bart", tmp_path_factory.mktemp("review"), tokenizer_dir("chatml"))


def test_a_target_longer_than_barts_positions_is_a_one_line_error_not_a_traceback(tmp_path, bart_dir, capsys):
    from transformers import AutoConfig

    import train

    limit = AutoConfig.from_pretrained(bart_dir).max_position_embeddings  # 512 in the tiny BART
    rng = np.random.default_rng(0)
    data = tmp_path / "rows.jsonl"
    source, target = rng.integers(3, 700, 8).tolist(), rng.integers(3, 700, limit + 20).tolist()
    data.write_text(json.dumps({"input_ids": source, "labels": target, "len": len(source),
                                "target_len": len(target), "num_loss_counted_tokens": len(target)}) + "\n")
    code = train.main(["--data-path", str(data), "--model-name-or-path", str(bart_dir), "--output-dir",
                       str(tmp_path / "out"), "--batch-size", "1", "--max-tokens-per-gpu", "2000", "--max-steps", "1",
                       "--no-activation-checkpointing"])  # in this process: a traceback fails the test
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:1: the target has {limit + 20} tokens, more than the model's {limit}" in err, err


def test_stage_1_keeps_a_target_suffix_that_already_holds_eos(capsys, tmp_path, bart_dir):
    """mBART-cc25's tokenizer encodes a target as `tokens </s> tgt_lang_code`; the row's labels must be exactly that
    (the model's shift_tokens_right takes the last token, the language id, as the decoder start)."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    import process_data

    model = tmp_path / "mbart-like"
    shutil.copytree(bart_dir, model)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    eos, lang = "<|im_end|>", "<|im_start|>"  # <|im_start|> plays the target language code (e.g. ro_RO)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos} {lang}", special_tokens=[(t, tokenizer.token_to_id(t)) for t in (eos, lang)])
    tokenizer.save(str(model / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(model)
    want = tok(text_target="A cat sat.")["input_ids"]
    assert want[-2:] == [tok.eos_token_id, tok.convert_tokens_to_ids(lang)]
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"source": "The cat sat on the mat.", "target": "A cat sat."}) + "\n")
    out = tmp_path / "out.jsonl"
    try:
        process_data.main(["--input-file", str(data), "--output-file", str(out), "--model-name-or-path", str(model),
                           "--num-workers", "1", "--max-sample-num-tokens", "64"])
    except SystemExit as e:
        assert e.code in (0, None)
    capsys.readouterr()
    row = json.loads(out.read_text().splitlines()[0])
    assert row["labels"] == want  # reviewed code: want + [eos]


def test_eval_num_beams_1_is_greedy_whatever_the_checkpoints_generation_config_says(bart_dir):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from minitrain.training.seq2seq import Seq2SeqLM
    from minitrain.training.validation import generate_replies

    lm = AutoModelForSeq2SeqLM.from_pretrained(bart_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 700, n) for n in (9, 5)]
    eos = [lm.config.eos_token_id]
    greedy = generate_replies(Seq2SeqLM(lm), [prompts], 8, eos, torch.device("cpu"), num_beams=1)
    # The truth from Hugging Face's own generate, one prompt at a time (no padding), greedy, with the checkpoint's
    # generation config still at its defaults: the decoder's tokens after its start token, cut after the first end.
    assert lm.generation_config.num_beams in (None, 1) and not lm.generation_config.do_sample
    truth = []
    with torch.no_grad():
        for prompt in prompts:
            out = lm.generate(input_ids=torch.tensor(prompt)[None], do_sample=False, num_beams=1, max_new_tokens=8)
            reply = out[0, 1:].tolist()
            truth.append(reply[: reply.index(eos[0]) + 1] if eos[0] in reply else reply)
    assert greedy == truth and max(len(r) for r in truth) >= 4, (greedy, truth)  # replies with content to compare
    # what e.g. facebook/bart-large-cnn's generation_config.json holds (num_beams 4, no_repeat_ngram_size 3, ...)
    g = lm.generation_config
    g.num_beams, g.no_repeat_ngram_size, g.min_length, g.repetition_penalty, g.length_penalty = 3, 1, 7, 3.0, 2.0
    again = generate_replies(Seq2SeqLM(lm), [prompts], 8, eos, torch.device("cpu"), num_beams=1)
    assert again == greedy


def test_rouge_of_an_exact_non_latin_prediction_is_not_zero():
    from minitrain.training.validation import rouge_scores

    texts = ["Привет мир, как дела", "東京は日本の首都です"]
    assert rouge_scores(texts, texts)["rougeL"] == pytest.approx(100.0)  # reviewed code: 0.0


def test_rouge_words_are_rouge_scores_own_on_ascii_text():
    import random
    import string

    from nltk.stem import porter
    from rouge_score import tokenize

    from minitrain.training.validation import RougeTokens

    ours, stemmer, rng = RougeTokens(), porter.PorterStemmer(), random.Random(0)
    alphabet = string.ascii_letters + string.digits + " _-.,;:'\"!?\n\t()[]"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["The runners were running quickly", "A cat's 3 hats_and-more"]
    for text in texts:
        assert ours.tokenize(text) == tokenize.tokenize(text, stemmer), text
    assert ours.tokenize("Größe Café, 東京") == ["größe", "café", "東", "京"]


def test_a_pad_less_config_and_an_over_long_generation_are_refused_in_one_line(tmp_path, bart_dir, capsys):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    import train
    from minitrain.training.families import ModelError
    from minitrain.training.seq2seq import Seq2SeqLM, check_loss_is_the_models_own

    lm = AutoModelForSeq2SeqLM.from_pretrained(bart_dir)
    lm.config.pad_token_id = None
    with pytest.raises(ModelError, match="no pad_token_id.*set pad_token_id in config.json"):
        check_loss_is_the_models_own(Seq2SeqLM(lm), torch.device("cpu"))
    data = tmp_path / "rows.jsonl"
    data.write_text(2 * (json.dumps({"input_ids": [5, 6], "labels": [7, 8], "len": 2, "target_len": 2}) + "\n"))
    code = train.main(["--data-path", str(data), "--model-name-or-path", str(bart_dir), "--output-dir",
                       str(tmp_path / "out"), "--batch-size", "1", "--max-tokens-per-gpu", "64", "--max-steps", "1",
                       "--validation-split", "0.5", "--eval-max-new-tokens", "600"])
    err = capsys.readouterr().err
    assert code == 2 and "--eval-max-new-tokens 600: the decoder has 512 positions" in err, err


def test_stage_1_refuses_limits_beyond_the_models_positions(tmp_path, bart_dir, capsys):
    import process_data

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"source": "a b", "target": "c"}) + "\n")
    with pytest.raises(SystemExit) as exit_:  # in this process: a traceback (any other exception) fails the test
        process_data.main(["--input-file", str(data), "--output-file", str(tmp_path / "out.jsonl"),
                           "--model-name-or-path", str(bart_dir), "--num-workers", "1", "--max-source-tokens", "64",
                           "--max-target-tokens", "600"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err[-1500:]
    assert "--max-target-tokens 600 is more than bart's 512 positions" in err
    assert not (tmp_path / "out.jsonl").exists()
