"""The experiment trackers `--report-to` sends each logged row to: TensorBoard, Weights & Biases, MLflow.

Each tracker is configured the way its users already configure it, as HF Trainer leaves it: wandb by
`WANDB_MODE` (offline writes OUTPUT/wandb/offline-run-*), `WANDB_API_KEY`, `WANDB_ENTITY`; MLflow by
`MLFLOW_TRACKING_URI` (a tracking server; MLflow's default sqlite store needs the full `mlflow`
package, a file store `MLFLOW_ALLOW_FILE_STORE=true`). `--project` is the wandb project and the MLflow
experiment (default `qdora`), `--run-name` the run's name in both (default: OUTPUT's folder name).
TensorBoard writes OUTPUT/tensorboard. Metric names are `train/<key>` (loss, lr, grad norm, tokens/s,
peak memory, epoch) and `eval/loss`.

Only rank 0 opens a reporter. Every package is checked before training starts (a missing one is one
message); a run that stops on an error is closed as failed (MLflow status FAILED, wandb exit code 1),
an interrupted one as killed, so no tracker shows a run still "running" forever.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from qdora.errors import QdoraError

# name -> (modules it imports, what to pip install)
PACKAGES = {"tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
            "wandb": (("wandb",), "wandb"), "mlflow": (("mlflow",), "mlflow-skinny")}
DEFAULT_PROJECT = "qdora"
STATUSES = ("done", "interrupted", "failed")


class Reporter(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...


def metric_name(key: str) -> str:
    """`loss` -> `train/loss`; `eval_loss` -> `eval/loss`."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


def check_reporters(names: tuple[str, ...]) -> None:
    """Every requested tracker's package is importable; else one message naming what to install."""
    missing = [n for n in names if any(_missing(m) for m in PACKAGES[n][0])]
    if missing:
        what = " ".join(PACKAGES[n][1] for n in missing)
        raise QdoraError(f"--report-to {','.join(missing)} needs a package that is not installed: "
                         f"pip install {what}  (or pip install 'qdora[loggers]')")
    if "mlflow" in names:
        import os

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if (not uri or uri.startswith("sqlite")) and _missing("sqlalchemy"):
            raise QdoraError("--report-to mlflow: MLflow's default store (sqlite) needs the full mlflow package; "
                             "set MLFLOW_TRACKING_URI to your tracking server (http://...), or pip install mlflow")


def _missing(module: str) -> bool:
    import sys

    if module in sys.modules:
        return sys.modules[module] is None  # a None entry: the import is known to fail
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def open_reporters(names: tuple[str, ...], output: Path, config: dict[str, Any], run_name: str | None,
                   project: str | None) -> list[Reporter]:
    """One open reporter per name (rank 0 only); if one fails to open, those already open are closed."""
    name = run_name or Path(output).resolve().name
    opened: list[Reporter] = []
    try:
        for n in names:
            opened.append(_OPENERS[n](Path(output), config, name, project or DEFAULT_PROJECT))
    except Exception as e:
        for r in opened:
            r.close("failed")
        if isinstance(e, QdoraError):
            raise
        raise QdoraError(f"--report-to {n}: could not start the run ({type(e).__name__}: {e})") from e
    return opened


class TensorBoardReporter:
    def __init__(self, output: Path, config: dict, run_name: str, project: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, output: Path, config: dict, run_name: str, project: str):
        import wandb

        self.run = wandb.init(project=project, name=run_name, dir=str(output), config=config,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "done" else 1)


class MlflowReporter:
    def __init__(self, output: Path, config: dict, run_name: str, project: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: ("" if v is None else v) for k, v in _flat(config).items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step, run_id=self.run.info.run_id)

    def close(self, status: str) -> None:
        mlflow_status = {"done": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.mlflow.end_run(mlflow_status)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as `a.b` keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_OPENERS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "mlflow": MlflowReporter}
