"""Per-rank loading (minitrain/training/loading.py) and sharded exports (export.write_hf_folder_sharded): no weight
passes through one process.

Exports: on 2 ranks, the export every rank writes its shards of equals the one rank 0 writes from the gathered state
dict (the writer for folders loaded by rank 0, and what every export was before), tensor for tensor and in the
logits of from_pretrained, for full fine-tuning, LoRA's merged model and an encoder-decoder (T5).

On 2 ranks with a random Llama of ~300M parameters, once build_model has the weights in place (where its start-up
probe would begin: it is left out; no optimizer state), rank 0's peak resident memory exceeds rank 1's by at most a
tenth of the fp32 model's size (with rank 0 loading the whole model and broadcasting it: 0.67x). The worker is this
file run under torchrun, through build_model, with glibc's mmap threshold fixed so that peak resident memory is the
memory that was live.
"""

import json
import resource
import sys
from pathlib import Path

from tests.test_train import LIVE_MEMORY_ENV, torchrun

LLAMA_300M = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True, max_position_embeddings=512)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def build_worker(model_dir: str, out: str) -> None:
    import torch

    from minitrain.training import model as model_module
    from minitrain.training.adapter import FullFineTuning
    from minitrain.training.config import TrainConfig
    from minitrain.training.distributed import cleanup_distributed, init_distributed, print0
    from minitrain.training.model import build_model

    world = init_distributed("gloo")
    config = TrainConfig(data_path="unused.jsonl", model_name_or_path=model_dir, output_dir=out, batch_size=2,
                         max_tokens_per_gpu=64, activation_checkpointing=False)
    # The peak when the weights are in place, where the start-up probe would begin: the probe all-gathers the whole
    # model on every rank alike where it fits (distributed.gathered_once), which would hide what loading left on rank
    # 0, and is not what this test is about (5 forwards of 300M parameters), so it does not run
    loaded, probe = [], model_module.start_up_probe
    model_module.start_up_probe = lambda *args: loaded.append(peak_rss())
    try:
        model = build_model(config, world, FullFineTuning())
    finally:
        model_module.start_up_probe = probe
    peak = loaded[0]
    params = sum(p.numel() for p in model.parameters())  # DTensors count their global size
    with open(f"{out}.{world.rank}", "w") as f:
        json.dump({"peak_rss": peak, "parameters": params}, f)
    print0(f"peak resident memory by the end of loading: rank {world.rank} {peak / 1e9:.2f} GB")
    del model
    torch.distributed.barrier()
    cleanup_distributed()


