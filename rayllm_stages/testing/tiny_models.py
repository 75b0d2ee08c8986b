"""Tiny chat models built locally, for tests, demos and benchmarks on machines with no model hub.

`build_tiny_chat_model(path)` writes a Hugging Face folder (BPE tokenizer with a chat template plus
a 2-layer Llama, about 2 MB) that vLLM loads by path. With `trained=True` the model is first fitted
for a few seconds to a toy task (`TOY_TASK`: "Is red warm or cool?" -> "warm"), so that greedy
decoding answers it exactly: a "good" model for evaluation and rollout tests, whose untrained twin
is the "bad" one.

Needs torch, transformers and tokenizers (the `cpu` or `gpu` extra).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOY_TASK: list[tuple[str, str]] = [
    ("Is red warm or cool?", "warm"),
    ("Is orange warm or cool?", "warm"),
    ("Is yellow warm or cool?", "warm"),
    ("Is crimson warm or cool?", "warm"),
    ("Is amber warm or cool?", "warm"),
    ("Is scarlet warm or cool?", "warm"),
    ("Is blue warm or cool?", "cool"),
    ("Is green warm or cool?", "cool"),
    ("Is teal warm or cool?", "cool"),
    ("Is violet warm or cool?", "cool"),
    ("Is navy warm or cool?", "cool"),
    ("Is cyan warm or cool?", "cool"),
]
"""The toy task a trained tiny model answers exactly: a question and its one-word answer."""

REWRITE_TASK: list[tuple[str, str]] = [(f"Rewrite as a question: {q.split()[1]}", q) for q, _ in TOY_TASK]
"""A second toy task, for chains: a colour name -> the `TOY_TASK` question about it."""

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Accepts string content and OpenAI list content (text parts are joined, other parts dropped).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarise the following text in one sentence.",
    "Answer the question with a single word.",
    "Ray Data streams rows through stages while the engine runs.",
    "Prefect schedules flows, retries tasks and keeps their state.",
    "Write a short poem about the sea, the sky and the mountains.",
    "What is the capital of France? Paris is the capital of France.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols , . ; : ! ? ' \" ( ) [ ] { } - + = / *",
    "Translate to French: good morning, good night, thank you, hello, yes, no.",
    "You are a helpful assistant. Reply briefly and clearly.",
]


def build_tiny_chat_model(
    path: str | Path,
    *,
    trained: bool = False,
    seed: int = 0,
    train_steps: int = 300,
    task: list[tuple[str, str]] | None = None,
) -> Path:
    """Write a tiny chat model folder that vLLM (CPU or GPU build) loads by path.

    Args:
        path: Folder to write; created if missing, files in it are overwritten.
        trained: Fit the model to `task` first (about 5 s on a laptop CPU).
        seed: Seed for weights and training order: the same seed gives the same model.
        train_steps: Optimiser steps when `trained` is set.
        task: (prompt, reply) pairs to fit; default `TOY_TASK` (`REWRITE_TASK` makes a reformatter).

    Returns:
        The folder, as a `Path`.

    Example:
        >>> folder = build_tiny_chat_model("/tmp/tiny-good", trained=True)
        >>> # vLLMEngineProcessorConfig(model_source=str(folder), ...)
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    task = task or TOY_TASK
    tokenizer = _build_tokenizer()
    config = LlamaConfig(  # type: ignore[call-arg]
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,  # head_dim 64: vLLM's CPU attention rejects 16
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    if trained:
        _fit(model, tokenizer, task, steps=train_steps, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "rayllm_tiny_model.json").write_text(
        json.dumps({"trained": trained, "seed": seed, "train_steps": train_steps if trained else 0})
    )
    return out


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS + [f"{q} {a}" for q, a in TOY_TASK + REWRITE_TASK]
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def _fit(model, tokenizer, task: list[tuple[str, str]], *, steps: int, seed: int) -> None:
    """Train on the answer tokens only, with the exact prompt string vLLM will see."""
    import torch

    examples = []
    for question, answer in task:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in examples)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in examples])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
    attention = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in examples])[:, None]).long()

    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(range(len(examples)), k=min(8, len(examples)))
        loss = model(input_ids=input_ids[batch], attention_mask=attention[batch], labels=labels[batch]).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
