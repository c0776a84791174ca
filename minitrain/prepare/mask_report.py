"""The mask report of stage 1 (`process_data.py --report masks.html`): one self-contained HTML page to check by eye
what the model will be trained on.

It shows a sample of conversations token by token, trained tokens highlighted and special tokens boxed, so a wrong
mask (a user turn trained, an end-of-turn token missed) is visible at a glance; trained and masked token counts and
tokens per role; every drop reason with its count and the first line numbers; and the histogram of sample lengths.
No script, no external file.
"""

import html
from collections import Counter

from minitrain import IGNORE

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: .2em .8em; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.sample { font: 13px/1.6 ui-monospace, monospace; white-space: pre-wrap; word-break: break-word;
          border: 1px solid #ddd; border-radius: 4px; padding: .6em; margin: .4em 0 1.4em; background: #fafafa; }
.t { background: #c8f0c8; } .m { color: #777; }
.s { border: 1px solid #999; border-radius: 3px; padding: 0 2px; font-size: 11px; }
.t.s { border-color: #2a7d2a; } .legend span { margin-right: 1.5em; }
"""


def piece_text(tokenizer, ids: list[int], start: int, end: int) -> str:
    """The text of ids[start:end] as it reads inside the sample: decoded after the token before it, which is then
    cut off. Decoded alone, a SentencePiece tokenizer (Llama 2, Mistral v1) strips the word-initial space of its
    first token, which is exactly what a person checking masks must see."""
    if start == 0:
        return tokenizer.decode(ids[start:end])
    before = tokenizer.decode(ids[start - 1 : start])
    both = tokenizer.decode(ids[start - 1 : end])
    return both[len(before):] if both.startswith(before) else tokenizer.decode(ids[start:end])


def token_spans(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The sample as HTML: each token's text, trained ones in green, special tokens boxed."""
    special = set(tokenizer.all_special_ids)
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    out = []
    for k, token in enumerate(input_ids):
        text = piece_text(tokenizer, input_ids, k, k + 1)
        classes = ["t" if labels[k] != IGNORE else "m"]
        if token in special or token in added:
            classes.append("s")
        out.append(f'<span class="{" ".join(classes)}" title="{token}">{html.escape(text)}</span>')
    return "".join(out)


def histogram_svg(lengths: list[int], bins: int = 30, width: int = 640, height: int = 160) -> str:
    if not lengths:
        return "<p>no samples</p>"
    top = max(lengths)
    size = max(1, -(-top // bins))
    counts = Counter(min(n // size, bins - 1) for n in lengths)
    peak = max(counts.values())
    bar = width / bins
    rects = [f'<rect x="{b * bar:.1f}" y="{height - counts[b] / peak * (height - 20):.1f}" width="{bar - 1:.1f}" '
             f'height="{counts[b] / peak * (height - 20):.1f}" fill="#4a90d9"><title>{b * size}-{(b + 1) * size - 1} '
             f'tokens: {counts[b]} samples</title></rect>' for b in range(bins) if counts[b]]
    axis = (f'<text x="0" y="12" font-size="11">{peak} samples</text>'
            f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">{top} tokens</text>'
            f'<text x="0" y="{height + 14}" font-size="11">0</text>')
    return f'<svg width="{width}" height="{height + 20}" role="img">{"".join(rects)}{axis}</svg>'


def render(source: str, samples: list[tuple[str, list[int], list[int], str]], tokens: int, trained: int,
           drops: Counter, drop_lines: dict[str, list[int]], lengths: list[int], written: int, read: int,
           input_format: str, role_tokens: Counter | None = None, truncated: str | None = None) -> str:
    """The report's HTML. `samples`: (where, input_ids, labels, token_spans HTML) of the conversations to show;
    `tokens`/`trained`: the whole output's; `drop_lines`: the first lines dropped for each reason; `truncated`:
    the summary's line on cut samples (seq2seq --on-too-long truncate)."""
    share = trained / tokens if tokens else 0.0
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>minitrain mask report: {html.escape(source)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Mask report: {html.escape(source)}</h1>",
             f"<p>{html.escape(input_format)}. {read:,} rows read, {written:,} samples written, "
             f"{sum(drops.values()):,} dropped.</p>",
             "<h2>Tokens</h2><table><tr><th></th><th>tokens</th><th>share</th></tr>",
             f"<tr><td>trained (the assistant turns and their end-of-turn tokens)</td><td class='n'>{trained:,}</td>"
             f"<td class='n'>{share:.1%}</td></tr>",
             f"<tr><td>masked (system, user, tool turns, template text)</td><td class='n'>{tokens - trained:,}</td>"
             f"<td class='n'>{1 - share:.1%}</td></tr>",
             f"<tr><td>all</td><td class='n'>{tokens:,}</td><td></td></tr></table>"]
    if role_tokens:
        parts.append(f"<h2>Tokens per role in the {len(samples)} conversations below</h2><p>each message's "
                     f"content tokenized alone (the template's own tokens not counted)</p>"
                     "<table><tr><th>role</th><th>tokens</th></tr>")
        parts += [f"<tr><td>{html.escape(role)}</td><td class='n'>{n:,}</td></tr>"
                  for role, n in role_tokens.most_common()]
        parts.append("</table>")
    parts.append("<h2>Dropped samples</h2>")
    if drops:
        parts.append("<table><tr><th>reason</th><th>samples</th><th>lines</th></tr>")
        for reason, n in drops.most_common():
            lines = drop_lines.get(reason, [])
            more = ", ..." if n > len(lines) else ""
            parts.append(f"<tr><td>{html.escape(reason)}</td><td class='n'>{n:,}</td>"
                         f"<td>{', '.join(map(str, lines))}{more}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>none</p>")
    if truncated:
        parts.append(f"<h2>Truncated samples</h2><p>{html.escape(truncated)}</p>")
    parts += ["<h2>Sample lengths (tokens)</h2>", histogram_svg(lengths),
              f"<h2>Conversations ({len(samples)}, chosen at random)</h2>",
              "<p class='legend'><span class='t'>trained token</span><span class='m'>masked token</span>"
              "<span class='s'>special token</span> (hover a token for its id)</p>"]
    for where, input_ids, labels, spans in samples:
        n_trained = sum(1 for label in labels if label != IGNORE)
        parts.append(f"<h3>{html.escape(where)} ({len(input_ids)} tokens, {n_trained} trained)</h3>"
                     f"<div class='sample'>{spans}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
