"""A tiny llama-architecture GGUF model with random weights, made on the fly for tests.

No package registry ships a GGUF model, and the tests may not download one, so they
write their own: about 650 KB, generated in well under a second, byte-for-byte the same
for the same arguments. It loads in llama.cpp (and Ollama) like a real model, has a
sentencepiece-style ("llama") tokenizer and a ChatML chat template, and answers with
random English words.

Its logits are shaped so tests can rely on how it stops: every special, byte and
word-fragment token is suppressed, so only whole words are sampled and generation ends
by `length`, unless `eos_boost` lifts the end-of-sequence token above the words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

# Common English words, all distinct; each becomes one token.
_WORD_TEXT: Final = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who"
)
WORDS: Final = tuple(_WORD_TEXT.split())

UNK_TOKEN: Final = "<unk>"
BOS_TOKEN: Final = "<s>"
# ChatML's end-of-turn marker doubles as EOS, as in Qwen-style models, so both llama.cpp
# and Ollama stop on it without extra stop strings.
EOS_TOKEN: Final = "<|im_end|>"
IM_START_TOKEN: Final = "<|im_start|>"

# ChatML; llama.cpp's jinja engine runs it and Ollama maps it to its own chatml template.
CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

N_EMBD: Final = 64
N_LAYER: Final = 2
N_HEAD: Final = 4
N_FF: Final = 128
CONTEXT_LENGTH: Final = 4096
RMS_EPS: Final = 1e-5
# Logit given to every token that is not a whole word while eos_boost is 0: far enough
# below the words (whose logits stay within a few units of 0) that none is ever sampled.
SUPPRESSED_LOGIT: Final = -30.0
# Spread of the random hidden dimensions and weights: small, so the bias channel (see
# write_tiny_gguf) dominates every RMSNorm.
WEIGHT_STD: Final = 0.02
# Standard deviation of the word tokens' logits: random, but not so flat or so peaked
# that sampling degenerates.
WORD_LOGIT_STD: Final = 1.0
SPM_SPACE: Final = "\u2581"


def _vocabulary() -> tuple[list[str], list[float], list[int], int]:
    """Tokens, scores, token types, and the index where whole-word tokens start.

    llama.cpp's SPM tokenizer only merges two adjacent pieces when their concatenation is
    itself a token, so each "▁word" needs every prefix ("▁w", "▁wo", ...) in the vocabulary
    to be reachable; the byte tokens make any other text tokenizable.
    """
    tokens = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    words = [SPM_SPACE + w for w in WORDS]
    word_set = set(words)
    fragments = sorted({w[:n] for w in words for n in range(1, len(w))} - word_set, key=lambda t: (len(t), t))
    tokens += fragments
    types += [gguf.TokenType.NORMAL] * len(fragments)
    first_word = len(tokens)
    tokens += words
    types += [gguf.TokenType.NORMAL] * len(words)

    # Longer pieces score higher, so merges build whole words before anything else.
    scores = [0.0] * first_word
    scores[260:first_word] = [float(len(t)) for t in fragments]
    scores += [float(len(t)) for t in words]
    return tokens, scores, [int(t) for t in types], first_word


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> npt.NDArray[np.float32]:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _reads_residual(rng: np.random.Generator, n_out: int) -> npt.NDArray[np.float32]:
    weight = _normal(rng, (n_out, N_EMBD), WEIGHT_STD)
    weight[:, 0] = 0.0
    return weight


def _writes_residual(rng: np.random.Generator, n_in: int) -> npt.NDArray[np.float32]:
    weight = _normal(rng, (N_EMBD, n_in), WEIGHT_STD)
    weight[0] = 0.0
    return weight


def write_tiny_gguf(path: Path, *, seed: int = 0, eos_boost: float = 0.0) -> Path:
    """Write the tiny model to `path` and return `path`.

    seed: picks the random weights; the file depends only on the arguments.
    eos_boost: 0 suppresses EOS like every non-word token, so replies always end by
        length. A positive value becomes the EOS logit, next to word logits spread
        around 0 with a standard deviation of about 1. With llama.cpp's default
        sampling, 2 ends four replies in five within 16 tokens, 3 ends most within a
        few, and 5 or more ends nearly every reply at its first token.
    """
    rng = np.random.default_rng(seed)
    tokens, scores, token_types, first_word = _vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    # Hidden dimension 0 is a constant "bias" channel: every embedding holds 1.0 there and
    # no layer writes to it, so after the final RMSNorm it is about sqrt(N_EMBD) while the
    # small random dimensions stay near 0. Output weights on that channel set each
    # token's logit almost exactly, independent of the random rest.
    bias_channel = float(np.sqrt(N_EMBD))
    embeddings = _normal(rng, (n_vocab, N_EMBD), WEIGHT_STD)
    embeddings[:, 0] = 1.0

    output = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    normed_hidden_std = WEIGHT_STD * bias_channel
    word_weight_std = WORD_LOGIT_STD / (normed_hidden_std * np.sqrt(N_EMBD - 1))
    output[first_word:, 1:] = _normal(rng, (n_vocab - first_word, N_EMBD - 1), word_weight_std)
    output[:first_word, 0] = SUPPRESSED_LOGIT / bias_channel
    eos = tokens.index(EOS_TOKEN)
    if eos_boost > 0:
        output[eos, 0] = eos_boost / bias_channel

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("llmrelay-tiny")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(tokens.index(UNK_TOKEN))
    writer.add_bos_token_id(tokens.index(BOS_TOKEN))
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", embeddings)
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        # Column 0 of each projection reading the residual stream and row 0 of each one
        # writing it stay zero: the layers neither see the bias channel (it would add the
        # same vector at every position, favouring a few words everywhere) nor change it.
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(f"{prefix}.{name}.weight", _reads_residual(rng, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_output.weight", _writes_residual(rng, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", _reads_residual(rng, N_FF))
        writer.add_tensor(f"{prefix}.ffn_up.weight", _reads_residual(rng, N_FF))
        writer.add_tensor(f"{prefix}.ffn_down.weight", _writes_residual(rng, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
