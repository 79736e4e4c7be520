"""An exact fast encoder for byte-level BPE tokenizers (Qwen2/2.5/3, Llama-3, GLM-4, DeepSeek
style), with tiktoken as the engine: the same ids and the same character offsets as the HF
`tokenizers` encode of the same text, at a fraction of its cost. `fast_bpe_plan` says whether a
tokenizer is eligible (and why not); prepare falls back to the HF path otherwise.

Eligible when the tokenizer.json has: a BPE model without dropout, continuing-subword prefix,
end-of-word suffix or byte fallback, ignore_merges false; no normalizer, padding or truncation;
a pre-tokenizer ByteLevel(use_regex, no prefix space) (the GPT-2 pattern) or Sequence[Split(Regex,
Isolated, not inverted), ByteLevel(no regex, no prefix space)] (the Split's pattern); no post-
processor, or one that leaves a pair-less encode without special tokens as it is
(TemplateProcessing; ByteLevel without trim_offsets, which would move offsets); all 256 bytes in the vocabulary; added tokens without
lstrip/rstrip/single_word; and merge conditions M and P below.

Why tiktoken's rule equals HF's merges. HF merges, within a pre-token, the adjacent pair with the
lowest merge index (leftmost on ties) among the listed merges; tiktoken merges the adjacent pair
whose concatenation has the lowest rank among all pairs whose concatenation is a token (leftmost on
ties), and returns a pre-token that is itself a token as that token. Ranks are the token ids, so:
  M: merge i makes token t_i, and id(t_i) strictly increases with i (same order, one merge per token);
  P: the parts of merge i are bytes or tokens made by earlier merges (HF's merge indices then only
     grow while a pre-token is merged);
  V: tiktoken's tokens are the bytes and the tokens t that HF's merges make of t's own bytes
     ("reachable"; checked by running the HF model alone on every token). An unreachable token is never
     in HF's output: the boundaries around a merged pair survive from the start, so the pair's bytes
     were merged as they are alone, which would make the token reachable.
The unique-decomposition condition (each token splits into two tokens only by its own merge) is
not needed and fails for real vocabularies (e.g. "out" = o+ut = ou+t). Proof of equality: both
start from the same bytes; take the first step where they differ, at a state S both reached. Every
HF merge is a tiktoken candidate with the same order (M; its token is reachable, so in V). So
tiktoken takes a pair (x, y) that is not listed, w = x + y in V, id(w) <= r, r the rank HF would
take next. By P, HF has applied every merge of rank < r, and the span of w has token boundaries
at both ends in S, so by the boundary argument the HF run of w's bytes alone, after its merges of
rank < id(w), is [x, y]. But w is reachable: that run is [a, b], w's own merge. Contradiction.
The whole-pre-token shortcut returns w only for w in V, which HF's merges reach: the same.

Added tokens are cut out as HF cuts them (non-normalized ones first, then normalized ones,
leftmost-longest; with special-token matching off a special token's match stays text and its
characters are not matched again) and the text between them is encoded with encode_ordinary.
Offsets come from token byte lengths; a token's character range is that of the characters its
bytes belong to, which is HF's rule. A text whose pre-tokens do not cover it (a Split pattern that
skips characters, which HF keeps) raises NotCovered, and the caller encodes it with HF.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENGINE_FAST = "tiktoken"
ENGINE_HF = "tokenizers"


class NotCovered(ValueError):
    """The pre-tokenizer pattern skips characters of this text: encode it with HF instead."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, used by byte-level vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass(frozen=True)
class FastBPEPlan:
    """What a worker needs to build the encoder (picklable; built once in the main process)."""

    pattern: str
    mergeable_ranks: dict[bytes, int]
    added: tuple[tuple[str, int, bool, bool], ...]
    """(content, id, special, normalized) of every added token."""


