"""Knowledge distillation (train.objective="distill"): the loss against a hand computation and against the
cross-entropy, chunked against unchunked, a student that learns its teacher, resume, the checks on the
teacher, what checkpoints hold, and a teacher in bfloat16 or int8."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tokenizers
from conftest import (
    TINY_SEQ_LEN,
    crash_then_resume,
    latest_checkpoint,
    metrics_entries,
    pattern_rows,
    saved_state,
    tiny_config,
    write_dataset,
)
from flax import nnx

from llm import config_validation, sharding
from llm.model.transformer import create_model
from llm.runs import directory
from llm.train import inputs, loop, losses, start, step as step_lib, teacher as teacher_lib

TEACHER_MODEL = dict(embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def teacher_run(data_dir, tmp_path_factory):
    """A teacher twice the student's width, briefly trained on the pattern data."""
    config = tiny_config(train__num_steps=30, train__eval_every=0, train__checkpoint_every=30)
    config.model.update(TEACHER_MODEL)
    config.data.path = data_dir
    workdir = str(tmp_path_factory.mktemp("teacher"))
    loop.train(config, workdir)
    return workdir


def _distill_config(data_dir, teacher_run, **train):
    config = tiny_config()
    config.data.path = data_dir
    config.train.update(
        dict(
            objective="distill",
            teacher=teacher_run,
            distill_alpha=0.7,
            distill_temperature=2.0,
            num_steps=12,
            log_every=2,
            eval_every=6,
            checkpoint_every=4,
        ),
        **train,
    )
    return config


@pytest.fixture(scope="module")
def distilled_run(data_dir, teacher_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("distilled"))
    loop.train(_distill_config(data_dir, teacher_run), workdir)
    return workdir


def test_loss_equals_the_hand_computed_value():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 1, 5, 6)) * 3
    tokens = np.array([[2, 5, 1, 0, 4]])
    weights = np.array([[1.0, 0.0, 1.0, 1.0]])  # the second prediction is outside the loss mask
    alpha, temperature = 0.3, 2.0

    p, q = _softmax(teacher[0, :4] / temperature), _softmax(student[0, :4] / temperature)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    cross_entropy = -np.log(_softmax(student[0, :4])[np.arange(4), tokens[0, 1:]])
    kl_sum, ce_sum = np.sum(kl * weights[0]), np.sum(cross_entropy * weights[0])
    expected = alpha * temperature**2 * kl_sum + (1 - alpha) * ce_sum

    # Position t predicts token t + 1: the logits of the last position have no target.
    student, teacher, targets = jnp.asarray(student[:, :4]), jnp.asarray(teacher[:, :4]), tokens[:, 1:]
    sums = losses.distill_sums(student, teacher, targets, jnp.asarray(weights), temperature)
    value, metrics = losses.distill_objective(sums, alpha, temperature)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["distill_kl"]) == pytest.approx(kl_sum, rel=1e-5)
    assert float(metrics["distill_ce"]) == pytest.approx(ce_sum, rel=1e-5)
    assert float(sums.weight) == 3.0


def _models_and_batch():
    student = create_model(tiny_config())
    teacher_config = tiny_config(seed=1)
    teacher_config.model.update(TEACHER_MODEL)
    rows = list(pattern_rows(4, TINY_SEQ_LEN, 128, seed=3))
    batch = {name: jnp.stack([row[name] for row in rows]) for name in rows[0]}
    return student, create_model(teacher_config), batch


def _terms(objective, graphdef, params, teacher, batch, **train):
    """(objective value, metric sums) of `objective` for the student's `params`, and their gradient."""
    train_cfg = tiny_config(train__distill_alpha=0.0).train
    train_cfg.update(train)

    def value(p):
        result = losses.OBJECTIVES[objective].terms(nnx.merge(graphdef, p), teacher, batch, None, train_cfg, {})
        return result[0], result[1]

    return jax.jit(jax.value_and_grad(value, has_aux=True))(params)


def test_alpha_zero_is_the_lm_cross_entropy():
    student, teacher, batch = _models_and_batch()
    graphdef, params = nnx.split(student)
    for chunk in (0, 12):
        (lm_value, lm_metrics), lm_grads = _terms("lm", graphdef, params, None, batch, loss_chunk_size=chunk)
        (value, metrics), grads = _terms("distill", graphdef, params, teacher, batch, loss_chunk_size=chunk)
        # The same sums; XLA may order a fused reduction differently beside the KL's: 1 float32 rounding at most.
        for distilled, lm in ((value, lm_value), (metrics["loss"], lm_metrics["loss"])):
            np.testing.assert_allclose(distilled, lm, rtol=2e-7)
        assert metrics["distill_ce"] == metrics["loss"] and float(metrics["distill_kl"]) > 0
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, lm_grads)


