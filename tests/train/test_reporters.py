"""--report-to: TensorBoard event files, a wandb offline run folder and an MLflow file store, each read back
with the tracker's own reader, hold exactly the rows of metrics.jsonl; failures close the runs as failed."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.errors import QdoraError
from qdora.options import report_to
from qdora.testing.runs import alpaca_data, metrics, small_config
from qdora.testing.wandb_records import offline_run_files, read_offline_run
from qdora.train import loop
from qdora.train.config import read_yaml, resolve_config
from qdora.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_to_values():
    assert report_to("none") == () and report_to(None) == () and report_to("") == ()
    assert report_to("all") == ("tensorboard", "wandb", "mlflow")
    assert report_to("wandb, mlflow,wandb") == ("wandb", "mlflow")
    assert report_to(["mlflow", "tensorboard"]) == ("mlflow", "tensorboard")
    with pytest.raises(QdoraError, match="unknown report-to 'comet'"):
        report_to("wandb,comet")


def test_yaml_list_is_accepted(tmp_path):
    (tmp_path / "run.yaml").write_text("model: m\ndata: d\noutput: o\nreport_to: [wandb, mlflow]\n")
    assert resolve_config(read_yaml(tmp_path / "run.yaml"), {}).reporters == ("wandb", "mlflow")


def _eval_file(tmp_path):
    (tmp_path / "eval").mkdir(exist_ok=True)
    return alpaca_data(tmp_path / "eval", n=8)


@pytest.fixture
def trackers(tmp_path, monkeypatch):
    """wandb offline, MLflow on a local file store: the trackers' own configuration, as a user sets it."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return store.as_uri()


def _mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def test_all_three_trackers_hold_the_metrics_rows(tiny_llama_dir, tmp_path, trackers):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = small_config(tiny_llama_dir, alpaca_data(tmp_path), out, max_steps=3, report_to="tensorboard,wandb,mlflow",
                       run_name="r1", project="proj", eval_data=str(_eval_file(tmp_path)), eval_every=3)
    assert train(cfg).status == "done"
    rows = metrics(out)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2, 3]
    eval_loss = rows[-1]["eval_loss"]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb.keys() == losses.keys() and all(tb[s] == pytest.approx(losses[s], rel=1e-6) for s in tb)
    assert events.Scalars("eval/loss")[0].value == pytest.approx(eval_loss, rel=1e-6)

    [run_file] = offline_run_files(out)
    run = read_offline_run(run_file)
    assert (run.name, run.project, run.exit_code) == ("r1", "proj", 0)
    assert run.config["lr"] == cfg.lr and run.config["resolved"]["model"]["name"] == str(tiny_llama_dir.resolve())
    wb = {h["_step"]: h["train/loss"] for h in run.history if "train/loss" in h}
    assert wb == pytest.approx(losses, rel=1e-6)
    assert [h["eval/loss"] for h in run.history if "eval/loss" in h] == pytest.approx([eval_loss], rel=1e-6)

    client, [ml] = _mlflow_runs(trackers, "proj")
    assert ml.info.run_name == "r1" and ml.info.status == "FINISHED" and ml.data.params["lr"] == str(cfg.lr)
    history = {m.step: m.value for m in client.get_metric_history(ml.info.run_id, "train/loss")}
    assert history == pytest.approx(losses, rel=1e-6)


def test_a_run_that_fails_is_closed_as_failed(tiny_llama_dir, tmp_path, trackers, monkeypatch):
    def broken_eval(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(loop, "evaluate", broken_eval)
    out = tmp_path / "run"
    cfg = small_config(tiny_llama_dir, alpaca_data(tmp_path), out, max_steps=3, report_to="wandb,mlflow",
                       project="failing", eval_data=str(_eval_file(tmp_path)), eval_every=2)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(cfg)
    _, [ml] = _mlflow_runs(trackers, "failing")
    assert ml.info.status == "FAILED"
    assert read_offline_run(offline_run_files(out)[0]).exit_code == 1


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("mlflow", "mlflow"),
                                          ("tensorboard", "torch.utils.tensorboard")])
def test_missing_package_is_refused_before_anything_is_written(tiny_llama_dir, tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # the import fails as if the package were not installed
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_llama_dir), "--data", str(alpaca_data(tmp_path)),
                                       "--output", str(out), "--report-to", f"{name}", "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"--report-to {name} needs a package that is not installed" in result.output
    assert not out.exists()


def test_mlflow_default_store_without_full_mlflow_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    out = tmp_path / "out"
    with pytest.raises(QdoraError, match="set MLFLOW_TRACKING_URI to your tracking server"):
        train(small_config(tiny_llama_dir, alpaca_data(tmp_path), out, report_to="mlflow"))
    assert not out.exists()


@pytest.mark.slow
def test_only_rank_0_reports(tiny_llama_dir, tmp_path, trackers):
    """2 gloo ranks under torchrun: one TensorBoard event file, one wandb run, one MLflow run."""
    import os
    import subprocess
    from pathlib import Path

    from qdora.testing.runs import SUBPROCESS_ENV
    from qdora.train.distributed import free_port

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "qdora.cli", "train", "--model", str(tiny_llama_dir), "--data",
           str(alpaca_data(tmp_path)), "--max-steps", "2", "--seq-len", "128", "--rank", "4", "--dtype", "fp32",
           "--device", "cpu", "--output", str(out), "--report-to", "all", "--project", "ranks"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    [run_file] = offline_run_files(out)
    assert read_offline_run(run_file).name == "two"  # default run name: OUTPUT's folder name
    _, runs = _mlflow_runs(trackers, "ranks")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
