"""The Hugging Face benchmarks measure what they claim: the synthetic checkpoint is a real Llama checkpoint, the
import's pages are handed back, and the figures are the ratios they are named after."""

import os

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config
from safetensors.numpy import save_file

from llm.hf import benchmark, importer, safetensors_files
from llm.infer import transformers_bench
from llm.runs import loading

TINY = dict(
    benchmark.LLAMA_1B,
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def synthetic_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("synthetic_llama"))
    benchmark.write_synthetic_llama(path, TINY)
    return path


def test_the_synthetic_checkpoint_loads_in_transformers_with_every_weight(synthetic_llama):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(synthetic_llama, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert model.num_parameters() == sum(int(np.prod(s)) for s in benchmark.llama_tensor_shapes(TINY).values())
    assert len(set(safetensors_files.weight_map(synthetic_llama).values())) == 2


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_released_tensor_pages_leave_the_process_and_the_values_stay(tmp_path):
    values = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)  # 64 MiB
    save_file({"w": values}, str(tmp_path / safetensors_files.SINGLE_FILE))
    tensor = safetensors_files.open_tensors(str(tmp_path), ["w"])["w"]
    before = _resident_bytes()
    assert float(tensor.sum(dtype=np.float64)) == pytest.approx(float(values.sum(dtype=np.float64)))
    touched = _resident_bytes()
    safetensors_files.release(tensor)
    released = _resident_bytes()
    assert touched - before > 48 << 20 and touched - released > 48 << 20
    np.testing.assert_array_equal(tensor[100:200], values[100:200])  # Read back from the page cache.


def test_import_benchmark_reports_peak_memory_against_the_checkpoint_size(synthetic_llama):
    result = benchmark.benchmark_import(synthetic_llama, "float32")
    size = benchmark.checkpoint_bytes(synthetic_llama)
    assert result["checkpoint_gib"] * 2**30 == size
    assert result["peak_rss_over_checkpoint"] == pytest.approx(result["peak_rss_gib"] * 2**30 / size)
    assert result["import_over_read"] == pytest.approx(result["import_s"] / result["read_files_s"])
    assert result["peak_rss_gib"] > 0.1  # A child that imports JAX: the parent's own RSS is not what is reported.


def test_decode_comparison_generates_transformers_tokens_and_reports_the_ratio(synthetic_llama, tmp_path):
    run_dir = importer.import_hf(synthetic_llama, str(tmp_path / "run"))
    torch.manual_seed(0)
    result = transformers_bench.benchmark_against_transformers(
        run_dir, synthetic_llama, batch_sizes=(1, 3), prompt_len=8, new_tokens=12
    )
    for batch in (1, 3):
        figures = result[f"batch_{batch}"]
        assert figures["rows_identical"] == 1.0  # Same weights, greedy: the same tokens.
        assert figures["speedup"] == pytest.approx(
            figures["ours_tokens_per_sec"] / figures["transformers_tokens_per_sec"]
        )
        # Decoding alone is a difference of two timings: None when a busy machine's noise exceeds it.
        ours, theirs = figures["ours_decode_tokens_per_sec"], figures["transformers_decode_tokens_per_sec"]
        assert all(rate is None or rate > 0 for rate in (ours, theirs))
        assert figures["decode_speedup"] == (pytest.approx(ours / theirs) if ours and theirs else None)


def test_the_comparisons_llama_has_the_shape_of_the_config(tmp_path):
    config = tiny_config()
    (tmp_path / "hf").mkdir()
    benchmark.write_synthetic_llama(str(tmp_path / "hf"), benchmark.llama_sizes(config), num_shards=1)
    imported = loading.load_model(importer.import_hf(str(tmp_path / "hf"), str(tmp_path / "run")))[1].model
    for key in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp_dim", "tie_embeddings"):
        assert imported[key] == config.model[key], key
    with pytest.raises(ValueError, match="Llama-shaped"):
        benchmark.llama_sizes(tiny_config(model__qkv_bias=True))  # A Qwen2.
