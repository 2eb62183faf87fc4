"""The retrieval index: planted passages found by every mode, RRF by hand, save/load, embedder identity, IVF-PQ
recall against exact search, and scripts/build_index.py."""

import os
import re
import zlib

import faiss
import numpy as np
import pytest
import torch
from conftest import run_script, spanish_documents
from test_hf_export import saved_hf

from llm.hf import importer
from llm.rag import calibration, vector
from llm.rag.documents import SourceDocument
from llm.rag.embeddings import Embedder
from llm.rag.hybrid import reciprocal_rank_fusion
from llm.rag.index import RetrievalIndex
from llm.rag.passages import split_document
from llm.rag.vector import VectorIndex

PLANTED = "La catedral de Burgos guarda el sepulcro del Cid Campeador y de doña Jimena."
QUERIES = [PLANTED, "¿Quién lo sabe?", "paella en Valencia", "nadie"]
# Small IVF-PQ settings a 41-passage corpus can train (at least max(nlist, 2**nbits) vectors).
SMALL_IVFPQ = dict(nlist=2, m=8, nbits=4, nprobe=2)
OPTIONS = {"flat": {}, "ivfpq": SMALL_IVFPQ, "hnsw": dict(M=8, efSearch=16)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An imported tiny random Llama (test_rag_embeddings' model) as a run."""
    path = tmp_path_factory.mktemp("index_run")
    _, hf_dir = saved_hf("llama", path / "hf")
    return importer.import_hf(hf_dir, str(path / "run"))


@pytest.fixture(scope="module")
def embedder(run_dir):
    return Embedder.from_run(run_dir)


@pytest.fixture(scope="module")
def passages():
    """40 one-sentence-per-passage documents and the planted passage, with unique ids."""
    texts = spanish_documents(40) + [PLANTED]
    documents = [SourceDocument(f"doc{i}", text, f"corpus.jsonl:{i + 1}") for i, text in enumerate(texts)]
    return [passage for document in documents for passage in split_document(document, budget=16, overlap=0)]


@pytest.fixture(scope="module")
def indexes(passages, embedder):
    """kind -> RetrievalIndex built with the embedder."""
    return {kind: RetrievalIndex.build(passages, embedder, kind, **OPTIONS[kind]) for kind in vector.KINDS}


def results(index, mode, k=5):
    return [[(hit.passage.id, hit.score, hit.ranks) for hit in index.search(query, k, mode)] for query in QUERIES]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_a_planted_passage_is_retrieved_first(kind, mode, indexes):
    hits = indexes[kind].search(PLANTED, k=3, mode=mode)
    assert hits[0].passage.text == PLANTED and hits[0].rank == 1
    assert [hit.rank for hit in hits] == list(range(1, len(hits) + 1)) and len(hits) == (1 if mode == "bm25" else 3)
    if mode == "dense":
        assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[1].score < 1 - 1e-4
    if mode == "hybrid":
        assert hits[0].ranks == {"bm25": 1, "dense": 1}


def test_reciprocal_rank_fusion_equals_the_hand_computed_fusion():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]])
    expected = {"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63}
    assert [f.item for f in fused] == ["a", "c", "b", "d"]
    assert {f.item: f.score for f in fused} == pytest.approx(expected)
    assert [f.ranks for f in fused] == [(1, 2), (3, 1), (2, None), (None, 3)]
    assert [f.score for f in reciprocal_rank_fusion([["a"], ["b"]], k=0)] == [1.0, 1.0]
    # Ties: equal scores are ordered by the best rank, then by the first list holding it.
    assert [f.item for f in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]
    assert [f.item for f in reciprocal_rank_fusion([["p", "q"], ["r", "s"], ["q", "p"]])] == ["p", "q", "r", "s"]
    assert [f.item for f in reciprocal_rank_fusion([["t", "u"], ["v"], ["u", "t"], ["w", "v"]])] == ["t", "v", "u", "w"]
    assert [f.item for f in reciprocal_rank_fusion([[], ["m"], ["n"]])] == ["m", "n"]
    with pytest.raises(ValueError, match="holds an item twice"):
        reciprocal_rank_fusion([["a", "a"]])
    weighted = reciprocal_rank_fusion([["a", "b"], ["b", "a"]], weights=(1.0, 0.5))
    assert [f.item for f in weighted] == ["a", "b"]
    assert [f.score for f in weighted] == pytest.approx([1 / 61 + 0.5 / 62, 1 / 62 + 0.5 / 61])
    with pytest.raises(ValueError, match="one weight >= 0 per ranked list"):
        reciprocal_rank_fusion([["a"], ["b"]], weights=(1.0,))


def test_hybrid_search_fuses_the_bm25_and_dense_rankings(indexes):
    index = indexes["flat"]
    query = "¿Quién lo sabe? paella"
    bm25 = [hit.passage.id for hit in index.search(query, 100, "bm25")]
    dense = [hit.passage.id for hit in index.search(query, 100, "dense")]
    expected = reciprocal_rank_fusion([bm25, dense], weights=(1.0, index.dense_weight))[:7]
    hybrid = index.search(query, 7, "hybrid")
    assert [hit.passage.id for hit in hybrid] == [f.item for f in expected]
    assert [hit.score for hit in hybrid] == [f.score for f in expected]
    assert [tuple(hit.ranks.values()) for hit in hybrid] == [f.ranks for f in expected]


@pytest.mark.parametrize("kind", vector.KINDS)
def test_an_index_saved_and_loaded_gives_identical_results(kind, indexes, embedder, tmp_path):
    index = indexes[kind]
    index.save(str(tmp_path / "index"))
    assert sorted(os.listdir(tmp_path)) == ["index"]  # the staging directory was moved in, nothing left over
    loaded = RetrievalIndex.load(str(tmp_path / "index"), embedder)
    assert loaded.vectors.kind == kind and loaded.vectors.options == index.vectors.options
    if kind == "ivfpq":  # a search option the index file keeps (FAISS's default would be 1)
        assert faiss.extract_index_ivf(loaded.vectors.index).nprobe == 2
    assert loaded.passages == index.passages
    assert (loaded.dense_weight, loaded.calibration) == (index.dense_weight, index.calibration)
    for mode in ("bm25", "dense", "hybrid"):
        assert results(loaded, mode) == results(index, mode), mode


def test_an_index_refuses_an_embedder_of_another_model_or_settings(passages, indexes, run_dir, tmp_path):
    directory = str(tmp_path / "index")
    indexes["flat"].save(directory)
    with pytest.raises(ValueError, match="pooling differs") as error:
        RetrievalIndex.load(directory, Embedder.from_run(run_dir, pooling="last"))
    assert "index built with: workdir=" in str(error.value) and "embedder given:   workdir=" in str(error.value)
    # Another model at the same path and step: a retrained (here: perturbed) Llama imported over the run.
    model, hf_dir = saved_hf("llama", tmp_path / "other_hf")
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(hf_dir)
    other_run = importer.import_hf(hf_dir, str(tmp_path / "run"))
    first = RetrievalIndex.build(passages, Embedder.from_run(other_run))
    first.save(str(tmp_path / "other_index"))
    importer.import_hf(saved_hf("llama", tmp_path / "same_hf")[1], other_run, overwrite=True)
    with pytest.raises(ValueError, match="probe text's embeddings differ") as error:
        RetrievalIndex.load(str(tmp_path / "other_index"), Embedder.from_run(other_run))
    assert str(error.value).count(f"workdir={other_run!r}") == 2 and "step=0" in str(error.value)


def test_bm25_only_and_vector_indexes_without_an_embedder(passages, indexes, tmp_path):
    bm25_only = RetrievalIndex.build(passages)
    assert bm25_only.search(PLANTED, 1, "bm25")[0].passage.text == PLANTED
    for mode in ("dense", "hybrid"):
        with pytest.raises(ValueError, match="BM25-only index"):
            bm25_only.search(PLANTED, 1, mode)
    bm25_only.save(str(tmp_path / "bm25"))
    assert results(RetrievalIndex.load(str(tmp_path / "bm25")), "bm25") == results(bm25_only, "bm25")
    indexes["flat"].save(str(tmp_path / "dense"))
    loaded = RetrievalIndex.load(str(tmp_path / "dense"))  # no embedder: BM25 works, dense names the run to load
    assert results(loaded, "bm25") == results(indexes["flat"], "bm25")
    with pytest.raises(ValueError, match="needs the embedder that built the index.*Embedder.from_run"):
        loaded.search(PLANTED, 1, "dense")
    with pytest.raises(ValueError, match="search mode must be one of"):
        loaded.search(PLANTED, 1, "sparse")
    with pytest.raises(FileNotFoundError, match="not a retrieval index"):
        RetrievalIndex.load(str(tmp_path / "missing"))


def test_a_failed_save_keeps_the_old_index_and_leaves_no_staging(passages, indexes, tmp_path, monkeypatch):
    directory = str(tmp_path / "index")
    RetrievalIndex.build(passages).save(directory)
    with pytest.raises(FileExistsError, match="overwrite"):
        indexes["flat"].save(directory)

    def fail(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(VectorIndex, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        indexes["flat"].save(directory, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["index"]
    assert RetrievalIndex.load(directory).vectors is None  # still the old BM25-only index, whole
    monkeypatch.undo()
    indexes["flat"].save(directory, overwrite=True)
    assert RetrievalIndex.load(directory).vectors.kind == "flat"


def clustered(count, dim, clusters, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    return centres[rng.integers(0, clusters, count)] + 0.3 * rng.standard_normal((count, dim), dtype=np.float32)


def recall_at_10(approximate, exact):
    return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])


def test_ivfpq_and_hnsw_recall_against_exact_search_and_their_option_errors(tmp_path):
    corpus, queries = clustered(4000, 32, 20, seed=0), clustered(50, 32, 20, seed=1)
    exact = VectorIndex.build(corpus).search(queries, 10)[1]
    ivfpq = VectorIndex.build(corpus, "ivfpq")
    assert ivfpq.options == {"nlist": 100, "m": 8, "nbits": 8, "nprobe": 8, "seed": 0}
    assert recall_at_10(ivfpq.search(queries, 10)[1], exact) > 0.65
    # Gaussian blobs in 32 dims are hard for a graph: recall grows with efSearch, the candidates per query.
    assert recall_at_10(VectorIndex.build(corpus, "hnsw").search(queries, 10)[1], exact) > 0.7
    hnsw = VectorIndex.build(corpus, "hnsw", efSearch=256)
    assert recall_at_10(hnsw.search(queries, 10)[1], exact) > 0.95
    hnsw.save(str(tmp_path))
    np.testing.assert_array_equal(VectorIndex.load(str(tmp_path)).search(queries, 10)[1], hnsw.search(queries, 10)[1])
    with pytest.raises(ValueError, match="needs at least 256 vectors.*'flat'"):
        VectorIndex.build(corpus[:200], "ivfpq", nlist=4)
    with pytest.raises(ValueError, match="needs at least 500 vectors"):
        VectorIndex.build(corpus[:400], "ivfpq", nlist=500, nbits=4)
    with pytest.raises(ValueError, match="m=5 does not divide dim=32"):
        VectorIndex.build(corpus, "ivfpq", m=5)
    with pytest.raises(ValueError, match=r"unknown options \['nprobe'\] for a 'hnsw' index"):
        VectorIndex.build(corpus, "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="kind must be one of"):
        VectorIndex.build(corpus, "lsh")


def write_corpus(directory):
    directory.mkdir()
    (directory / "notas.md").write_text("# Burgos\n\n" + PLANTED + "\n", encoding="utf-8")
    shard = "".join(
        f'{{"id": "d{i}", "text": "{text}", "metadata": {{}}}}\n' for i, text in enumerate(spanish_documents(8))
    )
    (directory / "shard.jsonl").write_text(shard, encoding="utf-8")
    return str(directory)


def test_build_index_script_end_to_end(run_dir, embedder, tmp_path):
    corpus, output = write_corpus(tmp_path / "corpus"), str(tmp_path / "index")
    result = run_script(
        "build_index.py",
        f"--input={corpus}",
        f"--output={output}",
        f"--embedder={run_dir}",
        "--max_tokens=60",
        "--vector_index=hnsw",
    )
    assert result.returncode == 0, result.stderr
    assert "passages from 9 documents" in result.stdout and "hnsw vector index of dim 64" in result.stdout
    index = RetrievalIndex.load(output, embedder)
    assert index.identity["workdir"] == run_dir and index.identity["step"] == 0
    # --max_tokens counts the embedder's tokens (PLANTED has 55; the documents' sentences some 20 each).
    assert max(len(embedder.tokenizer.encode(passage.text)) for passage in index.passages) <= 60
    assert len(index.passages) > 20
    hits = index.search(PLANTED, 2, "hybrid")
    assert hits[0].passage.text == PLANTED and hits[0].passage.headings == ("Burgos",)
    again = run_script("build_index.py", f"--input={corpus}", f"--output={output}")
    assert again.returncode != 0 and "already exists; pass --overwrite" in again.stderr
    again = run_script("build_index.py", f"--input={corpus}", f"--output={output}", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert RetrievalIndex.load(output).vectors is None


def test_build_index_script_refuses_bad_input_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n \n", encoding="utf-8")
    cases = {
        "no passages (no non-empty documents found)": [f"--input={empty}"],
        "does not exist": [f"--input={tmp_path / 'missing'}"],
        "--vector_index needs --embedder": [f"--input={empty}", "--vector_index=ivfpq"],
        "is not a run directory": [f"--input={empty}", f"--embedder={tmp_path / 'norun'}"],
    }
    for message, flags in cases.items():
        result = run_script("build_index.py", *flags, f"--output={tmp_path / 'index'}")
        assert result.returncode != 0 and message in result.stderr, (message, result.stderr)
    assert not os.path.exists(tmp_path / "index")


class SynonymEmbedder:
    """A stand-in embedder that sees only topic words, and knows what BM25 cannot: "alfaN" means "betaN"."""

    dim = 512

    def embed(self, texts, kind="passage"):
        vectors = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for topic in re.findall(r"(?:alfa|beta)(\d+)", text):
                vectors[row, zlib.crc32(topic.encode()) % self.dim] += 1.0
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class NoiseEmbedder(SynonymEmbedder):
    """Vectors that know nothing of the text: an untrained embedder at its worst."""

    def embed(self, texts, kind="passage"):
        rng = np.random.default_rng([zlib.crc32(text.encode()) for text in texts])
        vectors = rng.normal(size=(len(texts), self.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def calibration_passages():
    """Passages on topic N: one sentence names it "alfaN", the others "betaN" (which only the synonym-aware
    embedder relates), among filler words every passage shares."""
    fillers = spanish_documents(80)
    passages = []
    for i, filler in enumerate(fillers):
        clauses = filler.split(". ")[:3]
        text = " ".join(
            f"{clause.rstrip('.')} con {'alfa' if j == 0 else 'beta'}{i}." for j, clause in enumerate(clauses)
        )
        passages += split_document(SourceDocument(f"doc{i}", text, f"c:{i}"), budget=60, overlap=0)
    return passages


def test_pseudo_queries_are_a_sentence_and_the_rest_of_its_passage():
    pairs = calibration.pseudo_queries(calibration_passages(), 50, seed=0)
    assert len(pairs) == 50
    for query, target in pairs:
        original = next(p for p in calibration_passages() if p.id == target.id).text
        assert query in original and query not in target.text
        assert sorted((query + " " + target.text).split()) == sorted(original.split())


def test_calibration_trusts_vectors_that_rank_well_and_not_noise():
    passages = calibration_passages()
    useful = calibration.calibrate(passages, SynonymEmbedder())
    noise = calibration.calibrate(passages, NoiseEmbedder())
    assert useful.queries == noise.queries >= calibration.MIN_QUERIES
    assert useful.dense_weight > 0 and useful.mrr[str(useful.dense_weight)] > useful.mrr["0.0"]
    assert noise.dense_weight < 0.5 and noise.mrr[str(noise.dense_weight)] >= noise.mrr["1.0"]
    assert noise.mrr["1.0"] < noise.mrr["0.0"]  # equal weights would have made BM25 worse
    few = calibration.calibrate(passages[:10], NoiseEmbedder())
    assert (few.dense_weight, few.mrr) == (1.0, {})
