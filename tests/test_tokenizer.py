"""The SentencePiece tokenizer: exact round-trips, reserved ids, byte fallback, metrics, the training script."""

import json
import os
import subprocess
import sys
import unicodedata

import pytest
import sentencepiece as spm
from conftest import REPO

from llm import tokenizer

CORPUS = """\
¿Qué hora es? ¡Ya es tarde! El niño pequeño jugaba en el jardín con su perro.
«Mañana iremos al campo», dijo la abuela mientras cocinaba una paella con azafrán.
El pingüino y el ñandú viven lejos; la cigüeña vuelve cada año a la torre de la iglesia.
ÁNGEL, ÉRICA, ÍÑIGO, ÓSCAR y ÚRSULA llegaron a ÑUÑOA con la GÜERA el lunes.
La canción más famosa del verano sonaba en todas las radios de la ciudad.
Los árboles del parque perdieron sus hojas en otoño y el suelo quedó cubierto de color.
En 1605 se publicó la primera parte del Quijote; en 1615, la segunda.
¿Dónde está la estación de autobuses? Está detrás del mercado, junto a la farmacia.
"""
TEXTS = CORPUS.splitlines() * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "es")
    return tokenizer.train_tokenizer(TEXTS, prefix, vocab_size=400)


@pytest.mark.parametrize(
    "text",
    [
        "á é í ó ú ü ñ Á É Í Ó Ú Ü Ñ ¿ ¡ « »",
        "¿Qué tal, señor Muñoz? ¡Olé! «La cigüeña» — PINGÜINO, ÑANDÚ.",
        "  dos espacios,\ttabulador\n\nY un párrafo nuevo.\n",
        "Emoji 😀🇪🇸 y chino 中文 y griego αβγ",
    ],
)
def test_text_round_trips_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tokenizer.round_trips(tok, text)


def test_spanish_characters_are_pieces_not_bytes(tok):
    for char in "áéíóúüñÁÉÍÓÚÜÑ¿¡«»":
        pieces = [tok.piece(i) for i in tok.encode(char)]
        assert not any(p.startswith("<0x") for p in pieces), (char, pieces)


def test_reserved_ids_are_as_declared(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.role_ids == {"system": 4, "user": 5, "assistant": 6, "end": 7}
    assert [tok.piece(i) for i in range(4, 8)] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert tok.vocab_size == 400
    ids = tok.encode("hola", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    # A chat marker in text is one token, never split into pieces.
    assert tok.role_ids["user"] in tok.encode("<|user|>¿Hola?<|end|>")
    assert tok.encode("<|user|>")[-1] == 5


def test_byte_fallback_covers_unseen_characters(tok):
    ids = tok.encode("😀中")
    assert tok.unk_id not in ids
    pieces = [tok.piece(i) for i in ids]
    utf8 = [f"<0x{byte:02X}>" for byte in "😀中".encode()]
    assert [p for p in pieces if p.startswith("<0x")] == utf8


def test_digits_are_split(tok):
    pieces = [tok.piece(i) for i in tok.encode("1605")]
    assert [p for p in pieces if p != "▁"] == ["1", "6", "0", "5"]


def test_encode_normalizes_to_nfc_and_batches_agree(tok):
    text = "La cigüeña del año"
    assert tok.encode(unicodedata.normalize("NFD", text)) == tok.encode(text)
    assert tok.encode_batch([text, "¡Sí!"]) == [tok.encode(text), tok.encode("¡Sí!")]


def test_load_reads_back_the_same_model(tok):
    again = tokenizer.Tokenizer.load(tok.path)
    assert again.encode(CORPUS) == tok.encode(CORPUS)


def test_unigram_option(tmp_path):
    uni = tokenizer.train_tokenizer(TEXTS, str(tmp_path / "uni"), vocab_size=400, model_type="unigram")
    assert uni.role_ids["end"] == 7 and tokenizer.round_trips(uni, "¿Año? ¡Ñandú! «Pingüino»")


def test_multiword_pieces_round_trip_with_fewer_tokens(tok, tmp_path):
    multi = tokenizer.train_tokenizer(TEXTS, str(tmp_path / "multi"), vocab_size=400, multiword_pieces=True)
    text = "¿Dónde está la estación de autobuses? Está detrás del mercado."
    assert tokenizer.round_trips(multi, text)
    assert tokenizer.fertility(multi, TEXTS) < tokenizer.fertility(tok, TEXTS)
    assert any("▁" in multi.piece(i)[1:] for i in range(multi.vocab_size))  # some piece spans two words


def test_bad_arguments_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        tokenizer.train_tokenizer(TEXTS, str(tmp_path / "x"), vocab_size=400, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size must be >="):
        tokenizer.train_tokenizer(TEXTS, str(tmp_path / "x"), vocab_size=100)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizer.Tokenizer.load(str(tmp_path / "missing.model"))
    # A SentencePiece model with the library's default ids is not one of ours.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "foreign"), vocab_size=120, minloglevel=2
    )
    with pytest.raises(ValueError, match="not trained by llm.tokenizer"):
        tokenizer.Tokenizer.load(str(tmp_path / "foreign.model"))


def test_long_lines_are_cut_for_training_not_dropped():
    line = "palabra " * 2000  # 16 000 bytes, over SentencePiece's sentence limit
    pieces = list(tokenizer._training_sentences([line], max_bytes=4096))
    assert all(len(p.encode()) <= 4096 for p in pieces)
    assert "".join(pieces) == line


def test_conllu_texts_and_metrics(tok, tmp_path):
    path = tmp_path / "mini.conllu"
    path.write_text(
        "# sent_id = 1\n# text = El niño come.\n1\tEl\tel\tDET\t_\t_\t2\tdet\t_\t_\n\n"
        "# sent_id = 2\n# text = ¿Dónde está?\n1\t¿\t¿\tPUNCT\t_\t_\t2\tpunct\t_\t_\n\n",
        encoding="utf-8",
    )
    texts = tokenizer.conllu_texts(str(path))
    assert texts == ["El niño come.", "¿Dónde está?"]
    tokens = sum(len(tok.encode(t)) for t in texts)
    assert tokenizer.fertility(tok, texts) == pytest.approx(tokens / 5)
    assert tokenizer.bytes_per_token(tok, texts) == pytest.approx(len("El niño come.¿Dónde está?".encode()) / tokens)
    (tmp_path / "empty.conllu").write_text("1\tEl\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.conllu"):
        tokenizer.conllu_texts(str(tmp_path / "empty.conllu"))


def test_training_script_reports_metrics_and_round_trip(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"texto": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    conllu = tmp_path / "eval.conllu"
    conllu.write_text("# text = El niño come paella.\n1\tEl\n\n", encoding="utf-8")
    script = os.path.join(REPO, "scripts", "train_tokenizer.py")
    args = [sys.executable, script, f"--input={data}", "--text_field=texto", f"--eval_conllu={conllu}"]
    result = subprocess.run(
        args + [f"--output_prefix={tmp_path / 'out' / 'es'}", "--vocab_size=400"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "Fertility on 1 UD sentences" in result.stdout and "Round-trip OK" in result.stdout
    assert os.path.isfile(tmp_path / "out" / "es.model")
    # Bad flags fail before any training.
    bad = subprocess.run(
        [sys.executable, script, f"--input={tmp_path / 'nada*.jsonl'}", f"--output_prefix={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "matches no file" in bad.stderr
    assert not os.path.exists(tmp_path / "x.model")
