"""Each evaluation task scored on a tiny fixture with fake models whose answers, and so scores, are known."""

import json

import pytest

from llm.eval import generation_tasks, multiple_choice, suite, tasks
from llm.eval.multiple_choice import MultipleChoiceItem

XNLI_ROWS = 36  # 30 in the shot pool, 6 scored


def write_eval_data(directory):
    """A miniature es_eval directory in the real formats."""
    directory.mkdir(exist_ok=True)
    xnli = ["premise\thypothesis\tlabel"] + [
        f"Premisa {i} del texto.\tHipótesis {i}.\t{i % 3}" for i in range(XNLI_ROWS)
    ]
    (directory / tasks.XNLI_FILE).write_text("\n".join(xnli) + "\n", encoding="utf-8")
    for split, count in (("train", 9), ("test", 4)):
        texts = [f"Tuit {split} número {i} #día" for i in range(count)]
        (directory / f"sentiment_es_{split}_text.txt").write_text("\n".join(texts), encoding="utf-8")
        (directory / f"sentiment_es_{split}_labels.txt").write_text("\n".join(str(i % 3) for i in range(count)))
    answers = ["2,125", "18", "7", "3", "5", "6", "1", "2", "1000", "18", "6", "40"]
    mgsm = [f"Problema {i}: ¿cuántos huevos quedan?\t{answer}" for i, answer in enumerate(answers)]
    (directory / tasks.MGSM_FILE).write_text("\n".join(mgsm) + "\n", encoding="utf-8")
    articles = []
    for a in range(3):
        qas = [
            {
                "id": f"q{a}{q}",
                "question": f"¿Pregunta {a}.{q}?",
                "answers": [{"text": f"Respuesta {a}{q}", "answer_start": 0}],
            }
            for q in range(2)
        ]
        articles.append({"title": f"Artículo {a}", "paragraphs": [{"context": f"\ufeffContexto {a}.", "qas": qas}]})
    (directory / tasks.XQUAD_FILE).write_text(json.dumps({"data": articles, "version": "1.1"}), encoding="utf-8")
    sentences = ["# newdoc", "# text = La niña canta.", "1\tLa", "", "# text = Él come pan.", "1\tÉl", ""]
    (directory / suite.UD_FILE).write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return str(directory)


@pytest.fixture
def data_dir(tmp_path):
    return write_eval_data(tmp_path / "es_eval")


def shortest_choice(requests):
    """A fake model that always prefers the shortest continuation."""
    return [-float(len(continuation)) for _, continuation in requests]


def test_accuracy_and_macro_f1_are_exact():
    choices = (" Negativo", " Neutro", " Positivo")  # the shortest, " Neutro", always wins
    items = [MultipleChoiceItem("Tuit: x\nSentimiento:", choices, label) for label in (0, 1, 2, 1)]
    result = multiple_choice.evaluate(items, shortest_choice)
    assert result["accuracy"] == 50.0 and result["chance"] == pytest.approx(100 / 3)
    # F1 per class: 0, 2*2/(4+2) = 2/3, 0 -> macro 2/9.
    assert result["macro_f1"] == pytest.approx(100 * 2 / 9)
    assert result["predicted"] == [0, 4, 0]


def test_xnli_scores_held_out_pairs_with_spanish_prompts(data_dir):
    seen = []

    def oracle(requests):
        """Knows the gold label of every scored pair (premise i has label i % 3)."""
        seen.extend(requests)
        scores = []
        for context, continuation in requests:
            index = int(context.split("Premisa ")[-1].split()[0])
            scores.append(0.0 if continuation.startswith(f" {tasks.XNLI_ANSWERS[index % 3]},") else -1.0)
        return scores

    settings = suite.Settings(data_dir=data_dir, max_examples=-1, num_shots=3)
    result = suite.run_task("xnli", settings, oracle, generate=None)
    assert set(result) == {"zero_shot", "3_shot"}
    assert result["zero_shot"]["accuracy"] == result["3_shot"]["accuracy"] == 100.0
    assert result["3_shot"]["examples"] == XNLI_ROWS - tasks.XNLI_SHOT_POOL
    queried = {int(context.split("Premisa ")[-1].split()[0]) for context, _ in seen}
    assert queried == set(range(tasks.XNLI_SHOT_POOL, XNLI_ROWS))  # the shot pool is never scored
    context, continuation = seen[-1]
    assert context.endswith(f"Premisa {XNLI_ROWS - 1} del texto, ¿verdad?")
    assert continuation in {f" {answer}, Hipótesis {XNLI_ROWS - 1}." for answer in tasks.XNLI_ANSWERS}
    # Three shots show every label once, solved.
    assert all(f"¿verdad? {answer}, Hipótesis" in context for answer in tasks.XNLI_ANSWERS)


def test_sentiment_takes_shots_from_train_and_scores_test(data_dir):
    settings = suite.Settings(data_dir=data_dir, max_examples=-1, num_shots=2)
    prompts = []

    def record(requests):
        prompts.extend(context for context, _ in requests)
        return shortest_choice(requests)

    result = suite.run_task("sentiment", settings, record, generate=None)
    assert result["2_shot"]["accuracy"] == 25.0  # labels 0 1 2 0, always Neutro
    assert all("Tuit: Tuit test" in prompt.splitlines()[-2] for prompt in prompts)
    assert all(prompt.startswith(tasks.SENTIMENT_INSTRUCTION) for prompt in prompts)
    # 4 test tweets x 3 choices, zero-shot and then with 2 train tweets in front.
    shots_per_prompt = [prompt.count("Tuit: Tuit train") for prompt in prompts]
    assert sorted(shots_per_prompt) == [0] * 12 + [2] * 12


