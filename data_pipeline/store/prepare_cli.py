"""The prepare command line: its options (every one documented in --help, with its choices and
default) and their checks, so that bad input is a one-line message (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_pipeline.spec import (FORMATS, ON_ERROR, REASONING_TURNS, TRAIN_ON, TRUNCATION, DataConfig, DataConfigError,
                                SourceSpec, check_source_name)
from data_pipeline.render.tokenizer import with_pad_token

DESCRIPTION = "raw sources -> per-source tokenized shards + manifest, on all cores"


def parse_source_arg(text: str) -> SourceSpec:
    """NAME=PATH[:FORMAT]; the format suffix is recognised only if it names a format, so URLs
    such as file:///x or memory://x keep their colons."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise DataConfigError(f"--source {text!r}: expected NAME=PATH[:FORMAT]")
    check_source_name(name, f"--source {text!r}")
    path, _, fmt = rest.rpartition(":")
    if path and fmt in FORMATS:
        return SourceSpec(name=name, path=path, format=fmt)
    return SourceSpec(name=name, path=rest)


def _count(text: str) -> int:
    """argparse type of --num-proc: 0 (all cores) or a positive count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = all cores), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _mapping(text: str) -> dict:
    """argparse type of --template-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _seq_len(text: str) -> int:
    value = _count(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be >= 8, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument error is one line naming the option (argparse would print the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"prepare: error: {message} (see --help)\n")


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = DataConfig()
    p = _Parser(prog="python -m data_pipeline.prepare", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH[:FORMAT]",
                   help="a source, repeatable. NAME: letters, digits, _ . - (it names the source's folder under "
                        "--out). PATH: file, folder, glob or fsspec URL of .json/.jsonl/.parquet/.txt files "
                        f"(optionally .gz/.zst). FORMAT: one of {', '.join(FORMATS)} (default auto)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (AutoTokenizer.from_pretrained)")
    p.add_argument("--out", required=True, help="output folder (or fsspec URL) for the prepared sources")
    p.add_argument("--cache-dir", default="", help="local staging/cache folder when --out is a URL "
                                                   "(default: $XDG_CACHE_HOME/zhiling/shards)")
    p.add_argument("--template", default=defaults.template,
                   help="chat template: auto (the tokenizer's own, else chatml), chatml, qwen, qwen3, deepseek-r1, "
                        "llama3, chatglm, zh_plain, or a path to a Jinja file")
    p.add_argument("--template-kwargs", type=_mapping, default={}, metavar="JSON",
                   help="template arguments as a JSON object, e.g. '{\"enable_thinking\": true}': passed to every "
                        "render and to each turn's generation prompt")
    p.add_argument("--reasoning-turns", default=defaults.reasoning_turns, choices=REASONING_TURNS,
                   help="reasoning of earlier turns that the template drops: template = train it only where the "
                        "template keeps it (counted); every_turn = one sample per assistant turn")
    p.add_argument("--seq-len", type=_seq_len, default=defaults.seq_len,
                   help="tokens per training sequence: the truncation limit (>= 8)")
    p.add_argument("--train-on", default=defaults.train_on, choices=TRAIN_ON,
                   help="which tokens of conversations train")
    p.add_argument("--truncation", default=defaults.truncation, choices=TRUNCATION,
                   help="over-long conversations lose whole exchanges, oldest first (the system prompt stays); "
                        "when the last exchange alone does not fit: truncate_prompt cuts the start of its user "
                        "message, whole_turns drops the sample; drop drops every over-long sample")
    p.add_argument("--on-error", default=defaults.on_error, choices=ON_ERROR,
                   help="bad records: strict stops at the first (naming file, line, field); skip counts and "
                        "reports them")
    p.add_argument("--max-skip-fraction", type=_fraction, default=defaults.max_skip_fraction,
                   help="with --on-error skip: fail when a source skips more than this fraction of its records")
    p.add_argument("--num-proc", type=_count, default=defaults.num_proc, help="worker processes; 0 = all cores")
    p.add_argument("--text-field", default="text", help="for format text with JSON records: the document field")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_tokenizer(path: str):
    """AutoTokenizer.from_pretrained, with a one-line error naming --tokenizer when it cannot load."""
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):  # not a hub id either
        raise DataConfigError(f"--tokenizer {path}: no such folder")
    try:
        return with_pad_token(AutoTokenizer.from_pretrained(str(local) if local.exists() else path))
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataConfigError(f"--tokenizer {path}: cannot load a tokenizer: {first_line}") from None
