"""Model folders in a real model's shape with no weights, for GPU benchmarks on hosts with no model hub.

`build_dummy_model(path, "llama-3.1-8b")` writes `config.json` with that model's dimensions (bf16), the
tiny models' local BPE tokenizer (`tiny_models`) and a generation config. vLLM loads the folder with
`engine_kwargs: {load_format: dummy}`: random weights of the right size, so memory traffic, KV cache
and step times are those of the real model; the text it writes is noise.

Example:
    >>> folder = build_dummy_model("/tmp/llama-8b-shaped", "llama-3.1-8b")
    >>> # vLLMEngineProcessorConfig(model_source=str(folder), engine_kwargs={"load_format": "dummy"})
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Dimensions as published in each model's config.json (the vocabulary comes from our tokenizer).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}


def build_dummy_model(path: str | Path, shape: str = "llama-3.1-8b", *, max_position_embeddings: int = 8192) -> Path:
    """Write a weightless Llama folder of the named shape (see `SHAPES`); load it with `load_format: dummy`.

    Args:
        path: Folder to write (created; files in it are overwritten).
        shape: A key of `SHAPES`.
        max_position_embeddings: The longest context the config allows.

    Returns:
        The folder, as a `Path`.
    """
    from prefect_rayllm.rayllm_stages.testing.tiny_models import _build_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(out)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPES[shape],
        "head_dim": SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"],
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "rayllm_dummy_model.json").write_text(json.dumps({"shape": shape, "load_format": "dummy"}))
    return out
