"""Per-rank loading (minitrain/training/loading.py): no rank holds the whole model while it is built.

On 2 ranks with a random Llama of ~300M parameters, by the end of build_model (before any optimizer state exists)
rank 0's peak resident memory exceeds rank 1's by at most a tenth of the fp32 model's size (with rank 0 loading the
whole model and broadcasting it, it was ~0.4x). The worker is this file run under torchrun, through build_model.
"""

import json
import resource
import sys
from pathlib import Path

from tests.test_train import torchrun

LLAMA_300M = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True, max_position_embeddings=512)


def build_worker(model_dir: str, out: str) -> None:
    import torch

    from minitrain.training.adapter import FullFineTuning
    from minitrain.training.config import TrainConfig
    from minitrain.training.distributed import cleanup_distributed, init_distributed, print0
    from minitrain.training.model import build_model

    world = init_distributed("gloo")
    config = TrainConfig(data_path="unused.jsonl", model_name_or_path=model_dir, output_dir=out, batch_size=2,
                         max_tokens_per_gpu=64, activation_checkpointing=False)
    model = build_model(config, world, FullFineTuning())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    params = sum(p.numel() for p in model.parameters())  # DTensors count their global size
    with open(f"{out}.{world.rank}", "w") as f:
        json.dump({"peak_rss": peak, "parameters": params}, f)
    print0(f"peak resident memory by the end of build_model: rank {world.rank} {peak / 1e9:.2f} GB")
    del model
    torch.distributed.barrier()
    cleanup_distributed()


def test_rank_0_holds_no_more_than_a_tenth_of_the_model_beyond_rank_1_while_building(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    model_dir = tmp_path / "llama300m"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_300M), dtype=torch.bfloat16)
    model.save_pretrained(model_dir)  # bf16 on disk; trained in fp32
    n_params = sum(p.numel() for p in model.parameters())
    del model
    AutoTokenizer.from_pretrained(tokenizer_dir("chatml")).save_pretrained(model_dir)
    out = tmp_path / "report"
    run = torchrun([__file__, str(model_dir), str(out)], timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 loads the whole model" not in run.stdout  # the per-rank path, not the fallback
    rank0, rank1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    fp32_bytes = 4 * n_params
    assert rank0["parameters"] == n_params and 250e6 < n_params < 400e6
    print(f"peak RSS by the end of build_model: rank 0 {rank0['peak_rss'] / 1e9:.2f} GB, rank 1 "
          f"{rank1['peak_rss'] / 1e9:.2f} GB; fp32 model {fp32_bytes / 1e9:.2f} GB")
    assert rank0["peak_rss"] - rank1["peak_rss"] <= 0.1 * fp32_bytes


if __name__ == "__main__":
    build_worker(sys.argv[1], sys.argv[2])
