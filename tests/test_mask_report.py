"""process_data.py --report (the HTML mask report) and --config (a YAML/TOML file of its flags)."""

import html
import os
import re

from minitrain.prepare import pipeline
from tests.test_process_data import CONVERSATIONS, run_main, turns, write_lines


def test_the_report_shows_trained_tokens_drops_with_lines_and_lengths(capsys, tmp_path, tokenizer_dir):
    lines = [{"messages": CONVERSATIONS["single"]}, {"messages": turns(("y", "z"))[:1]},  # no reply: dropped
             {"messages": CONVERSATIONS["multi_with_system"]}]
    data = write_lines(tmp_path / "in.jsonl", lines)
    report = tmp_path / "masks.html"
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--report", str(report))
    assert code == 0, stderr
    page = report.read_text()
    assert f"mask report: {report}" in stdout
    assert "3 rows read, 2 samples written, 1 dropped" in page
    reason = re.search(r"<tr><td>([^<]+)</td><td class='n'>1</td><td>2</td></tr>", page)
    assert reason is not None, "the drop reason, its count and its line"
    # Every trained token is highlighted, every masked one not: the highlighted text is the replies alone.
    trained = "".join(html.unescape(t) for t in re.findall(r'<span class="t[^"]*" title="\d+">([^<]*)</span>', page))
    assert "Paris is the capital of France.<|im_end|>" in trained and "What is the capital" not in trained
    assert "Why did the chicken cross the road?<|im_end|>" in trained and "Tell me a joke" not in trained
    assert '<span class="m s"' in page  # masked special tokens (the turn openers) are boxed
    assert "<svg" in page and "3 samples" not in page
    roles = dict(re.findall(r"<tr><td>(system|user|assistant)</td><td class='n'>(\d+)</td></tr>", page))
    assert set(roles) == {"system", "user", "assistant"} and int(roles["assistant"]) > 0  # the 2 shown samples


def test_a_config_file_gives_the_flags_and_the_command_line_wins(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    config = tmp_path / "stage1.yaml"
    config.write_text(f"input-file: {data}\noutput_file: {tmp_path / 'from_file.jsonl'}\n"
                      f"model-name-or-path: {tokenizer_dir('chatml')}\nmax_sample_num_tokens: 4096\n"
                      f"num-workers: 1\n")
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--config", str(config))
    assert code == 0, stderr  # run_main's own --output-file (given after the file's) wins
    assert out.exists() and not (tmp_path / "from_file.jsonl").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temporary one
    config.write_text("max_sample_num_token: 10\n")
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--config", str(config))
    assert code == 2 and stderr.strip().endswith("unknown key 'max_sample_num_token'; did you mean "
                                                 "'max-sample-num-tokens'?") and len(stderr.splitlines()) == 1


class _SentencePieceLike:
    """Decodes as Llama 2 / Mistral v1 do: "▁" is a space, and the decoded string's first space is stripped."""

    all_special_ids = [3]
    added_tokens_decoder: dict = {}
    pieces = {1: "▁Hi", 2: "▁Hello", 3: "</s>", 4: "▁there"}

    def decode(self, ids):
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_a_trained_run_shows_its_word_initial_space():
    """Decoded alone, the reply's first token loses its space: the view would show a run that starts one character
    later than what trains."""
    from minitrain.prepare.mask_report import token_spans

    tok = _SentencePieceLike()
    ids, labels = [1, 2, 4, 3], [-100, 2, 4, 3]
    assert pipeline.masked_view(tok, ids, labels, "[[ ]]", False) == "Hi[[ Hello there</s>]]"
    assert '<span class="t" title="4"> there</span>' in token_spans(tok, ids, labels)
    assert '<span class="m" title="1">Hi</span>' in token_spans(tok, ids, labels)
