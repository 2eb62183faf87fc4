"""Experiment tracking: MLflow gets exactly what metrics.jsonl gets, a resumed run keeps its MLflow run, evaluation
logs to it, and codecarbon's energy accumulates in emissions.json and reaches the model card."""

import json
import os
import sys

import pytest
from conftest import crash_after, latest_checkpoint, metrics_entries, tiny_config
from mlflow import MlflowClient

from configs import base
from llm import config_validation
from llm.eval import model_card
from llm.train import emissions, loop, start, tracking

LONG_PREFIX = "x" * 7000  # Longer than MLflow's 6,000-character parameter values.


def _tracked_config(data_dir, num_steps):
    config = tiny_config(train__trackers="tensorboard,mlflow", train__track_emissions=True)
    config.data.path = data_dir
    config.train.update(num_steps=num_steps, log_every=2, eval_every=10, checkpoint_every=5, query_prefix=LONG_PREFIX)
    return config


def _histories(workdir):
    """{metric: [(step, value), ...]} of the run's MLflow run, and the MLflow client and run id."""
    info = tracking.read_run_info(workdir)
    client = MlflowClient(info["tracking_uri"])
    keys = client.get_run(info["run_id"]).data.metrics
    histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(info["run_id"], key)) for key in keys}
    return histories, client, info["run_id"]


def _jsonl_histories(workdir):
    """The same view of metrics.jsonl: every numeric value under its key, at its step."""
    histories = {}
    for entry in metrics_entries(workdir):
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                histories.setdefault(key, []).append((entry["step"], value))
    return histories


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, data_dir):
    """10 steps with MLflow (its default store: RUN/mlruns) and codecarbon, then resumed to 20 steps; returns the
    workdir, what the first call left (MLflow run info, emissions.json) and the current directory's listing."""
    workdir, cwd = tmp_path_factory.mktemp("tracked"), tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(cwd)  # Neither MLflow nor codecarbon may write where the trainer was started.
        loop.train(_tracked_config(data_dir, 10), str(workdir))
        first = {
            "info": tracking.read_run_info(str(workdir)),
            "emissions": emissions.read(str(workdir)),
            "histories": _histories(str(workdir))[0],
            "jsonl": _jsonl_histories(str(workdir)),
        }
        result = loop.train(_tracked_config(data_dir, 20), str(workdir))
    assert result.start_step == 10
    return str(workdir), first, os.listdir(cwd)


def test_mlflow_gets_every_metric_the_config_and_the_run_files(tracked_run):
    workdir, first, cwd_files = tracked_run
    assert first["histories"] == first["jsonl"]  # Every key, every step, every value, once.
    assert {"loss", "learning_rate", "eval_loss", "tokens_per_sec"} <= set(first["histories"])
    info = first["info"]
    assert info["tracking_uri"] == f"sqlite:///{workdir}/mlruns/mlflow.db"
    assert info["experiment"] == os.path.basename(workdir)
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.num_layers"] == "2" and params["train.trackers"] == "tensorboard,mlflow"
    assert params["train.num_steps"] == "10"  # The first start's value; the resume's is a tag.
    assert run.data.tags["changed_on_resume.train.num_steps"] == "20"
    assert len(params["train.query_prefix"]) == 6000 and params["train.query_prefix"].endswith(tracking.TRUNCATED)
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"config.json", "emissions.json"} <= artifacts
    assert artifacts <= {"config.json", "emissions.json"}  # No report or model card yet.
    assert cwd_files == []


def test_a_resumed_run_logs_to_the_same_mlflow_run_each_step_once(tracked_run):
    workdir, first, _ = tracked_run
    assert tracking.read_run_info(workdir) == first["info"]
    histories, client, run_id = _histories(workdir)
    assert histories == _jsonl_histories(workdir)
    assert [step for step, _ in histories["loss"]] == list(range(2, 21, 2))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name(first["info"]["experiment"]).experiment_id])) == 1


def test_emissions_accumulate_across_a_resume(tracked_run):
    workdir, first, _ = tracked_run
    before, after = first["emissions"], emissions.read(workdir)
    assert len(before["sessions"]) == 1 and len(after["sessions"]) == 2
    assert before["total"]["energy_kwh"] > 0 and before["total"]["emissions_kg_co2eq"] > 0
    assert after["sessions"][0] == before["sessions"][0]
    for key in ("energy_kwh", "emissions_kg_co2eq", "duration_s"):
        assert after["total"][key] == pytest.approx(sum(s[key] for s in after["sessions"]))
        assert after["total"][key] > before["total"][key]
    session = after["sessions"][-1]
    assert session["country"] == "ESP" and session["device_kind"] == "cpu" and session["device_count"] == 8
    # "measured" only when codecarbon read the CPU (and any GPU) from energy counters, as its hardware says.
    cpu_measured = session["methods"]["CPU"].startswith("measured")
    assert session["measurement"] == ("measured" if cpu_measured else "estimated")
    assert session["methods"]["RAM"] == "estimated"
    assert not any(name.endswith(".csv") for name in os.listdir(workdir))  # codecarbon's CSV output is off.


