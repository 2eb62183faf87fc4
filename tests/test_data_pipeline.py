"""The corpus pipeline end to end: runners agree, every document is accounted for, runs resume."""

import collections
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool

import ml_collections
import numpy as np
import pytest
from conftest import REPO
from test_hf_tokenizer import _save

from configs.data import es_default
from llm.corpus import beam_runner, corpus_io, local_runner, pipeline, sources, stages
from llm.corpus.document import Document, Dropped
from llm.corpus.report import AccountingError, Accounts
from llm.data import records
from llm.tokenizer import Tokenizer, load_tokenizer

PARAGRAPHS = [
    "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, vivía un hidalgo de los de lanza en "
    "astillero, adarga antigua, rocín flaco y galgo corredor. Comía más vaca que carnero y los sábados "
    "duelos y quebrantos.",
    "La biblioteca municipal abre sus puertas a las nueve de la mañana y cierra a las ocho de la tarde. Los "
    "lectores pueden pedir prestados hasta cinco libros durante tres semanas, y renovarlos desde la página web.",
    "¿Sabías que el castellano se habla en más de veinte países? Desde México hasta Argentina, cada región "
    "tiene su acento, su vocabulario y sus expresiones, pero todos nos entendemos sin demasiado esfuerzo.",
    "El tren de alta velocidad une Madrid y Sevilla en dos horas y media. Antes de su inauguración, en el año "
    "noventa y dos, el mismo viaje duraba más de seis horas y había que cambiar de tren en Córdoba.",
    "Para preparar una buena tortilla de patatas hacen falta huevos frescos, patatas, aceite de oliva y sal. "
    "Hay quien añade cebolla y hay quien la considera un sacrilegio; el debate no tiene fin en las cocinas.",
    "La pandilla de niños jugaba al fútbol en la plaza del pueblo hasta que anochecía. Las madres los "
    "llamaban desde los balcones, pero ellos siempre pedían cinco minutos más para terminar el partido.",
    "Los científicos del observatorio de Canarias descubrieron un planeta que gira alrededor de una estrella "
    "enana. Según sus cálculos, la temperatura en su superficie permitiría la existencia de agua líquida.",
    "¡Qué alegría volver a verte después de tanto tiempo! Pensaba que te habías mudado al extranjero y que ya "
    "no volverías por aquí. Cuéntame qué has hecho durante todos estos años, que tengo mucha curiosidad.",
    "El museo del Prado guarda obras de Velázquez, Goya y El Greco. Cada año lo visitan millones de personas, "
    "que recorren sus salas en silencio delante de Las Meninas o de los fusilamientos del tres de mayo.",
    "La cosecha de aceitunas comienza en noviembre y se prolonga durante el invierno. Los agricultores varean "
    "los olivos y recogen el fruto en mallas extendidas sobre la tierra, antes de llevarlo a la almazara.",
    "Mi abuela guardaba las cartas de su juventud en una caja de lata. Cuando la abrimos, encontramos "
    "fotografías amarillentas, un pañuelo bordado y un poema escrito a mano por alguien cuyo nombre nadie "
    "recordaba.",
    "El río Ebro nace en Cantabria y desemboca en el Mediterráneo, formando un delta donde se cultiva arroz. "
    "Las aves migratorias se detienen allí cada otoño para descansar antes de continuar su viaje hacia el sur.",
]
NEWS = [
    "Durante la reunión, la directora explicó que el presupuesto del próximo año sería menor. Pidió a cada "
    "departamento que revisara sus gastos y que propusiera medidas de ahorro antes de que terminara el mes.",
    "Los estudiantes de la universidad organizaron una feria de ciencias en el patio central. Hubo robots que "
    "bailaban, volcanes de bicarbonato y un telescopio con el que se podían ver los anillos de Saturno.",
    "Aquella noche llovió con tanta fuerza que el arroyo se desbordó y anegó los huertos. Por la mañana, los "
    "vecinos salieron con botas de goma para ayudarse unos a otros a sacar el barro de las casas.",
]
PII_TEXT = (
    "Para cualquier consulta sobre el mercado de los sábados, escríbeme a maria.lopez@correo.es o llámame al "
    "612 345 678; mi DNI es 12345678Z y te responderé en cuanto pueda, que los puestos abren muy temprano."
)
ENGLISH = (
    "The weather in the mountains was cold and windy, so the hikers decided to stay in the cabin and read "
    "books by the fire until the storm was over and the path was safe again for everyone."
)
CONLLU = (
    "# sent_id = 1\n# text = ¿Dónde está la biblioteca?\n1\t¿\t_\n\n# sent_id = 2\n# text = El río nace en Cantabria.\n"
)


