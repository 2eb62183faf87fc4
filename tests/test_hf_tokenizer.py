"""The Hugging Face tokenizer backend (llm/hf_tokenizer.py) against `transformers`, the reference it must match.

Two tokenizers are trained here with the `tokenizers` library: a byte-level BPE without a BOS (GPT-2 / Qwen
style) and a SentencePiece-style BPE (Metaspace, byte fallback, <s> </s> <unk>; Llama style), the latter once
with add_bos_token in its tokenizer_config.json (which transformers ignores), once with a BOS-adding
post-processor in its tokenizer.json, and once more with <s> </s> special only by its tokenizer_config.json.
"""

import json
import os
import unicodedata

import pytest
import transformers
from conftest import tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llm import chat_template
from llm.hf_tokenizer import HFTokenizer, NoChatMarkersError
from llm.infer.generate import TextStream
from llm.model.transformer import create_model
from llm.runs import directory, loading
from llm.serve import completions
from llm.tokenizer import load_tokenizer

CORPUS = [
    "El niño comió paella en la playa de Almería con su abuela.",
    "¿Qué tal estás? ¡Muy bien, gracias! Mañana vamos a la montaña.",
    "La canción del corazón: «el año que viene será mejor», dijo la señora Muñoz.",
    "El pingüino y la cigüeña viven en el zoológico de la ciudad.",
    "Los estudiantes de la universidad leen libros de historia y de ciencia.",
] * 30
TEXTS = [
    "¿Qué tal?  ¡Muy bien!",
    "«Cañón», dijo la señora Muñoz: ¡qué pingüino más raro!",
    "Emoji: 🎉🇪🇸 y más 😀, y chino 中文.",
    unicodedata.normalize("NFD", "canción, corazón, año y pingüino"),
    "  espacios   múltiples\n\n\tsaltos de línea\n",
    " empieza con espacio y termina con dos  ",
    "ÑANDÚ",
    "fin </s> y <s>otra vez",
]
BYTES = [f"<0x{byte:02X}>" for byte in range(256)]


def _byte_level() -> tuple[Tokenizer, dict]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer, {"eos_token": "<|endoftext|>", "pad_token": None}


