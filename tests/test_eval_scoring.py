"""Log-likelihood scoring with the real Transformer, bits-per-byte and the unigram baseline."""

import math

import numpy as np
import pytest
from conftest import forward, tiny_config
from scipy import special

from llm.data import records
from llm.eval import perplexity
from llm.eval.scoring import Scorer, encode_pair
from llm.infer import generate
from llm.model.transformer import create_model


@pytest.fixture(scope="module")
def model():
    return create_model(tiny_config())


def _reference(model, context, continuation):
    """Sum of log-softmax of a plain forward pass over (the last max_len + 1 tokens of) the request."""
    tokens = (list(context) + list(continuation))[-(model.cfg.max_seq_len + 1) :]
    log_probs = special.log_softmax(np.asarray(forward(model, np.array([tokens[:-1]]))[0], np.float64), axis=-1)
    first = len(tokens) - 1 - len(continuation)
    return sum(log_probs[t, tokens[t + 1]] for t in range(first, len(tokens) - 1))


def test_scores_equal_the_log_softmax_of_a_plain_forward_pass(model):
    rng = np.random.default_rng(0)
    requests = [
        (rng.integers(4, 128, n).tolist(), rng.integers(4, 128, m).tolist())
        for n, m in [(1, 1), (3, 5), (10, 2), (20, 12), (7, 1)]
    ]
    requests.append((rng.integers(4, 128, 50).tolist(), rng.integers(4, 128, 6).tolist()))  # > max_len 32
    # batch_size 2: several batches and buckets, padded rows and padded positions.
    scores = Scorer(model, batch_size=2).score_tokens(requests)
    for score, (context, continuation) in zip(scores, requests):
        assert score == pytest.approx(_reference(model, context, continuation), abs=1e-4)


def test_a_shared_few_shot_prefix_is_read_once_and_scores_the_same(model):
    rng = np.random.default_rng(1)
    prefix = rng.integers(4, 128, 20).tolist()  # >= MIN_SHARED_PREFIX: scored on top of its KV cache
    # The last request is longer than the context: cut from the left, it no longer shares the prefix.
    requests = [
        (prefix + rng.integers(4, 128, n).tolist(), rng.integers(4, 128, m).tolist())
        for n, m in [(0, 3), (5, 1), (9, 2), (1, 4), (30, 2)]
    ]
    scores = Scorer(model, batch_size=3).score_tokens(requests)
    for score, (context, continuation) in zip(scores, requests):
        assert score == pytest.approx(_reference(model, context, continuation), abs=1e-4)


def _greedy_tokens(model, context, count):
    tokens = list(context)
    for _ in range(count):
        tokens.append(int(np.argmax(np.asarray(forward(model, np.array([tokens]))[0, -1]))))
    return tokens[len(context) :]


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_greediness_is_whether_every_continuation_token_is_the_argmax(model, shared_prefix):
    rng = np.random.default_rng(2)
    prefix = rng.integers(4, 128, 20).tolist()  # >= MIN_SHARED_PREFIX: the rows run on top of its KV cache
    requests = []
    for n in (1, 4, 7):
        context = (prefix if shared_prefix else rng.integers(4, 128, 20).tolist()) + rng.integers(4, 128, n).tolist()
        greedy = _greedy_tokens(model, context, 3)
        requests += [(context, greedy), (context, greedy[:2] + [4 + (greedy[2] - 3) % 124])]
    answers = Scorer(model, batch_size=2).score_tokens_greedy(requests)
    assert [is_greedy for _, is_greedy in answers] == [True, False] * 3
    plain = Scorer(model, batch_size=2).score_tokens(requests)
    np.testing.assert_allclose([score for score, _ in answers], plain, atol=1e-5)


