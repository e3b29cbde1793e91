"""A ``.gguf`` model.path: converted once into a plain model directory whose weights and
tokenizer are the ones the file holds. The file here is written in-process from a tiny llama
the way llama.cpp's converter writes one (q and k rows permuted for its rope layout)."""

import contextlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_tokenizer, tiny_llama
from transformers import AutoTokenizer

from preftune.model import load, packaged

LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def rope_rows_as_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores each head's q/k rows interleaved (pairs), not as two halves."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path: Path, model, tokenizer) -> Path:
    config = model.config
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(True)
    weights = model.state_dict()
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].numpy())
    for layer in range(config.num_hidden_layers):
        for ours, theirs in LAYER_NAMES.items():
            weight = weights[f"model.layers.{layer}.{ours}.weight"].numpy()
            if theirs in ("attn_q", "attn_k"):
                weight = rope_rows_as_llama_cpp(weight, config.num_attention_heads
                                                if theirs == "attn_q"
                                                else config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{theirs}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tokenizer)
    return path, model, tokenizer


def converted(gguf_path: Path, cache: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PREFTUNE_CACHE", str(cache))
    return Path(load.resolve_model_dir(str(gguf_path)))


def test_a_gguf_file_becomes_the_model_and_tokenizer_it_holds(gguf_file, tmp_path, monkeypatch):
    path, model, tokenizer = gguf_file
    directory = converted(path, tmp_path / "cache", monkeypatch)
    weights = load_file(directory / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding, stored once
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)
    text = "What is the capital of France? Paris."
    assert AutoTokenizer.from_pretrained(directory)(text).input_ids == tokenizer(text).input_ids
    # converted once: a second resolution finds the cached directory
    assert converted(path, tmp_path / "cache", monkeypatch) == directory


def test_reading_the_file_once_converts_byte_for_byte_like_reading_it_each_time(
        gguf_file, tmp_path, monkeypatch):
    """The conversion shares one gguf reader and one tensor-name table across transformers'
    three loads (tokenizer, config, weights) and preftune's read of the tokenizer's BOS/EOS
    flags; the files it writes equal those of a conversion that reads the file each time."""
    path = gguf_file[0]
    readers = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a: readers.append(a) or reader(*a))
    once = converted(path, tmp_path / "once", monkeypatch)
    assert len(readers) == 1
    monkeypatch.setattr(packaged, "gguf_read_once", contextlib.nullcontext)
    each_time = converted(path, tmp_path / "each", monkeypatch)
    assert len(readers) == 1 + 4
    names = sorted(p.name for p in once.iterdir())
    assert names == sorted(p.name for p in each_time.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (once / name).read_bytes() == (each_time / name).read_bytes(), name


def test_a_conversion_that_another_process_finished_first_is_taken_as_it_is(
        gguf_file, tmp_path, monkeypatch):
    """Two runs started together both convert the file; the one that finishes second finds the
    cached directory in place of its own (os.replace: 'Directory not empty'), keeps that one,
    and leaves no staging directory behind."""
    replace = packaged.os.replace
    other = {}

    def other_process_first(staging, target):
        other["files"] = sorted(p.name for p in Path(staging).iterdir())
        shutil.copytree(staging, target)
        (Path(target) / "written-by").write_text("the other process")
        replace(staging, target)

    monkeypatch.setattr(packaged.os, "replace", other_process_first)
    directory = converted(gguf_file[0], tmp_path / "cache", monkeypatch)
    assert (directory / "written-by").read_text() == "the other process"
    assert "model.safetensors" in other["files"]
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]
    umask = os.umask(0)
    os.umask(umask)
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir makes it
