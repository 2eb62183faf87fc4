"""Fine-tuning data: SFT rows train on exactly the assistant's tokens, DPO pair records, sentiment label rows."""

import json
import os

import numpy as np
import pytest
from conftest import run_script

from llm import chat_template
from llm.corpus.sources import SourceError
from llm.data import loader, packing, records
from llm.eval import multiple_choice, scoring, tasks
from llm.finetune_data import preference, sentiment_tuning, sft


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _chat(*turns):
    """Alternating user / assistant messages."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def _rows(split_dir, decode=records.decode_row):
    return [row for path in records.shard_paths(split_dir) for row in records.iterate_shard(path, decode)]


def _trained_targets(row):
    """The tokens the trainer computes a loss on: t+1 counts when loss_mask[t+1] and same segment as t."""
    counted = (row["loss_mask"][1:] == 1) & (row["segment_ids"][1:] == row["segment_ids"][:-1])
    return row["tokens"][1:][counted].tolist()


# ---------------------------------------------------------------------------------------------------- SFT
def test_sft_loss_mask_is_exactly_the_assistant_tokens_after_packing(tokenizer):
    first = [{"role": "system", "content": "Sé breve."}, *_chat("¿Quién canta?", "La niña.")]
    second = _chat("Hola", "¡Hola!", "¿Y mañana?", "Nadie.")
    docs = [chat_template.render(tokenizer, messages) for messages in (first, second)]
    (row,) = packing.pack_masked_documents(docs, seq_len=128, pad_id=tokenizer.pad_id)
    roles, enc = tokenizer.role_ids, tokenizer.encode
    # Hand-built expectation: bos, then per message marker + content + <|end|>; targets = answer + <|end|>.
    expected_tokens, expected_mask = [], []
    for messages in (first, second):
        expected_tokens.append(tokenizer.bos_id)
        expected_mask.append(0)
        for message in messages:
            content = [*enc(message["content"]), roles["end"]]
            expected_tokens += [roles[message["role"]], *content]
            expected_mask += [0] + [int(message["role"] == "assistant")] * len(content)
    n = len(expected_tokens)
    assert row["tokens"][:n].tolist() == expected_tokens and not row["segment_ids"][n:].any()
    assert row["loss_mask"][:n].tolist() == expected_mask
    assert row["segment_ids"][:n].tolist() == [1] * len(docs[0][0]) + [2] * len(docs[1][0])
    answers = [*enc("La niña."), roles["end"], *enc("¡Hola!"), roles["end"], *enc("Nadie."), roles["end"]]
    assert _trained_targets(row) == answers


def test_masked_packing_never_splits_a_document():
    docs = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7], [0, 0, 1, 1]), ([8, 9], [0, 1])]
    rows = list(packing.pack_masked_documents(docs, seq_len=5))
    assert [r["tokens"].tolist() for r in rows] == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 0], [8, 9, 0, 0, 0]]
    assert [r["loss_mask"].tolist() for r in rows] == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="Document 0 has 6 tokens, more than seq_len=5"):
        list(packing.pack_masked_documents([([1] * 6, [1] * 6)], seq_len=5))


def test_long_conversation_loses_its_oldest_turns_but_keeps_the_system_message(tokenizer):
    system = {"role": "system", "content": "Eres amable."}
    turns = _chat(
        "La niña canta una canción en el jardín.",
        "Sí, con alegría.",
        "El señor García cocina por la mañana.",
        "Después de la reunión.",
        "¿Quién lo sabe?",
        "Nadie.",
    )
    full, _ = chat_template.render(tokenizer, [system, *turns])
    last_exchange, mask = chat_template.render(tokenizer, [system, *turns[4:]])
    ids, got_mask, truncated = sft.render_conversation(tokenizer, [system, *turns], seq_len=len(last_exchange))
    assert truncated and len(full) > len(last_exchange)
    assert (ids, got_mask) == (last_exchange, mask)
    assert sft.render_conversation(tokenizer, [system, *turns], seq_len=len(last_exchange) - 1) is None
    # A trailing question nobody answers trains nothing and is left out rather than truncating more.
    ids, _, truncated = sft.render_conversation(tokenizer, [system, *turns, *_chat("¿Y?")], seq_len=len(full))
    assert ids == full and not truncated


@pytest.fixture
def chats_file(tmp_path):
    good = json.dumps({"messages": _chat("¿Quién canta?", "La niña canta.")}, ensure_ascii=False)
    return _write_lines(
        tmp_path / "chats.jsonl",
        [
            good,
            '{"messages": [{"role": "user", "content": "hola"}',  # line 2: truncated JSON
            json.dumps({"messages": _chat("¿Hay alguien?")}),  # line 3: no assistant turn
            "",
            json.dumps({"messages": _chat("¿Quién?", "Mi abuela " * 60)}),  # line 5: longer than a row
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # line 6: role the template rejects
            *[json.dumps({"messages": _chat(f"Pregunta {i}", f"Respuesta {i}.")}) for i in range(30)],
        ],
    )


def test_prepare_sft_counts_drops_with_their_lines_and_writes_trainable_rows(tmp_path, chats_file, tokenizer):
    out = str(tmp_path / "sft")
    report = sft.prepare_sft(chats_file, tokenizer.path, out, seq_len=32, on_error="skip", min_validation_rows=2)
    assert report["conversations"] == {"read": 35, "kept": 31, "truncated": 0, "dropped": 4}
    assert report["drops"] == {
        "sft.bad_json": {"count": 1, "first": [f"{chats_file}:2"]},
        "sft.bad_messages": {"count": 1, "first": [f"{chats_file}:6"]},
        "sft.no_assistant": {"count": 1, "first": [f"{chats_file}:3"]},
        "sft.too_long": {"count": 1, "first": [f"{chats_file}:5"]},
    }
    assert json.load(open(os.path.join(out, "report.json"), encoding="utf-8")) == report
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))
    rows = _rows(os.path.join(out, "train")) + _rows(os.path.join(out, "validation"))
    assert report["rows"] == len(rows) and report["splits"]["validation"]["rows"] >= 2
    targets = [token for row in rows for token in _trained_targets(row)]
    assert len(targets) == report["assistant_tokens"]
    end = tokenizer.role_ids["end"]
    answers = tokenizer.decode([t for t in targets if t != end])  # the answers, and nothing of the questions
    assert "La niña canta." in answers and "Respuesta 7." in answers and "Pregunta" not in answers
    assert targets.count(end) == 31  # one closed answer per kept conversation
    # The trainer's loader reads the result.
    assert len(loader.validation_batches(os.path.join(out, "validation"), 32, batch_size=2, num_batches=1)) == 1


def test_prepare_sft_cli_writes_the_splits_and_stops_on_a_bad_line_with_its_number(tmp_path, chats_file, tokenizer):
    common = [f"--tokenizer={tokenizer.path}", "--seq_len=32"]
    result = run_script(
        "prepare_sft.py", f"--input={chats_file}", f"--output_dir={tmp_path / 'ok'}", "--on_error=skip", *common
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["conversations"]["kept"] == 31
    assert os.path.isdir(tmp_path / "ok" / "train") and os.path.isfile(tmp_path / "ok" / "report.json")
    result = run_script("prepare_sft.py", f"--input={chats_file}", f"--output_dir={tmp_path / 'bad'}", *common)
    assert result.returncode != 0 and f"{chats_file}:2" in result.stderr
    assert not os.path.exists(tmp_path / "bad" / "train")


@pytest.mark.parametrize("script", ["prepare_sft.py", "prepare_dpo.py"])
def test_prepare_cli_wants_exactly_one_source(tmp_path, tokenizer, script):
    common = [f"--tokenizer={tokenizer.path}", f"--output_dir={tmp_path}"]
    for flags in ([], ["--input=x.jsonl", "--chatterbot"]):
        result = run_script(script, *common, *flags)
        assert result.returncode != 0 and "exactly one of --input=FILE.jsonl and --chatterbot" in result.stderr
    result = run_script(script, *common, "--input=/nonexistent.jsonl")
    assert result.returncode != 0 and "--input='/nonexistent.jsonl' is not a file" in result.stderr


@pytest.mark.parametrize(
    "bad_line, message",
    [('{"messages": [', "not valid JSON"), (json.dumps({"messages": _chat("a")}), "no assistant turn")],
)
def test_prepare_sft_raise_names_file_and_line(tmp_path, tokenizer, bad_line, message):
    path = _write_lines(tmp_path / "chats.jsonl", [json.dumps({"messages": _chat("a", "b")}), bad_line])
    with pytest.raises(SourceError, match=f"chats.jsonl:2: .*{message}"):
        sft.prepare_sft(path, tokenizer.path, str(tmp_path / "out"), seq_len=32, on_error="raise")


def test_an_earlier_run_is_not_mixed_in(tmp_path, chats_file, tokenizer):
    out = str(tmp_path / "sft")
    sft.prepare_sft(chats_file, tokenizer.path, out, seq_len=32, on_error="skip", train_shards=3)
    with pytest.raises(FileExistsError, match="--overwrite"):
        sft.prepare_sft(chats_file, tokenizer.path, out, seq_len=32, on_error="skip")
    with pytest.raises(SourceError):  # bad input stops the run before anything is replaced
        sft.prepare_sft(chats_file, tokenizer.path, out, seq_len=32, on_error="raise", overwrite=True)
    assert len(records.shard_paths(os.path.join(out, "train"))) == 3
    sft.prepare_sft(chats_file, tokenizer.path, out, seq_len=32, on_error="skip", overwrite=True)
    assert len(records.shard_paths(os.path.join(out, "train"))) == 1


def test_chatterbot_dialogues_are_valid_alternating_conversations():
    dialogues = sft.chatterbot_dialogues("spanish")
    assert len(dialogues) >= 200 and {"trivia", "emociones", "psicologia"} <= {c for c, _ in dialogues}
    for _, messages in dialogues:
        chat_template.validate_messages(messages)
        assert [m["role"] for m in messages] == [("user", "assistant")[i % 2] for i in range(len(messages))]
        assert any(m["role"] == "assistant" for m in messages) and all(m["content"] for m in messages)


# ---------------------------------------------------------------------------------------------------- DPO
def test_pair_records_round_trip_and_reject_malformed_records():
    rng = np.random.default_rng(0)
    chosen, rejected = ({name: rng.integers(0, 100, 16).astype(np.int32) for name in records.FIELDS} for _ in "ab")
    decoded = records.decode_pair(records.encode_pair(chosen, rejected))
    assert set(decoded) == set(records.PAIR_FIELDS)
    for name in records.FIELDS:
        np.testing.assert_array_equal(decoded[f"chosen_{name}"], chosen[name])
        np.testing.assert_array_equal(decoded[f"rejected_{name}"], rejected[name])
    with pytest.raises(ValueError, match="not a preference pair"):
        records.decode_pair(records.encode_row({name: value[:3] for name, value in chosen.items()}))
    with pytest.raises(ValueError, match="same length"):
        records.encode_pair(chosen, {name: value[:8] for name, value in rejected.items()})


def test_prepare_dpo_masks_only_the_responses(tmp_path, tokenizer):
    history = [{"role": "system", "content": "Sé breve."}, *_chat("Hola", "Hola, ¿qué tal?", "¿Quién canta?")]
    path = _write_lines(
        tmp_path / "prefs.jsonl",
        [
            json.dumps({"prompt": "¿Quién cocina?", "chosen": "Mi abuela.", "rejected": "El río."}),
            json.dumps({"prompt": history, "chosen": "La niña.", "rejected": "Un pingüino."}),
            json.dumps({"prompt": "x", "chosen": "igual", "rejected": "igual"}),  # line 3: nothing to prefer
            json.dumps({"prompt": _chat("a", "b"), "chosen": "c", "rejected": "d"}),  # line 4: ends with the assistant
            "[1, 2]",  # line 5: not an object
        ],
    )
    out = str(tmp_path / "dpo")
    report = preference.prepare_dpo(path, tokenizer.path, out, seq_len=128, on_error="skip", validation_fraction=0.0)
    assert report["pairs"] == {"read": 5, "kept": 2, "prompt_truncated": 0, "dropped": 3}
    assert report["drops"] == {
        "dpo.bad_json": {"count": 1, "first": [f"{path}:5"]},
        "dpo.bad_pair": {"count": 2, "first": [f"{path}:3", f"{path}:4"]},
    }
    pairs = _rows(os.path.join(out, "train"), records.decode_pair) + _rows(
        os.path.join(out, "validation"), records.decode_pair
    )
    end = tokenizer.role_ids["end"]
    seen = set()
    for pair in pairs:
        prompts = []
        for side in ("chosen", "rejected"):
            row = {name: pair[f"{side}_{name}"] for name in records.FIELDS}
            assert row["tokens"].shape == (128,) and set(row["segment_ids"].tolist()) <= {0, 1}
            targets = _trained_targets(row)
            assert targets[-1] == end and end not in targets[:-1]
            seen.add(tokenizer.decode(targets[:-1]))
            prompt = row["tokens"][row["segment_ids"] == 1][row["loss_mask"][row["segment_ids"] == 1] == 0]
            assert prompt[-1] == tokenizer.role_ids["assistant"]
            prompts.append(prompt.tolist())
        assert prompts[0] == prompts[1]  # both answers to the same prompt
    assert seen == {"Mi abuela.", "El río.", "La niña.", "Un pingüino."}
    with pytest.raises(SourceError, match="prefs.jsonl:3: .*identical"):
        preference.prepare_dpo(path, tokenizer.path, str(tmp_path / "again"), seq_len=128, on_error="raise")


def test_a_long_prompt_is_cut_from_the_left_in_both_rows(tokenizer):
    prompt = np.arange(100, 130, dtype=np.int32)
    assert preference.fit_prompt(prompt, longest_response=10, seq_len=40) is prompt
    cut = preference.fit_prompt(prompt, longest_response=15, seq_len=40)
    assert cut.tolist() == [100, *range(106, 130)]  # bos kept, then the end of the prompt
    assert preference.fit_prompt(prompt, longest_response=39, seq_len=40) is None


def test_chatterbot_preferences_reject_an_unrelated_answer():
    dialogues = sft.chatterbot_dialogues("spanish")
    pairs = preference.chatterbot_preferences(dialogues)
    assert pairs == preference.chatterbot_preferences(dialogues)  # deterministic
    categories_of = {}  # answer text -> the categories it appears in
    pair_categories = []  # the category of each pair's dialogue, in the order pairs are made
    for category, messages in dialogues:
        for message in messages:
            if message["role"] == "assistant":
                categories_of.setdefault(message["content"], set()).add(category)
                pair_categories.append(category)
    assert len(pairs) == len(pair_categories)
    for pair, category in zip(pairs, pair_categories):
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]
        assert categories_of[pair["rejected"]] - {category}  # answered in another category
        preference.prompt_messages(pair["prompt"])


# ----------------------------------------------------------------------------------------------- sentiment
def test_sentiment_rows_use_the_zero_shot_eval_prompt_and_train_only_the_label(tmp_path, tokenizer):
    tweets = ["¡Qué alegría!", "Odio la lluvia.", "Hoy es martes."]
    for split, texts, labels in (("train", tweets, "2\n0\n1\n"), ("val", ["Nadie lo sabe."], "1\n")):
        _write_lines(tmp_path / f"sentiment_es_{split}_text.txt", texts)
        (tmp_path / f"sentiment_es_{split}_labels.txt").write_text(labels)
    out = str(tmp_path / "sentiment")
    report = sentiment_tuning.prepare_sentiment(str(tmp_path), tokenizer.path, out, seq_len=256)
    assert report["splits"]["train"]["examples"] == 3 and report["splits"]["validation"]["examples"] == 1
    assert report["splits"]["train"]["truncated"] == 0
    rows = _rows(os.path.join(out, "train"))
    items = multiple_choice.sentiment_items(tasks.read_sentiment(str(tmp_path), "train"), shots=())
    for row, item, tweet in zip(rows, items, tweets, strict=True):
        context, answer = scoring.encode_pair(tokenizer, item.context, item.choices[item.label])
        real = row["tokens"][row["segment_ids"] == 1].tolist()
        assert real == [*context, *answer, tokenizer.eos_id]  # the scorer's tokens, one example per row
        assert _trained_targets(row) == [*answer, tokenizer.eos_id]
        assert tokenizer.decode(answer).strip() == tasks.SENTIMENT_ANSWERS[item.label]
        assert tokenizer.decode(context[1:]) == f"{tasks.SENTIMENT_INSTRUCTION}\n\nTuit: {tweet}\nSentimiento:"
    (validation,) = _rows(os.path.join(out, "validation"))  # from the val split; test is never read
    assert "Nadie lo sabe." in tokenizer.decode(validation["tokens"][validation["segment_ids"] == 1].tolist())


def test_a_sentiment_prompt_too_long_for_the_row_keeps_bos_and_the_label(tokenizer):
    item = multiple_choice.sentiment_items([tasks.SentimentExample("Hoy es martes. " * 20, 1)], shots=())[0]
    tokens, mask, truncated = sentiment_tuning.example_tokens(tokenizer, item, seq_len=40)
    _, answer = scoring.encode_pair(tokenizer, item.context, item.choices[1])
    assert truncated and len(tokens) == 40 and tokens[0] == tokenizer.bos_id
    assert tokens[mask == 1].tolist() == [*answer, tokenizer.eos_id]
    assert tokenizer.decode(tokens[1 : -len(answer) - 1].tolist()).endswith("martes. \nSentimiento:")
