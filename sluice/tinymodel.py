"""A tiny random-weights Llama model, built offline, that mlx_lm.server (and anything reading Hugging Face
layouts) can load: for `sluice demo` and for the test suite. Its answers are gibberish; its serving path
(tokenizer, chat template, generation, streaming) is real.

numpy, safetensors and tokenizers come with mlx-lm, so they are imported inside `build()` only: the
sluice core stays standard-library only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Training text for the tokenizer: written for this file, so nothing is downloaded.
CORPUS = """\
sluice sits in front of local inference servers and lets through only as many requests as the GPU can take.
Every request enters a priority queue. Higher priority goes first, first in first out within a level, and a
request that has waited long enough moves up, so nothing starves. When a model must be swapped out, the
gate drains the requests in flight, puts the old model to sleep, wakes the new one, and carries on.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick
daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten. What is two plus two?
Two plus two is four. Hello! How are you today? I am fine, thank you. Please explain quicksort briefly.
Quicksort picks a pivot, splits the list into smaller and larger items, and sorts each part the same way.
A router, a queue, a gate, a model, a backend, a request, a response, a stream of tokens, a final answer.
"""

VOCAB_SIZE = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE, "bos_token_id": 0, "eos_token_id": 2, "torch_dtype": "float32",
}


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Canonical JSON, so the file is byte-identical on every build.
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, indent=1)


def _weights(seed: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    h, inter, layers = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"]
    heads, kv, hd = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"], CONFIG["head_dim"]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    # A separate, wide output layer: with tied embeddings each token would predict itself forever;
    # this way the next token is a (seeded, meaningless) function of the context: varied words.
    t = {"model.embed_tokens.weight": w(VOCAB_SIZE, h) * 25, "lm_head.weight": w(VOCAB_SIZE, h) * 25,
         "model.norm.weight": np.ones(h, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(heads * hd, h), p + "self_attn.k_proj.weight": w(kv * hd, h),
                  p + "self_attn.v_proj.weight": w(kv * hd, h), p + "self_attn.o_proj.weight": w(h, heads * hd),
                  p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                  p + "mlp.down_proj.weight": w(h, inter),
                  p + "input_layernorm.weight": np.ones(h, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(h, np.float32)})
    return t


def build(path, seed: int = 0) -> Path:
    """Write the model into `path` (created if needed); a no-op when an identical build is already there."""
    from safetensors.numpy import save
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": json.dumps(CONFIG, sort_keys=True, indent=1).encode(),
        "tokenizer.json": _tokenizer_json().encode(),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "unk_token": None, "model_max_length": 2048, "clean_up_tokenization_spaces": False,
        }, sort_keys=True, indent=1).encode(),
        "special_tokens_map.json": json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                                              sort_keys=True).encode(),
        "model.safetensors": save(_weights(seed), metadata={"format": "pt"}),
        "generation_config.json": json.dumps({"eos_token_id": 2}, sort_keys=True).encode(),
    }
    digest = hashlib.sha256(b"".join(hashlib.sha256(files[k]).digest() for k in sorted(files))).hexdigest()
    marker = out / ".sluice-tinymodel"
    if marker.exists() and marker.read_text() == digest:
        return out
    for name, data in files.items():
        (out / name).write_bytes(data)
    marker.write_text(digest)
    return out
