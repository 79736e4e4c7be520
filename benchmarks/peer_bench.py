"""Side by side with LLaMA-Factory 0.9.5 (LF): SFT training throughput and preprocessing time.

    python benchmarks/peer_bench.py --venv VENV [--work DIR] [--keep] [--repeats 2]
        [--prepare-samples 12000,200000] [--prepare-repeats 3,2] [--only train|prepare] [--limit N]

VENV: a LLaMA-Factory virtual environment, created and installed when missing (torch==2.13.0 first,
then llamafactory==0.9.5 and deepspeed==0.19.8 under a torch pin; PyPI's torchvision and torchaudio
are CUDA builds that break imports on a CPU torch, so torchvision is uninstalled and torchaudio's
.so files deleted), reused when present. Zhiling runs with the python that runs this script.
`--limit N` checks the plumbing in minutes: N training samples, prepare sizes 200 and 800, 1 repeat.

Training: a tiny from-scratch Llama (vocab 6400 from ../shared/data/tokenizer-zh-6400, hidden 256,
4 layers, tied embeddings, fp32, seed 0), built once into the work dir; both systems train that
directory on alpaca_zh_demo (chatml, 512 tokens, micro-batch 4 x accumulation 2 x 2 ranks = 16, lr
1e-4 cosine to 0 after 10% warmup, AdamW (0.9, 0.999), no weight decay, clip 1.0, ZeRO-2, one
epoch), unpacked and packed without cross-attention (LF: neat_packing), gradient checkpointing off.
LF runs through `llamafactory-cli train` (torchrun), Zhiling through `deepspeed --num_gpus 2
launcher/run.py --config <generated yaml>`, each rank with OMP_NUM_THREADS=1. The four runs of a
repeat go peer, ours, ours, peer (reversed in odd repeats), so that drifting load hits both.
One epoch: LF's num_train_epochs 1 (its last step may be short). Zhiling has no epoch key and every
step is a full global batch: max_steps is the fewest steps whose run plan draws as many samples as
prepare kept, so it may train a few samples twice (both counts are printed; compare the rates).

What the train-loop seconds cover:
  * LF: HF Trainer's `train_runtime` (all_results.json): from just before the first batch is fetched
    (the DeepSpeed engine already built) to the end of the last step and its logging.
  * Zhiling: the sum of `perf/step_seconds` over all steps (metrics.jsonl, every step logged): the
    first step's timer starts when Trainer.train() begins (set-up and engine already built); each
    step's covers its data fetch, forward/backward/step and the previous step's logging.
  Neither covers start-up, data preparation, the model load, the final save or the exit.
Real tokens = non-padding tokens trained (LF: counted in its saved tokenized set; Zhiling: the
per-step source token counts); real tokens/s = real tokens / train-loop seconds.

Preprocessing: N distinct alpaca records (JSON lines) made from the shared file (distinct_samples),
timed each in a fresh process, imports excluded, tokenizer load included: LF's `get_dataset`
(chatml, cutoff 512, preprocessing_num_workers 2, overwrite_cache, a fresh datasets cache) vs
Zhiling's `prepare_sources` (chatml, seq_len 512, num_proc 2, a fresh output folder); the side
that goes first alternates between repeats.

Last line: `peer_bench train_unpacked=<x> train_packed=<y> prepare=<z>`: medians over repeats of
ours/peer real tokens/s, and of peer/ours prepare seconds (the smaller of the two sizes').
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
TORCH_SPEC, PEER_SPECS = "torch==2.13.0", ["llamafactory==0.9.5", "deepspeed==0.19.8"]
SEQ_LEN, MICRO, ACCUM, RANKS = 512, 4, 2, 2
GLOBAL = MICRO * ACCUM * RANKS
MODES = ("unpacked", "packed")
PEER_MODE_KEYS = {"unpacked": ["disable_gradient_checkpointing=true"],
                  "packed": ["packing=true", "neat_packing=true", "disable_gradient_checkpointing=true"]}
COMMON_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------- set-up

def ensure_venv(venv: Path, work: Path) -> None:
    python = str(venv / "bin" / "python")
    if Path(python).exists():
        return
    print(f"building the LLaMA-Factory venv in {venv} (a few minutes)", flush=True)
    pin = work / "torch-pin.txt"
    pin.write_text(TORCH_SPEC + "\n")
    for cmd in ([sys.executable, "-m", "venv", str(venv)], [python, "-m", "pip", "install", "-q", TORCH_SPEC],
                [python, "-m", "pip", "install", "-q", "-c", str(pin), *PEER_SPECS],
                [python, "-m", "pip", "uninstall", "-y", "torchvision"]):
        subprocess.run(cmd, check=True)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    for so in glob.glob(os.path.join(purelib, "torchaudio", "lib", "*.so")):
        os.remove(so)


def build_model(model_dir: Path) -> None:
    if (model_dir / "config.json").exists():
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(SHARED_DATA / "tokenizer-zh-6400"))
    cfg = LlamaConfig(vocab_size=6400, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    print(f"tiny model: {sum(p.numel() for p in model.parameters()):,} parameters -> {model_dir}", flush=True)


def write_dataset(records: list, folder: Path, name: str, jsonl: bool = False) -> Path:
    """The records as a JSON (or JSON lines) file both systems read, registered in LF's dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{name}.jsonl" if jsonl else f"{name}.json")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if jsonl else json.dumps(
        records, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": path.name}}))
    return path


