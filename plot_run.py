"""One picture of a run: training and validation loss, learning rate and tokens/s against samples seen.

    python plot_run.py OUTPUT_DIR [--output PNG]    # default: OUTPUT_DIR/metrics.png

Reads OUTPUT_DIR/metrics.jsonl as train.py writes it (one record per optimizer step; `validation_loss` on the steps
that were evaluated). Errors are one line, `plot_run.py: error: FILE[:LINE]: reason; fix`, exit 2.
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
    """Three panels sharing the samples-seen axis; the PNG is written atomically."""
    samples = [r["samples_seen"] for r in records]
    evaluated = [r for r in records if r.get("validation_loss") is not None]
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(3, 1, sharex=True, figsize=(8, 9), height_ratios=(2, 1, 1))
    ax_loss.plot(samples, [r["loss"] for r in records], label="training loss", linewidth=1)
    if evaluated:
        ax_loss.plot([r["samples_seen"] for r in evaluated], [r["validation_loss"] for r in evaluated],
                     "o-", label="validation loss", linewidth=1.5, markersize=4)
    ax_loss.set_ylabel("loss (token mean)")
    ax_loss.legend()
    ax_loss.set_title(title)
    ax_lr.plot(samples, [r["lr"] for r in records], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_speed.plot(samples, [r["tokens_per_s"] for r in records], color="tab:purple")
    ax_speed.set_ylabel("tokens / s")
    ax_speed.set_xlabel("samples seen")
    for ax in (ax_loss, ax_lr, ax_speed):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic.write_bytes(png, image.getvalue())


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
