"""What a run prints and logs, on rank 0: metrics.jsonl (one record per step), the progress line, the validation
replies (generations.jsonl), with --eval-metric the predictions of each evaluation (predictions/samples_<N>.jsonl,
N = samples seen) and, when asked for, a tracker (Weights & Biases, TensorBoard or MLflow through their public APIs),
which gets every number of each step's record.
"""

import importlib.util
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from minitrain import atomic
from minitrain.training.checkpoint import GENERATIONS, METRICS
from minitrain.training.distributed import World
from minitrain.training.validation import generation_records

TRACKERS = ("wandb", "tensorboard", "mlflow")
PREDICTIONS = "predictions"


class RunLog:
    def __init__(self, config, world: World, tokenizer, total_steps: int | None, first_step: int):
        out = Path(config.output_dir)
        self.metrics, self.generations, self.predictions = out / METRICS, out / GENERATIONS, out / PREDICTIONS
        self.tokenizer, self.is_main = tokenizer, world.is_main
        if world.is_main and first_step == 0:  # a run that starts over: an earlier run's predictions are not its own
            shutil.rmtree(self.predictions, ignore_errors=True)
        self.tracker = open_tracker(config.tracker, out, asdict(config)) if world.is_main and config.tracker else None
        self.progress = tqdm(total=total_steps, initial=first_step, disable=not world.is_main, dynamic_ncols=True,
                             desc="train")

    def step(self, record: dict, evaluation, validator) -> None:
        if not self.is_main:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.progress.update(1)
        self.progress.write(
            f"step {record['step']} | epoch {record['epoch']} | samples {record['samples_seen']} | "
            f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f} | "
            f"{record['tokens_per_s']:.0f} tok/s | pack {record['packing_utilisation']:.0%}"
            + (f" | val loss {evaluation.loss:.4f}" if evaluation is not None else "")
            + (f" | rougeL {evaluation.metrics['rougeL']:.2f}" if evaluation and "rougeL" in evaluation.metrics else "")
        )
        if evaluation is not None and evaluation.predictions:
            self.predictions.mkdir(exist_ok=True)
            atomic.write_text(self.predictions / f"samples_{record['samples_seen']}.jsonl",
                              "".join(json.dumps(p) + "\n" for p in evaluation.predictions))
        if evaluation is not None and evaluation.replies:
            vset = validator.validation_set
            generations = generation_records(self.tokenizer, vset.cache, vset.prompts, evaluation.replies,
                                             record["step"], record["samples_seen"])
            with open(self.generations, "a") as f:
                f.writelines(json.dumps(g) + "\n" for g in generations)
            for g in generations:
                self.progress.write(f"  sample line {g['data_line']}: ...{g['prompt'][-80:]!r} -> {g['reply']!r}")
        if self.tracker is not None:
            self.tracker.log(record, record["step"])

    def close(self, failed: bool = False) -> None:
        self.progress.close()
        if self.tracker is not None:
            self.tracker.close(failed)


# ----------------------------------------------------------------------------------------------------------------
# Trackers


def tracker_problem(name: str | None) -> str | None:
    """Why --tracker `name` cannot work here (not installed), or None; checked before anything expensive."""
    if name is None:
        return None
    if name not in TRACKERS:
        return f"--tracker {name!r} is unknown; use one of {', '.join(TRACKERS)}"
    if importlib.util.find_spec(name) is None:  # the package is named as the tracker
        return f"--tracker {name} needs the {name} package, which is not installed; pip install {name}"
    return None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record (booleans and text are not plotted by trackers)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbTracker:
    def __init__(self, run):
        self.run = run

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardTracker:
    def __init__(self, writer):
        self.writer = writer

    def log(self, record: dict, step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps every step it logged

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, mlflow):
        self.mlflow = mlflow

    def log(self, record: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars(record), step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


def open_tracker(name: str, output_dir: Path, config: dict) -> WandbTracker | TensorBoardTracker | MlflowTracker:
    """Rank 0 only. W&B takes its project and entity from WANDB_PROJECT / WANDB_ENTITY as usual; MLflow its server
    from MLFLOW_TRACKING_URI and its experiment from MLFLOW_EXPERIMENT_NAME (default "minitrain"). Without a
    tracking URI, MLflow writes a local file store into <output-dir>/mlruns (`mlflow ui --backend-store-uri` it)."""
    if name == "wandb":
        import wandb

        return WandbTracker(wandb.init(dir=str(output_dir), config=config))
    if name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
            os.environ["MLFLOW_TRACKING_URI"] = (output_dir / "mlruns").resolve().as_uri()
        import mlflow

        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "minitrain"))
        mlflow.start_run()
        mlflow.log_params({k: str(v) for k, v in config.items()})
        return MlflowTracker(mlflow)
    from torch.utils.tensorboard import SummaryWriter

    return TensorBoardTracker(SummaryWriter(log_dir=str(output_dir / "tensorboard")))

