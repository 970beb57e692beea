"""A tiny random-weights Llama model, built offline, that mlx_lm.server (and anything reading Hugging Face
layouts) can load: for `sluice demo` and for the test suite. Its answers are gibberish; its serving path
(tokenizer, chat template, generation, streaming, usage counts) is real.

Every file is byte-identical on every build with the same seed, so tests can compare builds and a rebuild
into a directory that already holds this build writes nothing.

numpy, safetensors and tokenizers come with mlx-lm, so they are imported inside functions only: the sluice
core stays standard-library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Training text for the tokenizer, written for this file (nothing is downloaded). It is long and varied
# enough for the BPE trainer to fill the whole vocabulary, so the tokenizer and the embedding agree on it.
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

The river rose in the night. By morning the lower field was a lake, and the heron that lived by the mill
stood on the fence post as if it had always meant to be a sailor. The miller walked out in his boots,
looked at the water, looked at the sky, and went back inside to put the kettle on. There was nothing to
be done about a river; one could only wait for it to change its mind, as rivers always do.

In the workshop the clocks disagreed. The tall one by the door was ten minutes fast, the brass one on the
bench was slow, and the little cuckoo clock struck whenever it pleased. The clockmaker said that every clock
tells the truth about itself, which is more than can be said for most people, and went on filing a gear.

Write a function that returns the largest number in a list. If the list is empty, raise an error with a
helpful message. Then write a test for it: an empty list, a list of one number, negative numbers, and a
long list in random order. Good tests are small, fast, and able to fail; a test that cannot fail is a
comment that runs.

Recipe for bread: flour, water, salt and yeast. Mix, knead for ten minutes, let it rise for an hour, shape
the loaf, let it rise again, and bake in a hot oven until the crust is brown and the bottom sounds hollow
when you knock on it. Patience is the secret ingredient, and also the one most often left out.

Questions people ask a computer: What time is it in Tokyo? Summarize this article in three sentences.
Translate good morning into French. Why is the sky blue? Which is heavier, a kilogram of feathers or a
kilogram of iron? Write a haiku about autumn leaves. Give me a name for a small grey cat.
Answers a computer gives: It depends. Bonjour. Light scatters. They weigh the same. Smoke.

Weather report: cloudy in the morning with a chance of rain, clearing in the afternoon. Winds from the
west at twenty kilometres per hour. Temperatures between twelve and eighteen degrees. Tomorrow, sunshine
across the north, showers in the south, and fog along the coast until noon.

The library kept its oldest books in a cold room at the top of the stairs. Visitors had to wear gloves,
speak quietly, and write their names in a ledger that was itself older than most of the books. Nobody
remembered who had started the ledger, but everyone agreed it should never be allowed to end.
"""

VOCAB_SIZE = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]     # ids 0, 1, 2 (the trainer adds them first)
EOS_ID = 2
# ChatML, as Qwen and many others use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE, "eos_token_id": EOS_ID, "torch_dtype": "float32",
}
MARKER = ".sluice-tinymodel"                                    # sha256 over the files: which build this is


def _json(obj) -> bytes:
    # Sorted keys and fixed separators: the same object always gives the same bytes.
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def _tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # All 256 byte symbols up front, so any text (emoji, CJK) encodes without an unknown token.
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # The trainer breaks count ties by the pair itself, so its result does not depend on threads; the
    # re-dump makes the key order canonical too.
    return _json(json.loads(tok.to_str()))


def _weights(seed: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    h, inter, layers = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"]
    heads, kv, hd = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"], CONFIG["head_dim"]

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # Embedding and output layer are separate and wide (std 0.5): with tied or tiny ones every position
    # predicts about the same token; this way the next token is a seeded, meaningless function of the
    # context, and the output reads as varied words rather than one token repeated.
    t = {"model.embed_tokens.weight": w(VOCAB_SIZE, h, std=0.5), "lm_head.weight": w(VOCAB_SIZE, h, std=0.5),
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


def files(seed: int = 0) -> dict[str, bytes]:
    """The build, in memory: file name -> contents."""
    from safetensors.numpy import save
    return {
        "config.json": _json(CONFIG),
        "generation_config.json": _json({"eos_token_id": EOS_ID}),
        "model.safetensors": save(_weights(seed), metadata={"format": "pt"}),   # sorted tensors, no timestamp
        "special_tokens_map.json": _json({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
        "tokenizer.json": _tokenizer_json(),
        "tokenizer_config.json": _json({
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "model_max_length": CONFIG["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        }),
    }


def build(path, seed: int = 0) -> Path:
    """Write the model into `path` (created if needed) and return it. Files already holding the right bytes
    are left alone (a rebuild costs ~0.2 s and writes nothing), so a server may be reading them meanwhile."""
    out = Path(path).expanduser().resolve()         # absolute: mlx_lm.server's /v1/models id for it
    out.mkdir(parents=True, exist_ok=True)
    built = files(seed)
    for name, data in built.items():
        target = out / name
        if target.is_file() and target.read_bytes() == data:
            continue
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)          # atomic: a concurrent reader sees the old file or the new, never half
    digest = hashlib.sha256(b"".join(name.encode() + hashlib.sha256(built[name]).digest()
                                     for name in sorted(built))).hexdigest()
    if not (out / MARKER).is_file() or (out / MARKER).read_text() != digest + "\n":
        (out / MARKER).write_text(digest + "\n")
    return out