def distinct_samples(records: list, n: int, seed: int = 0) -> list:
    """n alpaca records, every prompt and every response distinct: the instruction of record i (mod
    the file), the input of a random record, the output of another with its sentences shuffled; the
    index leads the prompt and sits at a random sentence boundary of the response."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = records[i % len(records)], rng.choice(records), rng.choice(records)
        sentences = [s for s in re.split(r"(?<=[。！？!?\n])", c["output"]) if s]
        rng.shuffle(sentences)
        sentences.insert(rng.randrange(len(sentences) + 1), f"（{i}）")
        out.append({"instruction": f"{i}. {a['instruction']}", "input": b["input"], "output": "".join(sentences)})
    assert len({r["instruction"] + "\0" + r["input"] for r in out}) == n == len({r["output"] for r in out})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd: list, env: dict, log: Path) -> float:
    """Run to completion, output in `log`; the wall seconds. Then removes the DeepSpeed CPU all-reduce
    buffers this run left in /dev/shm: those new since the start and named with its MASTER_PORT
    (the name engine/jit_ops.remove_shm_buffer uses), never another user's."""
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{env['MASTER_PORT']}_*"
    before = set(glob.glob(pattern))
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    left = [p for p in glob.glob(pattern) if p not in before]
    for path in left:
        Path(path).unlink(missing_ok=True)
    if left:
        print(f"  (removed {len(left)} DeepSpeed shared-memory buffer(s) the run left)", flush=True)
    if rc != 0:
        sys.exit(f"failed (rc {rc}): {' '.join(map(str, cmd))}\n{log.read_text()[-4000:]}")
    return wall


def peer_env(venv: Path, work: Path, **extra) -> dict:
    env = {**os.environ, **COMMON_ENV, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "TORCH_EXTENSIONS_DIR": str(work / "torch_ext" / "peer"), "HF_HOME": str(work / "hf_home")}
    env.pop("PYTHONPATH", None)
    return {**env, **{k: str(v) for k, v in extra.items()}}


def ours_env(work: Path, **extra) -> dict:
    env = {**os.environ, **COMMON_ENV, "TORCH_EXTENSIONS_DIR": str(work / "torch_ext" / "ours")}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def child_json(cmd: list, env: dict, what: str) -> dict:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- training configs

