"""Tokenizers: load a tokenizer directory, or train a byte-level BPE on the run's own text.

Small Chinese models trained from scratch (the minimind path) use a small byte-level BPE whose
vocabulary is learnt on their own corpus; the result is saved in HF format (tokenizer.json +
tokenizer_config.json with a ChatML chat template) so that the exported model directory loads with
AutoTokenizer like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML, the template of Qwen and most Chinese open models. The generation prompt opens an
# assistant turn; an assistant turn ends with <|im_end|>, which is also the EOS token.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or trained; the message names the path or setting."""


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """A fast HF tokenizer from a local directory, with a pad token set."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load a tokenizer from {path}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{path}: a fast (Rust) tokenizer is required for exact loss masks")
    return with_pad_token(tok)


def with_pad_token(tok):
    """The tokenizer with a pad token (eos, else unk) when it has none: every loader applies the same
    rule, so that prepare's command line and the trainer give the same tokenizer fingerprint."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


# CJK ideographs (basic block + extension A + compatibility) and 〇.
CJK_CHAR = "[\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, cjk_char_level: bool = False):
    """Train a byte-level BPE of `vocab_size` tokens on `texts`, save it to out_dir, return it.

    cjk_char_level: isolate every Chinese character before BPE, so merges stay inside one
    character (each becomes one token) and never span several; small models learn character-level
    mappings far faster than with arbitrary multi-character pieces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"tokenizer.vocab_size={vocab_size}: a byte-level BPE needs at least "
                             f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    # Digits one by one (as LLaMA and Qwen do): numbers then share token pieces, which is what lets
    # a small model learn arithmetic and number formats instead of memorising merged digit runs.
    pieces = [pre_tokenizers.Digits(individual_digits=True)]
    if cjk_char_level:
        pieces.append(pre_tokenizers.Split(Regex(CJK_CHAR), behavior="isolated"))
    pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def is_complete_tokenizer_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "tokenizer.json").is_file() and (p / "tokenizer_config.json").is_file()

