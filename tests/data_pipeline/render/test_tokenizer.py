"""Training a byte-level BPE on the run's text: lossless, HF-loadable, ChatML template, digits split."""

import pytest

from data_pipeline.ingest.demo_data import generate
from data_pipeline.render.tokenizer import TokenizerError, load_tokenizer, train_bpe_tokenizer

TEXTS = [r["instruction"] + r["output"] for r in generate(600)]


@pytest.mark.parametrize("cjk_char_level", [False, True])
def test_round_trip_and_chat_template(tmp_path, cjk_char_level):
    tok = train_bpe_tokenizer(TEXTS, 400, tmp_path, cjk_char_level=cjk_char_level)
    assert len(tok) <= 400  # character-level saturates below the target on a small corpus
    for text in ("把数字 6971 写成中文。", "emoji 🙂 and tabs\t", "二〇二四年三月十五日"):
        assert tok.decode(tok(text)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}],
                                       tokenize=False)
    assert rendered == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n好<|im_end|>\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    pieces = [tok.decode([i]) for i in tok("6971")["input_ids"]]
    assert pieces == ["6", "9", "7", "1"]  # digits never merge
    reloaded = load_tokenizer(tmp_path)
    assert reloaded("六千九百")["input_ids"] == tok("六千九百")["input_ids"]


def test_cjk_char_level_gives_one_token_per_character(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, 400, tmp_path, cjk_char_level=True)
    assert [tok.decode([i]) for i in tok("六千九百七十一")["input_ids"]] == list("六千九百七十一")


def test_too_small_vocab_and_missing_dir_are_clear(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_bpe_tokenizer(TEXTS, 100, tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
