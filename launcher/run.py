"""Zhiling: distributed SFT of causal LMs on DeepSpeed ZeRO.

    deepspeed --num_gpus 2 launcher/run.py --config configs/sft/demo.yaml        # one node (CPU: gloo)
    deepspeed --hostfile hosts launcher/run.py --config configs/sft/X.yaml       # many nodes
    torchrun --nproc_per_node 8 launcher/run.py --config configs/sft/X.yaml
    mpirun -n 16 python launcher/run.py --config configs/sft/X.yaml              # rank discovery via mpi4py
    python launcher/slurm.py --config configs/sft/X.yaml --nodes 4 --gpus-per-node 8 --submit
    python launcher/run.py --config configs/sft/X.yaml train.lr=1e-5 --dry-run   # check inputs, print configs
    tensorboard --logdir runs/

Overrides are `key.sub=value` (YAML values); `--help-config` lists every key with its meaning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `deepspeed launcher/run.py` runs this file as a script
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--dry-run", action="store_true",
                   help="check every input that needs no training (DeepSpeed config, resume checkpoint, "
                        "sources, tokenizer, template, seq_len; each stage's), one line each on stderr, "
                        "print the resolved run and DeepSpeed configs on stdout and exit (2 if a check failed)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its documentation")
    p.add_argument("--world-size", type=int, default=None, help="with --dry-run: world size to resolve for")
    # The deepspeed launcher appends --local_rank=N; the rank itself comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)  # overrides may come after the flags too


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from engine.config import ConfigError, config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    if not args.config:
        print("error: --config is required", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        return dry_run(cfg, args.world_size)

    import torch

    from data_pipeline.errors import DataError
    from data_pipeline.render.tokenizer import TokenizerError
    from engine.jit_ops import build_notices, comm_ops
    from engine.trainer import Ranks, StopRequested, run
    from launcher.dist_env import DistEnvError, discover
    from launcher.process_group import init_distributed

    try:
        env = discover()
        if env.local_rank == 0:  # DeepSpeed's process group compiles its CPU all-reduce on first use
            for notice in build_notices(comm_ops(torch.cuda.is_available())):
                print(notice, file=sys.stderr, flush=True)
        init_distributed(env, timeout_minutes=cfg.dist_timeout_minutes, expected_world_size=cfg.world_size)
    except DistEnvError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 2
    ranks = Ranks(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank)
    try:
        summary = run(cfg, ranks, REPO_ROOT)
    except StopRequested as e:
        if env.rank == 0:
            print(str(e), file=sys.stderr)
        _shutdown(clean=True)
        return 0
    except (ConfigError, DataError, TokenizerError) as e:
        print(f"rank {env.rank}: error: {e}", file=sys.stderr)
        _shutdown(clean=False)
        return 2
    _shutdown(clean=True)
    if env.rank == 0:
        print(json.dumps(summary.record()))  # step, final_loss (null when no step ran, never NaN), export_dir
    return 0


def dry_run(cfg, world_size: int | None) -> int:
    """Check everything that can be checked without training (one line each, on stderr), then
    print the resolved configs as JSON on stdout; exit 2 if any check failed."""
    world = world_size or int(os.environ.get("WORLD_SIZE", cfg.world_size or 1))
    # stdout carries only the JSON. DeepSpeed's logger writes to the stdout it finds when first
    # imported, so the import (and every check) happens with stdout pointing at stderr.
    with contextlib.redirect_stdout(sys.stderr):
        import torch

        from engine.dry_run import dry_run as check_everything

        checks, resolved = check_everything(cfg, world, on_cuda=torch.cuda.is_available(), base_dir=REPO_ROOT)
    for check in checks:
        print(check.line(), file=sys.stderr)
    failed = [c for c in checks if c.status == "error"]
    if failed:
        print(f"dry run: {len(failed)} of {len(checks)} checks failed", file=sys.stderr)
        return 2
    print(json.dumps(resolved, indent=2, ensure_ascii=False, default=str))
    print(f"dry run: all {len(checks)} checks passed", file=sys.stderr)
    return 0


def _shutdown(clean: bool) -> None:
    """Leave the process group. After an error other ranks may never arrive: no barrier then."""
    import torch.distributed as dist

    if dist.is_initialized():
        if clean:
            dist.barrier()
            from engine.jit_ops import remove_shm_buffer  # late, like every engine import here

            remove_shm_buffer(dist.get_rank())
        dist.destroy_process_group()


if __name__ == "__main__":
    from engine import signals  # light: no torch

    # Before the heavy imports: a SIGUSR1 (SLURM's time-limit warning) during start-up must request
    # a stop, not kill the process by Python's default action. Only here, not at import: spawned
    # data workers import this module and must keep the default handlers.
    signals.install()
    sys.exit(main())