def test_chunked_equals_unchunked():
    student, teacher, batch = _models_and_batch()
    graphdef, params = nnx.split(student)
    train = dict(distill_alpha=0.6, distill_temperature=1.5, z_loss=1e-3)
    (value, metrics), grads = _terms("distill", graphdef, params, teacher, batch, **train)
    # 31 predictions in chunks of 12: the last chunk is padded.
    (chunked, chunked_metrics), chunked_grads = _terms(
        "distill", graphdef, params, teacher, batch, loss_chunk_size=12, **train
    )
    np.testing.assert_allclose(chunked, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), chunked_metrics, metrics)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), chunked_grads, grads)


def test_the_student_learns_its_teacher_and_logs_both_terms(distilled_run):
    entries = metrics_entries(distilled_run)
    logged = [e for e in entries if "distill_kl" in e]
    assert logged[-1]["distill_kl"] < 0.7 * logged[0]["distill_kl"]
    evaluations = [e["eval_distill_kl"] for e in entries if "eval_distill_kl" in e]
    assert len(evaluations) == 2 and evaluations[1] < 0.9 * evaluations[0]
    assert logged[-1]["distill_ce"] < logged[0]["distill_ce"]
    for entry in logged:  # the logged loss is the mix of its two logged parts
        assert entry["loss"] == pytest.approx(0.7 * 4.0 * entry["distill_kl"] + 0.3 * entry["distill_ce"], rel=1e-4)
    assert {"eval_loss", "eval_distill_kl", "eval_distill_ce"} <= set(entries[-1])


def _paths(tree):
    """Each leaf's path as a tuple of strings, without the trailing 'value' of an nnx Variable."""
    paths = (
        tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    )
    return {path[:-1] if path[-1] == "value" else path for path in paths}


def test_checkpoints_hold_the_student_only(data_dir, teacher_run, distilled_run):
    path = os.path.join(distilled_run, "checkpoints", str(latest_checkpoint(distilled_run)), "state")
    saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
    assert set(saved) == {"step", "params", "opt_state"}
    student = nnx.to_pure_dict(nnx.state(create_model(_distill_config(data_dir, teacher_run)), nnx.Param))
    assert _paths(saved["params"]) == _paths(student)
    embeddings = [leaf.shape for k, leaf in jax.tree_util.tree_flatten_with_path(saved)[0] if "embedding" in str(k)]
    assert embeddings and all(shape == (128, 32) for shape in embeddings)  # the student's width, never 64


def test_distillation_resumes_bit_exactly(data_dir, teacher_run, distilled_run, tmp_path, monkeypatch):
    config = _distill_config(data_dir, teacher_run)
    resumed, saved, trained = crash_then_resume(config, str(tmp_path), monkeypatch, batches=6)
    assert saved == 4 and resumed.start_step == 4  # the last checkpoint before the crash during step 7
    assert resumed.steps_run == trained == 12 - 4
    # The train state of a distillation run is an lm run's (the teacher is no part of it): read it as one.
    config.train.update(objective="lm", teacher="")
    jax.tree.map(np.testing.assert_array_equal, saved_state(config, distilled_run), saved_state(config, str(tmp_path)))
    assert metrics_entries(distilled_run)[-1] == pytest.approx(metrics_entries(tmp_path)[-1], rel=1e-6)


def _teacher_eval(config):
    """(loaded teacher, eval metrics of a fresh student on one validation batch) on the 8-device mesh."""
    mesh = sharding.create_mesh(config.mesh_shape)
    rules = config.logical_axis_rules
    with sharding.use_mesh(mesh, rules):
        teacher = teacher_lib.load_teacher(config, mesh)
        steps = step_lib.build_steps(config, mesh, teacher)
        state, frozen = steps.init(None)
        batch = inputs.validation_sets(config)[""][0]
        result = steps.eval(state, {**frozen, "teacher": teacher.params}, sharding.global_batch(batch, mesh, rules))
    return teacher, jax.device_get(result["sums"])