def ours_tree(work: Path, data_file: Path, mode: str) -> dict:
    model = str(work / "model")
    return {
        "run_dir": str(work / "runs" / f"ours-{mode}"), "model": {"path": model, "dtype": "fp32"},
        "tokenizer": {"path": model},
        "data": {"sources": [{"name": "alpaca", "path": str(data_file), "format": "alpaca"}], "template": "chatml",
                 "seq_len": SEQ_LEN, "packing": mode == "packed", "prepared_dir": str(work / "prepared")},
        "train": {"micro_batch_size": MICRO, "global_batch_size": GLOBAL, "max_steps": 1, "lr": 1e-4,
                  "min_lr_ratio": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "grad_clip": 1.0,
                  "deepspeed": "configs/ds/zero2.json"},
        "checkpoint": {"every_steps": 0, "keep_last": 1, "resume": "none", "export_at_end": False},
        "log": {"every_steps": 1}, "eval": {"at_end": False},
    }


def one_epoch_steps(tree: dict) -> int:
    """Fewest steps whose run plan (Zhiling's own, data_pipeline/schedule/run_length.py) draws as
    many samples as prepare kept. Prepares the data here once; the runs reuse the shards."""
    sys.path.insert(0, str(REPO))
    from data_pipeline.prepare import prepare_sources
    from data_pipeline.schedule.run_length import plan_run
    from data_pipeline.store.shards import open_prepared
    from engine.config import build_config
    from engine.preflight import load_run_tokenizer

    cfg = build_config(tree)
    tokenizer = load_run_tokenizer(cfg)
    prepare_sources(cfg.data, tokenizer, cfg.data.prepared_dir, show_progress=False)
    lengths = [open_prepared(cfg.data, tokenizer, cfg.data.prepared_dir)[0].lengths]
    samples, steps = len(lengths[0]), 1
    while plan_run(cfg.data.sources, lengths, total_steps=steps, global_batch_size=GLOBAL, seq_len=SEQ_LEN,
                   packing=cfg.data.packing, seed=cfg.data.seed).total_samples < samples:
        steps += 1
    return steps


def write_ours_configs(work: Path, data_file: Path) -> dict:
    import yaml

    paths = {}
    for mode in MODES:
        tree = ours_tree(work, data_file, mode)
        steps = one_epoch_steps(tree)
        tree["train"].update(max_steps=steps, warmup_steps=math.ceil(0.1 * steps))
        paths[mode] = work / f"ours-{mode}.yaml"
        paths[mode].write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
        check = subprocess.run([sys.executable, "launcher/run.py", "--config", str(paths[mode]), "--dry-run",
                                "--world-size", str(RANKS)], cwd=REPO, env=ours_env(work),
                               capture_output=True, text=True, check=False)
        if check.returncode != 0:
            sys.exit(f"dry run of {paths[mode]} failed:\n{check.stderr[-4000:]}")
        print(f"ours {mode}: one epoch = {steps} steps (warmup {math.ceil(0.1 * steps)}); dry run passed", flush=True)
    return paths


def write_peer_config(work: Path, data_dir: Path, dataset: str) -> Path:
    """LF's SFT yaml and its DeepSpeed config (ZeRO-2, HF "auto" values, no optimizer block, so that
    HF's Trainer builds a torch AdamW)."""
    import yaml

    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
          "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "overlap_comm": False,
                                                             "contiguous_gradients": True, "reduce_scatter": True}}
    (work / "peer_ds_z2.json").write_text(json.dumps(ds, indent=1))
    cfg = {"model_name_or_path": str(work / "model"), "stage": "sft", "do_train": True, "finetuning_type": "full",
           "deepspeed": str(work / "peer_ds_z2.json"), "dataset": dataset, "dataset_dir": str(data_dir),
           "template": "chatml", "cutoff_len": SEQ_LEN, "overwrite_cache": True, "preprocessing_num_workers": 2,
           "dataloader_num_workers": 0, "logging_steps": 1, "save_strategy": "no", "plot_loss": False,
           "overwrite_output_dir": True, "save_only_model": True, "report_to": "none",
           "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": ACCUM, "learning_rate": 1.0e-4,
           "num_train_epochs": 1.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "adam_beta1": 0.9,
           "adam_beta2": 0.999, "weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": False, "fp16": False, "seed": 42}
    path = work / "peer_sft.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------- training runs

