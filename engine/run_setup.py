"""Building a run's parts before its first step: the ranks, the tokenizer, the resume source and
the DeepSpeed engine (the data is engine/trainer.py's setup, the model engine/model.py's)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from data_pipeline.ingest.corpus import iter_texts
from data_pipeline.render.tokenizer import is_complete_tokenizer_dir, load_tokenizer, train_bpe_tokenizer
from engine.checkpointing import checkpoint, reshard
from engine.config import RunConfig, to_dict
from engine.ds_config import build_ds_config
from engine.jit_ops import build_notices, optimizer_ops
from engine.preflight import load_run_tokenizer
from engine.checkpointing.run_compat import check_resume_config
from engine.schedule import warmup_cosine


@dataclass
class Ranks:
    """This process's place in the job (launcher/dist_env.py discovers it)."""

    rank: int
    world_size: int
    local_rank: int


def is_main(r: Ranks) -> bool:
    return r.rank == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def setup_tokenizer(cfg: RunConfig, run_dir: Path, ranks: Ranks):
    """The model's tokenizer, a given directory, or (from scratch) one trained on the run's text."""
    if cfg.tokenizer.path or cfg.model.path:
        return load_run_tokenizer(cfg)  # a ConfigError naming the key when it cannot load
    tok_dir = run_dir / "tokenizer"
    if is_main(ranks) and not is_complete_tokenizer_dir(tok_dir):
        texts = iter_texts(cfg.data.sources, cache_dir=run_dir / "raw")
        train_bpe_tokenizer(texts, cfg.tokenizer.vocab_size, tok_dir, cjk_char_level=cfg.tokenizer.cjk_char_level)
    barrier()
    return load_tokenizer(tok_dir)


def setup_engine(cfg: RunConfig, model, ranks: Ranks, repo_root: Path,
                 resume: Optional[reshard.ResumeSource] = None):
    import deepspeed

    on_cuda = torch.cuda.is_available()
    ds_config = build_ds_config(cfg, ranks.world_size, on_cuda=on_cuda, base_dir=repo_root)
    ds_config = reshard.ds_config_for(resume, ds_config)  # load_universal after a world-size change
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = None
    if "scheduler" not in ds_config:  # ours, unless train.use_deepspeed_scheduler kept the template's
        scheduler = functools.partial(warmup_cosine, warmup=cfg.warmup_steps, total=cfg.train.max_steps,
                                      min_ratio=cfg.train.min_lr_ratio)
    if ranks.local_rank == 0:
        for notice in build_notices(optimizer_ops(ds_config)):
            print(notice, flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                           lr_scheduler=scheduler)
    return engine, ds_config


def prepare_resume(ckpt: Path, cfg: RunConfig, ranks: Ranks) -> reshard.ResumeSource:
    """Refuse an incompatible config; convert to the universal format if the world size changed."""
    saved_config = checkpoint.read_run_config(ckpt)
    if saved_config is not None:
        for change in check_resume_config(saved_config, to_dict(cfg), checkpoint=str(ckpt)):
            if is_main(ranks):
                print(f"resume: config changed (allowed): {change}", flush=True)
    source = reshard.plan_resume(ckpt, ranks.world_size)
    if is_main(ranks):
        print(source.describe(), flush=True)
        if source.universal:
            reshard.convert_to_universal(ckpt)
    barrier()
    return source
