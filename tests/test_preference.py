"""Preference training (DPO and its loss types, SimPO, ORPO, reward models): exact loss over pairs, packed
padding-free, on 1 and 2 processes; stage 1's preference rows.

The loss and gradients of train.py's own functions are compared with a direct per-pair implementation written
here: a plain Hugging Face forward of each sequence alone, full logits, log-softmax, the formula of the paper.
The 2-process check runs `pair_grad_worker` in the session's 2-rank job (tests/two_rank_server.py).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import run_main

VOCAB = 250  # token ids drawn below this (the tiny models' vocabulary is the chatml fixture tokenizer's, larger)
SKEWED = {0: [[0, 1, 2], [3], [4]], 1: [[5, 6, 7], [], []]}  # rank 1 runs two dummy packs


def write_pairs(path: Path, num_pairs: int, seed: int = 0, learnable: bool = False) -> Path:
    """Preference rows as process_data.py writes them: a shared prompt, masked on both sides.

    learnable: the chosen reply is always the same few tokens, the rejected one random, so a tiny model can learn
    to prefer it in a few steps.
    """
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(num_pairs):
            prompt = rng.integers(3, VOCAB, int(rng.integers(3, 10))).tolist()
            chosen = [7, 8, 9, 10] if learnable else rng.integers(3, VOCAB, int(rng.integers(2, 8))).tolist()
            rejected = rng.integers(3, VOCAB, int(rng.integers(2, 8))).tolist()
            row = {
                "chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * len(prompt) + chosen,
                "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected,
                "chosen_len": len(prompt + chosen), "rejected_len": len(prompt + rejected),
                "len": 2 * len(prompt) + len(chosen) + len(rejected),
            }
            f.write(json.dumps(row) + "\n")
    return path


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# The direct implementation


def direct_logp(lm, ids: list[int], labels: list[int]):
    """(sum of log p(label) over the trained tokens, their count): one sequence alone, full logits."""
    import torch

    logits = lm(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].double()  # (T-1, V)
    targets = torch.tensor(labels[1:])
    trained = targets != -100
    logp = torch.log_softmax(logits[trained], dim=-1).gather(1, targets[trained][:, None]).sum()
    return logp, int(trained.sum())


def direct_loss(lm, pairs: list[dict], name: str, beta: float, gamma: float = 0.0, sft_weight: float = 0.0,
                reference: np.ndarray | None = None, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """The mean over the pairs of the paper's loss (DPO: Rafailov et al. eq. 7, with TRL's loss types; SimPO: Meng et
    al. eq. 6; ORPO: Hong et al. eq. 6-7, λ = beta, on length-normalised log-probs as TRL)."""
    import torch
    import torch.nn.functional as F

    eps = label_smoothing
    losses = []
    for k, row in enumerate(pairs):
        lc, nc = direct_logp(lm, row["chosen_input_ids"], row["chosen_labels"])
        lr, nr = direct_logp(lm, row["rejected_input_ids"], row["rejected_labels"])
        if name == "dpo":
            rc, rr = float(reference[k, 0]), float(reference[k, 1])
            z = beta * ((lc - rc) - (lr - rr))
            if loss_type == "sigmoid":  # cDPO: the expected loss under labels flipped with probability eps
                loss = -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
            elif loss_type == "robust":  # unbiased under flips: (1 - eps) l(z) - eps l(-z), over 1 - 2 eps
                loss = ((1 - eps) * -torch.log(torch.sigmoid(z)) - eps * -torch.log(torch.sigmoid(-z))) / (1 - 2 * eps)
            elif loss_type == "hinge":
                loss = torch.clamp(1 - z, min=0)
            else:  # ipo: per-token log-ratios
                loss = ((lc - rc) / nc - (lr - rr) / nr - 1 / (2 * beta)) ** 2
        elif name == "orpo":
            pc, pr = torch.exp(lc / nc), torch.exp(lr / nr)  # the geometric mean token probability
            log_odds_ratio = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
            loss = -lc / nc - beta * torch.log(torch.sigmoid(log_odds_ratio))
        else:
            loss = -F.logsigmoid(beta * (lc / nc - lr / nr) - gamma)
        losses.append(loss - sft_weight * lc / nc)
    return torch.stack(losses).mean()


def trl_metrics(lm, pairs: list[dict], name: str, beta: float, reference: np.ndarray | None = None,
                **_) -> list[float]:
    """The metrics TRL logs under these names, by its definitions, each the mean over the pairs, in
    PREFERENCE_METRICS order. DPOTrainer: rewards/* = beta x (policy - reference) summed log-probs, logps/* the
    policy's summed log-probs. CPOTrainer with loss_type="simpo": log-probs averaged over the trained tokens
    (average_log_prob), logps/* those averages, rewards/* = beta x them."""
    import torch

    chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = [], [], [], []
    with torch.no_grad():
        for k, row in enumerate(pairs):
            lc, nc = direct_logp(lm, row["chosen_input_ids"], row["chosen_labels"])
            lr, nr = direct_logp(lm, row["rejected_input_ids"], row["rejected_labels"])
            if name == "dpo":
                chosen_logps.append(lc.item())
                rejected_logps.append(lr.item())
                chosen_rewards.append(beta * (lc.item() - float(reference[k, 0])))
                rejected_rewards.append(beta * (lr.item() - float(reference[k, 1])))
            else:
                chosen_logps.append(lc.item() / nc)
                rejected_logps.append(lr.item() / nr)
                chosen_rewards.append(beta * lc.item() / nc)
                rejected_rewards.append(beta * lr.item() / nr)
    c, r = np.array(chosen_rewards), np.array(rejected_rewards)
    return [c.mean(), r.mean(), (c > r).mean(), (c - r).mean(), np.mean(chosen_logps), np.mean(rejected_logps)]


def direct_grads(model_dir: Path, pairs: list[dict], **loss_kwargs) -> tuple[float, dict, list[float]]:
    """(the direct loss, its gradients, TRL's metrics) of the model at model_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss = direct_loss(lm, pairs, **loss_kwargs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in lm.named_parameters()}, trl_metrics(lm, pairs, **loss_kwargs)


def direct_table(model_dir: Path, pairs: list[dict]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return np.array([[direct_logp(lm, r[f"{side}_input_ids"], r[f"{side}_labels"])[0].item()
                          for side in ("chosen", "rejected")] for r in pairs])


def reward_model_dir(tiny: Path, out: Path, pad_token_id: int | None = None) -> Path:
    """A one-label sequence classifier saved from the tiny LM (its `score` head seeded), with its tokenizer; with
    `pad_token_id`, the config's pad token (the scoring position skips trailing ones)."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(tiny, out)
    torch.manual_seed(7)
    lm = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1, dtype=torch.float32)
    lm.config.pad_token_id = pad_token_id
    (out / "model.safetensors").unlink()
    lm.save_pretrained(out)
    return out


def reward_pair_loss(lm, pairs: list[dict], center: float = 0.0):
    """TRL's reward loss, the mean over the pairs, each sequence scored alone by the model's own sequence-
    classification forward (a row's `margin` subtracted from the score difference, 0 without one)."""
    import torch

    losses = []
    for row in pairs:
        sc, sr = (lm(input_ids=torch.tensor([row[f"{side}_input_ids"]]), use_cache=False).logits[0, 0].double()
                  for side in ("chosen", "rejected"))
        losses.append(-torch.log(torch.sigmoid(sc - sr - row.get("margin", 0.0))) + center * (sc + sr) ** 2)
    return torch.stack(losses).mean()


def direct_reward_grads(model_dir: Path, pairs: list[dict], center: float = 0.0) -> tuple[float, dict]:
    """reward_pair_loss of Hugging Face's own sequence classifier from `model_dir`, and its gradients."""
    import torch
    from transformers import AutoModelForSequenceClassification

    lm = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    loss = reward_pair_loss(lm, pairs, center)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in lm.named_parameters()}


def max_rel(grads: dict, reference: dict) -> float:
    return max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in reference.items())


def objectives(offsets: np.ndarray):
    """(name, objective, direct_loss kwargs, reference table offset): DPO with a reference away from the policy
    (so the sigmoid is not at 0) and an SFT term, SimPO, ORPO."""
    from minitrain.training.objectives import DPO, ORPO, SimPO

    return [
        ("dpo", DPO(beta=0.5, sft_weight=0.3), dict(name="dpo", beta=0.5, sft_weight=0.3), offsets),
        ("simpo", SimPO(beta=2.0, gamma=0.5), dict(name="simpo", beta=2.0, gamma=0.5), None),
        ("orpo", ORPO(beta=0.7), dict(name="orpo", beta=0.7), None),
    ]


# ---------------------------------------------------------------------------------------------------------------
# One process: train.py's forward_backward == the direct implementation, packed == one pair per micro-step


def test_loss_and_gradients_equal_the_direct_per_pair_implementation(tmp_path, tiny_model_dir):
    import torch

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.reference import attach_reference

    model_dir = tiny_model_dir("qwen2")  # an untied LM head; llama (tied) runs under torchrun below
    data = write_pairs(tmp_path / "pairs.jsonl", 6)
    pairs = read_pairs(data)
    config = train.TrainConfig(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(tmp_path / "o"),
                               batch_size=6, max_tokens_per_gpu=128, activation_checkpointing=False)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, single, vocab_size=10**6)
    assert cache.pairs and len(cache) == 6
    assert cache.lengths.tolist() == [r["len"] for r in pairs]
    offsets = np.random.default_rng(1).normal(0, 3, (6, 2))
    for name, objective, kwargs, offset in objectives(offsets):
        model = build_model(config, single)
        if objective.needs_reference:  # the initial model's log-probs, then moved away from the policy
            attach_reference(objective, model, cache, config, single)
            table = objective.reference[cache.content_hash]
            np.testing.assert_allclose(table, direct_table(model_dir, pairs), rtol=1e-6)
            objective.reference[cache.content_hash] = table + offset
            kwargs["reference"] = table + offset
        want_loss, want, want_metrics = direct_grads(model_dir, pairs, **kwargs)
        assert objective.metrics[:6] == ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                         "rewards/margins", "logps/chosen", "logps/rejected")  # TRL's, in this order
        assert len(objective.metrics) == (9 if name == "orpo" else 6)  # ORPO adds nll_loss and the log odds
        assert 0 < want_metrics[2] < 1, want_metrics  # some pairs ranked each way: the accuracy is checked
        for packs in ([np.arange(6)], [np.array([k]) for k in range(6)], [np.array([4, 0]), np.array([], int),
                                                                         np.array([5, 1, 2, 3])]):
            model.zero_grad(set_to_none=True)
            sums = train.forward_backward(model, objective, cache, packs, 6, 1, single.device)
            grads = {n: p.grad for n, p in model.lm.named_parameters()}
            assert sums[0].item() / 6 == pytest.approx(want_loss, rel=1e-6), (name, packs)
            assert sorted(grads) == sorted(want)
            assert max_rel(grads, want) < 1e-5, (name, packs, max_rel(grads, want))
            assert (sums[1:7] / 6).tolist() == pytest.approx(want_metrics, rel=1e-5, abs=1e-6), (name, packs)


def test_each_dpo_loss_type_and_its_gradient_equal_the_direct_per_pair_formula(tmp_path, tiny_model_dir):
    import torch

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.objectives import DPO
    from minitrain.training.reference import attach_reference

    model_dir = tiny_model_dir("qwen2")
    data = write_pairs(tmp_path / "pairs.jsonl", 6, seed=5)
    pairs = read_pairs(data)
    config = train.TrainConfig(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(tmp_path / "o"),
                               batch_size=6, max_tokens_per_gpu=128, activation_checkpointing=False)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, single, vocab_size=10**6)
    model = build_model(config, single)
    probe = DPO()
    attach_reference(probe, model, cache, config, single)
    # Away from the policy, so that the margins spread over both sides of the hinge and of IPO's target.
    table = probe.reference[cache.content_hash] + np.random.default_rng(6).normal(0, 3, (6, 2))
    for loss_type, eps in (("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)):
        objective = DPO(beta=0.5, loss_type=loss_type, label_smoothing=eps, reference={cache.content_hash: table})
        want_loss, want, _ = direct_grads(model_dir, pairs, name="dpo", beta=0.5, reference=table, loss_type=loss_type,
                                       label_smoothing=eps)
        model.zero_grad(set_to_none=True)
        packs = [np.array([4, 0]), np.array([], int), np.array([5, 1, 2, 3])]
        sums = train.forward_backward(model, objective, cache, packs, 6, 1, single.device)
        grads = {n: p.grad for n, p in model.lm.named_parameters()}
        assert sums[0].item() / 6 == pytest.approx(want_loss, rel=1e-5, abs=1e-6), loss_type
        assert max_rel(grads, want) < 1e-5, (loss_type, max_rel(grads, want))


def test_reward_loss_and_gradients_equal_hugging_faces_own_scores_per_pair(tmp_path, tiny_model_dir):
    import torch

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.objectives import Reward, build_objective

    data = write_pairs(tmp_path / "pairs.jsonl", 6, seed=7)
    pairs = read_pairs(data)
    for k, margin in ((1, 0.75), (3, -0.5), (4, 2.0)):  # TRL's optional margin field; the other pairs have none
        pairs[k]["margin"] = margin
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    pad = pairs[0]["chosen_input_ids"][-1]  # a pad id that ends a sequence: its score is read one token earlier
    model_dir = reward_model_dir(tiny_model_dir("qwen2"), tmp_path / "rm", pad_token_id=pad)
    config = train.TrainConfig(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(tmp_path / "o"),
                               batch_size=6, max_tokens_per_gpu=128, activation_checkpointing=False,
                               objective="reward", reward_center_coefficient=0.05)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, single, vocab_size=10**6)
    assert cache.margins.tolist() == [0.0, 0.75, 0.0, -0.5, 2.0, 0.0]
    model = build_model(config, single)
    from transformers import AutoConfig

    objective = build_objective(config, AutoConfig.from_pretrained(model_dir))
    assert isinstance(objective, Reward) and objective.pad_token_id == pad and objective.center_coefficient == 0.05
    want_loss, want = direct_reward_grads(model_dir, pairs, center=0.05)
    for packs in ([np.arange(6)], [np.array([4, 0]), np.array([], int), np.array([5, 1, 2, 3])]):
        model.zero_grad(set_to_none=True)
        sums = train.forward_backward(model, objective, cache, packs, 6, 1, single.device)
        grads = {n: p.grad for n, p in model.lm.named_parameters()}
        assert sums[0].item() / 6 == pytest.approx(want_loss, rel=1e-6), packs
        assert sorted(grads) == sorted(want)
        assert max_rel(grads, want) < 1e-5, (packs, max_rel(grads, want))
        assert 0 <= sums[1].item() / 6 <= 1  # accuracy


def test_the_default_dpo_loss_is_bit_identical_to_the_plain_sigmoid_and_smoothing_weighs_the_flipped_label():
    import torch
    import torch.nn.functional as F

    from minitrain.training.objectives import DPO

    rng = torch.Generator().manual_seed(0)
    chosen, rejected = -20 * torch.rand(16, generator=rng), -20 * torch.rand(16, generator=rng)
    ref = -20 * torch.rand(32, generator=rng, dtype=torch.float64)
    pack = type("Pack", (), {"reference": ref, "trained": torch.full((32,), 5.0)})
    losses = DPO(beta=0.3).pair_losses(chosen, rejected, pack)[0]
    before = -F.logsigmoid(0.3 * (chosen - ref.float()[0::2]) - 0.3 * (rejected - ref.float()[1::2]))  # today's
    assert torch.equal(losses, before)
    margin = 0.3 * ((chosen - ref.float()[0::2]) - (rejected - ref.float()[1::2]))
    smoothed = DPO(beta=0.3, label_smoothing=0.25).pair_losses(chosen, rejected, pack)[0]
    torch.testing.assert_close(smoothed, 0.75 * before + 0.25 * -F.logsigmoid(-margin))
    robust = DPO(beta=0.3, loss_type="robust", label_smoothing=0.0).pair_losses(chosen, rejected, pack)[0]
    torch.testing.assert_close(robust, before)  # ε = 0: plain DPO


def pair_grad_worker(model_dir: str, data_path: str, out_dir: str, reward_dir: str) -> None:
    """Under torchrun: the reference table and each objective's gradient on 2 FSDP2 ranks with skewed micro-steps."""
    import torch.distributed as dist

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import cleanup_distributed, init_distributed
    from minitrain.training.model import build_model
    from minitrain.training.reference import attach_reference

    world = init_distributed("auto")
    config = train.TrainConfig(data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=8,
                               max_tokens_per_gpu=128, fsdp_sharding_strategy="FULL_SHARD")  # + checkpointing
    cache = load_data(config, world, vocab_size=10**6)
    pairs = read_pairs(Path(data_path))
    offsets = np.random.default_rng(1).normal(0, 3, (8, 2))
    report = {}
    for name, objective, kwargs, offset in objectives(offsets):
        model = build_model(config, world)
        if objective.needs_reference:
            attach_reference(objective, model, cache, config, world)  # both ranks compute half of the pairs
            table = objective.reference[cache.content_hash]
            if world.is_main:
                report["table_max_rel"] = float(np.max(np.abs(table / direct_table(Path(model_dir), pairs) - 1)))
            objective.reference[cache.content_hash] = table + offset
            kwargs["reference"] = table + offset
        packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
        sums = train.forward_backward(model, objective, cache, packs, 8, world.world_size, world.device)
        dist.all_reduce(sums)
        grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
        if world.is_main:
            want_loss, want, want_metrics = direct_grads(Path(model_dir), pairs, **kwargs)
            report[name] = {"loss": sums[0].item() / 8, "want_loss": want_loss, "max_rel": max_rel(grads, want),
                            "names": sorted(grads) == sorted(want),
                            "metrics": dict(zip(objective.metrics, (sums[1:] / 8).tolist())),
                            "want_metrics": None if want_metrics is None else [float(m) for m in want_metrics]}
        if name == "dpo":  # TRL's other loss types, on the same sharded model and reference
            report.update(dpo_loss_types(model, objective.reference, cache, kwargs["reference"], model_dir, pairs, world))
    from dataclasses import replace

    from minitrain.training.objectives import Reward

    model = build_model(replace(config, objective="reward", model_name_or_path=reward_dir), world)
    objective = Reward(center_coefficient=0.05)
    packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
    sums = train.forward_backward(model, objective, cache, packs, 8, world.world_size, world.device)
    dist.all_reduce(sums)
    grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
    if world.is_main:
        want_loss, want = direct_reward_grads(Path(reward_dir), pairs, center=0.05)
        report["reward"] = {"loss": sums[0].item() / 8, "want_loss": want_loss, "max_rel": max_rel(grads, want),
                            "names": sorted(grads) == sorted(want),
                            "metrics": dict(zip(objective.metrics, (sums[1:] / 8).tolist()))}
    if world.is_main:
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


DPO_LOSS_TYPES = (("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0))  # (loss type, label smoothing)


def dpo_loss_types(model, reference: dict, cache, table: np.ndarray, model_dir: str, pairs: list[dict], world) -> dict:
    """Under torchrun: each DPO loss type's step loss and gradient on the ranks' skewed micro-steps; on rank 0 the
    report of each against direct_grads (TRL's formula per pair), else {}."""
    import torch.distributed as dist

    import train
    from minitrain.training.objectives import DPO

    report = {}
    for loss_type, eps in DPO_LOSS_TYPES:
        objective = DPO(beta=0.5, loss_type=loss_type, label_smoothing=eps, reference=reference)
        model.zero_grad(set_to_none=True)
        packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
        sums = train.forward_backward(model, objective, cache, packs, 8, world.world_size, world.device)
        dist.all_reduce(sums)
        grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
        if world.is_main:
            want_loss, want, _ = direct_grads(Path(model_dir), pairs, name="dpo", beta=0.5, reference=table,
                                              loss_type=loss_type, label_smoothing=eps)
            report[f"dpo_{loss_type}"] = {"loss": sums[0].item() / 8, "want_loss": want_loss,
                                          "max_rel": max_rel(grads, want), "names": sorted(grads) == sorted(want)}
    return report


def test_two_ranks_with_skewed_micro_steps_give_the_direct_gradient(tmp_path, tiny_model_dir, two_ranks):
    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=2)
    rows = read_pairs(data)
    for k, margin in ((1, 0.75), (6, -1.5)):  # the reward model's optional margins (the other objectives ignore them)
        rows[k]["margin"] = margin
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward_dir = reward_model_dir(tiny_model_dir("llama"), tmp_path / "rm")  # tied embeddings, no pad token
    run = two_ranks.run(__name__, "pair_grad_worker", [tiny_model_dir("llama"), data, tmp_path / "out", reward_dir])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["table_max_rel"] < 1e-6
    for name in ("dpo", "simpo", "orpo", "reward"):
        r = report[name]
        assert r["names"], name
        assert r["loss"] == pytest.approx(r["want_loss"], rel=1e-6), name
        assert r["max_rel"] < 1e-5, (name, r["max_rel"])
        assert len(r["metrics"]) == {"orpo": 9, "reward": 3}.get(name, 6)
        if name != "reward":  # TRL's definitions, written in the test (ORPO: its first 6, CPO-style averages)
            assert list(r["metrics"].values())[:6] == pytest.approx(r["want_metrics"], rel=1e-5, abs=1e-6), name
    for loss_type, _ in DPO_LOSS_TYPES:  # each of TRL's DPO loss types (with label smoothing where it has one)
        r = report[f"dpo_{loss_type}"]
        assert r["names"], loss_type
        assert r["loss"] == pytest.approx(r["want_loss"], rel=1e-5, abs=1e-6), loss_type
        assert r["max_rel"] < 1e-5, (loss_type, r["max_rel"])
    orpo = report["orpo"]["metrics"]  # TRL's names; the loss is the NLL minus λ x the log-sigmoid of the odds
    assert report["orpo"]["loss"] == pytest.approx(orpo["nll_loss"] - 0.7 * orpo["log_odds_ratio"], rel=1e-5)
    assert orpo["rewards/chosen"] == pytest.approx(0.7 * orpo["logps/chosen"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# train.py as a user runs it


def dpo_args(tmp_path, model_dir, data, steps: int) -> list[str]:
    return [
        "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(tmp_path / "out"),
        "--objective", "dpo", "--dpo-beta", "0.5", "--batch-size", "4", "--max-tokens-per-gpu", "64",
        "--max-steps", str(steps), "--learning-rate", "5e-3", "--validation-split", "0.2",
        "--eval-every-samples", "16", "--num-eval-generations", "1", "--eval-max-new-tokens", "2",
        "--save-dtype", "float32", "--no-activation-checkpointing",
    ]


@pytest.mark.parametrize("flags, loss", [
    (["--dpo-loss-type", "ipo", "--dpo-beta", "0.25"], 4.0),  # (0 - 1 / (2 x 0.25))^2
    (["--dpo-loss-type", "hinge"], 1.0),  # max(0, 1 - 0)
], ids=["ipo", "hinge"])
def test_the_dpo_loss_type_flags_pick_their_loss(tmp_path, capsys, tiny_model_dir, flags, loss):
    """--dpo-loss-type and --dpo-beta through the command line: at step 1 the policy is the reference, every
    log-ratio margin 0, and each loss type's formula (objectives.md, TRL's) at a margin of 0 is the step's loss
    (sigmoid's log 2 is the test below; robust and label smoothing are log 2 there too, so not told apart here)."""
    data = write_pairs(tmp_path / "pairs.jsonl", 10, seed=3)
    code, err = run_main([*dpo_args(tmp_path, tiny_model_dir("llama"), data, 1), *flags], capsys)
    assert code == 0, err[-2000:]
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("name, flags, truth", [
    ("simpo", ["--simpo-beta", "3", "--simpo-gamma", "1.5"], dict(beta=3.0, gamma=1.5)),
    ("simpo", ["--preference-sft-weight", "0.4"], dict(beta=2.0, gamma=0.5, sft_weight=0.4)),  # the defaults
    ("orpo", ["--orpo-lambda", "0.4"], dict(beta=0.4)),
], ids=["simpo", "simpo-sft-weight", "orpo"])
def test_the_simpo_and_orpo_flags_give_their_papers_loss(tmp_path, capsys, tiny_model_dir, name, flags, truth):
    """--simpo-beta, --simpo-gamma, --preference-sft-weight and --orpo-lambda through the command line: step 1's
    loss is the papers' loss (direct_loss: the model's own forward, one sequence at a time) of the step's pairs at
    the flags' values, before any update."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    data = write_pairs(tmp_path / "pairs.jsonl", 4, seed=7)
    code, err = run_main(["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir",
                          str(tmp_path / "out"), "--objective", name, "--batch-size", "2", "--max-tokens-per-gpu",
                          "64", "--max-steps", "1", "--save-dtype", "float32", "--no-activation-checkpointing",
                          *flags], capsys)
    assert code == 0, err[-2000:]
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = direct_loss(lm, [rows[line - 1] for line in first["sample_lines"]], name=name, **truth).item()
    assert len(first["sample_lines"]) == 2 and first["loss"] == pytest.approx(want, rel=1e-5)


def test_dpo_starts_at_log_2_learns_the_pairs_and_reuses_its_reference_on_resume(tmp_path, capsys, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    data = write_pairs(tmp_path / "pairs.jsonl", 10, seed=3, learnable=True)  # 8 train, 2 validation
    code, _ = run_main(dpo_args(tmp_path, model_dir, data, 10), capsys)
    out = tmp_path / "out"
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    # Policy == reference before the first update: every reward is 0, every pair's loss log 2. Up to float32
    # rounding: the reference packs the pairs as one validation step, the first step packs them otherwise, and a
    # sequence's log-prob moves in its last bits with the length of the row around it (~1e-7 relative here).
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5, key
    assert first["pairs"] == 4 and first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    # The chosen replies are learnable: the policy comes to prefer them.
    assert last["rewards/accuracies"] == 1.0 > first["rewards/accuracies"]
    assert last["rewards/margins"] > 1.0 and last["loss"] < 0.5
    assert last["validation_rewards/accuracies"] == 1.0 and last["validation_loss"] < 0.5
    assert "validation_rewards/chosen" in last and last["validation_tokens"] == 2  # units: pairs
    tables = list((out / "token_cache").glob("*/reference_logps-*.npy"))
    assert len(tables) == 1
    written = tables[0].stat().st_mtime_ns

    # Resume for two more steps: the table is read, not recomputed, and the model is the checkpoint's alone.
    import numpy as np

    import train

    capsys.readouterr()
    code = train.main(dpo_args(tmp_path, model_dir, data, 12))
    stdout = capsys.readouterr().out
    assert code == 0
    assert "resumed from" in stdout and f"reference log-probs: reused {tables[0]}" in stdout
    assert "computing" not in stdout and "weights: the checkpoint's; none is read" in stdout
    assert tables[0].stat().st_mtime_ns == written
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))

    # Without its table a resume reads the initial weights to compute it again (the checkpoint's are trained ones):
    # the same table as the first run's.
    table = np.load(tables[0])
    tables[0].unlink()
    code = train.main(dpo_args(tmp_path, model_dir, data, 13))
    stdout = capsys.readouterr().out
    assert code == 0 and "reference log-probs: computing" in stdout and "weights: the checkpoint's" not in stdout
    assert np.array_equal(np.load(tables[0]), table)

    from minitrain.tools import plot_run

    assert plot_run.main([str(out)]) == 0 and (out / "metrics.png").stat().st_size > 0


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_two_ranks_with_the_default_sharding_train_dpo_as_one_process_does(tmp_path, capsys, tiny_model_dir, adapter,
                                                                           two_ranks):
    """train.py under torchrun with --fsdp-sharding-strategy SHARD_GRAD_OP (the default until FULL_SHARD; it keeps
    parameters gathered after a forward): the reference pass before the first step must leave the shards to the optimizer (and,
    with LoRA, the adapters trainable), or the model never moves. The losses of 2 ranks are 1 process's."""
    model_dir = tiny_model_dir("llama")
    data = write_pairs(tmp_path / "pairs.jsonl", 10, seed=3, learnable=True)
    extra = ["--lora", "--lora-r", "4", "--lora-dropout", "0", "--learning-rate", "2e-2"] if adapter == "lora" else []
    args = [*dpo_args(tmp_path, model_dir, data, 5), *extra, "--fsdp-sharding-strategy", "SHARD_GRAD_OP"]
    code, _ = run_main([*args, "--output-dir", str(tmp_path / "one")], capsys)
    assert code == 0
    run = two_ranks.train([*args, "--output-dir", str(tmp_path / "two")], tmp_path / "two_run")  # the shared job
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
                for out in ("one", "two"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert two[-1]["loss"] < two[0]["loss"] - 0.01  # it trained (without the fixes: log 2 at every step)
    assert (tmp_path / "two" / "checkpoints" / "step_5").is_dir()  # the final full state (the optimizer's too)


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_objectives_run_end_to_end_without_a_reference(tmp_path, capsys, tiny_model_dir, objective):
    data = write_pairs(tmp_path / "pairs.jsonl", 4, seed=4, learnable=True)
    args = [
        "--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")),
        "--output-dir", str(tmp_path / "out"), "--objective", objective, "--batch-size", "4",
        "--max-tokens-per-gpu", "64", "--max-steps", "3", "--save-dtype", "float32", "--learning-rate", "5e-3",
    ]
    code, _ = run_main(args, capsys)
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and "rewards/accuracies" in records[0]
    if objective == "orpo":  # TRL's ORPO metric names; the chosen reply's NLL falls as it is learnt
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(records[0])
        assert records[-1]["nll_loss"] < records[0]["nll_loss"]
    assert not list((tmp_path / "out" / "token_cache").glob("*/reference_logps-*"))


