"""The run directory (llm/runs/directory.py): config over the schema's defaults, chat-tuned runs, atomic saves."""

import json
import os

import pytest
from conftest import tiny_config
from flax import nnx

from configs import base
from llm import checkpoint
from llm.runs import directory
from llm.train import loop


def _run_dir(path, **config_overrides):
    config = base.get_config()
    config.update(config_overrides)
    directory.write_run_files(str(path), config, None)
    return str(path)


def test_a_run_written_before_a_key_existed_reads_the_key_as_its_default(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"seed": 7, "model": {"num_layers": 3}}), encoding="utf-8")
    config = directory.load_config(str(tmp_path))
    assert config.seed == 7 and config.model.num_layers == 3
    assert config.model.embed_dim == base.get_config().model.embed_dim and config.chat is False


def test_a_run_is_chat_tuned_by_its_data_or_its_init_from(tmp_path):
    plain_data, chat_data = tmp_path / "plain_data", tmp_path / "chat_data"
    for data, report in ((plain_data, {"rows": 3}), (chat_data, {"format": "chat", "rows": 3})):
        data.mkdir()
        (data / "report.json").write_text(json.dumps(report), encoding="utf-8")
    config = base.get_config()
    config.data.path = str(plain_data)
    assert not directory.chat_tuned(config)
    config.data.path = str(chat_data)
    assert directory.chat_tuned(config)
    config.data.path = str(plain_data)
    config.init_from = _run_dir(tmp_path / "sft_run", chat=True)
    assert directory.chat_tuned(config)  # Continued training of a chat model stays a chat model.
    config.init_from = _run_dir(tmp_path / "pretrained_run")
    assert not directory.chat_tuned(config)


def test_save_run_never_leaves_a_half_written_directory(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"spm")
    target = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.Checkpointer, "save", disk_full)  # Fails after config and tokenizer are written.
        with pytest.raises(OSError, match="No space"):
            directory.save_run(str(target), base.get_config(), str(tokenizer), 1, model)
    assert not target.exists()
    directory.save_run(str(target), base.get_config(), str(tokenizer), 1, model)
    assert sorted(os.listdir(target)) == ["checkpoints", "config.json", "tokenizer.model"]
    assert os.listdir(target / "checkpoints") == ["1"]
    with pytest.raises(FileExistsError, match="already exists"):
        directory.save_run(str(target), base.get_config(), str(tokenizer), 2, model)
    assert os.listdir(target / "checkpoints") == ["1"]


def test_a_run_saved_before_a_config_key_existed_resumes(tmp_path, data_dir):
    config = tiny_config(train__num_steps=2, train__checkpoint_every=2, train__eval_every=0)
    config.data.path = data_dir
    loop.train(config, str(tmp_path))
    # Remove a key from the config saved in the checkpoint, as a run written by an older version lacks it.
    saved = tmp_path / "checkpoints" / "2" / "config" / "metadata"  # Orbax's JsonSave writes the JSON here.
    with open(saved, encoding="utf-8") as f:
        old = json.load(f)
    del old["model"]["kv_cache_dtype"]
    with open(saved, "w", encoding="utf-8") as f:
        json.dump(old, f)
    config.train.num_steps = 3
    result = loop.train(config, str(tmp_path))
    assert (result.start_step, result.steps_run) == (2, 1)