def run_peer(venv: Path, work: Path, config: Path, mode: str, tag: str) -> dict:
    out = work / "runs" / f"peer-{tag}"
    shutil.rmtree(out, ignore_errors=True)  # LF silently reuses an existing tokenized_path
    out.mkdir(parents=True)
    env = peer_env(venv, work, FORCE_TORCHRUN=1, NNODES=1, NPROC_PER_NODE=RANKS, MASTER_PORT=free_port())
    wall = run_logged(["llamafactory-cli", "train", str(config), f"output_dir={out}",
                       f"tokenized_path={out / 'tokenized'}", *PEER_MODE_KEYS[mode]], env, out / "train.log")
    counts = child_json([str(venv / "bin" / "python"), __file__, "--child", "peer-count", str(out / "tokenized")],
                        peer_env(venv, work), "counting LF's tokens")
    state = json.loads((out / "trainer_state.json").read_text())
    return {"wall": wall, "seconds": json.loads((out / "all_results.json").read_text())["train_runtime"],
            "steps": state["global_step"], "real": counts["real"], "supervised": counts["supervised"],
            "losses": {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}}


def count_peer_tokens(tokenized: str) -> None:
    """Child process in LF's venv: real tokens (attention mask != 0: neat packing marks padding with
    0, unpacked rows hold no padding) and supervised tokens (labels != -100) of the tokenized set."""
    from datasets import load_from_disk

    data = load_from_disk(tokenized)
    data = data["train"] if hasattr(data, "keys") else data
    real = sum(sum(1 for m in mask if m) for mask in data["attention_mask"])
    supervised = sum(sum(1 for t in labels if t != -100) for labels in data["labels"])
    print(json.dumps({"real": real, "supervised": supervised}))


def run_ours(work: Path, config: Path, tag: str) -> dict:
    run_dir = work / "runs" / f"ours-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = free_port()
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(RANKS), "--master_port", str(port),
           "launcher/run.py", "--config", str(config), f"run_dir={run_dir}"]
    wall = run_logged(cmd, ours_env(work, MASTER_PORT=port), run_dir / "train.log")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "perf/step_seconds" in x]
    real = sum(v for x in steps for k, v in x.items() if k.startswith("source/") and k.endswith("/tokens"))
    return {"wall": wall, "seconds": sum(x["perf/step_seconds"] for x in steps), "steps": len(steps),
            "real": int(real), "supervised": int(sum(x["train/response_tokens"] for x in steps)),
            "losses": {x["step"]: x["train/loss"] for x in steps}}


def spread(values: list, digits: int = 3) -> str:
    return f"median {statistics.median(values):.{digits}f} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


