"""One picture of a run: training and validation loss, learning rate and tokens/s against samples seen, for
preference objectives (DPO, SimPO) the rewards and the reward accuracy, and with --eval-metric rouge the validation
ROUGE figures.

    python -m minitrain.tools.plot_run OUTPUT_DIR [--output PNG]    # default: OUTPUT_DIR/metrics.png

Reads OUTPUT_DIR/metrics.jsonl as train.py writes it (one record per optimizer step; `validation_loss` on the steps
that were evaluated; `rewards/*` on every step of a preference run, `validation_rewards/*` on its evaluated steps;
`validation_rouge1`, `validation_rouge2`, `validation_rougeL`, `validation_rougeLsum` on the evaluated steps of a run
with --eval-metric rouge).
Errors are one line, `plot_run.py: error: FILE[:LINE]: reason; fix`, exit 2.
"""

import argparse
import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

from minitrain import atomic  # noqa: E402


class PlotError(ValueError):
    """A run folder that cannot be plotted; the message names the file and the fix."""


def read_metrics(path: Path) -> tuple[list[dict], bool]:
    """(step records, whether a torn last line was skipped). A killed run can leave its last line half-written."""
    if not path.is_file():
        raise PlotError(f"{path}: no such file; pass the --output-dir of a train.py run")
    lines = path.read_text().splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith("\n")
    records = []
    for line_no, line in enumerate(lines[:-1] if torn else lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{line_no}: not valid JSON ({e}); is this a train.py metrics file?") from None
        missing = [k for k in ("samples_seen", "loss", "lr", "tokens_per_s") if k not in record]
        if missing:
            raise PlotError(f"{path}:{line_no}: record has no {', '.join(missing)}; is this a train.py metrics file?")
        records.append(record)
    if not records:
        raise PlotError(f"{path}: no step has been logged yet; plot again once the run has trained a step")
    return records, torn


def plot(records: list[dict], title: str, png: Path) -> None:
    """Panels sharing the samples-seen axis: loss, preference rewards (if any), ROUGE (if any), learning rate,
    tokens/s; the PNG is written atomically."""
    samples = [r["samples_seen"] for r in records]
    evaluated = [r for r in records if r.get("validation_loss") is not None]
    preference = "rewards/margins" in records[0]
    rouge = [r for r in evaluated if "validation_rouge1" in r]
    panels = ["loss", *(["rewards"] if preference else []), *(["rouge"] if rouge else []), "lr", "speed"]
    heights = [1 if name in ("lr", "speed") else 2 for name in panels]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(8, 5 + sum(heights)), height_ratios=heights)
    ax_loss, ax_lr, ax_speed = axes[0], axes[-2], axes[-1]
    if preference:
        plot_rewards(axes[1], samples, records, evaluated)
    if rouge:
        plot_rouge(axes[panels.index("rouge")], rouge)
    ax_loss.plot(samples, [r["loss"] for r in records], label="training loss", linewidth=1)
    if evaluated:
        ax_loss.plot([r["samples_seen"] for r in evaluated], [r["validation_loss"] for r in evaluated],
                     "o-", label="validation loss", linewidth=1.5, markersize=4)
    ax_loss.set_ylabel("loss (pair mean)" if preference else "loss (token mean)")
    ax_loss.legend()
    ax_loss.set_title(title)
    ax_lr.plot(samples, [r["lr"] for r in records], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_speed.plot(samples, [r["tokens_per_s"] for r in records], color="tab:purple")
    ax_speed.set_ylabel("tokens / s")
    ax_speed.set_xlabel("samples seen")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic.write_bytes(png, image.getvalue())


def plot_rewards(ax, samples: list[int], records: list[dict], evaluated: list[dict]) -> None:
    """TRL's preference curves: rewards of the chosen and rejected sides and their margin; reward accuracy on a
    second axis (0..1)."""
    for key, colour in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red"),
                        ("rewards/margins", "tab:blue")):
        ax.plot(samples, [r[key] for r in records], color=colour, label=key, linewidth=1)
        if evaluated and f"validation_{key}" in evaluated[0]:
            ax.plot([r["samples_seen"] for r in evaluated], [r[f"validation_{key}"] for r in evaluated], "o--",
                    color=colour, label=f"validation {key}", markersize=4, linewidth=1)
    ax.set_ylabel("reward")
    accuracy = ax.twinx()
    accuracy.plot(samples, [r["rewards/accuracies"] for r in records], color="tab:gray", label="rewards/accuracies",
                  linewidth=1)
    accuracy.set_ylim(-0.05, 1.05)
    accuracy.set_ylabel("reward accuracy")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = accuracy.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize="small")


def plot_rouge(ax, evaluated: list[dict]) -> None:
    """The validation ROUGE figures (F-measure x 100) of each evaluation."""
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        ax.plot([r["samples_seen"] for r in evaluated], [r[f"validation_{kind}"] for r in evaluated], "o-",
                label=kind, markersize=4, linewidth=1)
    ax.set_ylabel("validation ROUGE")
    ax.legend(fontsize="small")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="the --output-dir of a train.py run")
    parser.add_argument("--output", type=Path, help="PNG to write (default: OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    png = args.output or args.output_dir / "metrics.png"
    try:
        records, torn = read_metrics(args.output_dir / "metrics.jsonl")
        if torn:
            print(f"{args.output_dir / 'metrics.jsonl'}: skipped its torn last line (the run was killed mid-write)")
        plot(records, str(args.output_dir), png)
    except (PlotError, OSError) as e:
        print(f"plot_run.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
