"""The project's own Chinese demo set: instructions whose answers can be checked exactly.

A tiny model trained from scratch for a few CPU minutes cannot learn open-ended chat, but it can
visibly learn fixed-form Chinese tasks: writing numbers in Chinese characters and back, dates in
Chinese, small sums written in Chinese. Every answer is computed, so `score()` tells how many a
model gets exactly right. The set is generated, never downloaded, and deterministic for a seed.

`builtin:zh_demo` (optionally `builtin:zh_demo?n=4000&seed=0`) as a source path materialises it as
an alpaca-format JSONL file.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlparse

DIGITS = "零一二三四五六七八九"
BUILTIN_PREFIX = "builtin:"
DEFAULT_SIZE = 4000


def number_to_chinese(n: int) -> str:
    """0..99999999 in Chinese numerals: 10 -> 十, 105 -> 一百零五, 20001 -> 二万零一 (二 rather
    than 两 throughout: one consistent form for a model to learn)."""
    if not 0 <= n < 10**8:
        raise ValueError(f"number_to_chinese supports 0..99999999, got {n}")
    if n == 0:
        return DIGITS[0]
    text = _below_10k(n)
    if n >= 10**4:
        high, low = divmod(n, 10**4)
        text = _below_10k(high) + "万"
        if low:
            text += ("零" if low < 1000 else "") + _below_10k(low)
    # 一十五 is read 十五 when the number starts with it (also 一十万 -> 十万).
    return text[1:] if text.startswith("一十") else text


def _below_10k(n: int) -> str:
    units = ((1000, "千"), (100, "百"), (10, "十"), (1, ""))
    out, zero_pending, started = [], False, False
    for value, unit in units:
        d = (n // value) % 10
        if d == 0:
            zero_pending = started
            continue
        if zero_pending:
            out.append("零")
            zero_pending = False
        out.append(DIGITS[d] + unit)
        started = True
    return "".join(out)


def date_to_chinese(year: int, month: int, day: int) -> str:
    """2024-03-15 -> 二〇二四年三月十五日 (years digit by digit, as written in Chinese)."""
    y = "".join("〇一二三四五六七八九"[int(c)] for c in f"{year:04d}")
    return f"{y}年{number_to_chinese(month)}月{number_to_chinese(day)}日"


def _task_num_to_zh(rng: random.Random) -> tuple[str, str]:
    n = rng.choice([rng.randint(0, 99), rng.randint(100, 9999), rng.randint(10000, 999999)])
    return f"把数字 {n} 写成中文。", number_to_chinese(n)


def _task_zh_to_num(rng: random.Random) -> tuple[str, str]:
    # Uniform over the task's 10,000 numbers: with distinct samples, a favoured sub-range (such as
    # the 100 two-digit numbers) would just run out.
    n = rng.randint(0, 9999)
    return f"把“{number_to_chinese(n)}”写成阿拉伯数字。", str(n)


def _task_date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"用中文写出日期 {y}-{m:02d}-{d:02d}。", date_to_chinese(y, m, d)


def _task_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 49)
    return f"{number_to_chinese(a)}加{number_to_chinese(b)}等于多少？", f"{number_to_chinese(a + b)}。"


TASKS = (_task_num_to_zh, _task_zh_to_num, _task_date, _task_add)


# A task whose draws repeat this many times in a row has (nearly) run out of distinct prompts.
MAX_REPEATED_DRAWS = 1000
# One prompt in RESERVED_MODULUS (by a stable hash) is reserved for testing: never generated for
# training, so demo_prompts always finds unseen prompts of every task, however large n is.
RESERVED_MODULUS = 50
VERSION = 2
"""2: distinct instructions only, test prompts reserved (1 drew with repetition)."""


def is_reserved(prompt: str) -> bool:
    """Whether `prompt` belongs to the test part of the task space (never in training data)."""
    return zlib.crc32(prompt.encode("utf-8")) % RESERVED_MODULUS == 0


def _draw_distinct(n: int, rng: random.Random, keep) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs with distinct prompts that `keep` accepts, the tasks in turn; a
    task that keeps repeating (its space used up) leaves the rotation to the others."""
    active, seen, out = list(TASKS), set(), []
    repeats = {task: 0 for task in TASKS}
    turn = 0
    while len(out) < n:
        if not active:
            raise ValueError(f"builtin:zh_demo has about {len(out)} distinct samples of this kind; n={n} asks for more")
        task = active[turn % len(active)]
        prompt, answer = task(rng)
        if prompt in seen or not keep(prompt):
            repeats[task] += 1
            if repeats[task] >= MAX_REPEATED_DRAWS:
                active.remove(task)
            continue
        repeats[task] = 0
        seen.add(prompt)
        out.append((prompt, answer))
        turn += 1
    return out


def generate(n: int, seed: int = 0) -> list[dict]:
    """n alpaca records {instruction, input, output}: distinct instructions, the four tasks in
    turn (a small task, such as the 2,550 sums, stops contributing once used up), none of them a
    reserved test prompt. Duplicates would only repeat samples and leak into held-out splits."""
    pairs = _draw_distinct(n, random.Random(seed), lambda prompt: not is_reserved(prompt))
    return [{"instruction": instruction, "input": "", "output": output} for instruction, output in pairs]


def demo_prompts(n: int = 8, exclude: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str]]:
    """Fixed (prompt, expected answer) pairs from the reserved test part of every task (so never
    in any generated training set), drawn with their own seed; prompts in `exclude` are skipped."""
    return _draw_distinct(n, random.Random(987654321), lambda prompt: is_reserved(prompt) and prompt not in exclude)


def parse_builtin(path: str) -> tuple[str, int, int]:
    """`builtin:zh_demo?n=4000&seed=0` -> ('zh_demo', 4000, 0)."""
    parsed = urlparse(path[len(BUILTIN_PREFIX):])
    name = parsed.path
    if name != "zh_demo":
        raise ValueError(f"unknown builtin dataset {path!r}; the only one is builtin:zh_demo")
    query = parse_qs(parsed.query)
    unknown = set(query) - {"n", "seed"}
    if unknown:
        raise ValueError(f"{path!r}: unknown parameter(s) {sorted(unknown)}; allowed: n, seed")
    try:
        n = int(query.get("n", [DEFAULT_SIZE])[0])
        seed = int(query.get("seed", [0])[0])
    except ValueError:
        raise ValueError(f"{path!r}: n and seed must be integers") from None
    if n < 1:
        raise ValueError(f"{path!r}: n must be >= 1")
    return name, n, seed


def materialize_builtin(path: str, cache_dir: str | Path) -> str:
    """Write the builtin set as alpaca JSONL under cache_dir (once) and return the file path."""
    name, n, seed = parse_builtin(path)
    out = Path(cache_dir) / f"{name}-v{VERSION}-n{n}-seed{seed}.jsonl"
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in generate(n, seed):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # atomic: a concurrent reader never sees a half-written file
    return str(out)


def score(answers: list[str], expected: list[str]) -> int:
    """How many answers equal the expected text exactly (after stripping whitespace)."""
    return sum(a.strip() == e.strip() for a, e in zip(answers, expected))