def test_evaluation_logs_its_metrics_and_files_to_the_training_run(tracked_run, tmp_path):
    workdir, first, _ = tracked_run
    report = {"workdir": workdir, "step": 20, "bpb": 3.25, "xnli": {"accuracy": 41.5, "n": 30}, "settings": {"k": 1}}
    output = tmp_path / "report.json"
    output.write_text(json.dumps(report))
    (tmp_path / "report.md").write_text("| task |")
    tracking.log_evaluation(workdir, report, 20, str(output))
    histories, client, run_id = _histories(workdir)
    assert histories["eval/bpb"] == [(20, 3.25)]
    assert histories["eval/xnli/accuracy"] == [(20, 41.5)] and histories["eval/xnli/n"] == [(20, 30.0)]
    assert not any(key.startswith(("eval/settings", "eval/step", "eval/workdir")) for key in histories)
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/report.json", "eval/report.md"}


def test_the_model_card_shows_the_training_compute(tracked_run):
    workdir, _, _ = tracked_run
    config = _tracked_config("", 20)
    total = emissions.read(workdir)["total"]
    card = open(
        model_card.write_model_card(workdir, config, num_params=1000, step=20, report={"settings": {"num_shots": 0}})
    ).read()
    section = card.split("## Training compute")[1].split("##")[0]
    assert (
        "| tokens seen | 5,120 |" in section and "over 2 session(s)" in section and "| devices | 8 x cpu |" in section
    )
    assert f"| energy | {total['energy_kwh']:.4g} kWh, {total['measurement']} |" in section
    assert f"{total['emissions_kg_co2eq']:.4g} kg CO2eq (ESP grid" in section


def test_a_run_without_energy_tracking_says_so_in_its_card(tmp_path):
    compute = {
        "total": {"duration_s": 300.0, "energy_kwh": None, "sessions": 1},
        "sessions": [{"device_kind": "TPU v5 lite", "device_count": 16, "process_count": 4, "energy_kwh": None}],
    }
    card = model_card.model_card(
        tiny_config(),
        num_params=1,
        step=4,
        workdir=str(tmp_path),
        report={"settings": {"num_shots": 0}},
        data_report=None,
        compute=compute,
    )
    assert "| wall time | 5 min over 1 session(s) |" in card and "| devices | 16 x TPU v5 lite on 4 hosts |" in card
    assert "| energy | not measured (config.train.track_emissions=False) |" in card


def test_steps_an_interrupted_run_logged_past_its_checkpoint_are_not_logged_twice(
    tracked_run, tmp_path, data_dir, monkeypatch
):
    # A store shared by several runs, as $MLFLOW_TRACKING_URI would give (the tracked run's: no second migration).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.read_run_info(tracked_run[0])["tracking_uri"])
    config = _tracked_config(data_dir, 10)
    config.train.track_emissions = False
    crash_after(monkeypatch, 8)  # Logged steps 2..8, checkpointed step 5.
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, str(tmp_path / "run"))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run") == 5
    histories, client, run_id = _histories(str(tmp_path / "run"))
    assert client.get_run(run_id).info.status == "FAILED"
    assert [step for step, _ in histories["loss"]] == [2, 4, 6, 8]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")  # The run stays in its store.
    loop.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "elsewhere.db")
    histories, client, _ = _histories(str(tmp_path / "run"))
    assert tracking.read_run_info(str(tmp_path / "run"))["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [step for step, _ in histories["loss"]] == [2, 4, 6, 8, 10]
    assert histories["loss"] == _jsonl_histories(str(tmp_path / "run"))["loss"]  # The replayed steps are identical.
    assert emissions.read(str(tmp_path / "run"))["total"]["energy_kwh"] is None


def test_an_unknown_tracker_is_refused_with_the_allowed_ones():
    with pytest.raises(config_validation.ConfigError, match=r"config.train.trackers='tensorboard,wandb': 'wandb'"):
        start.checked_config(tiny_config(train__trackers="tensorboard,wandb"))
    assert tracking.tracker_names(tiny_config(train__trackers=" mlflow, tensorboard,mlflow")) == (
        "mlflow",
        "tensorboard",
    )
    assert tracking.tracker_names(tiny_config(train__trackers="")) == ()


def test_the_tracker_table_has_exactly_the_allowed_choices():
    assert set(tracking.TRACKERS) == set(base.LIST_CHOICES["train.trackers"])


def test_a_missing_mlflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"trackers includes 'mlflow'.*pip install -e '\.\[mlflow\]'"):
        tracking.check_config(tiny_config(train__trackers="mlflow"))
    tracking.check_config(tiny_config())  # The default needs no extra.


def test_codecarbon_failing_to_start_records_the_session_without_energy(tmp_path, monkeypatch):
    def broken(config, workdir):
        raise RuntimeError("no /proc/cpuinfo here")

    monkeypatch.setattr(emissions, "_started_tracker", broken)
    with emissions.track(tiny_config(train__track_emissions=True), str(tmp_path)):
        pass  # training would run here, and does: a measuring tool that fails does not stop it
    session = emissions.read(str(tmp_path))["sessions"][-1]
    assert session["energy_kwh"] is None and session["not_measured"] == "codecarbon could not start"


def test_an_unknown_emissions_country_is_refused():
    with pytest.raises(config_validation.ConfigError, match="config.train.emissions_country='SPAIN'"):
        emissions.check_config(tiny_config(train__track_emissions=True, train__emissions_country="SPAIN"))
