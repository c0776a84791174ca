"""A small T5, built from its config with random weights, and a synthetic summarization task, for the encoder-decoder
example (examples/seq2seq_t5/run.sh). No encoder-decoder weights ship in any package here, so the example trains
one from scratch; the same commands work unchanged with a real checkpoint (e.g. google/flan-t5-base saved to a
local folder) as --model-name-or-path.

    python examples/seq2seq_t5/make_example.py OUT

writes OUT/tiny-t5 (config, random weights, a word-level tokenizer that appends </s> like T5's), OUT/train.jsonl
(4,000 rows) and OUT/valid.jsonl (200 rows) of {"source", "target"}. The task: a "report" of 12-24 words, some of
them names of places and things; its summary lists the names, in order ("summarize: ..." -> "paris river tower").
Copying through cross-attention is learnable in minutes on 2 CPU cores; ROUGE rises from ~0 to well above 50.
"""

import json
import random
import sys
from pathlib import Path

NAMES = ("paris rome oslo lima cairo delhi tokyo quito river tower bridge castle harbor valley forest desert island "
         "market temple garden").split()
FILLER = ("the a of and in to was is near by with from old new big small north south east west over under "
          "after before people walked saw found built said").split()
SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0 (also the decoder start), eos 1, unk 2


def sample(rng: random.Random) -> dict:
    words = [rng.choice(NAMES) if rng.random() < 0.25 else rng.choice(FILLER) for _ in range(rng.randint(12, 24))]
    names = [w for w in words if w in NAMES] or ["none"]
    return {"source": " ".join(words), "target": " ".join(names)}


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, *NAMES, *FILLER, "none", "summarize", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, vocab_size: int) -> None:
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=3,
                      num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                               max_new_tokens=32)
    model.save_pretrained(folder)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out / "tiny-t5")
    build_model(out / "tiny-t5", len(tokenizer))
    rng = random.Random(0)
    for name, count in (("train.jsonl", 4000), ("valid.jsonl", 200)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(sample(rng)) + "\n" for _ in range(count))
    print(f"wrote {out / 'tiny-t5'}, {out / 'train.jsonl'}, {out / 'valid.jsonl'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/seq2seq_t5/make_example.py OUT_DIR")
    main(Path(sys.argv[1]))