def _pre_tokenizer_pattern(pre) -> tuple[Optional[str], str]:
    if not isinstance(pre, dict):
        return None, "no pre-tokenizer (not byte-level)"
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            return None, "ByteLevel pre-tokenizer with add_prefix_space"
        if not pre.get("use_regex", True):
            return None, "ByteLevel pre-tokenizer without a splitting regex"
        return GPT2_PATTERN, ""
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or ()) == 2:
        split, byte_level = pre["pretokenizers"]
        if (split.get("type") == "Split" and "Regex" in (split.get("pattern") or {})
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space")):
            return split["pattern"]["Regex"], ""
    return None, f"pre-tokenizer {json.dumps(pre)[:120]} is not one the fast encoder reproduces"


def _post_processor_inert(processor) -> bool:
    """Whether a post-processor leaves ids and offsets of a pair-less encode without special tokens
    as they are: none, TemplateProcessing (it only adds special tokens), ByteLevel without offset
    trimming, or a Sequence of those."""
    if processor is None:
        return True
    kind = processor.get("type")
    if kind == "Sequence":
        return all(map(_post_processor_inert, processor.get("processors") or ()))
    return kind == "TemplateProcessing" or (kind == "ByteLevel" and not processor.get("trim_offsets", True))


def _structure_reason(spec: dict) -> tuple[Optional[str], str]:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"model {model.get('type')!r} is not BPE"
    for key, what in (("dropout", "dropout"), ("continuing_subword_prefix", "a continuing-subword prefix"),
                      ("end_of_word_suffix", "an end-of-word suffix"), ("byte_fallback", "byte fallback"),
                      ("ignore_merges", "ignore_merges")):
        if model.get(key):
            return None, f"BPE with {what}"
    if not _post_processor_inert(spec.get("post_processor")):
        return None, f"post-processor {json.dumps(spec.get('post_processor'))[:120]} may change offsets"
    for key in ("normalizer", "padding", "truncation"):
        if spec.get(key) is not None:
            return None, f"tokenizer has a {key} ({(spec[key] or {}).get('type', 'set') if isinstance(spec[key], dict) else 'set'})"
    for token in spec.get("added_tokens") or ():
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return None, f"added token {token.get('content')!r} has lstrip/rstrip/single_word"
    return _pre_tokenizer_pattern(spec.get("pre_tokenizer"))


def _mergeable_ranks(spec: dict) -> tuple[Optional[dict[bytes, int]], str]:
    """Conditions M, P and V of the module docstring; the tiktoken ranks when they hold."""
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or ()]
    byte_tokens = {c: vocab.get(c) for c in _BYTE_OF_CHAR}
    missing = [c for c, i in byte_tokens.items() if i is None]
    if missing:
        return None, f"{len(missing)} of the 256 byte tokens are not in the vocabulary"
    made_at: dict[str, int] = {}
    previous = -1
    for i, (a, b) in enumerate(merges):
        token = a + b
        token_id = vocab.get(token)
        if token_id is None or a not in vocab or b not in vocab:
            return None, f"merge {i} ({a!r}, {b!r}) names a token that is not in the vocabulary"
        if token_id <= previous or token in made_at:
            return None, f"merge order is not id order (merge {i}, {token!r}: id {token_id} after {previous})"
        for part in (a, b):
            if len(part) > 1 and made_at.get(part, i) >= i:
                return None, f"merge {i} ({a!r}, {b!r}) uses {part!r} before a merge makes it"
        made_at[token] = i
        previous = token_id
    candidates = [token for token in vocab if len(token) > 1 and token in made_at]
    reached = {token for token, enc in zip(candidates, _bare_model(spec).encode_batch(candidates))
               if enc.tokens == [token]}
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        try:
            raw = bytes(_BYTE_OF_CHAR[c] for c in token)
        except KeyError:
            return None, f"vocabulary token {token!r} is not byte-level"
        if len(token) == 1 or token in reached:
            ranks[raw] = token_id  # V: bytes and tokens the merges reach from their own bytes
    return ranks, ""


