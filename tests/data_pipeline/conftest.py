"""Shared fixtures: a tiny byte-level BPE tokenizer trained in memory (no files needed) and the
project's real data from <repo>/../shared/data when it is present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
MARKERS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
           "<|observation|>"]
CORPUS = ["你好，世界！今天天气很好。", "The quick brown fox jumps over the lazy dog.", "指令 回答 工具 结果",
          "机器学习是人工智能的一个分支。", "😀 emoji 🚀 test", "{\"name\": \"f\", \"arguments\": {\"x\": 1}}",
          "  indented\n\tline\n\nnext  ", "数字 12345 和 English words mixed 在一起。"]


def make_tiny_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=MARKERS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """The tiny tokenizer saved as a folder, for the command lines and worker processes."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tokenizer-zh-6400" / "tokenizer.json").is_file():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (expected <repo>/../shared/data)")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def shared_tokenizer(shared_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_data / "tokenizer-zh-6400"))