def write_checkpoint(model_dir: Path, llama: dict) -> int:
    """A bf16 Llama checkpoint of config `llama` in `model_dir` (config.json and model.safetensors, the tensors and
    file save_pretrained writes: tied weights once), without building it: the model on the meta device gives the
    names and shapes, each tensor is a constant (building loads no values that matter; HF's random init of 300M
    parameters cost more than writing them). Returns the model's parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**llama), dtype=torch.bfloat16)
    tied = set(model.all_tied_weights_keys)
    model_dir.mkdir(parents=True)
    save_file({name: torch.full(t.shape, 0.02, dtype=t.dtype) for name, t in model.state_dict().items()
               if name not in tied}, model_dir / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(model_dir)  # dtype bfloat16: bf16 on disk; trained in fp32
    return sum(p.numel() for p in model.parameters())


def test_rank_0_holds_no_more_than_a_tenth_of_the_model_beyond_rank_1_while_building(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "llama300m"
    n_params = write_checkpoint(model_dir, LLAMA_300M)
    AutoTokenizer.from_pretrained(tokenizer_dir("chatml")).save_pretrained(model_dir)
    fp32_bytes = 4 * n_params
    # Peak RSS as live memory (LIVE_MEMORY_ENV): with glibc's default, identical runs here differed by -0.2 to +0.8 GB
    # between the ranks, and a run with rank 0 loading the whole model once showed rank 1 higher. As measured here:
    # 1.53 / 1.49 GB (excess 0.04 GB), and 2.32 / 1.25 GB with rank 0 loading the whole model.
    run = torchrun([__file__, str(model_dir), str(tmp_path / "report")], timeout=400, env=LIVE_MEMORY_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 loads the whole model" not in run.stdout  # the per-rank path, not the fallback
    rank0, rank1 = (json.loads(Path(f"{tmp_path / 'report'}.{r}").read_text()) for r in (0, 1))
    assert rank0["parameters"] == n_params and 250e6 < n_params < 400e6
    print(f"peak RSS by the end of loading: rank 0 {rank0['peak_rss'] / 1e9:.2f} GB, rank 1 "
          f"{rank1['peak_rss'] / 1e9:.2f} GB; fp32 model {fp32_bytes / 1e9:.2f} GB")
    assert rank0["peak_rss"] - rank1["peak_rss"] <= 0.1 * fp32_bytes, (rank0, rank1)


EXPORT_CASES = {"full": ("llama", {}), "lora": ("llama", {"lora": True, "lora_init": "random", "lora_r": 4}),
                "t5": ("t5", {})}


def export_worker(cases: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from minitrain.training import export, lora
    from minitrain.training.checkpoint import save_export
    from minitrain.training.config import TrainConfig
    from minitrain.training.distributed import cleanup_distributed, init_distributed

    world = init_distributed("gloo")
    report = {}
    for case, model_dir in json.loads(cases).items():
        flags = EXPORT_CASES[case][1]
        config = TrainConfig(data_path="unused.jsonl", model_name_or_path=model_dir, output_dir=f"{out}/{case}",
                             batch_size=2, max_tokens_per_gpu=64, activation_checkpointing=False, **flags)
        from minitrain.training.model import build_model

        model = build_model(config, world, lora.build_adapter(config))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert model.sharded_export, case  # read per rank, so exported per rank
        # the whole model: split into files of at most ~100 kB, read back through model.safetensors.index.json
        limit, export.MAX_FILE_BYTES = export.MAX_FILE_BYTES, 100_000 if case == "full" else 5 * 2**30
        try:
            sharded = save_export(model, tokenizer, config, world, samples_seen=1)
            model.sharded_export = False  # rank 0 gathers and writes, as every export did before
            gathered = save_export(model, tokenizer, config, world, samples_seen=2)
        finally:  # the shared job's later workers export with the real limit
            export.MAX_FILE_BYTES = limit
        if world.is_main:
            auto = AutoModelForSeq2SeqLM if case == "t5" else AutoModelForCausalLM
            a, b = (auto.from_pretrained(p, dtype=torch.float32) for p in (sharded, gathered))
            ids = torch.arange(3, 19)[None]
            extra = {"decoder_input_ids": torch.arange(5, 12)[None]} if case == "t5" else {}
            with torch.no_grad():
                logits = [m(input_ids=ids, **extra).logits for m in (a, b)]
            report[case] = {
                "files": sorted(p.name for p in sharded.iterdir()),
                "keys_equal": a.state_dict().keys() == b.state_dict().keys(),
                "max_tensor_diff": max((a.state_dict()[k] - v).abs().max().item() for k, v in b.state_dict().items()),
                "max_logit_diff": (logits[0] - logits[1]).abs().max().item(),
                "logit_std": logits[1].std().item(),
                "config_dtype": json.loads((sharded / "config.json").read_text()).get("dtype"),
            }
        del model
    if world.is_main:
        Path(f"{out}/report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_the_export_every_rank_writes_equals_rank_0s_for_full_lora_merged_and_t5(tmp_path, tiny_model_dir,
                                                                                  tokenizer_dir, two_ranks):
    from tests.tiny_models import build_tiny_seq2seq

    dirs = {"llama": str(tiny_model_dir("llama")), "t5": str(build_tiny_seq2seq("t5", tmp_path, tokenizer_dir("chatml")))}
    cases = {case: dirs[arch] for case, (arch, _) in EXPORT_CASES.items()}
    run = two_ranks.run(__name__, "export_worker", [json.dumps(cases), tmp_path / "out"])  # the shared 2-rank job
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for case, found in report.items():
        assert found["keys_equal"], case
        assert found["max_tensor_diff"] == 0.0, case
        assert found["max_logit_diff"] == 0.0 and found["logit_std"] > 0, case
        assert found["config_dtype"] == "bfloat16", case
        if case == "full":
            assert "model.safetensors.index.json" in found["files"] and "model-00002-of-00003.safetensors" in found[
                "files"], found["files"]
        else:
            assert "model.safetensors" in found["files"] and "model.safetensors.index.json" not in found["files"]
        assert not any(name.startswith(".") for name in found["files"]), case  # no shards or temporary left
    assert "adapter" in report["lora"]["files"]


def cut_short(model_dir: Path, folder: Path) -> Path:
    """A copy of the model folder whose model.safetensors lost its second half (an interrupted download or copy)."""
    import shutil

    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


def test_a_weights_file_cut_short_stops_every_rank_with_one_line_naming_it(tmp_path, capsys, tiny_model_dir,
                                                                           two_ranks):
    from tests.test_train import base_args, run_main, write_data

    damaged = cut_short(tiny_model_dir("llama"), tmp_path / "cut")
    data = write_data(tmp_path / "data.jsonl", 8, vocab=200)
    want = (f"train.py: error: --model-name-or-path {damaged}: model.safetensors cannot be read (Error while "
            f"deserializing header: incomplete metadata, file not fully covered): the file is damaged or incomplete")
    code, err = run_main(base_args(tmp_path / "one", damaged, data), capsys)  # one process: from_pretrained's read
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    # 2 ranks: each rank's own read of the header, the same line on both (naming where it was read), no traceback
    run = two_ranks.train([*base_args(tmp_path / "two", damaged, data), "--no-activation-checkpointing"],
                          tmp_path / "two")  # auto's choice here, without a memory-estimate process
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(want in line and "(read on rank" in line for line in lines), lines


if __name__ == "__main__":
    build_worker(sys.argv[1], sys.argv[2])