def test_bfloat16_and_int8_teachers_run_sharded_by_the_rules(data_dir, teacher_run):
    config = _distill_config(data_dir, teacher_run)
    teacher, reference = _teacher_eval(config)
    embedding = teacher.params["embed"]["embedding"]
    assert embedding.dtype == jnp.float32 and "fsdp" in embedding.sharding.spec  # the rules table's embed -> fsdp
    cases = (
        ("bfloat16", "none", {"bfloat16"}, 0.02),
        ("float32", "int8", {"int8", "float32"}, 0.05),
        ("bfloat16", "int8", {"int8", "bfloat16"}, 0.05),
    )
    for dtype, quantization, dtypes, tolerance in cases:
        config.train.update(teacher_dtype=dtype, teacher_quantization=quantization)
        teacher, sums = _teacher_eval(config)
        assert {leaf.dtype.name for leaf in jax.tree.leaves(teacher.params)} == dtypes
        assert teacher.config.model.dtype == dtype
        assert np.isfinite(sums["distill_kl"]) and sums["distill_kl"] == pytest.approx(
            reference["distill_kl"], rel=tolerance
        )


def _run_dir(path, config, tokenizer_path):
    """A run directory as the start-up checks see one (config, tokenizer, a checkpoint step), untrained."""
    directory.write_run_files(str(path), config, tokenizer_path)
    os.makedirs(path / "checkpoints" / "1")
    return str(path)


def _hf_tokenizer(path, pieces):
    """A Hugging Face tokenizer.json whose vocabulary is `pieces`, id by id."""
    os.makedirs(path)
    model = tokenizers.models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="<unk>")
    tokenizers.Tokenizer(model).save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>"}, f)
    return str(path / "tokenizer.json")


def test_a_teacher_with_another_tokenizer_or_vocabulary_is_refused(tokenizer, tmp_path):
    data = write_dataset(tmp_path / "data")
    shutil.copy(tokenizer.path, os.path.join(data, "tokenizer.model"))
    pieces = [tokenizer.piece(i) for i in range(tokenizer.vocab_size)]
    config = tiny_config(model__vocab_size=tokenizer.vocab_size)
    config.data.path = data
    config.train.update(objective="distill", teacher=_run_dir(tmp_path / "same", config, data))
    start.checked_config(config)  # the same SentencePiece tokenizer

    config.train.teacher = _run_dir(tmp_path / "hf", config, _hf_tokenizer(tmp_path / "hf_tok", pieces))
    start.checked_config(config)  # the same pieces as a Hugging Face tokenizer.json

    changed = pieces[:300] + ["▁distinto"] + pieces[301:]
    config.train.teacher = _run_dir(tmp_path / "other", config, _hf_tokenizer(tmp_path / "other_tok", changed))
    expected = f"at id 300: the student's piece is {pieces[300]!r}, the teacher's '▁distinto'"
    with pytest.raises(config_validation.ConfigError, match=re.escape(expected)):
        start.checked_config(config)

    longer = _hf_tokenizer(tmp_path / "longer_tok", pieces + ["▁más"])
    config.train.teacher = _run_dir(tmp_path / "longer", config, longer)
    with pytest.raises(config_validation.ConfigError, match="at id 320: the student's piece is None, the teacher's"):
        start.checked_config(config)

    wider = tiny_config(model__vocab_size=tokenizer.vocab_size + 64)
    config.train.teacher = _run_dir(tmp_path / "wider", wider, data)
    with pytest.raises(
        config_validation.ConfigError, match="model.vocab_size=384 but the student config.model.vocab_size=320"
    ):
        start.checked_config(config)


def test_distillation_without_a_teacher_and_a_teacher_without_distillation_are_refused(data_dir, teacher_run):
    config = _distill_config(data_dir, teacher_run, teacher="")
    with pytest.raises(config_validation.ConfigError, match="objective='distill' needs config.train.teacher"):
        start.checked_config(config)
    config.train.update(teacher=teacher_run, objective="lm")
    with pytest.raises(config_validation.ConfigError, match="teacher=.* is set but config.train.objective='lm'"):
        start.checked_config(config)
    config.train.update(objective="distill", teacher="/nonexistent/teacher")
    with pytest.raises(FileNotFoundError, match="config.train.teacher='/nonexistent/teacher'"):
        start.checked_config(config)


def test_a_multi_host_distillation_is_refused_at_start_up(data_dir, teacher_run, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(config_validation.ConfigError, match="distillation runs on one host; this run has 2 processes"):
        start.checked_config(_distill_config(data_dir, teacher_run))