def test_a_reward_model_trains_and_its_export_scores_pairs_as_the_live_model(tmp_path, capsys, tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=3, learnable=True)
    held = read_pairs(write_pairs(tmp_path / "held.jsonl", 3, seed=9, learnable=True))
    out = tmp_path / "out"
    args = [
        "--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")),  # a causal LM: `score` is new
        "--output-dir", str(out), "--objective", "reward", "--batch-size", "4", "--max-tokens-per-gpu", "64",
        "--max-steps", "6", "--learning-rate", "5e-3", "--validation-data-path", str(tmp_path / "held.jsonl"),
        "--eval-every-samples", "24", "--save-dtype", "float32",
    ]
    from tests.test_resume import run_main as run_with_output

    code, stdout, _ = run_with_output(args, capsys)
    assert code == 0
    assert "validation: 3 pairs, 1 micro-steps and 0 generations per evaluation" in stdout  # pairs said once
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert {"accuracy", "margin", "mean_reward"} <= set(first) and first["pairs"] == 4
    assert first["loss"] == pytest.approx(math.log(2), abs=0.05)  # a new head scores both sides about alike
    assert last["loss"] < first["loss"] - 0.1 and last["accuracy"] == 1.0
    # The export is a sequence classifier; scoring each held-out sequence alone gives the live model's margin.
    rm = AutoModelForSequenceClassification.from_pretrained(out / "hf_format" / "samples_24", dtype=torch.float32)
    assert rm.config.architectures[0].endswith("ForSequenceClassification") and rm.config.num_labels == 1
    with torch.no_grad():
        margins = [(rm(input_ids=torch.tensor([r["chosen_input_ids"]])).logits[0, 0]
                    - rm(input_ids=torch.tensor([r["rejected_input_ids"]])).logits[0, 0]).item() for r in held]
    assert last["validation_margin"] == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-5)
    assert last["validation_accuracy"] == pytest.approx(np.mean([m > 0 for m in margins]))


