"""`inspect`: show what a prepared source trains on, before spending a long run on it.

    python -m data_pipeline.inspect FOLDER [--index 0] [--count 1] [--json] [--tokenizer DIR]

FOLDER is a prepared source folder (`<out>/<source name>/`, what prepare writes), or `<out>`
itself when it holds exactly one source. Samples are read back from the shards, so what is shown
is exactly what the trainer will see: the token ids decoded with the tokenizer that made them,
and the trained tokens (loss mask) marked.

A trained span is a maximal run of consecutive trained tokens; its text is the decode of exactly
those tokens (what the model learns to produce, end-of-turn token included), and the full text is
the decode of all tokens of the sample. Human output marks the spans in bold green when stdout is
a terminal (or --color always), else between [[TRAIN]] and [[/TRAIN]]. --json prints one object
per sample and nothing else on stdout: {"index": N, "text": "...", "trained": ["span text", ...]}.

The manifest records the tokenizer's fingerprint, not its folder. Without --tokenizer, the
tokenizer of a trainer run (`<run>/tokenizer` beside `<run>/data/<source>`) is used when its
fingerprint matches; otherwise --tokenizer is required. A tokenizer whose fingerprint differs
from the manifest's is refused (its ids may spell other text) unless --ignore-fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.store.shard_cache import is_url
from data_pipeline.store.shards import (FORMAT_VERSION, MANIFEST, ShardedSource, read_manifest, read_manifest_text,
                                  tokenizer_fingerprint)
from data_pipeline.render.tokenizer import is_complete_tokenizer_dir

TRAIN_OPEN, TRAIN_CLOSE = "[[TRAIN]]", "[[/TRAIN]]"
ANSI_TRAIN, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"
RUN_TOKENIZER = Path("..") / ".." / "tokenizer"
"""Where a trainer run keeps its tokenizer, relative to one of its prepared sources (<run>/data/<name>)."""


class InspectError(ValueError):
    """Input that cannot be inspected (folder, tokenizer, range); the message says what to do."""


@dataclass
class InspectedSample:
    """One sample decoded: the full text and its consecutive runs of tokens, trained or not."""

    index: int
    num_tokens: int
    text: str
    segments: list[tuple[str, bool]]
    """(decoded text, trained) of each maximal run of tokens with the same mask value, in order."""
    trained_tokens: int

    @property
    def trained(self) -> list[str]:
        return [text for text, trained in self.segments if trained]

    def to_json(self) -> dict:
        return {"index": self.index, "text": self.text, "trained": self.trained}


# ----------------------------------------------------------------------------- the folder

def _manifest_problem(folder: Path) -> Optional[str]:
    """Why `folder` is not a readable prepared source, or None when it is one."""
    text = read_manifest_text(folder)
    if text is None:
        return f"{folder}: no {MANIFEST}, so this is not a prepared source folder"
    if read_manifest(folder, text) is not None:
        return None
    try:
        manifest = json.loads(text)
    except ValueError as err:
        return f"{folder / MANIFEST}: not valid JSON ({err}); run prepare again"
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return f"{folder / MANIFEST}: incomplete (preparation missing or interrupted); run prepare again"
    return (f"{folder / MANIFEST}: field 'format_version' is {manifest.get('format_version')!r}, this version "
            f"reads {FORMAT_VERSION}; run prepare again")


def _child_sources(folder: Path) -> list[Path]:
    """Prepared sources directly inside `folder` (temp and hidden folders of prepare excluded)."""
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    except OSError:
        return []
    return [p for p in children if read_manifest(p) is not None]


def resolve_source_folder(path: str | Path) -> str | Path:
    """The prepared source folder that `path` names: itself, its manifest's folder, or its only source."""
    if is_url(path):
        return path  # a source folder at an fsspec URL: its manifest says whether it is one
    folder = Path(path)
    if folder.is_file() and folder.name == MANIFEST:
        folder = folder.parent
    if not folder.exists():
        raise InspectError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InspectError(f"{folder} is a file; pass a prepared source folder (<out>/<source name>)")
    problem = _manifest_problem(folder)
    if problem is None:
        return folder
    if not (folder / MANIFEST).exists():
        children = _child_sources(folder)
        if len(children) == 1:
            return children[0]
        if children:
            names = ", ".join(c.name for c in children)
            raise InspectError(f"{folder} holds {len(children)} prepared sources ({names}); pass one of them, "
                               f"e.g. {children[0]}")
        problem += " and holds no prepared source (prepare writes <out>/<source name>/manifest.json)"
    raise InspectError(problem)