def bench_train(args, work: Path) -> dict:
    records = json.loads((SHARED_DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[: args.limit or None]
    data_file = write_dataset(records, work / "data", "bench_train")
    build_model(work / "model")
    ours_configs = write_ours_configs(work, data_file)
    peer_config = write_peer_config(work, data_file.parent, "bench_train")
    order = [("peer", "unpacked"), ("ours", "unpacked"), ("ours", "packed"), ("peer", "packed")]
    results = {mode: [] for mode in MODES}
    print(f"\ntrain: {len(records)} samples, {RANKS} ranks, ZeRO-2, fp32, global batch {GLOBAL}, seq {SEQ_LEN}")
    print(f"{'run':<22}{'steps':>6}{'real tok':>10}{'supervised':>11}{'loop s':>9}{'wall s':>8}{'real tok/s':>11}")
    for r in range(args.repeats):
        got = {mode: {} for mode in MODES}
        for side, mode in (order if r % 2 == 0 else order[::-1]):
            tag = f"{mode}-r{r}"
            res = run_peer(args.venv, work, peer_config, mode, tag) if side == "peer" else run_ours(
                work, ours_configs[mode], tag)
            got[mode][side] = res
            print(f"{side + ' ' + tag:<22}{res['steps']:>6}{res['real']:>10,}{res['supervised']:>11,}"
                  f"{res['seconds']:>9.1f}{res['wall']:>8.1f}{res['real'] / res['seconds']:>11,.0f}", flush=True)
        for mode in MODES:
            results[mode].append(got[mode])
    ratios = {}
    for mode in MODES:
        rate = {side: [p[side]["real"] / p[side]["seconds"] for p in results[mode]] for side in ("peer", "ours")}
        per_repeat = [o / p for o, p in zip(rate["ours"], rate["peer"])]
        ratios[mode] = statistics.median(per_repeat)
        last = results[mode][-1]
        print(f"\n{mode}: ours/peer real tokens/s {spread(per_repeat)} over {len(per_repeat)} repeat(s)")
        for side in ("peer", "ours"):
            print(f"  {side}: real tokens/s {spread(rate[side], 0)}; steps {last[side]['steps']}, "
                  f"real tokens {last[side]['real']:,}, supervised {last[side]['supervised']:,}")
        print(f"  ours - peer: real tokens {last['ours']['real'] - last['peer']['real']:+,}, "
              f"supervised {last['ours']['supervised'] - last['peer']['supervised']:+,}, "
              f"steps {last['ours']['steps'] - last['peer']['steps']:+}")
        print_losses(last["peer"]["losses"], last["ours"]["losses"])
    return ratios


def print_losses(peer: dict, ours: dict) -> None:
    last = max([*peer, *ours])
    print(f"  {'step':>6}{'peer loss':>11}{'ours loss':>11}   (last repeat)")
    for s in sorted({1, last, *range(5, last + 1, 5)}):
        cells = [f"{x[s]:>11.4f}" if s in x else f"{'-':>11}" for x in (peer, ours)]
        print(f"  {s:>6}" + "".join(cells))


# ---------------------------------------------------------------------------------- preprocessing

def time_peer_prepare(data_dir: str, dataset: str, model: str, scratch: str) -> None:
    """Child process in LF's venv: get_dataset timed, tokenizer load included, imports excluded."""
    import pyarrow.compute as pc
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args({
        "model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "full", "dataset": dataset,
        "dataset_dir": data_dir, "template": "chatml", "cutoff_len": SEQ_LEN, "packing": False,
        "overwrite_cache": True, "preprocessing_num_workers": 2, "output_dir": scratch, "report_to": "none"})
    start = time.perf_counter()
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    train = get_dataset(template, model_args, data_args, training_args, "sft", **tokenizer_module)["train_dataset"]
    seconds = time.perf_counter() - start
    tokens = pc.sum(pc.list_value_length(train.data.column("input_ids"))).as_py()  # no Python lists
    print(json.dumps({"seconds": seconds, "samples": len(train), "tokens": tokens}))


def time_ours_prepare(data_file: str, model: str, out: str) -> None:
    """Child process: prepare_sources timed, tokenizer load included, imports excluded."""
    sys.path.insert(0, str(REPO))
    from data_pipeline.prepare import prepare_sources
    from data_pipeline.render.tokenizer import load_tokenizer
    from data_pipeline.spec import DataConfig, SourceSpec
    # Imports stay outside the timing, as the peer's (llamafactory has imported these already):
    # AutoTokenizer on a model directory imports the model's config class, and with it torch.
    from transformers import AutoTokenizer, LlamaConfig  # noqa: F401

    start = time.perf_counter()
    tokenizer = load_tokenizer(model)
    cfg = DataConfig(sources=[SourceSpec(name="bench", path=data_file, format="alpaca")], template="chatml",
                     seq_len=SEQ_LEN, num_proc=2)
    sources = prepare_sources(cfg, tokenizer, out, show_progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "samples": sum(len(s) for s in sources),
                      "tokens": sum(s.manifest["counts"]["tokens"] for s in sources)}))


