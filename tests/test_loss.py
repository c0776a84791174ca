"""The memory-safe loss: packed == per-sample, chunked == plain cross-entropy == Liger's fused kernel."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from minitrain.training.loss import chunked_ce_sum
from minitrain.training.model import PackedCausalLM
from tests import liger_interpreter


def random_samples(vocab: int, lengths=(7, 12, 5)):
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100  # prompt half masked
        samples.append((ids, labels))
    return samples


def packed(samples):
    """(input_ids, position_ids, positions, targets) the way data.make_pack builds them, in plain torch."""
    ids = torch.cat([s for s, _ in samples])[None]
    pos = torch.cat([torch.arange(len(s)) for s, _ in samples])[None]
    shifted = torch.cat([torch.cat([lab[1:], torch.tensor([-100])]) for _, lab in samples])
    positions = torch.nonzero(shifted != -100).flatten()
    return ids, pos, positions, shifted[positions]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_forward_equals_per_sample_forward(tiny_model_dir, arch):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
    samples = random_samples(lm.config.vocab_size)
    ids, pos, positions, targets = packed(samples)
    with torch.no_grad():
        packed_logits = lm(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = [lm(input_ids=s[None], use_cache=False).logits[0] for s, _ in samples]
        torch.testing.assert_close(packed_logits, torch.cat(alone), atol=2e-5, rtol=0)
        # Per-token loss: the wrapper's summed CE on the pack equals HF's own shifted CE of each sample alone.
        per_token_alone = torch.cat(
            [
                F.cross_entropy(lg[:-1], lab[1:], reduction="none")[lab[1:] != -100]
                for lg, (_, lab) in zip(alone, samples)
            ]
        )
        per_token_packed = F.cross_entropy(packed_logits[positions], targets, reduction="none")
        torch.testing.assert_close(per_token_packed, per_token_alone, atol=2e-5, rtol=0)
        wrapped = PackedCausalLM(lm, chunk_rows=4)(ids, pos, positions, targets)
        torch.testing.assert_close(wrapped, per_token_alone.sum(), atol=1e-4, rtol=1e-6)
    # A KV cache makes transformers ignore the packing: the test above must see the difference (it would fail).
    with torch.no_grad():
        cached = lm(input_ids=ids, position_ids=pos, use_cache=True).logits[0]
    assert (cached - torch.cat(alone)).abs().max() > 1e-3


def test_chunked_ce_equals_plain_ce_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    plain = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    expected = torch.autograd.grad(plain, (hidden, weight, bias))
    chunked = chunked_ce_sum(hidden, weight, bias, targets, chunk_rows=8)  # 5 chunks, the last one short
    got = torch.autograd.grad(chunked, (hidden, weight, bias))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # evaluation skips the gradient work and gives the same value
        value = chunked_ce_sum(hidden, weight, bias, targets, chunk_rows=64)
    torch.testing.assert_close(value, plain, rtol=1e-6, atol=1e-5)


def test_all_masked_pack_gives_zero_loss_and_zero_gradient_on_every_parameter(tiny_model_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    model = PackedCausalLM(lm)
    ids = torch.tensor([[5, 6, 7]])
    empty = torch.zeros(0, dtype=torch.long)
    loss = model(ids, torch.arange(3)[None], empty, empty)
    loss.backward()
    assert loss.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # every rank must produce every gradient for FSDP's collectives
        assert p.grad.abs().max().item() == 0.0, name


LIGER_SCRIPT = r"""
import json, sys
import torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM
from minitrain.training.model import PackedCausalLM
lm = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
g = torch.Generator().manual_seed(2)
ids = torch.randint(3, lm.config.vocab_size, (1, 24), generator=g)
pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
positions = torch.tensor([2, 3, 4, 5, 8, 13, 14, 20, 21, 22])
targets = ids[0, positions + 1]
out = {}
for name, liger in (("chunked", False), ("liger", True)):
    model = PackedCausalLM(lm, use_liger=liger, chunk_rows=4)
    lm.zero_grad(set_to_none=True)
    loss = model(ids, pos, positions, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)
    empty = torch.zeros(0, dtype=torch.long)
    masked = model(ids, pos, empty, empty)
    masked.backward()
    out[name] = (loss, grads, masked, max(p.grad.abs().max().item() for p in lm.parameters()))
# plain: full logits through the HF model, CE summed over the same positions
lm.zero_grad(set_to_none=True)
logits = lm(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
plain = F.cross_entropy(logits[positions], targets, reduction="sum")
plain.backward()
plain_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
def rel(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in b)
print(json.dumps({
    "plain": plain.item(), "chunked": out["chunked"][0].item(), "liger": out["liger"][0].item(),
    "chunked_grad_rel": rel(out["chunked"][1], plain_grads), "liger_grad_rel": rel(out["liger"][1], plain_grads),
    "chunked_masked": out["chunked"][2].item(), "liger_masked": out["liger"][2].item(),
    "chunked_masked_grad": out["chunked"][3], "liger_masked_grad": out["liger"][3],
}))
"""


def test_liger_fused_ce_equals_chunked_and_plain_ce(tiny_model_dir):
    """Liger's fused linear CE on CPU runs only in Triton's interpreter, which must be on before triton imports."""
    stdout = liger_interpreter.run(LIGER_SCRIPT, str(tiny_model_dir("llama")), timeout=300)
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r["chunked"] == pytest.approx(r["plain"], rel=1e-6)
    assert r["liger"] == pytest.approx(r["plain"], rel=1e-5)
    assert r["chunked_grad_rel"] < 1e-5 and r["liger_grad_rel"] < 1e-4
    assert r["chunked_masked"] == 0.0 and r["liger_masked"] == 0.0
    assert r["chunked_masked_grad"] == 0.0 and r["liger_masked_grad"] == 0.0


def test_no_tensor_of_the_loss_holds_every_tokens_logits():
    """README: the loss never builds a full tokens x vocab logits tensor. Every tensor the trainer's forward and
    backward make (each operation's output, seen by a dispatch mode) on a row of 2,500 trained tokens has at most one
    chunk's rows (1,024, the trainer's default) x vocab elements; the model's own forward, for contrast, makes the
    whole 2,500 x vocab one under the same mode."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from transformers import LlamaConfig, LlamaForCausalLM

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
            return out

    vocab, tokens = 4096, 2500
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, vocab, (1, tokens))
    pos, positions = torch.arange(tokens)[None], torch.arange(tokens - 1)
    with Largest() as trainer:
        PackedCausalLM(lm)(ids, pos, positions, ids[0, 1:]).backward()
    assert 0 < trainer.numel <= 1024 * vocab < tokens * vocab, trainer.numel
    with Largest() as own, torch.no_grad():
        lm(input_ids=ids, use_cache=False)
    assert own.numel >= tokens * vocab  # the mode sees a whole-row logits tensor where one is made
