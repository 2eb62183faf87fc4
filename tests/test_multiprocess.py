"""Multi-process runs for real: `scripts/train.py --distributed` in two processes of four CPU devices each,
joined by a loopback coordinator (tests/process_launch.py), against one process with the eight devices of
conftest.py; and the corpus pipeline's Beam runner with two worker processes against one."""

import glob
import os

import jax
import numpy as np
import pytest
from conftest import metrics_entries, one_device_steps, run_script, saved_state, tiny_config
from process_launch import Launch
from test_data_pipeline import corpus_files, counts, make_config

from configs import tiny_es
from llm import checkpoint, sharding
from llm.corpus import beam_runner
from llm.data import loader
from llm.train import loop

MESH = (2, 2, 2)  # Every axis spans both processes' devices or splits within one: data, fsdp and tensor all work.
LAUNCH_TIMEOUT_S = 240
TRAINED = ("loss", "grad_norm", "param_norm")  # Logged values that depend on the arithmetic, not on timing.


def _config(data_dir, **overrides):
    config = tiny_config(**{"mesh_shape": MESH, **overrides})
    config.data.path = data_dir
    return config


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def _flags(config, workdir):
    """scripts/train.py flags that rebuild `config` from configs/tiny_es.py: --config.KEY=VALUE per changed key."""
    default, wanted = _flat(tiny_es.get_config().to_dict()), _flat(config.to_dict())
    flags = [f"--config={os.path.join('configs', 'tiny_es.py')}", f"--workdir={workdir}"]
    for key, value in wanted.items():
        if value != default[key]:
            text = f"({','.join(map(str, value))})" if isinstance(value, tuple | list) else str(value)
            flags.append(f"--config.{key}={text}")
    return flags


def _train_two_processes(config, workdir):
    launch = Launch("train.py", _flags(config, workdir), f"{workdir}_logs")
    launch.wait(LAUNCH_TIMEOUT_S)
    return launch


def _trained_values(workdir):
    return [{k: v for k, v in e.items() if k in TRAINED or k.startswith("eval_")} for e in metrics_entries(workdir)]


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    """20 steps with evaluation and checkpoints every 10, trained by two processes of four devices."""
    workdir = str(tmp_path_factory.mktemp("two_process"))
    _train_two_processes(_config(data_dir), workdir)
    return workdir


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
    """The same run in this process, on its eight devices."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    loop.train(_config(data_dir), workdir)
    return workdir


def test_two_processes_train_as_one_process_of_eight_devices(data_dir, two_process_run, one_process_run):
    two, one = _trained_values(two_process_run), _trained_values(one_process_run)
    # Written once, by process 0: every logged step appears once, as in the one-process run.
    assert [e["step"] for e in metrics_entries(two_process_run)] == [
        e["step"] for e in metrics_entries(one_process_run)
    ]
    assert any("eval_loss" in e for e in two)
    for got, want in zip(two, one, strict=True):
        assert got.keys() == want.keys()
        # Same global batches, same sharded program; gloo adds the partial sums of a cross-process reduction in
        # another order than the in-process all-reduce, so the last bits may differ.
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5)
    events = glob.glob(os.path.join(two_process_run, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1 and os.path.getsize(events[0]) > 0
    # Each process drew 20 batches of 4 rows: its half of the 20 global batches of 8, no more.
    with one_device_steps(_config(data_dir), 20) as (_, steps):
        saver = checkpoint.Checkpointer(os.path.join(two_process_run, "checkpoints"), keep=3)
        _, data_state, _ = saver.restore(20, steps.abstract_state)
        saver.close()
    assert data_state["layout"]["process_count"] == 2 and data_state["layout"]["batch_size"] == 4
    assert data_state["grain"]["next_index"] == 20


def test_processes_read_disjoint_halves_of_the_one_process_batches(data_dir):
    """The loader side of the equality above: process i's rows are the i-th half of each global batch."""
    train = loader.split_dir(data_dir, "train")
    halves = [
        loader.TrainIterator(train, seq_len=32, batch_size=4, seed=0, process_index=i, process_count=2) for i in (0, 1)
    ]
    whole = loader.TrainIterator(train, seq_len=32, batch_size=8, seed=0)
    for _ in range(40):  # Past one epoch of 256 rows.
        np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]), next(whole)["tokens"])
    validation = loader.split_dir(data_dir, "validation")
    halves = [loader.validation_batches(validation, 32, 4, 3, process_index=i, process_count=2) for i in (0, 1)]
    wholes = loader.validation_batches(validation, 32, 8, 3)
    for first, second, together in zip(*halves, wholes, strict=True):
        np.testing.assert_array_equal(np.concatenate([first["tokens"], second["tokens"]]), together["tokens"])


