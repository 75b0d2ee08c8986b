"""A tiny vision-language model built locally, for tests and demos of image curation.

`build_tiny_vision_model(path)` writes an Idefics3 folder (BPE tokenizer, chat template, PIL image
processor, a 2-layer vision tower and a 2-layer Llama; about 3.4 MB, random weights) that the CPU
build of vLLM loads by path and Ray Data LLM's multimodal stage accepts. Its answers are gibberish,
but with structured outputs its replies are valid JSON, which is what the pipeline needs to prove.

Constraints measured on vLLM 0.29 + transformers 5.19 (see the reference notes):
- every Idefics3 marker (`<image>`, `<fake_token_around_image>`, `<global-img>`, `<row_i_col_j>`,
  `<end_of_utterance>`) must be a single-id special token;
- image splitting must stay on and every image is scaled to two tiles per edge: an image that fits
  one tile gives vLLM zero patches and kills the engine;
- the chat template must accept plain-string content (Ray's default) and OpenAI parts.
"""

from __future__ import annotations

from pathlib import Path

TILE = 64  # pixels per tile edge; the vision tower's image size
PATCH = 16
SCALE = 2  # pixel shuffle factor
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
CHAT_TEMPLATE = (
    "<s>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% elif p['type'] in ['image', 'image_url', 'image_pil'] %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "describe the image",
    "a photo of a cat on a red chair",
    "caption quality score sharp blurry bright dark",
    '{"caption": "a dog", "quality": 3}',
    "You are a helpful assistant.",
    "User: Assistant: System:",
] * 50


def build_tiny_vision_model(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Idefics3 model to `path` (deterministic for a seed); returns the folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<end_of_utterance>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": 2 * TILE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
        do_rescale=True,
        do_normalize=True,
        do_pad=True,
        do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(TILE // PATCH) ** 2 // SCALE**2,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)

    vision = Idefics3VisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=TILE, patch_size=PATCH
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=int(tokenizer.convert_tokens_to_ids("<image>")),  # type: ignore[arg-type]
        scale_factor=SCALE,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    return folder
