"""The training run: setup -> train -> cleanup, the step loop readable top to bottom.

One optimizer step:
  1. the data stream hands this rank its micro-batches of the next global batch;
  2. one all-reduce sums the response-token count of the whole global batch (and a stop flag);
  3. each micro-batch (data_pipeline/batch.MicroBatch) goes through the engine's forward:
     CausalLMWithMaskedLoss runs the model body, then its lm_head, a FusedLMHead
     (engine/fused_head.py), computes the per-source response-token CE sums in the fused kernel;
     the loss handed to backward is sum / global count (engine/loss.py), so the step's gradient is
     exactly that of the global token mean, whatever the split;
  4. DeepSpeed's backward/step; per-source sums are all-reduced once for logging (step_totals.py).

What a checkpoint holds for resume is engine/state.TrainerState; what a run returns is RunSummary.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from data_pipeline.schedule.accounting import consumed_sample_ids, source_counts
from data_pipeline.schedule.batch import MicroBatch
from data_pipeline.selection.dedup import deduplicate
from data_pipeline.schedule.eval_batches import EvalSet, eval_batches, split_training_sources
from data_pipeline.store.fingerprint import eval_overlap_warnings
from data_pipeline.schedule.labels import count_targets
from data_pipeline.prepare import prepare_sources
from data_pipeline.store.shards import open_prepared
from data_pipeline.schedule.stream import SFTStream, StreamStateError
from engine import signals
from engine.checkpointing import checkpoint
from engine.config import RunConfig, expand_stages, to_dict
from engine.export import export_run
from engine.loss import CausalLMWithMaskedLoss, scaled_for_deepspeed
from engine.lora import apply_lora, parameter_counts
from engine.model import DTYPES, build_model
from engine.segment_attention import use_segment_attention
from engine.sequence_parallel import SequenceParallelLayout, UlyssesAttention, activations_on_host
from engine.tiled_mlp import install_tiled_mlp
from engine.checkpointing.consumption import SourceConsumption
from engine.evaluate import evaluate
from engine.fused_layers import install_fused_layers
from engine.finished import finished_message, finished_summary, write_summary
from engine.monitor import (Monitor, attention_context, flops_per_token, matmul_parameters, memory_scalars, mfu,
                            quiet_library_logging)
from engine.nan_policy import step_was_skipped
from engine.preflight import check_before_data, check_stages_before_data
from engine.rules import check_epochs, check_rules_of_thumb, check_stage_rules
from engine.checkpointing.run_compat import ResumeConfigError
from engine.run_setup import Ranks, barrier, is_main, prepare_resume, setup_engine, setup_tokenizer
from engine.samples import before_after_report, generate_answers, samples_markdown
from engine.checkpointing.save_schedule import SaveSchedule
from engine.stages import run_stages
from engine.state import RunSummary, TrainerState
from engine.step_totals import StepTotals, all_reduce_ints, grad_norm_if_not_tracked

PREEMPTED = "PREEMPTED"


class StopRequested(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# setup


def setup_data(cfg: RunConfig, tokenizer, run_dir: Path, ranks: Ranks):
    out_dir = Path(cfg.data.prepared_dir) if cfg.data.prepared_dir else run_dir / "data"
    if is_main(ranks):
        # Rank 0 tokenizes (idempotent: reused when inputs, tokenizer and settings match); the
        # others wait and then memory-map the shards. run_dir must be on storage all nodes see.
        prepare_sources(cfg.data, tokenizer, out_dir, show_progress=True)
    barrier()
    return deduplicated(open_prepared(cfg.data, tokenizer, out_dir), cfg.data.dedup, "data.sources", ranks)


def deduplicated(sources: list, dedup: str, key: str, ranks: Ranks) -> list:
    """With data.dedup=exact, each source without its exact duplicates (every rank computes the
    same views from the same fingerprints; rank 0 says what was dropped)."""
    if dedup != "exact":
        return sources
    out = []
    for i, source in enumerate(sources):
        view, dropped = deduplicate(source, f"{key}[{i}]")
        if dropped and is_main(ranks):
            print(f"dedup: {source.name}: {dropped} exact duplicates dropped, {len(view)} of {len(source)} "
                  "samples kept", flush=True)
        out.append(view)
    return out


def setup_eval_data(cfg: RunConfig, tokenizer, run_dir: Path, ranks: Ranks) -> list[EvalSet]:
    """data.eval_sources, prepared like training sources (same tokenizer, template, masking)."""
    if not cfg.data.eval_sources:
        return []
    eval_cfg = dataclasses.replace(cfg.data, sources=cfg.data.eval_sources, eval_sources=[])
    out_dir = Path(cfg.data.prepared_dir) if cfg.data.prepared_dir else run_dir / "data"
    if is_main(ranks):
        prepare_sources(eval_cfg, tokenizer, out_dir, show_progress=True)
    barrier()
    opened = deduplicated(open_prepared(eval_cfg, tokenizer, out_dir), cfg.data.dedup, "data.eval_sources", ranks)
    return [EvalSet(s.name, s) for s in opened]


# ----------------------------------------------------------------------------------------------
# the run


class Trainer:
    def __init__(self, cfg: RunConfig, ranks: Ranks, repo_root: Path):
        self.cfg = cfg
        self.ranks = ranks
        self.repo_root = repo_root
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # (step, eval loss) of the latest evaluation; a checkpoint saved at that step records the
        # loss as its metric for checkpoint.keep_best. Evaluate before saving at the same step.
        self.last_eval: Optional[tuple[int, float]] = None

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, ranks = self.cfg, self.ranks
        quiet_library_logging(ranks.rank, cfg.log.deepspeed_log_level)
        # Paths, the DeepSpeed config and seq_len are checked before minutes of data preparation.
        check_before_data(cfg, ranks.world_size, on_cuda=torch.cuda.is_available(), base_dir=self.repo_root)
        if is_main(ranks):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for warning in check_rules_of_thumb(cfg):
                print(f"warning: {warning}", flush=True)
        barrier()
        self.tokenizer = setup_tokenizer(cfg, self.run_dir, ranks)
        self.start_step = 0
        resume_from = self._resume_checkpoint()
        resume_source, saved = None, None
        if resume_from is not None:
            saved = TrainerState.read(resume_from)
            self.start_step = saved.step
            resume_source = prepare_resume(resume_from, cfg, ranks)
        self.monitor = Monitor(self.run_dir, rank=ranks.rank, enabled_tb=cfg.log.tensorboard,
                               total_steps=cfg.train.max_steps, start_step=self.start_step,
                               peak_tflops=cfg.log.peak_tflops, world_size=ranks.world_size)
        sources = setup_data(cfg, self.tokenizer, self.run_dir, ranks)
        # Held-out samples leave the training sources here, before the schedule sees them.
        sources, held_out = split_training_sources(sources, cfg.data.sources)
        self.eval_sets = held_out + setup_eval_data(cfg, self.tokenizer, self.run_dir, ranks)
        if is_main(ranks):
            for warning in eval_overlap_warnings(sources, [(e.name, e.source) for e in self.eval_sets]):
                print(f"warning: {warning}", flush=True)
        model = build_model(cfg.model, self.tokenizer, seed=cfg.train.seed)
        fused = install_fused_layers(model, cfg.model.fused_layers, on_cuda=torch.cuda.is_available(),
                                     dtype=cfg.model.dtype, say=self.monitor.print)
        self.monitor.print(fused.describe())
        wrapped = CausalLMWithMaskedLoss(model, num_sources=len(sources), backend=cfg.train.loss_backend,
                                         strategy=cfg.train.loss_strategy)
        if cfg.model.lora.enabled:  # after the fused head is in place: PEFT wraps the final modules
            wrapped.lm = apply_lora(wrapped.lm, cfg.model.lora, base_path=cfg.model.path, seed=cfg.train.seed)
        if cfg.train.tiled_mlp:
            install_tiled_mlp(wrapped.lm, cfg.train.tiled_mlp)
        if cfg.model.last_layer_target_rows:  # last: it wraps whatever forwards the layer has now
            self.monitor.print(wrapped.last_layer.install(wrapped.lm).describe())
        self.n_trainable, self.n_params = parameter_counts(wrapped)
        self.sp = SequenceParallelLayout.of(ranks.rank, ranks.world_size, cfg.train.sequence_parallel)
        self.ulysses = UlyssesAttention(wrapped.lm, self.sp.size, cfg.train.micro_batch_size) if self.sp.enabled else None
        # Sequence-parallel rows stay rows (Ulysses cuts each one); its attention is segment-aware already.
        self.padding_free = cfg.data.padding_free and not self.sp.enabled
        if self.padding_free:
            use_segment_attention(model)
        self.engine, self.ds_config = setup_engine(cfg, wrapped, ranks, self.repo_root, resume_source)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.stream = SFTStream(
            sources, cfg.data.sources, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size, rank=self.sp.group, world_size=self.sp.groups,
            seed=cfg.data.seed, packing=cfg.data.packing, pad_id=self.tokenizer.pad_token_id,
            total_steps=cfg.train.max_steps, pad_multiple=self.sp.size, padding_free=self.padding_free,
            balance=cfg.data.balance_micro_batches,
        )
        self.source_names = [s.name for s in cfg.data.sources]
        self.consumption = SourceConsumption.from_quotas(self.source_names, self.stream.plan.quotas)
        if resume_from is not None:
            checkpoint.load(self.engine, resume_from, source=resume_source)  # weights, optimizer, lr, RNG
            try:
                self.stream.load_state_dict(saved.data)
            except StreamStateError as e:  # e.g. train.max_steps changed the per-source quotas
                raise ResumeConfigError(f"{resume_from}: {e}") from None
            self.consumption.load_state_dict(saved.consumption)
            self.monitor.print(f"resumed from {resume_from} at step {self.start_step}")
        hf = model.config
        self.flops_tok = flops_per_token(matmul_parameters(model), hf.num_hidden_layers, hf.hidden_size,
                                         attention_context([s.lengths for s in sources], cfg.data.seq_len))
        self.monitor.print(
            f"model: {self.n_params / 1e6:.2f}M parameters ({self.n_trainable / 1e6:.3f}M trainable, "
            f"{self.n_trainable / max(self.n_params, 1):.2%}), vocab {len(self.tokenizer)}, ZeRO-{self.zero_stage}, "
            f"{ranks.world_size} rank(s)"
            + (f" (sequence parallel {self.sp.size} x data parallel {self.sp.groups})" if self.sp.enabled else "")
            + f", grad accumulation {self.stream.grad_accum}, "
            f"{sum(len(s) for s in sources)} samples in {len(sources)} source(s)"
        )
        if is_main(ranks):
            for warning in check_epochs(cfg.train.kind, self.source_names, [len(s) for s in sources],
                                        self.stream.plan.quotas):
                print(f"warning: {warning}", flush=True)
        if self.start_step == 0:
            eval_tags = [f"eval/{e.name}/loss" for e in self.eval_sets] + (["eval/loss"] if self.eval_sets else [])
            self.monitor.log_config(to_dict(cfg), metric_tags=("train/loss", *eval_tags))
            self.monitor.log_model_size(self.n_trainable, self.n_params)
        self.save_schedule = SaveSchedule(cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes)
        self._install_signal_handlers()

    def _resume_checkpoint(self) -> Optional[Path]:
        return checkpoint.resume_checkpoint(self.cfg.checkpoint.resume, self.ckpt_root)

    def _install_signal_handlers(self) -> None:
        # SLURM sends SIGUSR1 before the time limit, schedulers SIGTERM before preemption: finish
        # the current step, save, and exit cleanly so that a requeued job resumes from here.
        # (launcher/run.py installs them first thing; this covers other entry points.)
        signals.install()

    # -- train ---------------------------------------------------------------------------------
    def train(self) -> RunSummary:
        cfg, engine, monitor = self.cfg, self.engine, self.monitor
        prompts = cfg.log.sample_prompts
        before = []
        if prompts and self.start_step == 0:
            before = generate_answers(engine, self.tokenizer, prompts, cfg.log.sample_max_new_tokens, self.zero_stage)
        step = self.start_step
        last_loss = float("nan")
        monitor.step_timer()
        end = cfg.train.max_steps if cfg.train.stop_at_step is None else cfg.train.stop_at_step
        while step < end:
            data_state = self.stream.state_dict()  # the position before this step's batch
            micro_batches = self.stream.next_step()
            # One all-reduce: the global target count, any rank's stop signal, rank 0's save clock.
            time_due = is_main(self.ranks) and self.save_schedule.time_due()
            stop_signal = signals.stop_requested() is not None
            # A sequence-parallel group shares its rows: its first rank counts them, once.
            counts_here = self.sp.rank == 0
            local = [sum(count_targets(mb.labels) for mb in micro_batches) if counts_here else 0,
                     int(stop_signal), int(time_due)]
            global_count, stop, save_due = all_reduce_ints(local)
            if stop:
                self._save(step, data_state)
                self._mark_preempted(step)
                raise StopRequested(f"stop signal received; checkpoint saved at step {step}")
            step += 1
            if cfg.data.log_sample_ids and counts_here:
                self._log_sample_ids(step, micro_batches)
            if global_count == 0:
                # Nothing trains in this global batch: no update at all (not a NaN, and no Adam
                # momentum step on zero gradients).
                monitor.print(f"step {step}: no response token in the global batch; step skipped")
                continue
            lr = engine.get_lr()[0]
            loss_sums = torch.zeros(len(self.source_names), dtype=torch.float64)
            target_counts = torch.zeros(len(self.source_names), dtype=torch.int64)
            own_grad_norm = None
            skipped_before = engine.skipped_steps
            for mb in micro_batches:
                if self.sp.enabled:  # this rank's cut of every row (shifted before the cut)
                    mb = mb.sequence_shard(self.sp.rank, self.sp.size)
                # CausalLMWithMaskedLoss.forward -> FusedLMHead.forward -> the fused kernel
                with activations_on_host(cfg.train.offload_activations):
                    mb_loss_sums, mb_counts = engine(**mb.to(engine.device).model_inputs())
                engine.backward(scaled_for_deepspeed(mb_loss_sums.sum(), global_count, self.ranks.world_size,
                                                     len(micro_batches)))
                if engine.is_gradient_accumulation_boundary():
                    own_grad_norm = grad_norm_if_not_tracked(engine)
                engine.step()
                loss_sums += mb_loss_sums.detach().double().cpu()
                target_counts += mb_counts.detach().cpu()
            counts = source_counts(micro_batches if counts_here else [], len(self.source_names))
            counts["response_tokens"] = target_counts.tolist()  # what the loss counted (after the shift)
            totals = StepTotals.all_reduced(loss_sums, counts)
            last_loss = totals.loss
            if step_was_skipped(cfg.train.nan_policy, step, last_loss, engine.skipped_steps > skipped_before,
                                loss_scaling=engine.fp16_enabled(),
                                describe_sources=lambda: totals.describe(self.source_names)):
                monitor.print(f"step {step}: non-finite loss or gradient norm; update skipped "
                              f"(train.nan_policy=skip), loss {last_loss}")
            self.consumption.add(totals.samples, totals.tokens, totals.response_tokens)
            self._log_step(step, totals, lr, own_grad_norm)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.max_steps:
                self._evaluate(step)  # before a save at this step: keep_best reads its loss
            if (save_due or self.save_schedule.step_due(step)) and step < cfg.train.max_steps:
                self._save(step)
            if cfg.log.sample_every and prompts and step % cfg.log.sample_every == 0:
                answers = generate_answers(engine, self.tokenizer, prompts, cfg.log.sample_max_new_tokens, self.zero_stage)
                monitor.log_text("samples", samples_markdown(prompts, answers), step)
        monitor.end_progress()
        if step == cfg.train.max_steps and (cfg.eval.at_end or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0)):
            self._evaluate(step)
        self._save(step)
        if step < cfg.train.max_steps:  # stop_at_step: this job's share is done, the run is not
            monitor.print(f"stopped at step {step} of {cfg.train.max_steps} (train.stop_at_step); "
                          "launch again to resume")
            return self._finish(RunSummary(step, last_loss, None, before=before))
        after = []
        if prompts:
            after = generate_answers(engine, self.tokenizer, prompts, cfg.log.sample_max_new_tokens, self.zero_stage)
            if before:
                monitor.print(before_after_report(prompts, before, after, cfg.log.sample_expected))
            monitor.log_text("samples", samples_markdown(prompts, after), step)
        export_dir = None
        if cfg.checkpoint.export_at_end:
            dtype = cfg.checkpoint.export_dtype if cfg.checkpoint.export_dtype != "auto" else cfg.model.dtype
            export_dir = export_run(engine.module.lm, self.tokenizer, self.run_dir, DTYPES[dtype],
                                    lora=cfg.model.lora.enabled, merged=cfg.checkpoint.export_merged, say=monitor.print)
        return self._finish(RunSummary(step, last_loss, str(export_dir) if export_dir else None,
                                       before=before, after=after))

    def _finish(self, summary: RunSummary) -> RunSummary:
        """The job's summary, also left in run_dir: a later launch of the finished run prints it."""
        summary = dataclasses.replace(summary, final_loss=summary.record()["final_loss"])  # None, never NaN
        if is_main(self.ranks):
            write_summary(self.run_dir, summary.record())
        return summary

    def _evaluate(self, step: int) -> None:
        """Token-weighted loss of every eval set (all ranks), logged as eval/<name>/loss."""
        if not self.eval_sets:
            return
        start = time.perf_counter()
        batches = eval_batches(self.eval_sets, rank=self.ranks.rank, world_size=self.ranks.world_size,
                               seq_len=self.cfg.data.seq_len,
                               micro_batch_size=self.cfg.eval.micro_batch_size or self.cfg.train.micro_batch_size,
                               pad_id=self.tokenizer.pad_token_id, mask_format=self.stream.mask_format,
                               padding_free=self.padding_free)
        results = evaluate(self.engine, batches)
        if "eval/loss" in results:
            self.last_eval = (step, results["eval/loss"])
        self.monitor.log_scalars(step, {**results, "perf/eval_seconds": time.perf_counter() - start})
        losses = [(e.name, results.get(f"eval/{e.name}/loss")) for e in self.eval_sets] + [("all", results.get("eval/loss"))]
        self.monitor.print(f"eval loss at step {step}: " + ", ".join(f"{n} {v:.4f}" for n, v in losses if v is not None))
        self.monitor.step_timer()  # evaluation time is not the next step's time

    def _log_step(self, step: int, totals: "StepTotals", lr: float, own_grad_norm: Optional[float]) -> None:
        dt = self.monitor.step_timer()
        if step % self.cfg.log.every_steps and step != self.cfg.train.max_steps:
            return
        tokens, response = sum(totals.tokens), sum(totals.response_tokens)
        scalars = {
            "train/loss": totals.loss,
            "train/lr": lr,
            "train/response_tokens": float(response),
            "perf/step_seconds": dt,
            "perf/tokens_per_s": tokens / dt,
            "perf/response_tokens_per_s": response / dt,
            "perf/samples_per_s": sum(totals.samples) / dt,
            **memory_scalars(),
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_grad_norm
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        util = mfu(tokens / dt / self.ranks.world_size, self.flops_tok, self.monitor.peak_tflops)
        if util is not None:
            scalars["perf/mfu"] = util
        scalars.update(totals.source_scalars(self.source_names))
        scalars.update(self.consumption.scalars())
        self.monitor.log_step(step, scalars)

    def _log_sample_ids(self, step: int, micro_batches: list[MicroBatch]) -> None:
        """Debug log: the (source, sample) ids this rank's data-parallel slice held, one JSON line per
        step (the first rank of a sequence-parallel group writes it for the group: "rank" and
        "world_size" are the data-parallel ones)."""
        folder = self.run_dir / "sample_ids"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "rank": self.sp.group, "world_size": self.sp.groups,
                  "ids": [list(x) for x in consumed_sample_ids(micro_batches)]}
        with open(folder / f"rank{self.sp.group}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, step: int, data_state: Optional[dict] = None) -> None:
        data_state = self.stream.state_dict() if data_state is None else data_state
        state = TrainerState(step=step, data=data_state, world_size=self.ranks.world_size,
                             consumption=self.consumption.state_dict())
        path = checkpoint.save(
            self.engine, self.ckpt_root, step, state.to_json(), keep_last=self.cfg.checkpoint.keep_last,
            keep_best=self.cfg.checkpoint.keep_best, metric=self._metric_at(step),
            run_config=to_dict(self.cfg), hf_model=self.engine.module.lm, tokenizer=self.tokenizer,
        )
        self.save_schedule.saved()
        self.monitor.print(f"saved checkpoint {path}")

    def _metric_at(self, step: int) -> Optional[float]:
        return self.last_eval[1] if self.last_eval is not None and self.last_eval[0] == step else None

    def _mark_preempted(self, step: int) -> None:
        if is_main(self.ranks):
            (self.run_dir / PREEMPTED).write_text(f"{step}\n")

    # -- cleanup -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if getattr(self, "ulysses", None) is not None:
            self.ulysses.restore()
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()


def run(cfg: RunConfig, ranks: Ranks, repo_root: Path) -> RunSummary:
    """Train the run, or each of its stages in turn (engine/stages.py)."""
    if cfg.stages:
        def say(text: str) -> None:
            if is_main(ranks):
                print(text, file=sys.stderr, flush=True)

        stages = expand_stages(cfg)
        check_stages_before_data(stages, ranks.world_size, on_cuda=torch.cuda.is_available(), base_dir=repo_root)
        for warning in check_stage_rules(stages):
            say(f"warning: {warning}")
        return run_stages(cfg, is_main=is_main(ranks), say=say,
                          run_one=lambda stage_cfg: run_single(stage_cfg, ranks, repo_root))
    return run_single(cfg, ranks, repo_root)


def run_single(cfg: RunConfig, ranks: Ranks, repo_root: Path) -> RunSummary:
    done = finished_summary(cfg)
    if done is not None:  # launched again after its end: no resume, eval, save or export
        if is_main(ranks):
            print(finished_message(cfg, done), flush=True)
        return RunSummary.from_record(done)
    trainer = Trainer(cfg, ranks, repo_root)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
