"""Training tokenizers on a corpus: byte-level BPE (GPT-2's scheme) and a character-level vocabulary.

Both return an lmforge ``Tokenizer`` whose ``save(dir)`` writes a ``tokenizer.json`` +
``tokenizer_config.json`` that lmforge and ``transformers`` load.
"""

from __future__ import annotations

from collections.abc import Iterable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

CHAR_UNK = "<unk>"


def char_tokenizer(text: str) -> Tokenizer:
    """One token per distinct character of ``text`` (sorted, as nanoGPT's shakespeare_char), plus
    ``<unk>`` for characters not seen. Encoding splits into single characters; decoding concatenates."""
    chars = sorted(set(text))
    if not chars:
        raise LmforgeError("cannot build a character vocabulary from empty text")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab[CHAR_UNK] = len(vocab)
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=CHAR_UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, unk_token=CHAR_UNK, name="char")


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (Radford et al. 2019; Sennrich et al. 2016) trained on ``texts``: the 256 byte
    symbols, then merges up to ``vocab_size`` (special tokens included, first in the vocabulary).
    The first special token, if any, becomes EOS (and PAD)."""
    specials = list(dict.fromkeys(special_tokens if special_tokens is not None else ["<|endoftext|>"]))
    if vocab_size < 256 + len(specials):
        raise LmforgeError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 256 byte "
                           f"tokens plus {len(specials)} special token(s) = {256 + len(specials)}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    eos = specials[0] if specials else None
    return Tokenizer(backend, eos_token=eos, pad_token=eos, name="bpe")
