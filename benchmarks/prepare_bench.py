"""Tokens per second of `prepare` vs a plain `datasets.map` tokenisation of the same data.

    python benchmarks/prepare_bench.py [--copies-alpaca 12] [--copies-glaive 20] [--num-proc 2] [--repeat 3]

Data: the shared alpaca (1,000) and glaive tool-call (300) demo files, replicated. Baseline:
`datasets.load_dataset("json")` + `Dataset.map(batched=True, num_proc=N)` running
tokenizer.apply_chat_template(tokenize=False) + tokenizer(...) — ids only, no loss mask, no
validation. Contender: prepare_sources (ids + exact loss masks + validation + shards + manifest),
same tokenizer, same template (the tokenizer's own), same N processes. Every measurement runs in
a fresh Python process on a fresh cache/output folder; each round runs both sides, in alternating
order, so drifting load on a shared machine hits both alike. The last line is
`prepare_bench speedup=<x>`: the median over rounds of the per-round tokens/s ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.prepare import prepare_sources  # noqa: E402
from data_pipeline.spec import DataConfig, SourceSpec  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "system": "system"}


def replicate(src: Path, copies: int, dst: Path) -> Path:
    records = json.loads(src.read_text(encoding="utf-8"))
    with dst.open("w", encoding="utf-8") as f:
        for _ in range(copies):
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return dst


def to_messages(example: dict) -> tuple[list[dict], list | None]:
    """Minimal alpaca/ShareGPT -> chat messages conversion for the baseline."""
    if example.get("instruction") is not None:
        prompt = example["instruction"] + ("\n" + example["input"] if example.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}], None
    messages = []
    for turn in example["conversations"]:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]})
        else:
            messages.append({"role": SHAREGPT_ROLES.get(turn["from"], "user"), "content": turn["value"]})
    tools = json.loads(example["tools"]) if example.get("tools") else None
    return messages, tools or None


def baseline(files: list[Path], tokenizer, num_proc: int, cache: Path) -> int:
    import datasets

    datasets.disable_progress_bars()

    def tokenize(batch: dict) -> dict:
        keys = list(batch)
        texts = []
        for i in range(len(batch[keys[0]])):
            messages, tools = to_messages({k: batch[k][i] for k in keys})
            texts.append(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False))
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    tokens = 0
    for f in files:
        ds = datasets.load_dataset("json", data_files=str(f), split="train", cache_dir=str(cache))
        out = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
        tokens += sum(len(x) for x in out["input_ids"])
    return tokens


def run_side(side: str, files: list[Path], num_proc: int, work: Path) -> dict:
    """One timed run of one side, in this (fresh) process, on a fresh cache/output folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizer-zh-6400"))
    start = time.perf_counter()
    if side == "baseline":
        tokens = baseline(files, tokenizer, num_proc, work / "hf_cache")
        samples = None
    else:
        # seq_len large enough that nothing is truncated: both sides tokenize the same text.
        cfg = DataConfig(sources=[SourceSpec(name=f.stem, path=str(f)) for f in files], seq_len=32768,
                         num_proc=num_proc)
        sources = prepare_sources(cfg, tokenizer, work / "prepared", show_progress=False)
        tokens = sum(s.manifest["counts"]["tokens"] for s in sources)
        samples = sum(len(s) for s in sources)
    return {"side": side, "tokens": tokens, "seconds": time.perf_counter() - start, "samples": samples}


def spawn_side(side: str, files: list[Path], num_proc: int, work: Path) -> dict:
    work.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, __file__, "--side", side, "--num-proc", str(num_proc), "--work", str(work),
           "--files", *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} run failed:\n{proc.stderr[-4000:]}")
    out = proc.stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(work, ignore_errors=True)
    result = json.loads(out.strip().splitlines()[-1])
    # CPU seconds of the child and every process it waited for (the worker pools), start-up included.
    result["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies-alpaca", type=int, default=12)
    parser.add_argument("--copies-glaive", type=int, default=20)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each runs both sides, order alternating")
    parser.add_argument("--side", choices=["baseline", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one measurement, printed as JSON
        print(json.dumps(run_side(args.side, args.files, args.num_proc, args.work)))
        return
    if not (SHARED / "tokenizer-zh-6400").is_dir():
        sys.exit(f"shared data not found at {SHARED}")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = [replicate(SHARED / "alpaca_zh_demo.json", args.copies_alpaca, tmp / "alpaca.jsonl"),
                 replicate(SHARED / "glaive_toolcall_zh_demo.json", args.copies_glaive, tmp / "glaive.jsonl")]
        for r in range(args.repeat):
            order = ("baseline", "prepare") if r % 2 == 0 else ("prepare", "baseline")
            got = {side: spawn_side(side, files, args.num_proc, tmp / f"run{r}-{side}") for side in order}
            rounds.append(got)
            base, ours = got["baseline"], got["prepare"]
            print(f"round {r}: datasets.map {base['seconds']:.2f}s (cpu {base['cpu_seconds']:.1f}s), "
                  f"prepare {ours['seconds']:.2f}s (cpu {ours['cpu_seconds']:.1f}s), "
                  f"ratio {(ours['tokens'] / ours['seconds']) / (base['tokens'] / base['seconds']):.2f}", flush=True)
    base_s = statistics.median(g["baseline"]["seconds"] for g in rounds)
    ours_s = statistics.median(g["prepare"]["seconds"] for g in rounds)
    base_tokens, ours_tokens = rounds[0]["baseline"]["tokens"], rounds[0]["prepare"]["tokens"]
    ratios = [(g["prepare"]["tokens"] / g["prepare"]["seconds"]) / (g["baseline"]["tokens"] / g["baseline"]["seconds"])
              for g in rounds]
    samples = 1000 * args.copies_alpaca + 300 * args.copies_glaive
    print(f"samples={samples} num_proc={args.num_proc} rounds={args.repeat} (fresh processes, medians)")
    print(f"datasets.map  tokens={base_tokens} seconds={base_s:.2f} tokens/s={base_tokens / base_s:,.0f}")
    print(f"prepare       tokens={ours_tokens} seconds={ours_s:.2f} tokens/s={ours_tokens / ours_s:,.0f} "
          f"(kept {rounds[0]['prepare']['samples']} samples, ids + loss masks)")
    cpu_ratio = statistics.median(g["baseline"]["cpu_seconds"] / g["prepare"]["cpu_seconds"] for g in rounds)
    print(f"cpu seconds (median): datasets.map {statistics.median(g['baseline']['cpu_seconds'] for g in rounds):.1f}, "
          f"prepare {statistics.median(g['prepare']['cpu_seconds'] for g in rounds):.1f}, ratio {cpu_ratio:.2f}")
    print(f"prepare_bench speedup={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