def _metaspace(template: bool) -> tuple[Tokenizer, dict]:
    """A Llama-style BPE: the 256 <0xNN> byte pieces follow <unk> <s> </s> in the vocabulary, as in Llama's."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tokenizer.to_str())
    learned = [piece for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])[3:]]
    spec["model"]["vocab"] = {piece: i for i, piece in enumerate(["<unk>", "<s>", "</s>", *BYTES, *learned])}
    spec["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if template:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return tokenizer, config
    return tokenizer, {**config, "add_bos_token": True, "add_eos_token": False}


def _specials_in_vocab() -> tuple[Tokenizer, dict]:
    """<s> and </s> as plain vocabulary entries, not added tokens: only the config says they are special."""
    tokenizer, config = _metaspace(template=True)
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] == "<unk>"]
    return Tokenizer.from_str(json.dumps(spec)), config


BUILDERS = {
    "byte_level": _byte_level,
    "metaspace": lambda: _metaspace(template=False),
    "metaspace_template": lambda: _metaspace(template=True),
    "specials_in_vocab": _specials_in_vocab,
}
# transformers 5 ignores tokenizer_config.json's add_bos_token when there is a tokenizer.json: only the
# post-processor adds a BOS.
ADDS_BOS = {"byte_level": False, "metaspace": False, "metaspace_template": True, "specials_in_vocab": True}


def _save(directory_path, kind: str) -> str:
    tokenizer, config = BUILDERS[kind]()
    os.makedirs(directory_path, exist_ok=True)
    tokenizer.save(os.path.join(directory_path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    with open(os.path.join(directory_path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(directory_path)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved(request, tmp_path_factory):
    """(kind, directory with tokenizer.json + tokenizer_config.json) of each tokenizer."""
    return request.param, _save(tmp_path_factory.mktemp(request.param), request.param)


def test_ids_match_transformers_with_and_without_bos(saved):
    kind, path = saved
    ours, reference = HFTokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)
    assert (ours.add_bos_token, ours.add_eos_token) == (ADDS_BOS[kind], False)
    for text in TEXTS:
        plain = ours.encode(text)
        assert plain == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, ours.add_bos_token, ours.add_eos_token) == reference(text)["input_ids"], text
        assert ours.encode(text, add_bos=True, add_eos=True) == [ours.bos_id, *plain, ours.eos_id]
    assert ours.encode_batch(TEXTS, add_bos=True) == [ours.encode(text, add_bos=True) for text in TEXTS]
    if kind == "byte_level":  # No BOS of its own: texts start after the end-of-text token.
        assert ours.bos_id == ours.eos_id == ours.pad_id and ours.unk_id is None
    else:  # An emoji the vocabulary lacks falls back to its UTF-8 bytes.
        assert [ours.piece(i) for i in ours.encode("😀")] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_decode_matches_transformers(saved):
    _, path = saved
    ours, reference = HFTokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ours.encode(text, add_bos=True, add_eos=True)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        plain = reference.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == reference.decode(plain, skip_special_tokens=True)


def _stream(tokenizer, ids, previous_id) -> str:
    stream = TextStream(tokenizer, previous_id=previous_id)
    return "".join(stream.push(token)[0] for token in ids) + stream.rest()


def test_decode_after_streams_what_the_whole_sequence_decodes_to(saved):
    tokenizer = HFTokenizer.load(saved[1])
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=True)
        whole = tokenizer.decode(ids)
        assert _stream(tokenizer, ids[1:], None) == _stream(tokenizer, ids[1:], tokenizer.bos_id) == whole
        for cut in range(2, len(ids)):
            # A prompt that ends on a whole character: the completion streams on with its leading space. (After
            # a special token, e.g. </s> inside the text, a new text starts, as for SentencePiece's decode_after.)
            prompt = tokenizer.decode(ids[:cut])
            special = tokenizer.piece(ids[cut - 1]) in ("<s>", "</s>", "<|endoftext|>")
            if whole.startswith(prompt) and not prompt.endswith("\ufffd") and not special:
                assert tokenizer.decode_after(ids[cut:], ids[cut - 1]) == whole[len(prompt) :]
                assert _stream(tokenizer, ids[cut:], ids[cut - 1]) == whole[len(prompt) :]


def test_load_tokenizer_picks_the_backend(saved, tokenizer):
    _, path = saved
    assert isinstance(load_tokenizer(path), HFTokenizer)
    assert isinstance(load_tokenizer(os.path.join(path, "tokenizer.json")), HFTokenizer)
    assert load_tokenizer(tokenizer.path).encode("¿Qué tal?") == tokenizer.encode("¿Qué tal?")
    assert tokenizer.has_role_tokens and not load_tokenizer(path).has_role_tokens
    with pytest.raises(NoChatMarkersError, match="chat template"):
        _ = load_tokenizer(path).role_ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(os.path.join(path, "missing", "tokenizer.json"))
    with pytest.raises(ValueError, match="load_tokenizer"):
        type(tokenizer).load(os.path.join(path, "tokenizer.json"))  # The SentencePiece class alone.


def test_a_run_directory_with_a_tokenizer_json_loads(tmp_path, tokenizer):
    source = _save(tmp_path / "hf", "metaspace")
    hf = HFTokenizer.load(source)
    config = tiny_config(model__vocab_size=hf.vocab_size)
    run_dir = str(tmp_path / "run")
    directory.write_run_files(run_dir, config, tokenizer.path)  # An earlier SentencePiece copy is replaced.
    directory.save_run(run_dir, config, os.path.join(source, "tokenizer.json"), 0, create_model(config), True)
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.json", "tokenizer.json", "tokenizer_config.json"]
    assert directory.find_tokenizer(run_dir, config) == os.path.join(run_dir, "tokenizer.json")
    run = loading.load_run(run_dir)
    assert isinstance(run.tokenizer, HFTokenizer)
    assert run.tokenizer.encode(TEXTS[1], add_bos=True) == hf.encode(TEXTS[1], add_bos=True)
    assert run.tokenizer.bos_id == 1 and run.tokenizer.unk_id == 0


def test_special_tokens_of_the_config_are_added_and_an_eos_is_required(tmp_path):
    path = _save(tmp_path, "byte_level")
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|fin|>"}, f)
    ours, reference = HFTokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.eos_id == reference.eos_token_id == ours.vocab_size - 1 == len(reference) - 1
    assert ours.encode("hola<|fin|>") == reference.encode("hola<|fin|>", add_special_tokens=False)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<|endoftext|>"}, f)
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer.load(path)


def test_the_chat_template_refuses_a_tokenizer_without_chat_markers(tmp_path):
    hf = HFTokenizer.load(_save(tmp_path, "byte_level"))
    with pytest.raises(chat_template.ChatFormatError, match="chat-role markers"):
        chat_template.render(hf, [{"role": "user", "content": "¿Qué tal?"}], add_generation_prompt=True)


def test_token_bytes_spell_out_the_text(saved, tokenizer):
    kind, path = saved
    hf = HFTokenizer.load(path)
    for text in TEXTS:
        spelled = b"".join(hf.token_bytes(i) for i in hf.encode(text)).decode("utf-8")
        # A SentencePiece-style tokenizer writes a space in front of a text that does not start with one.
        assert spelled == (text if kind == "byte_level" or text.startswith(" ") else " " + text)
        spelled = b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode(text)).decode("utf-8")
        assert spelled == " " + unicodedata.normalize("NFC", text)
    emoji = hf.encode("😀")
    assert completions.token_text(hf, emoji[-1]).startswith("bytes:\\x")
    assert "".join(completions.token_text(hf, i) for i in hf.encode(" la playa")) == " la playa"


def test_special_tokens_map_json_is_read_as_transformers_reads_it(tmp_path):
    path = _save(tmp_path, "metaspace_template")
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<unk>", "bos_token": "<s>"}, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": {"content": "</s>", "lstrip": False}, "pad_token": "<unk>"}, f)
    ours, reference = HFTokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (2, 0, 1)
    assert (reference.eos_token_id, reference.pad_token_id, reference.bos_token_id) == (2, 0, 1)
    run_dir = str(tmp_path / "run")
    directory.write_run_files(run_dir, tiny_config(), os.path.join(path, "tokenizer.json"))
    assert HFTokenizer.load(run_dir).eos_id == 2  # special_tokens_map.json travels with the tokenizer.
    # A config with added_tokens_decoder (what transformers 5 writes) makes it ignore special_tokens_map.json.
    added = {"content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<unk>", "added_tokens_decoder": {"0": {**added, "special": True}}}, f)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    assert HFTokenizer.load(path).eos_id == reference.eos_token_id == 0
