"""Tokens per second of `prepare` vs a plain `datasets.map` tokenisation of the same data.

    python benchmarks/prepare_bench.py [--copies-alpaca 12] [--copies-glaive 20] [--num-proc 2]

Data: the shared alpaca (1,000) and glaive tool-call (300) demo files, replicated. Baseline:
`datasets.load_dataset("json")` + `Dataset.map(batched=True, num_proc=N)` running
tokenizer.apply_chat_template(tokenize=False) + tokenizer(...) — ids only, no loss mask, no
validation. Contender: prepare_sources (ids + exact loss masks + validation + shards + manifest),
same tokenizer, same template (the tokenizer's own), same N processes. Both start cold (fresh
cache/output folders). The last line is `prepare_bench speedup=<x>` (tokens/s ratio).
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies-alpaca", type=int, default=12)
    parser.add_argument("--copies-glaive", type=int, default=20)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args()
    if not (SHARED / "tokenizer-zh-6400").is_dir():
        sys.exit(f"shared data not found at {SHARED}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizer-zh-6400"))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = [replicate(SHARED / "alpaca_zh_demo.json", args.copies_alpaca, tmp / "alpaca.jsonl"),
                 replicate(SHARED / "glaive_toolcall_zh_demo.json", args.copies_glaive, tmp / "glaive.jsonl")]
        samples = 1000 * args.copies_alpaca + 300 * args.copies_glaive
        # seq_len large enough that nothing is truncated: both sides tokenize the same text.
        cfg = DataConfig(sources=[SourceSpec(name=f.stem, path=str(f)) for f in files], seq_len=32768,
                         num_proc=args.num_proc)

        start = time.perf_counter()
        base_tokens = baseline(files, tokenizer, args.num_proc, tmp / "hf_cache")
        base_s = time.perf_counter() - start

        start = time.perf_counter()
        sources = prepare_sources(cfg, tokenizer, tmp / "prepared", show_progress=False)
        ours_s = time.perf_counter() - start
        ours_tokens = sum(s.manifest["counts"]["tokens"] for s in sources)

    base_rate, ours_rate = base_tokens / base_s, ours_tokens / ours_s
    print(f"samples={samples} num_proc={args.num_proc}")
    print(f"datasets.map  tokens={base_tokens} seconds={base_s:.2f} tokens/s={base_rate:,.0f}")
    print(f"prepare       tokens={ours_tokens} seconds={ours_s:.2f} tokens/s={ours_rate:,.0f} "
          f"(kept {sum(len(s) for s in sources)} samples, ids + loss masks)")
    print(f"prepare_bench speedup={ours_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