def open_source(path: str | Path) -> ShardedSource:
    """The prepared source that `path` names, opened (InspectError for anything unreadable)."""
    folder = resolve_source_folder(path)
    try:
        return ShardedSource(folder)
    except DataError as err:
        raise InspectError(str(err)) from None
    except (KeyError, TypeError) as err:
        raise InspectError(f"{folder}/{MANIFEST}: missing or malformed field {err}; run prepare again") from None
    except (OSError, ValueError) as err:
        raise InspectError(f"{folder}: cannot read the index ({err}); run prepare again") from None


# ----------------------------------------------------------------------------- the tokenizer

def _fingerprints(tokenizer) -> list[str]:
    """The fingerprints this tokenizer may have been prepared under: as loaded, and with the pad
    token that load_tokenizer (the trainer's loader) sets when the folder defines none."""
    found = [tokenizer_fingerprint(tokenizer)]
    if tokenizer.pad_token is None and (tokenizer.eos_token or tokenizer.unk_token) is not None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        found.append(tokenizer_fingerprint(tokenizer))
    return found


def _load(path: Path):
    from transformers import AutoTokenizer  # heavy: imported only once a tokenizer is needed

    if not path.is_dir():
        raise InspectError(f"--tokenizer {path}: no such folder")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise InspectError(f"--tokenizer {path}: cannot load a tokenizer ({err})") from None


def load_matching_tokenizer(source: ShardedSource, tokenizer_dir: str | Path | None, *,
                            ignore_fingerprint: bool = False, warn=None):
    """The tokenizer to decode `source` with: `tokenizer_dir`, else the run's own tokenizer when its
    fingerprint matches. A mismatch is refused, or only warned about (via `warn`) if ignored."""
    expected = source.manifest.get("tokenizer_fingerprint")
    if tokenizer_dir is None:
        guess = None if is_url(source.folder) else Path(source.folder) / RUN_TOKENIZER
        if guess is not None and is_complete_tokenizer_dir(guess):
            try:
                tokenizer = _load(guess)
            except InspectError:
                tokenizer = None  # not loadable: the user names the tokenizer instead
            if tokenizer is not None and expected in _fingerprints(tokenizer):
                return tokenizer
        raise InspectError(f"{source.folder}/{MANIFEST} records the tokenizer's fingerprint ({expected}), not its "
                           "folder: pass --tokenizer DIR, the tokenizer this source was prepared with")
    tokenizer = _load(Path(tokenizer_dir))
    found = _fingerprints(tokenizer)
    if expected not in found:
        message = (f"--tokenizer {tokenizer_dir} has fingerprint {found[0]}, but {source.folder} was "
                   f"prepared with tokenizer {expected}")
        if not ignore_fingerprint:
            raise InspectError(message + "; pass the tokenizer it was prepared with (or --ignore-fingerprint to "
                                         "decode anyway, e.g. when only the chat template changed)")
        if warn is not None:
            warn(f"warning: {message}; decoding anyway")
    prepared_vocab = source.manifest.get("vocab_size")
    if isinstance(prepared_vocab, int) and len(tokenizer) < prepared_vocab:
        raise InspectError(f"--tokenizer {tokenizer_dir} has {len(tokenizer)} ids, but {source.folder} was prepared "
                           f"with a tokenizer of {prepared_vocab}: its ids cannot be decoded with this one")
    return tokenizer


# ----------------------------------------------------------------------------- decoding