def test_mgsm_exact_match_on_the_final_number(data_dir):
    completions = {8: " La respuesta es 1.000.", 9: " 18", 10: " unos 5", 11: ""}  # gold: 1000, 18, 6, 40

    def generate(prompts, max_new_tokens, stop_strings):
        assert max_new_tokens == 7 and stop_strings == ("\n",)
        return [completions[int(prompt.split("Problema ")[-1].split(":")[0])] for prompt in prompts]

    settings = suite.Settings(data_dir=data_dir, max_examples=-1, num_shots=2, max_new_tokens=7)
    result = suite.run_task("mgsm", settings, None, generate)
    assert (result["exact_match"], result["answered"], result["examples"]) == (50.0, 75.0, 4)
    assert result["samples"][0] == {
        "question": "Problema 8: ¿cuántos huevos quedan?",
        "completion": " La respuesta es 1.000.",
        "answer": 1000,
    }


def test_xquad_exact_match_f1_and_overlap_metrics(data_dir):
    completions = {
        "¿Pregunta 1.0?": " la respuesta 10.",
        "¿Pregunta 1.1?": " Respuesta",
        "¿Pregunta 2.0?": " otra cosa",
        "¿Pregunta 2.1?": " Respuesta 21",
    }

    def generate(prompts, max_new_tokens, stop_strings):
        assert all(prompt.endswith("\nRespuesta:") for prompt in prompts)
        assert all("Contexto 0." in prompt for prompt in prompts)  # the shot comes from the held-out article
        return [completions[prompt.splitlines()[-2][len("Pregunta: ") :]] for prompt in prompts]

    settings = suite.Settings(data_dir=data_dir, max_examples=-1, num_shots=1)
    result = suite.run_task("xquad", settings, None, generate)
    assert result["examples"] == 4 and result["exact_match"] == 50.0
    # F1: 1, 2/3 (one of two words), 0, 1.
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4)
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100 and 0 < result["rougeL"] < 100


def test_robustness_reports_the_drop_from_clean(data_dir):
    def accents_matter(requests):
        """Right on clean text (the oracle of the XNLI test), always "No" once accents are gone."""
        scores = []
        for context, continuation in requests:
            if "Hipótesis" not in continuation:
                scores.append(0.0 if continuation.startswith(" No,") else -1.0)
                continue
            index = int(context.split("Premisa ")[-1].split()[0])
            scores.append(0.0 if continuation.startswith(f" {tasks.XNLI_ANSWERS[index % 3]},") else -1.0)
        return scores

    settings = suite.Settings(data_dir=data_dir, max_examples=-1, num_shots=0)
    results, seconds = suite.run_tasks(["robustness"], settings, accents_matter, generate=None)
    assert set(results) == {"robustness"} and set(seconds) == {"xnli", "sentiment", "robustness"}
    xnli = results["robustness"]["xnli"]
    assert xnli["setting"] == "zero_shot" and xnli["clean"] == {"accuracy": 100.0}
    # The six scored pairs have labels 0 1 2 0 1 2: answering "No" gets the two contradictions.
    assert xnli["no_accents"] == {"accuracy": pytest.approx(100 / 3)}
    assert xnli["no_accents_drop"] == {"accuracy": pytest.approx(200 / 3)}
    assert set(results["robustness"]["sentiment"]["typos"]) == {"accuracy", "macro_f1"}


def test_subsets_and_shots_are_seeded_and_disjoint(data_dir):
    pool, scored = tasks.load_xnli(data_dir)
    assert tasks.subsample(scored, 3, seed=0) == tasks.subsample(scored, 3, seed=0)
    assert len(tasks.subsample(scored, 3, seed=0)) == 3 and tasks.subsample(scored, -1, 0) == scored
    shots = tasks.choose_shots(pool, 6, seed=0, label_of=lambda example: example.label)
    assert [shot.label for shot in shots] == [0, 1, 2, 0, 1, 2]
    assert not set(shots) & set(scored)
    with pytest.raises(ValueError, match="shot pool has only 30"):
        tasks.choose_shots(pool, 31, seed=0)


def test_readers_name_the_file_and_line_of_bad_input(data_dir, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("premise\thypothesis\tlabel\nuna\totra\t1\nuna\totra\tneutral\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:3: label 'neutral' is not one of 0..2"):
        tasks.read_xnli(str(bad))
    bad.write_text("¿Cuánto?\tmuchos\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:1: answer 'muchos' is not an integer"):
        tasks.read_mgsm(str(bad))
    assert tasks.read_mgsm(f"{data_dir}/{tasks.MGSM_FILE}")[0].answer == 2125
    assert tasks.load_xquad(data_dir)[0][0].context == "Contexto 0."  # byte-order mark dropped
    with pytest.raises(FileNotFoundError, match="pass --data_dir"):
        tasks.load_mgsm(str(tmp_path / "nowhere"))


def test_unknown_tasks_are_listed_with_the_allowed_ones():
    assert suite.parse_tasks("bpb, xnli,bpb") == ["bpb", "xnli"]
    with pytest.raises(ValueError, match="Unknown task.*'xnil'.*choose from bpb, xnli, sentiment"):
        suite.parse_tasks("bpb,xnil")


def test_generation_prompts_fit_the_context(trained_run):
    from llm.runs.loading import load_run

    run = load_run(trained_run)
    generate = generation_tasks.run_generator(run, batch_size=2)
    long_prompt = "Contexto: " + "la niña canta en el jardín " * 60 + "\nPregunta: ¿Quién canta?\nRespuesta:"
    completions = generate([long_prompt, "Pregunta: ¿Quién canta?\nRespuesta:", "Hola"], 8, ("\n",))
    assert len(completions) == 3 and all("\n" not in completion for completion in completions)