def write_corpus(root) -> str:
    """A tiny corpus with planted duplicates, foreign text, PII and malformed files; returns its directory."""
    corpus = root / "corpus"
    corpus.mkdir()
    books = PARAGRAPHS + [
        PARAGRAPHS[0].lower().replace(" ", "  "),  # exact duplicate of paragraph 0 up to case and spacing
        PARAGRAPHS[1] + " Consulte el horario.",  # near duplicate of paragraph 1
    ]
    (corpus / "libros.txt").write_text("\n\n".join(books) + "\n", encoding="utf-8")
    lines = [json.dumps({"text": text, "url": f"https://example.es/{i}"}) for i, text in enumerate(NEWS)]
    lines.insert(1, '{"text": "una línea JSON rota"')
    lines += [json.dumps({"text": PII_TEXT}), json.dumps({"text": ENGLISH})]
    (corpus / "noticias.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (corpus / "roto.txt").write_bytes("Una línea con un byte inválido: ".encode() + b"\xff\xfe fin.\n")
    (corpus / "vacio.txt").write_bytes(b"")
    return str(corpus)


def make_config(root, **overrides) -> ml_collections.ConfigDict:
    config = es_default.get_config()
    config.sources.paths = write_corpus(root) if not (root / "corpus").exists() else str(root / "corpus")
    config.sources.text_mode = "paragraph"
    config.runner.num_workers = 2
    config.runner.chunk_size = 3  # several chunks per worker, so ordering across chunks is exercised
    config.output.corpus_shards = 3
    config.tokenizer.vocab_size = 400
    config.pack.seq_len = 64
    config.pack.min_validation_rows = 1
    config.pack.train_shards = 2
    conllu = root / "eval.conllu"
    conllu.write_text(CONLLU, encoding="utf-8")
    config.report.eval_conllu = str(conllu)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def read_tree(directory) -> dict[str, bytes]:
    """Every file under `directory`: relative path -> bytes."""
    tree = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            tree[os.path.relpath(path, directory)] = open(path, "rb").read()
    return tree


def corpus_files(step_directory) -> dict[str, bytes]:
    return {name: data for name, data in read_tree(step_directory).items() if name.endswith(".jsonl")}


def counts(step_directory) -> dict:
    return corpus_io.read_counts(str(step_directory)).counts()


# Module-level so that worker processes can unpickle it by reference.
def exploding_stages(config):
    """The real stages plus one that crashes midway through the corpus, like a killed run."""
    return [*stages.document_stages(config), ("explode", _explode)]


def _explode(document):
    if document.id.endswith("libros.txt:6"):
        raise RuntimeError("simulated crash")
    return document


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A complete local run of every step, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("local")
    config = make_config(root)
    output = root / "out"
    pipeline.prepare(config, str(output), local_runner.LocalRunner(config, progress=False), progress=False)
    return root, config, output


def test_filter_and_dedup_decisions(local_run):
    _, _, output = local_run
    filtered = counts(output / "stages" / "filter")
    deduped = counts(output / "stages" / "dedup")
    assert filtered["stages"]["read"]["dropped"] == {"source.bad_json": 1, "source.empty": 1, "source.invalid_utf8": 1}
    assert (
        sum(filtered["stages"]["langid"]["dropped"].values()) + sum(filtered["stages"]["quality"]["dropped"].values())
        == 1
    )  # the English paragraph
    assert deduped["stages"]["exact_dedup"]["dropped"] == {"exact_dedup.duplicate": 1}
    assert deduped["stages"]["near_dedup"]["dropped"] == {"near_dedup.near_duplicate": 1}
    assert filtered["pii"]["email"] == 1 and filtered["pii"]["phone"] == 1 and filtered["pii"]["dni"] == 1
    kept = {document.id: document for document in corpus_io.read_documents(str(output / "stages" / "dedup"))}
    # The smaller id of each duplicate pair is the one kept.
    assert "libros.txt:0" in kept and "libros.txt:12" not in kept
    assert "libros.txt:1" in kept and "libros.txt:13" not in kept
    assert len(kept) == len(PARAGRAPHS) + len(NEWS) + 1
    assert "noticias.jsonl:6" not in kept  # the English paragraph
    scrubbed = kept["noticias.jsonl:5"]
    assert "maria.lopez" not in scrubbed.text and "12345678Z" not in scrubbed.text
    assert kept["noticias.jsonl:1"].metadata["url"] == "https://example.es/0"
    assert "¿Sabías que el castellano" in kept["libros.txt:2"].text  # accents and ¿ survive untouched


def test_shards_are_sorted_by_id_and_hashed_by_id(local_run):
    _, config, output = local_run
    for path in corpus_io.shard_paths(str(output / "stages" / "dedup")):
        index = int(os.path.basename(path).split("-")[1])
        ids = [document.id for document in corpus_io.iterate_documents(open(path, encoding="utf-8"), path)]
        assert ids == sorted(ids)
        assert all(corpus_io.shard_of(doc_id, config.output.corpus_shards) == index for doc_id in ids)


def test_every_document_is_accounted_for(local_run):
    _, _, output = local_run
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    documents = report["documents"]
    # 14 paragraphs + 2 malformed text files + 6 JSONL lines (one of them broken).
    assert documents["in"] == 14 + 2 + 6
    drops = sum(sum(stage["dropped"].values()) for stage in report["stages"])
    assert documents["in"] == documents["kept"] + drops == documents["kept"] + documents["dropped"]
    for before, after in zip(report["stages"], report["stages"][1:]):
        assert after["documents_in"] == before["documents_out"]


def test_accounts_check_catches_a_lost_document():
    accounts = Accounts(["read", "clean"])
    accounts.record("read", Document("a", "hola"))
    accounts.record("read", Document("b", "adiós"))
    accounts.record("clean", Document("a", "hola"))  # "b" never reaches clean, nor is it dropped
    with pytest.raises(AccountingError, match="clean"):
        accounts.check()
    accounts.record("clean", Dropped("b", "clean.empty"))
    accounts.check()


def test_prepare_writes_every_promised_file(local_run):
    _, config, output = local_run
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.load(str(output / "tokenizer.model"))
    assert (output / "tokenizer.vocab").is_file()
    assert tokenizer.vocab_size == report["tokenizer"]["vocab_size"] == 400
    seq_len = config.pack.seq_len
    real_tokens = 0
    for split in ("train", "validation"):
        paths = records.shard_paths(str(output / split))
        assert len(paths) == report["packing"]["splits"][split]["shards"]
        rows = [row for path in paths for row in records.iterate_shard(path)]
        assert len(rows) == report["packing"]["splits"][split]["rows"] > 0
        assert all(row["tokens"].shape == (seq_len,) for row in rows)
        real_tokens += sum(int(np.count_nonzero(row["segment_ids"])) for row in rows)
    # Every corpus token is packed once, plus bos and eos around each document.
    assert real_tokens == report["corpus"]["tokens"] + 2 * report["documents"]["kept"]
    assert report["packing"]["seq_len"] == seq_len and report["packing"]["vocab_size"] == 400
    assert 0 < report["packing"]["packing_efficiency"] <= 1
    assert report["tokenizer"]["fertility"] > 0 and report["tokenizer"]["bytes_per_token"] > 0
    assert report["tokenizer"]["spanish_characters_round_trip"]
    assert {entry["source"] for entry in report["sources"]} == {"libros.txt", "noticias.jsonl"}
    assert sum(entry["tokens"] for entry in report["sources"]) == report["corpus"]["tokens"]
    assert all(entry["licence"] == "unknown" for entry in report["sources"])
    assert set(report["elapsed_seconds"]) == {"filter", "dedup", "decontaminate", "tokenizer", "pack"}
    assert report["mb"]["out"] <= report["mb"]["in"] and report["words"]["out"] > 0


def test_local_and_beam_runners_write_the_same_corpus(local_run, tmp_path):
    root, config, output = local_run
    runner = beam_runner.BeamRunner(config)
    runner.filter(config, str(tmp_path / "filter"))
    runner.dedup(config, str(tmp_path / "filter"), str(tmp_path / "dedup"))
    for step in ("filter", "dedup"):
        assert corpus_files(tmp_path / step) == corpus_files(output / "stages" / step)
        assert counts(tmp_path / step) == counts(output / "stages" / step)


def test_local_output_does_not_depend_on_workers_or_chunks(local_run, tmp_path):
    root, _, output = local_run
    config = make_config(root, **{"runner.num_workers": 1, "runner.chunk_size": 50})
    runner = local_runner.LocalRunner(config, progress=False)
    runner.filter(config, str(tmp_path / "filter"))
    runner.dedup(config, str(tmp_path / "filter"), str(tmp_path / "dedup"))
    for step in ("filter", "dedup"):
        assert corpus_files(tmp_path / step) == corpus_files(output / "stages" / step)
        assert counts(tmp_path / step) == counts(output / "stages" / step)


class CountingRunner(local_runner.LocalRunner):
    """A local runner that remembers which steps it ran."""

    def __init__(self, config, **kwargs):
        super().__init__(config, progress=False, **kwargs)
        self.ran = []

    def filter(self, config, output_dir):
        self.ran.append("filter")
        return super().filter(config, output_dir)

    def dedup(self, config, input_dir, output_dir):
        self.ran.append("dedup")
        return super().dedup(config, input_dir, output_dir)


def test_rerun_skips_finished_steps_and_changes_nothing(local_run, caplog):
    _, config, output = local_run
    before = read_tree(output)
    runner = CountingRunner(config)
    with caplog.at_level("INFO"):
        pipeline.prepare(config, str(output), runner, progress=False)
    assert runner.ran == []
    for step in pipeline.STEPS:
        assert f"Step {step}: finished in a previous run" in caplog.text
    assert read_tree(output) == before


def test_interrupted_run_resumes_and_matches_a_clean_run(local_run, tmp_path, monkeypatch):
    root, config, clean = local_run
    output = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.prepare(config, output, CountingRunner(config, make_stages=exploding_stages), progress=False)
    assert pipeline.read_marker(pipeline.step_dir(output, "filter")) is None

    # Second attempt: the corpus steps finish, then packing crashes.
    def crash(*args):
        raise RuntimeError("simulated crash in pack")

    monkeypatch.setitem(pipeline._STEP_FUNCTIONS, "pack", crash)
    with pytest.raises(RuntimeError, match="in pack"):
        pipeline.prepare(config, output, CountingRunner(config), progress=False)
    monkeypatch.undo()
    assert pipeline.read_marker(pipeline.step_dir(output, "tokenizer")) is not None

    runner = CountingRunner(config)
    pipeline.prepare(config, output, runner, progress=False)
    assert runner.ran == []  # filter and dedup were finished: only tokenizer's successors ran
    resumed, reference = read_tree(output), read_tree(clean)
    # Timings differ, and SentencePiece stores its output path in the .model (the .vocab compares pieces).
    volatile = ("_COMPLETE.json", "counts.json", "report.json", "tokenizer.model")
    assert {k: v for k, v in resumed.items() if not k.endswith(volatile)} == {
        k: v for k, v in reference.items() if not k.endswith(volatile)
    }
    assert json.loads(resumed["report.json"])["documents"] == json.loads(reference["report.json"])["documents"]


def test_changed_config_is_refused_naming_the_key(local_run):
    root, config, output = local_run
    changed = make_config(root, **{"quality.min_words": 6})
    with pytest.raises(ValueError, match=r"quality\.min_words was 5, now 6"):
        pipeline.prepare(changed, str(output), CountingRunner(changed), progress=False)


def test_malformed_input_raises_naming_file_and_line_without_losing_output(local_run, tmp_path):
    root, _, _ = local_run
    config = make_config(root, **{"sources.on_error": "raise"})
    output = str(tmp_path / "out")
    with pytest.raises(sources.SourceError, match=r"noticias\.jsonl:2: invalid JSON"):
        pipeline.prepare(config, output, CountingRunner(config), progress=False)
    assert pipeline.read_marker(pipeline.step_dir(output, "filter")) is None
    assert not os.path.exists(os.path.join(output, "report.json"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"output_dir": ""}, "--output_dir"),
        ({"runner": "spark"}, "--runner='spark'"),
        ({"until": "everything"}, "--until='everything'"),
        ({"output_dir": "gs://bucket/es"}, "remote directory needs --runner=beam"),
        ({"config": {"output.corpus_shards": 0}}, "output.corpus_shards=0"),
        ({"config": {"tokenizer.model_type": "wordpiece"}}, "tokenizer.model_type='wordpiece'"),
        ({"config": {"dedup.threshold": 1.5}}, "dedup.threshold"),
        ({"config": {"report.eval_conllu": "/no/such.conllu"}}, "report.eval_conllu"),
    ],
)
def test_validate_names_the_bad_flag_or_key(tmp_path, changes, message):
    config = make_config(tmp_path, **changes.get("config", {}))
    arguments = {"output_dir": str(tmp_path / "out"), "runner": "local", "until": "report"}
    arguments.update({k: v for k, v in changes.items() if k != "config"})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        pipeline.validate(config, **arguments)