def _bare_model(spec: dict):
    """The tokenizer's BPE model alone (no added tokens, pre-tokenizer or processors): encoding a
    vocabulary token's byte-level string with it runs the merges on exactly that one word."""
    from tokenizers import Tokenizer

    bare = {key: None for key in ("truncation", "padding", "normalizer", "pre_tokenizer", "post_processor",
                                  "decoder")}
    return Tokenizer.from_str(json.dumps(dict(spec, added_tokens=[], **bare)))


@lru_cache(maxsize=4)
def fast_bpe_plan(tokenizer_json: str) -> tuple[Optional[FastBPEPlan], str]:
    """(plan, "") when the tokenizer is eligible for the fast encoder, else (None, why not)."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None, "tiktoken is not installed"
    spec = json.loads(tokenizer_json)
    pattern, reason = _structure_reason(spec)
    if pattern is None:
        return None, reason
    ranks, reason = _mergeable_ranks(spec)
    if ranks is None:
        return None, reason
    added = tuple((t["content"], t["id"], bool(t.get("special")), bool(t.get("normalized")))
                  for t in spec.get("added_tokens") or () if t.get("content"))
    bytes_of = {token_id: raw for raw, token_id in ranks.items()}
    for content, token_id, _, _ in added:
        if bytes_of.get(token_id, content.encode("utf-8")) != content.encode("utf-8"):
            return None, f"added token {content!r} has the id of another vocabulary token"
    return FastBPEPlan(pattern, ranks, added), ""


def _alternation(contents: list[str]) -> Optional[re.Pattern]:
    """Leftmost-longest over `contents` (at one position the longest alternative is tried first)."""
    ordered = sorted(set(contents), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


class FastBPE:
    """The fast encoder built from a FastBPEPlan; one per worker."""

    def __init__(self, plan: FastBPEPlan) -> None:
        import tiktoken

        self.encoding = tiktoken.Encoding("prepare-fast-bpe", pat_str=plan.pattern,
                                          mergeable_ranks=plan.mergeable_ranks, special_tokens={})
        self._encode_ordinary = self.encoding.encode_ordinary
        size = max([*plan.mergeable_ranks.values(), *(i for _, i, _, _ in plan.added)]) + 1
        self.byte_length = np.zeros(size, dtype=np.int64)
        for raw, token_id in plan.mergeable_ranks.items():
            self.byte_length[token_id] = len(raw)
        self._id = {content: token_id for content, token_id, _, _ in plan.added}
        self.added_ids = self._id
        self._special = {content for content, _, special, _ in plan.added if special}
        for content, token_id, _, _ in plan.added:
            self.byte_length[token_id] = len(content.encode("utf-8"))
        # HF cuts at non-normalized added tokens first, then at normalized ones in what is left.
        self._passes = [p for p in (_alternation([c for c, _, _, n in plan.added if not n]),
                                    _alternation([c for c, _, _, n in plan.added if n])) if p is not None]
        # With one pass and special tokens matched, cutting is a re.split with the match kept.
        self._split = re.compile(f"({self._passes[0].pattern})").split if len(self._passes) == 1 else None
        self._short: dict[str, list[int]] = {}
        """Ids of short pieces between added tokens (e.g. the newline after a turn's end)."""

    def _cut(self, text: str, start: int, end: int, passes: list, match_special: bool, out: list) -> None:
        if not passes:
            out.append((start, end, None))
            return
        cursor = start
        for m in passes[0].finditer(text, start, end):
            if not match_special and m.group() in self._special:
                continue  # stays text; its characters are not matched again (as in HF)
            if cursor < m.start():
                self._cut(text, cursor, m.start(), passes[1:], match_special, out)
            out.append((m.start(), m.end(), self._id[m.group()]))
            cursor = m.end()
        if cursor < end:
            self._cut(text, cursor, end, passes[1:], match_special, out)

    def encode_ids(self, text: str, match_special: bool = True) -> list[int]:
        """Token ids of `text` (no special tokens added); special-token text is plain text when
        match_special is false (non-special added tokens still match, as in HF)."""
        if match_special and self._split is not None:  # one pass, every match a token: cut in C
            parts = self._split(text)
            if len(parts) == 1:
                return self._encode_ordinary(text)
            ids: list[int] = []
            ids_of, short = self._id, self._short
            for k, part in enumerate(parts):
                if k % 2:
                    ids.append(ids_of[part])
                elif part:
                    cached = short.get(part)
                    if cached is None:
                        cached = self._encode_ordinary(part)
                        if len(part) <= 2 and len(short) < 4096:
                            short[part] = cached
                    ids.extend(cached)
            return ids
        pieces: list = []
        self._cut(text, 0, len(text), self._passes, match_special, pieces)
        if len(pieces) == 1 and pieces[0][2] is None:
            return self._encode_ordinary(text)
        ids = []
        for start, end, token_id in pieces:
            if token_id is None:
                ids.extend(self._encode_ordinary(text[start:end]))
            else:
                ids.append(token_id)
        return ids

    def encode_batch(self, texts: list[str], match_special: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 [n], character offsets int64 [n, 2] as HF reports them) of each text,
        vectorised over the texts' concatenation. Raises NotCovered when the tokens of a text do
        not add up to its bytes (the caller then encodes the batch text by text)."""
        ids = [self.encode_ids(t, match_special) for t in texts]
        flat: list[int] = []
        counts = np.empty(len(ids), dtype=np.int64)
        for k, one in enumerate(ids):
            flat.extend(one)
            counts[k] = len(one)
        flat_ids = np.array(flat, dtype=np.int64)
        lengths = self.byte_length[flat_ids]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        token_end = np.cumsum(counts)
        byte_end = np.cumsum(np.fromiter(map(len, map(str.encode, texts)), dtype=np.int64, count=len(texts)))
        covered = np.concatenate([[0], ends])[token_end]  # bytes of the tokens up to the end of each text
        if not np.array_equal(covered, byte_end):
            raise NotCovered(texts[int(np.flatnonzero(covered != byte_end)[0])][:40])
        joined = "".join(texts)
        char_base = np.concatenate([[0], np.cumsum(np.fromiter(map(len, texts), dtype=np.int64,
                                                               count=len(texts)))[:-1]])
        if joined.isascii():
            start_char, end_char = starts, ends
        else:
            char_of_byte = np.cumsum(np.frombuffer(joined.encode("utf-8"), dtype=np.uint8) & 0xC0 != 0x80) - 1
            start_char, end_char = char_of_byte[starts], char_of_byte[ends - 1] + 1
        base = np.repeat(char_base, counts)
        offsets = np.stack([start_char - base, end_char - base], axis=1)
        bounds = [0, *token_end.tolist()]
        return [(flat_ids[a:b], offsets[a:b]) for a, b in zip(bounds, bounds[1:])]

    def encode(self, text: str, match_special: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids, offsets) of one text; NotCovered as in encode_batch."""
        return self.encode_batch([text], match_special)[0]


    def token_to_id(self, content: str) -> Optional[int]:
        """The id of an added token (special_text.special_token_ids reads it)."""
        return self._id.get(content)


class PlainAdapter:
    """A FastBPE that looks like a tokenizers.Tokenizer with encode_special_tokens=True, for
    special_text.encode_guarded (which reads .ids and .offsets of .encode(text))."""

    class _Encoding:
        def __init__(self, ids, offsets) -> None:
            self.ids, self.offsets = ids, offsets

    def __init__(self, fast: FastBPE) -> None:
        self.fast = fast

    def encode(self, text: str, add_special_tokens: bool = False) -> "PlainAdapter._Encoding":
        ids, offsets = self.fast.encode(text, match_special=False)
        return self._Encoding(ids.tolist(), [tuple(o) for o in offsets.tolist()])