def prepare_once(side: str, args, work: Path, data_file: Path) -> dict:
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    if side == "peer":
        cmd = [str(args.venv / "bin" / "python"), __file__, "--child", "peer-prepare", str(data_file.parent),
               data_file.stem, str(work / "model"), str(scratch)]
        env = peer_env(args.venv, work, HF_DATASETS_CACHE=scratch / "hf_datasets")
    else:
        cmd = [sys.executable, __file__, "--child", "ours-prepare", str(data_file), str(work / "model"),
               str(scratch / "prepared")]
        env = ours_env(work)
    try:
        return child_json(cmd, env, f"{side} prepare")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bench_prepare(args, work: Path) -> dict:
    build_model(work / "model")
    records = json.loads((SHARED_DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    ratios = {}
    print("\nprepare: chatml, 512 tokens, 2 processes, a fresh process and output folder each time")
    for size, repeats in zip(args.sizes, args.prepare_repeats):
        data_file = write_dataset(distinct_samples(records, size), work / f"prepare-{size}", f"distinct_{size}",
                                  jsonl=True)
        seconds = {"peer": [], "ours": []}
        for r in range(repeats):
            for side in ("peer", "ours") if r % 2 == 0 else ("ours", "peer"):
                got = prepare_once(side, args, work, data_file)
                seconds[side].append(got["seconds"])
                print(f"  {size:>7} records {side} r{r}: {got['samples']:,} samples, {got['tokens']:,} tokens, "
                      f"{got['seconds']:.2f} s", flush=True)
        per_repeat = [p / o for p, o in zip(seconds["peer"], seconds["ours"])]
        ratios[size] = statistics.median(per_repeat)
        print(f"  {size} records: peer s {spread(seconds['peer'], 2)}; ours s {spread(seconds['ours'], 2)}; "
              f"peer/ours {spread(per_repeat)}")
    return ratios


# ---------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work dir, kept (default: a new temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temp work dir")
    p.add_argument("--venv", type=Path, help="LLaMA-Factory venv (built there when missing)")
    p.add_argument("--repeats", type=int, default=2, help="training repeats (four runs each)")
    p.add_argument("--prepare-samples", help='preprocessing sizes (default "12000,200000"; with --limit "200,800")')
    p.add_argument("--prepare-repeats", help='repeats per size (default "3,2"; with --limit "1,1")')
    p.add_argument("--only", choices=["train", "prepare"])
    p.add_argument("--limit", type=int, default=0, help="plumbing check: train on N samples, tiny prepare sizes")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sizes = [int(x) for x in (args.prepare_samples or ("200,800" if args.limit else "12000,200000")).split(",")]
    args.prepare_repeats = [int(x) for x in (args.prepare_repeats or ("1,1" if args.limit else "3,2")).split(",")]
    return args


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    args = parse_args()
    if args.child:
        kind, *rest = args.child
        {"peer-count": count_peer_tokens, "peer-prepare": time_peer_prepare,
         "ours-prepare": time_ours_prepare}[kind](*rest)
        return
    if not args.venv:
        sys.exit("--venv PATH is required (a LLaMA-Factory venv; built there when missing)")
    if not (SHARED_DATA / "tokenizer-zh-6400").is_dir():
        sys.exit(f"shared data not found at {SHARED_DATA}")
    work = (args.work or Path(tempfile.mkdtemp(prefix="peer_bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.venv = args.venv.resolve()
    tree = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip()
    print(f"work dir {work}; Zhiling at {tree or 'unknown commit'}", flush=True)
    try:
        ensure_venv(args.venv, work)
        train = bench_train(args, work) if args.only != "prepare" else {}
        prep = bench_prepare(args, work) if args.only != "train" else {}
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    fields = [f"train_{mode}={ratio:.3f}" for mode, ratio in train.items()]
    if prep:
        print("\n" + " ".join(f"prepare_{size_label(n)}={ratio:.3f}" for n, ratio in prep.items()))
        fields.append(f"prepare={min(prep.values()):.3f}")
    print("peer_bench " + " ".join(fields))


if __name__ == "__main__":
    main()
