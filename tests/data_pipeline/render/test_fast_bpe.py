"""The fast byte-level BPE encoder: the same ids and offsets as the HF tokenizer wherever it is
used (shared tokenizer, locally built ones, adversarial text, the real prepare on the shared demo
data), and a stated reason, with the HF path, wherever it is not eligible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.render import fast_bpe
from data_pipeline.render.fast_bpe import FastBPE, fast_bpe_plan

ADVERSARIAL = [
    "", " ", "  ", "\n", "\r\n", "\t", " \t \n\n  x", "a\r\nb\r\n\r\n  c", "line\n\n\n   \n\tend   ",
    "12345 67.89 ٣٤٥ ５６ 1e10", "emoji 😀🚀👨‍👩‍👧 🇨🇳 text", "混合 scripts: English, 中文, русский, العربية, हिन्दी, 日本語かな",
    "e\u0301 combining a\u0308\u0304 ǹ", "zero\u200bwidth\u200d joiner\ufeff bom", "\u00a0nbsp\u3000ideographic space",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n好<|im_end|>\n", "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start|", "<|im_end|>x<|im_end", "it's we'll they're I'M 'S", "   leading and trailing   ",
    "\U0001f600" * 7 + "末", "tabs\t\t\tand\u000b\u000cforms", "<|endoftext|><|endoftext|>abc<|im_start|>",
    "<|buffer1|><|buffer9|> x<|im_end|><|buffer9|", "<|object_ref_start|>ref<|box_end|>",  # non-special added
]


def hf_encode(backend, text: str, plain: bool):
    backend.encode_special_tokens = plain
    try:
        enc = backend.encode(text, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = False
    return enc.ids, enc.offsets


def assert_same(backend, texts, plain_too: bool = True) -> None:
    plan, why = fast_bpe_plan(backend.to_str())
    assert plan is not None, why
    fast = FastBPE(plan)
    for plain in (False, True) if plain_too else (False,):
        got = fast.encode_batch(texts, match_special=not plain)
        for text, (ids, offsets) in zip(texts, got):
            want_ids, want_offsets = hf_encode(backend, text, plain)
            assert ids.tolist() == want_ids, (text, plain)
            assert [tuple(o) for o in offsets.tolist()] == want_offsets, (text, plain)


def test_the_shared_tokenizer_is_eligible_and_exact_on_adversarial_text(shared_tokenizer):
    assert_same(shared_tokenizer.backend_tokenizer, ADVERSARIAL)


def test_the_tiny_tokenizer_is_exact_on_adversarial_text(tiny_tokenizer):
    assert_same(tiny_tokenizer.backend_tokenizer, ADVERSARIAL)


def test_exact_on_a_sweep_of_code_points(shared_tokenizer):
    """Letters, digits and whitespace of every script decide the pre-tokenizer's pieces; the two
    regex engines must agree on each code point (every 7th one here; all of them agree)."""
    cps = [c for c in range(0, 0x110000, 7) if not 0xD800 <= c < 0xE000]
    texts = ["".join(f"a{chr(c)}b {chr(c)}1 {chr(c)}{chr(c)}  {chr(c)}\n'{chr(c)}s" for c in cps[i:i + 64])
             for i in range(0, len(cps), 64)]
    assert_same(shared_tokenizer.backend_tokenizer, texts[::3], plain_too=False)


def _byte_level_bpe(vocab_extra: dict[str, int], merges: list[tuple[str, str]], **options):
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update({t: len(alphabet) + i for i, t in enumerate(vocab_extra)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, **options))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return backend


def test_a_vocabulary_with_an_alternative_decomposition_stays_exact():
    """"abc" is a token made as ab+c, but b+c merges first, so HF never reaches it: it is left out
    of tiktoken's ranks (else tiktoken would merge a+bc)."""
    backend = _byte_level_bpe({"bc": 0, "ab": 1, "abc": 2}, [("b", "c"), ("a", "b"), ("ab", "c")])
    plan, why = fast_bpe_plan(backend.to_str())
    assert plan is not None, why
    assert b"abc" not in plan.mergeable_ranks and b"ab" in plan.mergeable_ranks
    assert backend.encode("abc abcabc xabcx").tokens[:2] == ["a", "bc"]
    assert_same(backend, ["abc", "abc abcabc xabcx", "ab abab c", "bcab"])


def test_a_qwen_style_split_pre_tokenizer_is_exact():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([t for t in ADVERSARIAL if t] * 5, trainer)
    assert_same(backend, ADVERSARIAL + ["IT'S It'Ll 123456 abc\r\n\r\n  \n x"])