def token_runs(trained: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal [start, end) runs of tokens with the same mask value, and that value."""
    if len(trained) == 0:
        return []
    edges = (np.flatnonzero(np.diff(trained.astype(np.int8))) + 1).tolist()
    starts, ends = [0] + edges, edges + [len(trained)]
    return [(s, e, bool(trained[s])) for s, e in zip(starts, ends)]


def decode(tokenizer, ids) -> str:
    """The exact text of `ids`: special tokens kept, no clean-up of spaces."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_range(source: ShardedSource, index: int, count: int) -> None:
    total = len(source)
    if count < 1:
        raise InspectError(f"--count {count}: must be at least 1")
    if not 0 <= index < total:
        raise InspectError(f"--index {index} is out of range: source {source.name!r} has {total} samples"
                           + (f" (0..{total - 1})" if total else ""))
    if index + count > total:
        raise InspectError(f"--index {index} --count {count} asks for samples {index}..{index + count - 1}, but "
                           f"source {source.name!r} has {total} samples (0..{total - 1})")


def iter_samples(source: ShardedSource, tokenizer, index: int, count: int) -> Iterator[InspectedSample]:
    """Samples index .. index+count-1 of `source` decoded one at a time (output starts at once)."""
    vocab = len(tokenizer)
    for i in range(index, index + count):
        try:
            ids, trained = source.get_tokens_and_mask(i)
        except (OSError, ValueError) as err:
            raise InspectError(f"{source.folder}: cannot read sample {i} ({err}); run prepare again") from None
        if ids.size and int(ids.max()) >= vocab:
            raise InspectError(f"sample {i} holds token id {int(ids.max())}, beyond the tokenizer's {vocab} ids: "
                               "this is not the tokenizer the source was prepared with")
        segments = [(decode(tokenizer, ids[s:e]), is_trained) for s, e, is_trained in token_runs(trained)]
        yield InspectedSample(i, int(ids.size), decode(tokenizer, ids), segments, int(trained.sum()))


def inspect_samples(source: ShardedSource, tokenizer, index: int = 0, count: int = 1) -> list[InspectedSample]:
    """Samples index .. index+count-1 of `source`, decoded with `tokenizer`."""
    check_range(source, index, count)
    return list(iter_samples(source, tokenizer, index, count))


# ----------------------------------------------------------------------------- output

def source_header(source: ShardedSource, colour: bool) -> str:
    settings = source.manifest.get("settings", {})
    marks = "bold green" if colour else f"between {TRAIN_OPEN} and {TRAIN_CLOSE}"
    return (f"source {source.name!r} ({source.folder}): {len(source)} samples, format "
            f"{source.manifest.get('detected_format', '?')}, template {settings.get('template', '?')}, train_on "
            f"{settings.get('train_on', '?')}; trained text is shown {marks}")


def render_human(sample: InspectedSample, total: int, colour: bool) -> str:
    """Header line + the text with each trained span marked."""
    spans = len(sample.trained)
    head = (f"=== sample {sample.index} of {total}: {sample.num_tokens} tokens, {sample.trained_tokens} trained "
            f"in {spans} span{'s' if spans != 1 else ''} ===")
    opening, closing = (ANSI_TRAIN, ANSI_RESET) if colour else (TRAIN_OPEN, TRAIN_CLOSE)
    body = "".join(f"{opening}{text}{closing}" if trained else text for text, trained in sample.segments)
    lines = [head, body if body.endswith("\n") else body + "\n"]
    if "".join(text for text, _ in sample.segments) != sample.text:
        lines.insert(1, "note: a character is split across a span edge, so the span texts differ from the "
                        "full text there")
    return "\n".join(lines)


def use_colour(choice: str) -> bool:
    if choice == "auto":
        return sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    return choice == "always"


def _whole_number(minimum: int):
    """An argparse type: an int of at least `minimum`, with a message saying so otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="prepared source folder (<out>/<source name>), or <out> holding one source")
    p.add_argument("--index", type=_whole_number(0), default=0, help="first sample (default 0)")
    p.add_argument("--count", type=_whole_number(1), default=1, help="how many samples (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample: index, text, trained spans")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder the source was prepared with")
    p.add_argument("--ignore-fingerprint", action="store_true",
                   help="decode even if the tokenizer's fingerprint differs from the manifest's")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="mark trained spans with colour (auto: when stdout is a terminal) or brackets")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)

    def warn(message: str) -> None:
        print(f"inspect: {message}", file=sys.stderr)

    try:
        source = open_source(args.folder)
        check_range(source, args.index, args.count)
        tokenizer = load_matching_tokenizer(source, args.tokenizer, ignore_fingerprint=args.ignore_fingerprint,
                                            warn=warn)
        colour = use_colour(args.color)
        if not args.json:
            print(source_header(source, colour))
        for sample in iter_samples(source, tokenizer, args.index, args.count):
            if args.json:
                print(json.dumps(sample.to_json(), ensure_ascii=False))
            else:
                print(render_human(sample, len(source), colour))
        sys.stdout.flush()
    except InspectError as err:
        sys.stdout.flush()
        print(f"inspect: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
