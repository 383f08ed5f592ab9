"""The vocabulary of a GGUF file: the benchmark model's 256 bytes, or a Hugging Face byte-level BPE tokenizer as
llama.cpp's ``convert_hf_to_gguf.py`` writes one; both as llama.cpp's ``gpt2`` tokenizer model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf

from .plan import fail

#: BPE merges llama.cpp requires with a gpt2 vocabulary; gguf-py cannot write an empty array, so the byte
#: vocabulary gets one merge that can never apply (its parts are multi-byte strings, which only merges form).
_NO_MERGES = ["<none> <none>"]


def _byte_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte (what llama.cpp's gpt2 vocabularies spell bytes with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_byte_vocab(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """The benchmark model's vocabulary (token ``b`` is byte ``b``) as a gpt2 BPE vocabulary without merges:
    llama.cpp tokenizes text into its bytes and prints every token as its byte."""
    if vocab_size != 256:
        raise fail(f"without a tokenizer the vocabulary is the 256 bytes, but the model has {vocab_size} tokens")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(_byte_to_unicode())
    writer.add_token_types([gguf.TokenType.NORMAL] * 256)
    writer.add_token_merges(_NO_MERGES)
    # No special tokens: nothing is prepended, and the end of text is byte 0, which text does not contain.
    writer.add_add_bos_token(False)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)


def write_hf_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: str) -> None:
    """A Hugging Face byte-level BPE tokenizer, as ``convert_hf_to_gguf.py`` writes one (``_set_vocab_gpt2``):
    its tokens padded to the model's vocabulary, added tokens as CONTROL (special) or USER_DEFINED, merges and
    special token ids by gguf-py's ``SpecialVocab``."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        spec_file = Path(folder) / "tokenizer.json"
        spec = json.loads(spec_file.read_text()) if spec_file.exists() else {}
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise fail(
                f"tokenizer {type(tokenizer).__name__} is not a byte-level BPE fast tokenizer (tokenizer.json "
                f"model {model.get('type')!r}, byte_fallback {model.get('byte_fallback')}); convert it with "
                "llama.cpp's convert_hf_to_gguf.py"
            )
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise fail(f"the tokenizer has token ids up to {max(by_id)}, the model's vocabulary {vocab_size}")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)


__all__ = ["write_byte_vocab", "write_hf_vocab"]