def _ineligible():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    normalized = _byte_level_bpe({"ab": 0}, [("a", "b")])
    normalized.normalizer = normalizers.NFKC()
    trimmed = _byte_level_bpe({"ab": 0}, [("a", "b")])
    trimmed.post_processor = processors.ByteLevel(trim_offsets=True)
    out_of_order = json.loads(_byte_level_bpe({"ab": 0, "bc": 1}, [("a", "b"), ("b", "c")]).to_str())
    out_of_order["model"]["merges"] = out_of_order["model"]["merges"][::-1]
    dropout = _byte_level_bpe({"ab": 0}, [("a", "b")], dropout=0.1)
    return {"wordpiece": (wordpiece.to_str(), "is not BPE"), "normalizer": (normalized.to_str(), "normalizer"),
            "trim_offsets": (trimmed.to_str(), "post-processor"),
            "merge_order": (json.dumps(out_of_order), "merge order is not id order"),
            "dropout": (dropout.to_str(), "dropout")}


@pytest.mark.parametrize("kind", ["wordpiece", "normalizer", "trim_offsets", "merge_order", "dropout"])
def test_ineligible_tokenizers_say_why(kind):
    tokenizer_json, reason = _ineligible()[kind]
    plan, why = fast_bpe_plan(tokenizer_json)
    assert plan is None and reason in why


def test_the_trim_offsets_post_processor_really_moves_offsets():
    """Why ByteLevel(trim_offsets=True) is refused: HF's offsets then leave out leading spaces."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_ineligible()["trim_offsets"][0])
    assert backend.encode("a  ab", add_special_tokens=False).offsets != [(0, 1), (1, 2), (2, 3), (3, 5)]


def test_prepare_falls_back_and_says_why(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.prepare import prepare_sources
    from data_pipeline.spec import DataConfig, SourceSpec

    backend = Tokenizer.from_str(_ineligible()["normalizer"][0])
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"instruction": "ab ab", "output": "ba ab"}) + "\n")
    cfg = DataConfig(sources=[SourceSpec(name="a", path=str(data))], template="chatml", num_proc=1)
    (source,) = prepare_sources(cfg, tokenizer, tmp_path / "out", show_progress=False)
    assert source.manifest["encoder"]["engine"] == fast_bpe.ENGINE_HF
    assert "normalizer" in source.manifest["encoder"]["why_not_fast"]


def _prepared(shared_data, shared_tokenizer, out, monkeypatch, fast: bool):
    from data_pipeline import prepare as prepare_module
    from data_pipeline.spec import DataConfig, SourceSpec

    forged = out.parent / "forged.jsonl"  # data spelling special tokens: the guarded, piecewise path
    forged.write_text("".join(json.dumps({"instruction": text, "output": text[::-1] + " 好 <|endoftext|>"}) + "\n"
                              for text in ADVERSARIAL if text.strip()), encoding="utf-8")

    if not fast:
        monkeypatch.setattr(prepare_module, "fast_bpe_plan", lambda _: (None, "disabled in this test"))
    cfg = DataConfig(sources=[SourceSpec(name="alpaca", path=str(shared_data / "alpaca_zh_demo.json")),
                              SourceSpec(name="glaive", path=str(shared_data / "glaive_toolcall_zh_demo.json")),
                              SourceSpec(name="forged", path=str(forged))],
                     template="chatml", seq_len=512, num_proc=1)
    sources = prepare_module.prepare_sources(cfg, shared_tokenizer, out, show_progress=False)
    monkeypatch.undo()
    return sources


def test_prepare_gives_the_same_samples_with_either_engine(shared_data, shared_tokenizer, tmp_path, monkeypatch):
    """All records of the shared demo files (alpaca; glaive tool calls, with truncation at 512) and
    records whose data spells special tokens."""
    fast = _prepared(shared_data, shared_tokenizer, tmp_path / "fast", monkeypatch, True)
    slow = _prepared(shared_data, shared_tokenizer, tmp_path / "hf", monkeypatch, False)
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert a.manifest["encoder"] == {"engine": fast_bpe.ENGINE_FAST}
        assert b.manifest["encoder"]["engine"] == fast_bpe.ENGINE_HF
        assert a.manifest["counts"] == b.manifest["counts"] and a.manifest["skips"] == b.manifest["skips"]
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            (ids_a, mask_a), (ids_b, mask_b) = a.get_tokens_and_mask(i), b.get_tokens_and_mask(i)
            assert np.array_equal(ids_a, ids_b) and np.array_equal(mask_a, mask_b), i
        assert np.array_equal(a.fingerprints, b.fingerprints)