def test_bad_requests_get_a_clear_error(model):
    scorer = Scorer(model)
    with pytest.raises(ValueError, match="Request 0: the context is empty"):
        scorer.score_tokens([([], [5])])
    with pytest.raises(ValueError, match="Request 1: a continuation of 40 tokens"):
        scorer.score_tokens([([2], [5]), ([2], [5] * 40)])
    with pytest.raises(ValueError, match="needs the tokenizer"):
        scorer.loglikelihood([("a", "b")])


def test_lengths_pad_to_a_few_buckets():
    assert [generate.bucket(n, 256) for n in (1, 16, 17, 100, 129, 256)] == [16, 16, 32, 128, 256, 256]
    assert [generate.bucket(n, 100) for n in (33, 64, 65, 100)] == [64, 64, 100, 100]


def test_continuations_split_where_the_text_splits(trained_run):
    from llm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(f"{trained_run}/tokenizer.model")
    context, continuation = encode_pair(tokenizer, "La niña canta, ¿verdad? ", "Sí")
    assert context[0] == tokenizer.bos_id
    assert context[1:] + continuation == tokenizer.encode("La niña canta, ¿verdad? Sí")
    assert tokenizer.decode(continuation) == "Sí"


class ByteTokenizer:
    """Letters a..d are ids 0..3; bos is 4. Enough to compute bits-per-byte by hand."""

    bos_id = 4

    def encode_batch(self, texts):
        return [[ord(char) - ord("a") for char in text] for text in texts]


def _rows(token_lists, loss_masks):
    for tokens, mask in zip(token_lists, loss_masks):
        yield {
            "tokens": np.array(tokens),
            "segment_ids": np.ones(len(tokens), int),
            "positions": np.arange(len(tokens)),
            "loss_mask": np.array(mask),
        }


def test_unigram_bpb_by_hand(tmp_path):
    # Training targets (loss_mask 1): a x5, b, c. The bos (4) and the masked-out d are not targets.
    records.write_shards(
        _rows([[4, 0, 0, 0, 1], [4, 0, 0, 2, 3]], [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]]),
        str(tmp_path / "train"),
        num_shards=2,
    )
    unigram = perplexity.UnigramModel.from_shards(str(tmp_path / "train"), vocab_size=5)
    assert unigram.counts.tolist() == [5, 1, 1, 0, 0]
    # Add-one: p = (c + 1) / (7 + 5) = 1/2, 1/6, 1/6, 1/12, 1/12.
    np.testing.assert_allclose(np.exp(unigram.log_probs()), [1 / 2, 1 / 6, 1 / 6, 1 / 12, 1 / 12])
    score = perplexity.score_text(unigram.score_tokens, ByteTokenizer(), ["aab", "d"], max_len=4)
    bits = 1 + 1 + math.log2(6) + math.log2(12)
    assert (score.tokens, score.bytes, score.documents) == (4, 4, 2)
    assert score.bpb == pytest.approx(bits / 4)
    assert score.perplexity == pytest.approx(2 ** (bits / 4))


def test_unigram_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the vocabulary of 3"):
        perplexity.UnigramModel.fit(_rows([[0, 5]], [[1, 1]]), vocab_size=3)


def test_long_documents_are_scored_once_in_windows():
    tokens = list(range(10, 31))  # 21 tokens, context of 8: windows of 4
    requests = perplexity.rolling_requests(tokens, bos_id=2, max_len=8)
    assert [token for _, continuation in requests for token in continuation] == tokens
    for context, continuation in requests:
        assert context == [2] + tokens[: tokens.index(continuation[0])] and len(continuation) <= 4


def test_text_files_split_into_paragraphs(tmp_path):
    path = tmp_path / "texto.txt"
    path.write_text("Primer párrafo,\nen dos líneas.\n\n \nSegundo párrafo.\n", encoding="utf-8")
    assert perplexity.read_text_documents(str(path)) == ["Primer párrafo,\nen dos líneas.", "Segundo párrafo."]
    (tmp_path / "vacio.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vacio.txt: no text"):
        perplexity.read_text_documents(str(tmp_path / "vacio.txt"))