def test_sigkill_and_restart_resumes_and_ends_as_an_uninterrupted_run(data_dir, two_process_run, tmp_path):
    config, workdir = _config(data_dir), str(tmp_path / "killed")
    launch = Launch("train.py", _flags(config, workdir), str(tmp_path / "first_logs"))
    first_checkpoint = os.path.join(workdir, "checkpoints", "10")
    launch.wait_until(lambda: os.path.isdir(first_checkpoint), timeout=LAUNCH_TIMEOUT_S)
    launch.kill(1)
    launch.kill_all()  # Process 0 would wait for its peer until a timeout: the job is restarted as a whole.
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "20")), "the run ended before the kill"
    restart = _train_two_processes(config, workdir)
    for i in (0, 1):
        assert "Resumed from step 10 " in restart.log(i)
    assert "step 5:" not in restart.log(0)  # It did not train the first steps again.
    assert _trained_values(workdir) == _trained_values(two_process_run)
    resumed, uninterrupted = saved_state(config, workdir), saved_state(config, two_process_run)
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_of_two_processes_restores_in_one(data_dir, two_process_run, one_process_run):
    config = _config(data_dir)
    restored, reference = saved_state(config, two_process_run), saved_state(config, one_process_run)
    assert int(restored["step"]) == 20
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)  # Last bits: see the first test.
    params = jax.tree.leaves(restored["params"])
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(p, np.float64))) for p in params))
    assert norm == pytest.approx(metrics_entries(two_process_run)[-2]["param_norm"], rel=1e-6)


def test_lora_fine_tune_on_two_processes(data_dir, two_process_run, tmp_path):
    """LoRA from the two-process run (its base restored across processes), with adapter dropout, as in one."""
    config = _config(data_dir, init_from=two_process_run)
    config.train.update(trainable="lora", num_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
    config.model.update(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="attention/(query|value)|mlp/down")
    _train_two_processes(config, str(tmp_path / "two"))
    loop.train(config, str(tmp_path / "one"))
    two, one = _trained_values(str(tmp_path / "two")), _trained_values(str(tmp_path / "one"))
    assert [e.keys() for e in two] == [e.keys() for e in one] and "eval_loss" in two[0]  # The "before" at step 0.
    for got, want in zip(two, one, strict=True):
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5)


def test_beam_runner_with_two_worker_processes_writes_what_one_writes(tmp_path):
    config = make_config(tmp_path)
    outputs = {}
    # One worker: the FnApiRunner in this process, as tests/test_data_pipeline.py runs it; two: two SDK worker
    # processes, which split the bundles and the grouped keys between them.
    for workers, args in ((1, []), (2, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])):
        runner = beam_runner.BeamRunner(config, args)
        outputs[workers] = tmp_path / f"workers_{workers}"
        runner.filter(config, str(outputs[workers] / "filter"))
        runner.dedup(config, str(outputs[workers] / "filter"), str(outputs[workers] / "dedup"))
    for step in ("filter", "dedup"):
        assert corpus_files(outputs[1] / step) == corpus_files(outputs[2] / step)
        assert counts(outputs[1] / step) == counts(outputs[2] / step)


def test_a_mesh_that_does_not_split_the_batch_between_processes_is_refused(data_dir, tmp_path):
    # (1, 1, 8): pure tensor parallelism over both processes, so every device holds every row of the batch.
    config = _config(data_dir, mesh_shape=(1, 1, 8))
    launch = Launch("train.py", _flags(config, str(tmp_path / "run")), str(tmp_path / "logs"))
    with pytest.raises(AssertionError, match=r"rows 0-7 of each batch sit on devices of processes \[0, 1\]"):
        launch.wait(LAUNCH_TIMEOUT_S)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_processes=2", "--process_id=0"], "--num_processes, --process_id only apply to a multi-process run"),
        (["--distributed", "--num_processes=2", "--process_id=2"], "--process_id=2 must be below num_processes=2"),
    ],
)
def test_train_script_refuses_a_wrong_process_layout(data_dir, tmp_path, flags, message):
    result = run_script("train.py", f"--workdir={tmp_path}", f"--config.data.path={data_dir}", *flags)
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(coordinator_address="localhost"), "is not HOST:PORT"),
        (dict(num_processes=0), "num_processes=0 must be at least 1"),
        (dict(process_id=-1), "process_id=-1 must be at least 0"),
    ],
)
def test_distributed_layout_is_checked(layout, message):
    with pytest.raises(ValueError, match=message):
        sharding.check_distributed_args(
            **{"coordinator_address": None, "num_processes": None, "process_id": None, **layout}
        )
    sharding.check_distributed_args("localhost:1234", 2, 1)  # A good layout passes.