RESUMED = {  # a DPO loss type with label smoothing, ORPO, a reward model (margins, centring), and one with LoRA
    "dpo_robust": ["--objective", "dpo", "--dpo-loss-type", "robust", "--dpo-label-smoothing", "0.1"],
    "orpo": ["--objective", "orpo"],
    "reward": ["--objective", "reward", "--reward-center-coefficient", "0.05"],
    "reward_lora": ["--objective", "reward", "--lora", "--lora-r", "4", "--lora-dropout", "0.3"],  # dropout: RNG
}
TIMINGS = ("tokens_per_s", "peak_memory_gb", "step_time_s", "elapsed_s")


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_a_run_stopped_and_resumed_gives_the_uninterrupted_steps_and_weights(tmp_path, capsys, tiny_model_dir, name):
    """Same world size (tests/test_resume.py runs the kill and the world-size changes): the resumed run logs the
    uninterrupted run's steps bit for bit, its losses and metrics too, and ends with the same weights."""
    import torch
    from safetensors.torch import load_file

    import train
    from tests.test_resume import metrics

    data = write_pairs(tmp_path / "pairs.jsonl", 12, seed=5, learnable=True)
    rows = read_pairs(data)
    rows[2]["margin"], rows[7]["margin"] = 0.5, -1.0  # the reward model's; the others ignore them
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def args(out: str, steps: int) -> list[str]:
        return ["--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")), "--output-dir",
                str(tmp_path / out), "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", str(steps),
                "--learning-rate", "5e-3", "--save-dtype", "float32", "--no-activation-checkpointing", *RESUMED[name]]

    assert run_main(args("reference", 4), capsys)[0] == 0
    assert run_main(args("resumed", 2), capsys)[0] == 0
    code = train.main(args("resumed", 4))
    assert code == 0 and "resumed from" in capsys.readouterr().out
    expected, got = metrics(tmp_path / "reference"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if k not in TIMINGS} for r in got] == \
        [{k: v for k, v in r.items() if k not in TIMINGS} for r in expected]  # bit for bit: losses, metrics, lines
    assert len({r["loss"] for r in expected}) == 4  # it trained: the steps differ
    folder = "hf_format/samples_16" + ("/adapter" if "lora" in name else "")
    file = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
    a, b = (load_file(tmp_path / run / folder / file) for run in ("reference", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("score" in k for k in a) == name.startswith("reward")  # a reward model's export holds its head


def test_the_memory_estimate_runs_a_step_of_each_preference_objective(tiny_model_dir, capsys, monkeypatch):
    """The estimate builds its packs on fake tensors (torch.bincount there used to stop every preference run whose
    activation checkpointing was decided by the estimate, the default). Each objective's step runs in every estimate
    (no --gpu-memory-gib: the row and the cost of a token, without the search for the longest row that fits), on the
    model the objective trains: AdamW's state in each simulated step is that of the causal LM (DPO, ORPO, KTO: the
    reference's log-probabilities are a table, not a second model) or of the 1-label classifier (reward), counted in
    the test."""
    from tests.test_memory import adamw_state_bytes, estimate_memory, simulated_parts

    model_dir = tiny_model_dir("llama")
    for objective in ("dpo", "orpo", "reward", "kto"):
        steps = simulated_parts(monkeypatch)
        estimate, _ = estimate_memory(["--model-name-or-path", str(model_dir), "--world-size", "2",
                                       "--max-tokens-per-gpu", "256", "--objective", objective], capsys)
        assert estimate["objective"] == objective and estimate["peak_gib"] > 0 and steps
        state = adamw_state_bytes(model_dir, 2, classifier=objective == "reward")
        assert [parts["optimizer_state"] for parts in steps] == [state] * len(steps), objective


def test_the_reference_table_is_keyed_by_the_model_files_and_the_device(tmp_path, tiny_model_dir):
    import os
    import shutil

    from minitrain.training.reference import model_key

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    key = model_key(str(model), "cpu")
    assert model_key(str(model), "cpu") == key and model_key(str(model), "cuda") != key
    from minitrain.training.lora import QLoRA

    assert model_key(str(model), "cpu", QLoRA.base_weights) != key  # QLoRA's reference is the 4-bit base
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # new weights, same name
    assert model_key(str(model), "cpu") != key
    key = model_key(str(model), "cpu")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert model_key(str(model), "cpu") != key


def test_objective_and_data_must_match(tmp_path, capsys, tiny_model_dir):
    from tests.test_train import base_args, write_data

    model_dir = tiny_model_dir("llama")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    code, err = run_main(base_args(tmp_path, model_dir, pairs), capsys)
    assert code == 2 and "holds preference pairs, which --objective sft cannot train" in err, err
    samples = write_data(tmp_path / "samples.jsonl", 4, vocab=VOCAB)
    code, err = run_main([*base_args(tmp_path, model_dir, samples), "--objective", "dpo"], capsys)
    assert code == 2 and "holds samples, not preference pairs; --objective dpo needs" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, pairs), "--objective", "simpo", "--simpo-beta", "0"],
                         capsys)
    assert code == 2 and "--simpo-beta must be positive" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, pairs), "--objective", "simpo", "--simpo-gamma", "-0.5"],
                         capsys)
    assert code == 2 and "--simpo-gamma must be >= 0 (the target margin), got -0.5" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, pairs), "--objective", "dpo", "--dpo-loss-type", "hinge",
                          "--dpo-label-smoothing", "0.1"], capsys)
    assert code == 2 and "--dpo-label-smoothing applies to --dpo-loss-type sigmoid and robust, not hinge" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, pairs), "--objective", "dpo", "--dpo-loss-type", "robust",
                          "--dpo-label-smoothing", "0.5"], capsys)
    assert code == 2 and "--dpo-label-smoothing must be in [0, 0.5), got 0.5" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, pairs), "--objective", "orpo", "--preference-sft-weight",
                          "0.5"], capsys)
    assert code == 2 and "orpo has its own NLL term" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, samples), "--objective", "orpo"], capsys)
    assert code == 2 and "holds samples, not preference pairs; --objective orpo needs" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, samples), "--objective", "reward"], capsys)
    assert code == 2 and "holds samples, not preference pairs; --objective reward needs" in err, err
    code, err = run_main([*base_args(tmp_path, model_dir, pairs), "--objective", "reward", "--eval-metric", "rouge"],
                         capsys)
    assert code == 2 and "a reward model does not generate" in err and len(err.strip().splitlines()) == 1, err


