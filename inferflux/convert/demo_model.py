"""A small random-weight Llama model with a real trained tokenizer, for trying InferFlux offline.

Newcomers need a model to try every command, and the machines this runs on
may have no network. This writes a Hugging Face folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with a Llama-3 style
chat template) using only runtime dependencies: numpy, safetensors and
tokenizers. The weights are noise, so the text it generates is gibberish; the
shapes, tokenizer and template are real, so every code path runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from inferflux.formats.model_config import ModelConfig
from inferflux.formats.weights import expected_shapes, iter_names

# Llama 3's pre-tokenizer split (what llama.cpp calls "llama-bpe").
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CORPUS = [
    "InferFlux serves language models over the OpenAI and Ollama APIs.",
    "The quick brown fox jumps over the lazy dog, 1234567890 times.",
    "Hello, world! How are you today? I'm fine, thanks; and you?",
    "def main():\n    print('hello')\n    return 0\n",
    "Bonjour le monde. ¿Qué tal? Grüße! 你好，世界。こんにちは。🙂🚀",
    "Requests are batched, pages are cached, and tokens are streamed back.",
]
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048)


def train_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """Byte-level BPE with Llama 3's split regex, special tokens appended, BOS added on encode."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return tokenizer


def make_demo_model(out_dir: Path, seed: int = 0, **shape: int) -> Path:
    """Write the demo model folder to `out_dir` and return it.

    `shape` overrides entries of SHAPE (e.g. a wider model for benchmarks).
    """
    shape = {**SHAPE, **shape}
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": shape["max_position_embeddings"],
    }, indent=2))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="float32",
                  bos_token_id=ids["<|begin_of_text|>"], eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
                  **shape)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_random_weights(config, np.random.default_rng(seed)), out_dir / "model.safetensors")
    return out_dir


def _random_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Noise of the right shapes under Hugging Face names; norms start at one."""
    model_config = ModelConfig.from_hf_config(config)
    shapes = expected_shapes(model_config)
    weights = {}
    for ours, hf_name, _ in iter_names(model_config.num_layers):
        if ours in shapes:
            shape = shapes[ours]
            weights[hf_name] = (np.ones(shape, np.float32) if len(shape) == 1
                                else rng.normal(0.0, 0.05, shape).astype(np.float32))
    return weights
