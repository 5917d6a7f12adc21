"""HF safetensors directories (Llama with llama3 RoPE scaling, Qwen2 with QKV bias) and GGUF
files written from them, against HF transformers' logits on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxLLMError
from jaxllm.checkpoints.gguf_loader import load_gguf, permute_rotary
from jaxllm.checkpoints.safetensors_loader import load_hf_dir
from jaxllm.model import Transformer
from tests.golden.cases import TINY_INPUT_IDS

GOLDEN = Path(__file__).resolve().parent / "golden"


def full_logits(cfg, params, rope_factors=None, dtype=jnp.float32):
    model = Transformer(cfg, params, dtype=dtype, rope_factors=rope_factors)
    t = len(TINY_INPUT_IDS)
    tokens = jnp.asarray([TINY_INPUT_IDS])
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    logits, _ = model(tokens, jnp.arange(t)[None], mask)
    return np.asarray(logits[0])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_safetensors_logits_match_hf(name):
    cfg, params = load_hf_dir(GOLDEN / name)
    want = np.load(GOLDEN / name / "logits.npy")
    got = full_logits(cfg, params)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_configs_read_from_hf():
    llama, _ = load_hf_dir(GOLDEN / "tiny-llama")
    qwen, _ = load_hf_dir(GOLDEN / "tiny-qwen2")
    assert llama.rope_scaling is not None and llama.rope_scaling.factor == 8.0
    assert not llama.attention_bias and qwen.attention_bias
    assert (llama.num_heads, llama.num_kv_heads) == (4, 2)


def write_gguf(path: Path, name: str, qtype: gguf.GGMLQuantizationType) -> None:
    """Write an HF tiny model as llama.cpp's converter would (permuted Q/K rows)."""
    hf = json.loads((GOLDEN / name / "config.json").read_text())
    cfg, params = load_hf_dir(GOLDEN / name)
    arch = "llama" if hf["model_type"] == "llama" else "qwen2"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    def add(tname, x, quantize=True):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if quantize and x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            if qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(tname, x.astype(np.float16))
                return
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(tname, x)

    permute = arch == "llama"
    w.add_tensor("token_embd.weight", params["embed"])
    w.add_tensor("output_norm.weight", params["final_norm"])
    add("output.weight", params["lm_head"].T)
    for i, p in enumerate(params["layers"]):
        b = f"blk.{i}."
        q, k = p["wq"].T, p["wk"].T
        if permute:
            q, k = permute_rotary(q, cfg.num_heads), permute_rotary(k, cfg.num_kv_heads)
        add(b + "attn_q.weight", q)
        add(b + "attn_k.weight", k)
        add(b + "attn_v.weight", p["wv"].T)
        add(b + "attn_output.weight", p["wo"].T)
        add(b + "ffn_gate.weight", p["w_gate"].T)
        add(b + "ffn_up.weight", p["w_up"].T)
        add(b + "ffn_down.weight", p["w_down"].T)
        add(b + "attn_norm.weight", p["attn_norm"], quantize=False)
        add(b + "ffn_norm.weight", p["mlp_norm"], quantize=False)
        if "bq" in p:
            add(b + "attn_q.bias", p["bq"], quantize=False)
            add(b + "attn_k.bias", p["bk"], quantize=False)
            add(b + "attn_v.bias", p["bv"], quantize=False)
    if cfg.rope_scaling is not None:
        from jaxllm.model import rope_inv_freq

        plain = rope_inv_freq(cfg.replace(rope_scaling=None))
        w.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(cfg)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Tolerance relative to max |logit|, per storage type of the matrices.
GGUF_TYPES = {
    gguf.GGMLQuantizationType.F32: 1e-4,
    gguf.GGMLQuantizationType.F16: 2e-3,
    gguf.GGMLQuantizationType.Q8_0: 3e-2,
}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("qtype", list(GGUF_TYPES), ids=lambda q: q.name)
def test_gguf_logits_match_hf(tmp_path, name, qtype):
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, name, qtype)
    cfg, params, _, factors = load_gguf(path)
    want = np.load(GOLDEN / name / "logits.npy")
    got = full_logits(cfg, params, rope_factors=factors)
    assert np.abs(got - want).max() <= GGUF_TYPES[qtype] * np.abs(want).max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"])
def test_gguf_quantized_tensors_dequantize_exactly(tmp_path, qtype):
    """Loaded weights equal gguf's own dequantization of what was written (the Q/K
    permutation undone)."""
    qt = gguf.GGMLQuantizationType[qtype]
    path = tmp_path / "m.gguf"
    write_gguf(path, "tiny-llama", qt)
    cfg, params, _, _ = load_gguf(path)
    _, ref = load_hf_dir(GOLDEN / "tiny-llama")
    w = ref["layers"][1]["w_gate"].T
    expect = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).T
    np.testing.assert_array_equal(params["layers"][1]["w_gate"], expect)
    q = ref["layers"][0]["wq"].T
    q_rt = gguf.quants.dequantize(gguf.quants.quantize(permute_rotary(q, cfg.num_heads), qt), qt)
    from jaxllm.checkpoints.gguf_loader import unpermute_rotary

    np.testing.assert_array_equal(params["layers"][0]["wq"], unpermute_rotary(q_rt, 4).T)


def test_bad_files_raise_one_clear_error(tmp_path):
    with pytest.raises(JaxLLMError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(JaxLLMError, match="not a GGUF file"):
        load_gguf(junk)
    good = tmp_path / "good.gguf"
    write_gguf(good, "tiny-llama", gguf.GGMLQuantizationType.F32)
    cut = tmp_path / "cut.gguf"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(JaxLLMError, match="truncated|damaged"):
        load_gguf(cut)
    with pytest.raises(JaxLLMError, match="no config.json"):
        load_hf_dir(tmp_path)


def test_unsupported_architecture_is_rejected(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((GOLDEN / "tiny-llama" / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JaxLLMError, match="unsupported architecture 'gpt_neox'"):
        load_hf_dir(d)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_k_quant_tensors_load(tmp_path, qtype):
    """gguf-py cannot write K-quants, so the blocks are random bytes (every f16 field kept
    finite); the loaded matrix must equal gguf's own dequantization of those bytes."""
    from jaxllm.checkpoints.gguf_loader import dequantize_tensor, open_gguf

    qt = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    rows, cols = 8, 2 * block
    raw = np.random.default_rng(0).integers(0, 0x3B, (rows, cols // block * type_size))
    raw = raw.astype(np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("t.weight", raw, raw_shape=raw.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = open_gguf(tmp_path / "k.gguf").tensors
    got = dequantize_tensor(t)
    assert got.shape == (rows, cols) and np.isfinite(got).all()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qt))


def assert_same_as_gguf_reader(path):
    from jaxllm.checkpoints.gguf_file import GGUFFile

    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.data_offset, a.n_bytes) == (
            b.name,
            b.tensor_type,
            b.data_offset,
            b.n_bytes,
        )
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_fast_gguf_reader_matches_gguf_package(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    write_gguf(path, "tiny-qwen2", gguf.GGMLQuantizationType[qtype])
    assert_same_as_gguf_reader(path)


def test_fast_gguf_reader_matches_gguf_package_on_smollm2(smollm2):
    assert_same_as_gguf_reader(smollm2.source)