BAD_PAIR_ROWS = {
    "missing_label": ({"chosen_input_ids": [5, 6], "chosen_labels": [-100, 6], "rejected_input_ids": [5, 7]},
                      "pairs.jsonl:2: preference row has no 'rejected_labels' field"),
    "wrong_label": ({"chosen_input_ids": [5, 6], "chosen_labels": [-100, 6], "rejected_input_ids": [5, 7],
                     "rejected_labels": [-100, 8]}, "pairs.jsonl:2: rejected_labels[1] = 8 but rejected_input_ids[1] = 7"),
    "not_a_pair": ({"input_ids": [5, 6], "labels": [-100, 6]},
                   "pairs.jsonl:2: preference row has no 'chosen_input_ids' field"),
    "empty_side": ({"chosen_input_ids": [5, 6], "chosen_labels": [-100, 6], "rejected_input_ids": [],
                    "rejected_labels": []}, "pairs.jsonl:2: 'rejected_input_ids' must be a non-empty list of integers"),
    "bad_margin": ({"chosen_input_ids": [5, 6], "chosen_labels": [-100, 6], "rejected_input_ids": [5, 7],
                    "rejected_labels": [-100, 7], "margin": "big"},
                   "pairs.jsonl:2: `margin` must be a finite number, got 'big'"),
}


