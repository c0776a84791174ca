"""Packed rows through minitrain's variable-length attention path (attention.py), on CPU: PyTorch's varlen kernel is
CUDA-only, so a per-sample SDPA stands in for the kernel alone; everything around it (the boundaries computed on the
host per pack, the reshapes, GQA, the registration through transformers' AttentionInterface) is the code GPUs run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minitrain.training import attention
from minitrain.training.data import (
    IGNORE,
    build_token_cache,
    make_pack,
    open_token_cache,
)
from minitrain.training.model import PackedCausalLM
from tests.test_train import write_data
from tests.tiny_models import build_tiny_model

# tests/test_cuda.py's bounds for bf16 on the GPU against fp32 each sample alone, on a model with trained-size logits
# (the tiny fixtures' std ~0.2 logits keep every loss near ln V whatever attention does). Measured with bf16 weights on
# CPU: per-token max 0.16, mean 0.04; gradients 0.022 of each tensor's norm. The control test below shows that a
# sample attending to the previous one, or a boundary one token off, exceeds each bound several times over.
BF16_PER_TOKEN_MAX, BF16_PER_TOKEN_MEAN, BF16_GRAD_REL = 0.5, 0.1, 0.06

SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::equal", "aten::is_nonzero"}


class CountSyncs(TorchDispatchMode):
    """Counts the ops that wait for the device on CUDA (a tensor's value read on the host)."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func._schema.name in SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def per_sample_sdpa(counter=None):
    """The stand-in kernel: causal SDPA on each sample's slice (the boundaries read on the host, as a test may)."""
    def kernel(query, key, value, cu_seq, max_len, scale, window, enable_gqa):
        if counter is not None:
            counter.paused = True
        assert window == (-1, 0) and max_len == int(cu_seq.diff().max())
        bounds = cu_seq.tolist()
        outs = []
        for start, end in zip(bounds, bounds[1:]):
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (H, T, D)
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                       enable_gqa=enable_gqa).transpose(0, 1))
        if counter is not None:
            counter.paused = False
        return torch.cat(outs)
    return kernel


@pytest.fixture
def cache(tmp_path):
    data = write_data(tmp_path / "data.jsonl", 6, vocab=700, seed=4)
    build_token_cache(data, tmp_path / "cache")
    return open_token_cache(tmp_path / "cache")


@pytest.fixture(scope="module")
def trained_qwen2_dir(tmp_path_factory, tokenizer_dir):
    """Qwen2 (GQA) with trained-size logits (std ~6), the chatml tokenizer's vocabulary."""
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("trained"), tokenizer_dir("chatml"), trained_logits=True)


def own_token_losses(lm, cache, indices) -> torch.Tensor:
    """The model's own forward + plain cross-entropy, one sample at a time, each trained token's CE in pack order."""
    out = []
    for i in indices:
        start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
        ids = torch.from_numpy(cache.input_ids[start:end].astype(np.int64))[None]
        labels = torch.from_numpy(cache.labels[start:end].astype(np.int64))[1:]
        ce = F.cross_entropy(lm(input_ids=ids, use_cache=False).logits[0, :-1].float(), labels,
                             ignore_index=IGNORE, reduction="none")
        out.append(ce[labels != IGNORE])
    return torch.cat(out)


def grad_rel(got: dict, want: dict) -> float:
    """The largest ||got - want|| / ||want|| over the parameters."""
    return max(((got[n].float() - g).norm() / g.norm()).item() for n, g in want.items())


def test_the_cuda_bounds_catch_cross_sample_attention_and_an_off_by_one_boundary(cache, trained_qwen2_dir,
                                                                                  monkeypatch):
    """The control for test_cuda.py's bounds, in fp32 through the stand-in kernel: correct boundaries give the
    truth; one sequence for the whole pack (samples attend to earlier ones) or each inner boundary one token late
    give per-token losses and gradients far outside the bf16 bounds."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(attention, "varlen_kernel", per_sample_sdpa())
    lm = AutoModelForCausalLM.from_pretrained(trained_qwen2_dir, dtype=torch.float32,
                                              attn_implementation=attention.VARLEN)
    model = PackedCausalLM(lm)
    pack = make_pack(cache, np.arange(6))
    plain = AutoModelForCausalLM.from_pretrained(trained_qwen2_dir, dtype=torch.float32)
    truth = own_token_losses(plain, cache, np.arange(6))
    truth.sum().backward()
    want = {n: p.grad for n, p in plain.named_parameters()}
    late = pack.cu_seq_lens.clone()
    late[1:-1] += 1
    whole = torch.tensor([0, int(pack.cu_seq_lens[-1])], dtype=pack.cu_seq_lens.dtype)
    for name, cu in (("right", pack.cu_seq_lens), ("one late", late), ("one sequence", whole)):
        lm.zero_grad(set_to_none=True)
        got = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets, cu_seq_lens=cu,
                    max_length=int(cu.diff().max()), per_token=True)
        got.sum().backward()
        diff = (got.detach() - truth.detach()).abs()
        rel = grad_rel({n: p.grad for n, p in lm.named_parameters()}, want)
        if name == "right":
            assert diff.max() < 1e-4 and rel < 1e-5, (diff.max(), rel)
        else:
            assert diff.max() > 3 * BF16_PER_TOKEN_MAX and diff.mean() > 3 * BF16_PER_TOKEN_MEAN, (name, diff)
            assert rel > 2 * BF16_GRAD_REL, (name, rel)


def own_loss(lm, cache, indices) -> torch.Tensor:
    """The model's own forward + plain cross-entropy, one sample at a time: the truth."""
    total = 0.0
    for i in indices:
        start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
        ids = torch.from_numpy(cache.input_ids[start:end].astype(np.int64))[None]
        labels = torch.from_numpy(cache.labels[start:end].astype(np.int64))[1:]
        logits = lm(input_ids=ids, use_cache=False).logits[0, :-1]
        total = total + F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # both with 4 query heads on 2 key/value heads (GQA)