def test_validate_rejects_an_unknown_config_section(tmp_path):
    config = make_config(tmp_path)
    config.packing = ml_collections.ConfigDict({"seq_len": 10})
    with pytest.raises(ValueError, match="section 'packing'"):
        pipeline.validate(config, str(tmp_path / "out"), "local", "report")


def test_parallel_map_reads_a_bounded_number_of_chunks_ahead_and_stops_cleanly():
    pulled = []

    def chunks():
        for index in range(100):
            pulled.append(index)
            yield [index]

    with local_runner.parallel_map(len, chunks(), workers=2) as results:
        assert next(results) == 1
        time.sleep(0.5)  # time to run ahead, if it could
        assert len(pulled) <= 2 * 2  # two chunks per worker in flight, the consumed one among them
        assert sum(results) == 99
    assert len(pulled) == 100

    # Leaving early (here a consumer error) must end the workers and read no further.
    pulled.clear()
    with pytest.raises(KeyError), local_runner.parallel_map(len, chunks(), workers=2) as results:
        next(results)
        raise KeyError("consumer failed")
    assert len(pulled) < 100


def _exit_on_seven(value):
    if value == 7:
        os._exit(1)  # A worker killed mid-chunk, as by the out-of-memory killer.
    return value


def test_parallel_map_raises_when_a_worker_dies_instead_of_waiting_forever():
    with pytest.raises(BrokenProcessPool), local_runner.parallel_map(_exit_on_seven, range(20), workers=2) as results:
        list(results)