@pytest.mark.parametrize("objective, case", [
    *((objective, case) for objective in ("dpo", "orpo") for case in BAD_PAIR_ROWS),
    *(("reward", case) for case in ("missing_label", "empty_side", "bad_margin")),
])
def test_bad_pair_rows_name_file_and_line(tmp_path, capsys, tiny_model_dir, objective, case):
    row, message = BAD_PAIR_ROWS[case]
    data = tmp_path / "pairs.jsonl"
    good = read_pairs(write_pairs(data, 1))[0]
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    from tests.test_train import base_args

    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--objective", objective], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_train_py_stops_on_a_bad_pair_row_with_one_line_on_stderr(tmp_path, tiny_model_dir):
    """As a user runs it (a fresh process): nothing else on stderr before the line (the memory estimate's module
    tracker printed a torch warning there in every run)."""
    import os
    import subprocess

    data = tmp_path / "pairs.jsonl"
    good = read_pairs(write_pairs(data, 1))[0]
    data.write_text(json.dumps(good) + "\n" + json.dumps(BAD_PAIR_ROWS["empty_side"][0]) + "\n")
    from tests.test_train import ROOT, base_args

    run = subprocess.run([sys.executable, "train.py", *base_args(tmp_path, tiny_model_dir("llama"), data),
                          "--objective", "reward"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [
        f"train.py: error: {data}:2: 'rejected_input_ids' must be a non-empty list of integers (flat, no booleans); "
        f"re-run process_data.py to produce input_ids/labels/len rows"], run.stderr


def test_a_pair_with_a_side_that_trains_nothing_is_dropped_and_counted(tmp_path):
    from minitrain.training.data import (
        build_token_cache,
        cache_dir_for,
        open_token_cache,
    )

    data = tmp_path / "pairs.jsonl"
    rows = read_pairs(write_pairs(data, 3))
    rows[1]["rejected_labels"] = [-100] * len(rows[1]["rejected_labels"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache_dir = cache_dir_for(data, tmp_path / "cache")
    build_token_cache(data, cache_dir)
    cache = open_token_cache(cache_dir)
    assert len(cache) == 2 and cache.skipped_lines == (2,) and cache.lines.tolist() == [1, 3]
    assert cache.chosen_lengths.tolist() == [rows[0]["chosen_len"], rows[2]["chosen_len"]]
    assert cache.trained.tolist() == [sum(x != -100 for x in r["chosen_labels"][1:] + r["rejected_labels"][1:])
                                      for r in (rows[0], rows[2])]


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: process_data.py on preference rows

USER, EARLIER, FINAL = {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, \
    {"role": "user", "content": "What is 2 + 2?"}
PROMPT = [{"role": "system", "content": "Be brief."}, USER, EARLIER, FINAL]  # an earlier assistant turn: masked
GOOD, BAD = {"role": "assistant", "content": "It is 4."}, {"role": "assistant", "content": "Five, probably."}
ROW_FORMS = {
    "torchllms": {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]},
    "trl_messages": {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]},
    "trl_text": {"prompt": FINAL["content"], "chosen": GOOD["content"], "rejected": BAD["content"]},
}


def preference_cli(capsys, tmp_path, tokenizer, input_file, *flags):
    from tests.test_process_data import run_main as process_main

    return process_main(capsys, tmp_path, tokenizer, input_file, *flags)


def test_an_id_beyond_64_bits_beside_the_conversation_encodes_like_any_other_field(capsys, tmp_path, tokenizer_dir):
    """The reader keeps such a number exact (orjson cannot write it): a pair and a KTO row stopped with a traceback,
    and a messages row was dropped as 'chat template rejected the conversation'. Each now gives the same rows as
    without the field."""
    from tests.test_process_data import CONVERSATIONS, write_lines

    big = 123456789012345678901234567890
    rows = [ROW_FORMS["trl_text"], {"prompt": "Hi", "completion": "Hello.", "label": True},
            {"messages": CONVERSATIONS["single"]}]
    for row in rows:
        outputs = []
        for extra in ({}, {"id": big}):
            data = write_lines(tmp_path / "in.jsonl", [{**row, **extra}])
            code, _, err, out = preference_cli(capsys, tmp_path, tokenizer_dir("chatml"), data)
            assert code == 0, err
            outputs.append(out.read_text())
        assert outputs[0] == outputs[1] and outputs[0].count("\n") == 1, row


@pytest.mark.parametrize("family", ["chatml", "llama3"])
@pytest.mark.parametrize("form", sorted(ROW_FORMS))
def test_each_row_form_gives_both_sides_with_only_the_final_reply_trained(capsys, tmp_path, tokenizer_dir, family,
                                                                        form):
    from transformers import AutoTokenizer

    from tests.test_process_data import write_lines

    tok_dir = tokenizer_dir(family)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = write_lines(tmp_path / "in.jsonl", [ROW_FORMS[form]])
    code, stdout, err, out = preference_cli(capsys, tmp_path, tok_dir, data)
    assert code == 0, err
    assert "preference (detected from line 1)" in stdout and "chosen: " in stdout and "rejected: " in stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    prompt = [FINAL] if form == "trl_text" else PROMPT
    eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[family]
    for side, reply in (("chosen", GOOD), ("rejected", BAD)):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        want = tok.apply_chat_template(prompt + [reply], tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(want) and row[f"{side}_len"] == len(ids)
        trained = [i for i, label in zip(ids, labels) if label != -100]
        assert [label for label in labels if label != -100] == trained
        assert tok.decode(trained) == reply["content"] + eot  # only the final reply, with its end of turn (no whitespace)
        first = next(k for k, label in enumerate(labels) if label != -100)
        assert all(label != -100 for label in labels[first: first + len(trained)])  # one run
    first = [next(k for k, label in enumerate(row[f"{s}_labels"]) if label != -100) for s in ("chosen", "rejected")]
    assert row["chosen_input_ids"][: first[0]] == row["rejected_input_ids"][: first[1]]  # the shared prompt
    assert row["len"] == row["chosen_len"] + row["rejected_len"]


def test_a_margin_field_passes_through_stage_1_and_into_the_cache(capsys, tmp_path, tokenizer_dir):
    from minitrain.training.data import build_token_cache, cache_dir_for, open_token_cache
    from tests.test_formats import write_csv
    from tests.test_process_data import write_lines

    rows = [{**ROW_FORMS["trl_text"], "margin": 1.5}, {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "7."}]
    for name, writer in (("in.jsonl", write_lines), ("in.csv", write_csv)):  # a CSV cell holds the number as text
        path = tmp_path / name
        writer(path, rows)
        code, _, err, out = preference_cli(capsys, tmp_path, tokenizer_dir("chatml"), path)
        assert code == 0, err
        written = [json.loads(line) for line in out.read_text().splitlines()]
        assert written[0]["margin"] == 1.5 and "margin" not in written[1]
    cache_dir = cache_dir_for(out, tmp_path / "cache")
    build_token_cache(out, cache_dir)
    assert open_token_cache(cache_dir).margins.tolist() == [1.5, 0.0]


def test_csv_and_parquet_rows_give_the_jsonl_output_and_stage_2_reads_it(capsys, tmp_path, tokenizer_dir):
    from minitrain.training.data import (
        build_token_cache,
        cache_dir_for,
        open_token_cache,
    )
    from tests.test_formats import write_csv, write_parquet
    from tests.test_process_data import write_lines

    rows = [ROW_FORMS["trl_text"], {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}]
    outputs = []
    for name, writer in (("in.jsonl", write_lines), ("in.csv", write_csv), ("in.parquet", write_parquet)):
        path = tmp_path / name
        writer(path, rows)
        code, _, err, out = preference_cli(capsys, tmp_path, tokenizer_dir("chatml"), path)
        assert code == 0, err
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    cache_dir = cache_dir_for(out, tmp_path / "cache")
    build_token_cache(out, cache_dir)
    cache = open_token_cache(cache_dir)
    written = [json.loads(line) for line in outputs[0].decode().splitlines()]
    assert cache.pairs and cache.lengths.tolist() == [r["len"] for r in written]
    assert cache.chosen_lengths.tolist() == [r["chosen_len"] for r in written]


def test_bad_pairs_are_dropped_and_counted_with_their_line(capsys, tmp_path, tokenizer_dir):
    from tests.test_process_data import write_lines

    other_prompt = [{"role": "user", "content": "Something else"}]
    lines = [
        ROW_FORMS["torchllms"],
        {"chosen": PROMPT + [GOOD], "rejected": other_prompt + [BAD]},  # 2: prompts differ
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},  # 3: chosen identical to rejected
        {"chosen": PROMPT + [GOOD], "rejected": PROMPT},  # 4: a side with no reply: nothing to train
        {"prompt": "Hi " * 48, "chosen": "a", "rejected": "b"},  # 5: each side fits, both together do not
    ]
    data = write_lines(tmp_path / "in.jsonl", lines)
    code, stdout, err, out = preference_cli(capsys, tmp_path, tokenizer_dir("chatml"), data,
                                            "--max-sample-num-tokens", "300")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 1
    for line, reason in ((2, "the chosen and rejected prompts differ"), (3, "chosen is identical to rejected"),
                         (4, "a side's last message is not an assistant turn"),
                         (5, "longer than --max-sample-num-tokens")):
        assert f"dropped {data}:{line}: {reason}" in stdout, stdout
    assert "dropped 4 samples" in stdout
    code, _, err, _ = preference_cli(capsys, tmp_path, tokenizer_dir("chatml"), data, "--max-sample-num-tokens", "300",
                                     "--on-too-long", "error")
    assert code == 2 and f"{data}:5: the pair has" in err and "(chosen + rejected) > --max-sample-num-tokens 300" in err


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Yes."}, "in.jsonl:2: no `rejected` field"),
    ({"prompt": "Hi", "chosen": None, "rejected": "No."},
     "in.jsonl:2: `chosen` must be a list of messages or a string"),
    ({"chosen": "Yes.", "rejected": "No."}, "in.jsonl:2: a text `chosen`/`rejected` needs a `prompt`"),
    ({"prompt": "Hi", "chosen": [{"role": "wizard", "content": "x"}], "rejected": "No."},
     "in.jsonl:2: chosen: messages[1] has unknown role 'wizard'"),
    ({"chosen": [{"role": "user", "content": "Hi"}], "rejected": []},  # not the messages rows' hint (it was)
     'in.jsonl:2: rejected: no messages; each side must be a non-empty list of {"role": ..., "content": ...} '
     'messages, or a string with a `prompt`'),
    ({"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "margin": "a lot"},
     "in.jsonl:2: `margin` must be a finite number, got 'a lot'"),
])
def test_bad_preference_rows_stop_the_run_naming_file_and_line(capsys, tmp_path, tokenizer_dir, row, message):
    from tests.test_process_data import write_lines

    data = write_lines(tmp_path / "in.jsonl", [ROW_FORMS["trl_text"], row])
    code, _, err, out = preference_cli(capsys, tmp_path, tokenizer_dir("chatml"), data, "--input-format", "preference")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


if __name__ == "__main__":
    pair_grad_worker(*sys.argv[1:5])


def test_dpo_with_lora_takes_the_base_model_as_its_reference(tmp_path, capsys, tiny_model_dir):
    """With LoRA the reference is the base model, adapters off: with adapters that start away from zero
    (--lora-init random) the reference table must still be the base model's own log-probs."""
    model_dir = tiny_model_dir("llama")
    data = write_pairs(tmp_path / "pairs.jsonl", 10, seed=3, learnable=True)
    args = [*dpo_args(tmp_path, model_dir, data, 3), "--lora", "--lora-init", "random", "--lora-r", "4",
            "--learning-rate", "1e-2"]
    code, _ = run_main(args, capsys)
    assert code == 0
    out = tmp_path / "out"
    [table_file] = list((out / "token_cache").glob("*/reference_logps-*.npy"))
    assert np.allclose(np.load(table_file), direct_table(model_dir, read_pairs(data)), rtol=1e-5, atol=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[0]["loss"] - math.log(2)) > 1e-3  # the random adapters move the policy off the reference
    assert (out / "hf_format" / "samples_12" / "adapter" / "adapter_config.json").is_file()