def test_varlen_path_equals_each_sample_alone_with_no_host_sync(arch, cache, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    counter = CountSyncs()
    monkeypatch.setattr(attention, "varlen_kernel", per_sample_sdpa(counter))
    model_dir = tiny_model_dir(arch)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention.VARLEN)
    model = PackedCausalLM(lm)
    assert model.attention_takes_boundaries
    indices = np.arange(6)
    pack = make_pack(cache, indices)
    assert pack.cu_seq_lens.tolist() == np.cumsum([0, *cache.lengths[:6]]).tolist()
    with counter:
        loss = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets,
                     cu_seq_lens=pack.cu_seq_lens, max_length=pack.max_length)
        loss.backward()
    assert counter.count == 0  # nothing in the forward or backward reads a device value on the host
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # sdpa, each sample alone
    truth = own_loss(reference, cache, indices)
    truth.backward()
    assert loss.item() == pytest.approx(truth.item(), rel=1e-5)
    for name, p in reference.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_the_sdpa_path_reads_device_values_on_the_host_so_the_count_means_something(cache, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)  # sdpa
    pack = make_pack(cache, np.arange(6))
    counter = CountSyncs()
    with counter:
        PackedCausalLM(lm)(pack.input_ids, pack.position_ids, pack.positions, pack.targets)
    assert counter.count > 0  # transformers finds the packed samples from position_ids on the device


def test_the_kernel_is_chosen_by_device_and_flags_that_cannot_work_are_one_line():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert attention.choose("auto", cpu) == "sdpa"
    assert attention.choose("auto", cuda) in (attention.VARLEN, "flash_attention_2", "flash_attention_3")
    assert attention.choose("eager", cuda) == "eager"
    assert attention.problem("auto", cuda=False) is None and attention.problem("sdpa", cuda=False) is None
    assert "needs a CUDA GPU" in attention.problem(attention.VARLEN, cuda=False)
    assert "is unknown" in attention.problem("xformers", cuda=True)


def test_compiled_blocks_train_with_the_eager_losses(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """--compile's blocks give the eager losses. The start-up probe's truth, the model's own forward, runs eager:
    through the compiled blocks it cost a compile of every block for inputs training never gives them, and it checked
    the trainer against compiled code."""
    import json

    from torch._dynamo import lookup_backend

    import train

    graphs, inductor, compile_module = [], lookup_backend("inductor"), torch.nn.Module.compile

    def recorded(gm, example_inputs):  # each graph the blocks compile: its inputs' names, then inductor as before
        graphs.append([node.name for node in gm.graph.nodes if node.op == "placeholder"])
        return inductor(gm, example_inputs)

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend=recorded, **kw))
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700, seed=5)
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        code = train.main(["--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")),
                           "--output-dir", str(out), "--batch-size", "4", "--max-tokens-per-gpu", "128",
                           "--max-steps", "3", "--learning-rate", "1e-3", "--save-dtype", "float32",
                           "--no-activation-checkpointing", *extra])  # auto's choice here, without its estimate
        assert code == 0, capsys.readouterr().err
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    # Every graph is the trainer's: its sdpa gets the packed row's block-diagonal mask, while the model's own forward
    # of a sample alone gets none (causal). Before, one graph of 5 had no mask: the probe's own forward, compiled.
    assert graphs and all("l_kwargs_attention_mask_" in graph for graph in graphs), graphs


def test_activation_checkpointing_is_on_only_when_a_rows_activations_would_not_fit(monkeypatch):
    from types import SimpleNamespace

    from minitrain.training import distributed
    from minitrain.training import model as model_module
    from minitrain.training.distributed import World

    world = World(0, 0, 2, 2, torch.device("cpu"))
    monkeypatch.setattr(distributed, "available_host_memory", lambda: 16 * 2**30)  # 8 GiB free per rank
    small = SimpleNamespace(num_hidden_layers=30, hidden_size=576)  # SmolLM2-135M
    big = SimpleNamespace(num_hidden_layers=32, hidden_size=4096)  # an 8B model
    on, why = model_module.checkpointing_needed(small, 1024, world)
    assert not on and why == "activations ~1.0 GiB per rank, 8.0 GiB free"
    on, why = model_module.checkpointing_needed(big, 16384, world)
    assert on and why.startswith("activations ~120.0 GiB per rank")


def test_attention_dropout_the_varlen_kernel_cannot_apply_names_the_config_key_and_the_other_kernel():
    """It said 'set the model's attention_dropout to 0', a key GPT-2's config does not have (attn_pdrop)."""
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError) as e:
        attention.varlen_attention(torch.nn.Module(), q, q, q, None, dropout=0.1, cu_seq_lens_q=torch.tensor([0, 3]))
    assert str(e.value) == (f"{attention.VARLEN} has no attention dropout (0.1); set it to 0 in the model's "
                            "config.json (attention_dropout, or attn_pdrop for GPT-2) or pass --attn-implementation "
                            "sdpa")
