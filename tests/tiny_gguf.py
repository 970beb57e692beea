"""A tiny random-weights Llama model in one GGUF file, written offline, that llama.cpp's server loads: the
llama.cpp counterpart of sluice/tinymodel.py (test-only: it needs the `gguf` package, which brings numpy).

Its answers are gibberish; its serving path (byte-level BPE tokenizer, ChatML template, generation, streaming,
usage counts) is llama.cpp's own. The same seed gives the same bytes on every build, and a rebuild into a
directory that already holds them writes nothing (a server may be reading the file meanwhile).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from sluice.tinymodel import CHAT_TEMPLATE, CORPUS

FILE = "tiny-llama.gguf"
VOCAB_SIZE = 512
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]      # ids 0, 1, 2
EOS_ID = 2
HIDDEN, FFN, LAYERS, HEADS, HEAD_DIM, CTX = 128, 256, 2, 2, 64, 2048

# GPT-2's split of text into words before BPE (llama.cpp applies its own "gpt-2" pre-tokenizer at run time;
# this one only decides which merges the trainer learns).
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (what llama.cpp's byte-level BPE decodes back)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges): the specials, the 256 byte symbols, then merges learned greedily on the corpus
    until VOCAB_SIZE; ties go to the smallest pair, so the result is the same everywhere."""
    sym = _byte_symbols()
    words = Counter(tuple(sym[b] for b in w.encode()) for w in _WORDS.findall(CORPUS))
    tokens, merges = [*SPECIAL, *sym], []
    while len(tokens) < VOCAB_SIZE:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        tokens.append(merged)
        merges.append(f"{best[0]} {best[1]}")
        new: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return tokens, merges


def _tensors(seed: int, n_vocab: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.02):                        # (out, in), as Hugging Face stores them; GGUF flips it
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # Wide, untied embedding and output (std 0.5), as in sluice/tinymodel.py: the next token is a seeded,
    # meaningless function of the context instead of one token repeated.
    t = {"token_embd.weight": w(n_vocab, HIDDEN, std=0.5), "output_norm.weight": np.ones(HIDDEN, np.float32),
         "output.weight": w(n_vocab, HIDDEN, std=0.5)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        qkv = HEADS * HEAD_DIM
        t.update({p + "attn_norm.weight": np.ones(HIDDEN, np.float32),
                  p + "attn_q.weight": w(qkv, HIDDEN), p + "attn_k.weight": w(qkv, HIDDEN),
                  p + "attn_v.weight": w(qkv, HIDDEN), p + "attn_output.weight": w(HIDDEN, qkv),
                  p + "ffn_norm.weight": np.ones(HIDDEN, np.float32),
                  p + "ffn_gate.weight": w(FFN, HIDDEN), p + "ffn_up.weight": w(FFN, HIDDEN),
                  p + "ffn_down.weight": w(HIDDEN, FFN)})
    return t


def write(target: Path, seed: int = 0) -> None:
    import gguf
    tokens, merges = vocab()
    wr = gguf.GGUFWriter(str(target), "llama")
    wr.add_name("sluice-tiny-llama")
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_context_length(CTX)
    wr.add_embedding_length(HIDDEN)
    wr.add_block_count(LAYERS)
    wr.add_feed_forward_length(FFN)
    wr.add_head_count(HEADS)
    wr.add_head_count_kv(HEADS)
    wr.add_key_length(HEAD_DIM)
    wr.add_value_length(HEAD_DIM)
    wr.add_rope_dimension_count(HEAD_DIM)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_vocab_size(len(tokens))
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("gpt-2")
    wr.add_token_list(tokens)
    wr.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL)))
    wr.add_token_merges(merges)
    wr.add_bos_token_id(0)
    wr.add_eos_token_id(EOS_ID)
    wr.add_pad_token_id(0)
    wr.add_add_bos_token(False)
    wr.add_chat_template(CHAT_TEMPLATE)
    for name, data in _tensors(seed, len(tokens)).items():
        wr.add_tensor(name, data)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def build(path, seed: int = 0) -> Path:
    """Write the model into directory `path` (created if needed); return the .gguf file's absolute path."""
    out = Path(path).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    target = out / FILE
    tmp = out / f".{FILE}.{os.getpid()}.tmp"
    write(tmp, seed)
    if target.is_file() and target.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, target)      # atomic: a concurrent reader sees the old file or the new, never half
    return target
