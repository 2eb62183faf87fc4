"""scripts/sample.py and scripts/chat.py on a trained run: Spanish text out, clear errors in."""

import json
import os
import shutil

import pytest
from conftest import run_script

from llm import chat_template
from llm.infer import generate
from llm.runs import loading


def test_a_run_loads_and_generates_text(trained_run):
    run = loading.load_run(trained_run)
    assert run.step == 30 and run.tokenizer.vocab_size == run.config.model.vocab_size
    greedy = generate.generate_text(run, ["La niña canta", "¿Quién"], max_new_tokens=12)
    assert greedy == generate.generate_text(run, ["La niña canta", "¿Quién"], max_new_tokens=12)
    assert all(isinstance(text, str) for text in greedy)
    streamed = []
    text = generate.stream_text(run, "La niña canta", 12, streamed.append)
    assert "".join(streamed) == text == greedy[0]


def test_stop_strings_cut_the_completion(trained_run):
    run = loading.load_run(trained_run)
    free = generate.generate_text(run, ["El pingüino"], max_new_tokens=16)[0]
    assert len(free) > 3
    stop = free[2:4]
    cut = generate.generate_text(run, ["El pingüino"], max_new_tokens=16, stop_strings=[stop])[0]
    assert cut == free[: free.index(stop)]


def test_sample_script_prints_one_line_per_sample(trained_run):
    result = run_script(
        "sample.py",
        f"--workdir={trained_run}",
        "--prompt=Mi abuela",
        "--num_samples=2",
        "--max_new_tokens=8",
        "--temperature=0.9",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- Mi abuela") == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt="], "--prompt must not be empty"),
        (["--prompt=Hola", "--workdir=/nonexistent/run"], "--workdir='/nonexistent/run' does not exist"),
        (["--prompt=" + "palabra " * 100], "does not fit the model's context"),
    ],
)
def test_sample_script_errors_are_clear(trained_run, flags, message):
    result = run_script("sample.py", f"--workdir={trained_run}", *flags)
    assert result.returncode != 0 and message in result.stderr


def test_missing_checkpoint_is_named(tmp_path, trained_run):
    (tmp_path / "config.json").write_text(open(os.path.join(trained_run, "config.json")).read())
    (tmp_path / "tokenizer.model").write_bytes(open(os.path.join(trained_run, "tokenizer.model"), "rb").read())
    with pytest.raises(FileNotFoundError, match="No checkpoints in"):
        loading.load_run(str(tmp_path))


def test_chat_script_streams_answers_until_exit(trained_run):
    result = run_script(
        "chat.py", f"--workdir={trained_run}", "--max_new_tokens=8", stdin="Hola\n/reset\n¿Qué tal?\n/exit\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Asistente:") == 2


def _chat_answer(workdir, message):
    """The answer chat.py prints to one message, greedily, without a system text."""
    flags = ("--max_new_tokens=8", "--temperature=0", "--repetition_penalty=1", "--system=")
    result = run_script("chat.py", f"--workdir={workdir}", *flags, stdin=f"{message}\n/exit\n")
    assert result.returncode == 0, result.stderr
    body = result.stdout.split("Asistente:", 1)[1]
    return body[: body.rindex("\n\nTú:")].removesuffix("\n")


def test_chat_script_prompts_a_chat_tuned_run_through_its_chat_template(trained_run, tmp_path):
    chat_run = tmp_path / "chat_run"
    shutil.copytree(trained_run, chat_run)
    config = json.loads((chat_run / "config.json").read_text(encoding="utf-8"))
    (chat_run / "config.json").write_text(json.dumps({**config, "chat": True}), encoding="utf-8")
    run = loading.load_run(trained_run)
    template_ids, _ = chat_template.render(run.tokenizer, [{"role": "user", "content": "Hola"}], True)
    stop_ids = chat_template.stop_token_ids(run.tokenizer)
    chat_answer = generate.stream_text(run, template_ids, 8, lambda _: None, stop_token_ids=stop_ids)
    plain_answer = generate.stream_text(
        run, "Usuario: Hola\nAsistente:", 8, lambda _: None, stop_strings=("\nUsuario:", "\n\n")
    )
    assert chat_answer != plain_answer  # Otherwise this test could not tell the two prompts apart.
    assert _chat_answer(str(chat_run), "Hola") == " " + chat_answer
    assert _chat_answer(trained_run, "Hola") == plain_answer


def test_completions_keep_the_space_that_separates_them_from_the_prompt(trained_run):
    run = loading.load_run(trained_run)
    prompt_ids = run.tokenizer.encode("La niña canta", add_bos=True)
    completion = generate.run_generator(run).generate([prompt_ids], 12)[0]
    full = run.tokenizer.decode(prompt_ids + completion)
    assert "La niña canta" + generate.generate_text(run, ["La niña canta"], 12)[0] == full


def test_sample_script_on_a_tensor_parallel_mesh_prints_what_one_device_does(trained_run, monkeypatch):
    flags = [f"--workdir={trained_run}", "--prompt=Mi abuela", "--max_new_tokens=12", "--temperature=0.9", "--seed=3"]
    one = run_script("sample.py", *flags)  # the script's process has one CPU device
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")  # now 8, as the tests' own
    split = run_script("sample.py", *flags, "--mesh_shape=1,2,4")  # heads, MLP and KV cache over 4 devices
    assert one.returncode == 0 and split.returncode == 0, one.stderr + split.stderr
    assert split.stdout == one.stdout and len(one.stdout) > len("--- Mi abuela\n") + 6  # seeded: the same draws
    bad = run_script("sample.py", *flags, "--mesh_shape=1,3,1")
    assert bad.returncode != 0 and "--mesh_shape=1,3,1: mesh_shape (1, 3, 1) needs 3 devices, but 8" in bad.stderr