def test_script_runs_end_to_end_and_resumes(tmp_path):
    config = make_config(tmp_path)
    output = tmp_path / "out"
    flags = [
        sys.executable,
        os.path.join(REPO, "scripts", "prepare_data.py"),
        f"--output_dir={output}",
        f"--config.sources.paths={config.sources.paths}",
        "--config.sources.text_mode=paragraph",
        "--config.tokenizer.vocab_size=400",
        "--config.pack.seq_len=64",
        "--config.pack.min_validation_rows=1",
        f"--config.report.eval_conllu={config.report.eval_conllu}",
        "--config.runner.num_workers=2",
        "--noprogress",
    ]
    first = subprocess.run(flags, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    for name in ("tokenizer.model", "tokenizer.vocab", "report.json", "train", "validation"):
        assert (output / name).exists(), name
    second = subprocess.run(flags, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "Step filter: finished in a previous run" in second.stderr
    bad = subprocess.run(flags[:2] + ["--runner=spark"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert bad.returncode != 0 and "--output_dir is required" in bad.stderr


# The keys of make_config that the pipeline's scripts run needs to see the same corpus as local_run.
_PIPELINE_KEYS = (
    "sources.paths",
    "sources.text_mode",
    "runner.num_workers",
    "runner.chunk_size",
    "output.corpus_shards",
    "pack.min_validation_rows",
    "pack.train_shards",
    "report.eval_conllu",
)


def test_an_existing_tokenizer_replaces_the_trained_one(local_run, tmp_path):
    """--tokenizer=HF_DIR (config.tokenizer.path): the corpus is tokenized with it and its files are published;
    the filter and dedup steps of an earlier run are reused."""
    root, config, output = local_run
    hf_dir = _save(tmp_path / "hf", "metaspace_template")
    with open(os.path.join(hf_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write("{% for m in messages %}{{ m.content }}{% endfor %}")
    out = tmp_path / "out"
    for step in ("filter", "dedup"):
        shutil.copytree(output / "stages" / step, out / "stages" / step)
    (out / "tokenizer.model").write_bytes((output / "tokenizer.model").read_bytes())  # An earlier run's: removed.
    script = os.path.join(REPO, "scripts", "prepare_data.py")
    flags = [f"--output_dir={out}", f"--tokenizer={hf_dir}", "--noprogress", "--config.pack.seq_len=64"]
    flags += [f"--config.{key}={config[key.split('.')[0]][key.split('.')[1]]}" for key in _PIPELINE_KEYS]
    result = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Step dedup: finished in a previous run" in result.stderr
    names = set(os.listdir(out))
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not names & {"tokenizer.model", "tokenizer.vocab"}
    tokenizer = load_tokenizer(str(out))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["tokenizer"]["vocab_size"] == report["packing"]["vocab_size"] == tokenizer.vocab_size
    assert report["tokenizer"]["source"] == hf_dir
    # The packed tokens are the tokenizer's encoding of every document, with bos and eos around it.
    documents = list(corpus_io.read_documents(str(out / "stages" / "dedup")))
    want = collections.Counter()
    for document in documents:
        want.update(tokenizer.encode(document.text, add_bos=True, add_eos=True))
    packed = collections.Counter()
    for split in ("train", "validation"):
        for row in (row for path in records.shard_paths(str(out / split)) for row in records.iterate_shard(path)):
            packed.update(row["tokens"][row["segment_ids"] > 0].tolist())
    assert packed == want and sum(want.values()) == report["corpus"]["tokens"] + 2 * len(documents)
    bad = subprocess.run(
        [sys.executable, script, f"--output_dir={tmp_path / 'bad'}", f"--tokenizer={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "tokenizer.path=" in bad.stderr and "holds no tokenizer.json" in bad.stderr
