"""`launcher/run.py --dry-run`: every check that needs no training, one line each.

For the run (or each stage of a staged run): the DeepSpeed config as DeepSpeed itself parses it,
the resume checkpoint, the model directory, each local source (a few records read and parsed in
the declared format), the tokenizer, the chat template rendering a parsed sample, and data.seq_len
against the model's positions. Remote (fsspec URL) sources are not read. A run that trains its own
tokenizer is checked with one trained on the sampled records. A later stage starts from the
previous stage's export, which does not exist before the run: its model and tokenizer checks use
the model the previous stage was checked with.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from data_pipeline.ingest.corpus import iter_texts
from data_pipeline.ingest.demo_data import BUILTIN_PREFIX, materialize_builtin
from data_pipeline.errors import DataError
from data_pipeline.ingest.formats import Conversation, detect_format, parse_record
from data_pipeline.ingest.readers import decode_payload, iter_records, list_files
from data_pipeline.spec import SourceSpec
from data_pipeline.render.templates import build_template, source_template_spec
from data_pipeline.render.tokenizer import TokenizerError, is_complete_tokenizer_dir, load_tokenizer, train_bpe_tokenizer
from engine.checkpointing.checkpoint import find_latest, read_trainer_state, resolve_resume
from engine.config import ConfigError, RunConfig, expand_stages, to_dict
from engine.ds_config import build_ds_config, grad_accum_steps
from engine.lora import adapter_plan
from engine.model import model_skeleton
from engine.nan_policy import check_nan_policy_config
from engine.preflight import check_model_dir, check_seq_len, check_sequence_parallel, load_run_tokenizer
from engine.rules import check_stage_rules

SAMPLE_RECORDS = 8
"""Records read from each source: enough to catch a wrong format or path, quick on any file."""
CHECK_ERRORS = (ConfigError, DataError, TokenizerError, OSError)


@dataclass(frozen=True)
class Check:
    status: str
    """ok, error or skip."""
    key: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.key}: {self.detail}"


class _Checks:
    """Collects the results of one run's (or stage's) checks, keys prefixed with the stage."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.results: list[Check] = []

    def add(self, status: str, key: str, detail: str) -> None:
        self.results.append(Check(status, f"{self.prefix}{key}", detail))

    def attempt(self, key: str, check: Callable[[], str]) -> bool:
        """Run one check; its return value is the ok detail, a raised error the error line."""
        try:
            self.add("ok", key, check())
            return True
        except CHECK_ERRORS as e:
            message = str(e)
            self.add("error", key, message[len(key) + 2:] if message.startswith(f"{key}: ") else message)
            return False


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _sample_source(spec: SourceSpec, on_error: str, cache_dir: Path) -> tuple[str, list]:
    """Read the first records of a local source and parse them as its declared format."""
    path = spec.path
    if path.startswith(BUILTIN_PREFIX):
        try:
            path = materialize_builtin(path, cache_dir)
        except ValueError as e:  # an unknown builtin set, or more samples than it has
            raise DataError(str(e), file=spec.path, reason="bad_builtin") from None
    files = list_files(str(path))
    fmt, samples, rejected = spec.format, [], []
    for raw in itertools.islice(iter_records(files), SAMPLE_RECORDS):
        try:
            payload = decode_payload(raw)
            if fmt == "auto":
                fmt = detect_format(payload, spec.text_field)
            samples.append(parse_record(payload, fmt, spec.text_field))
        except DataError as e:
            located = e if e.file else e.located(raw.file, raw.line)
            if on_error == "strict":
                raise located from None
            rejected.append(located)
    if not samples:
        if rejected:
            raise rejected[0]
        raise DataError("the source holds no records", file=str(path), reason="empty_source")
    detail = f"{len(samples)} of the first {len(samples) + len(rejected)} records parse as {fmt} ({len(files)} file(s))"
    if rejected:
        detail += f"; {len(rejected)} would be skipped (data.on_error=skip), first: {rejected[0]}"
    return detail, samples


def _check_sources(checks: _Checks, cfg: RunConfig, cache_dir: Path) -> list:
    samples: list = []
    for section in ("sources", "eval_sources"):
        for i, spec in enumerate(getattr(cfg.data, section)):
            key = f"data.{section}[{i}].path"
            if _is_remote(spec.path):
                checks.add("skip", key, f"{spec.path}: a remote source is not read in a dry run")
                continue
            try:
                detail, parsed = _sample_source(spec, cfg.data.on_error, cache_dir)
            except CHECK_ERRORS as e:
                checks.add("error", key, f"source {spec.name!r}: {e}")
                continue
            checks.add("ok", key, f"source {spec.name!r}: {detail}")
            samples += parsed
    return samples


def _trained_tokenizer(cfg: RunConfig, cache_dir: Path):
    """From scratch: the run's tokenizer if it exists, else a stand-in trained on sampled records."""
    existing = Path(cfg.run_dir) / "tokenizer"
    if is_complete_tokenizer_dir(existing):
        return load_tokenizer(existing), f"{existing} (trained by an earlier launch)"
    local = [s for s in cfg.data.sources if not _is_remote(s.path)]
    texts = list(iter_texts(local, cache_dir=cache_dir, max_records=SAMPLE_RECORDS))
    if not texts:
        return None, "trained from the data at the start of the run (no local text to try it on)"
    out = cache_dir / f"tokenizer-{abs(hash(cfg.run_dir))}"
    tokenizer = train_bpe_tokenizer(texts, cfg.tokenizer.vocab_size, out, cjk_char_level=cfg.tokenizer.cjk_char_level)
    return tokenizer, ("trained from the data at the start of the run; checked with one trained on "
                       f"{len(texts)} sampled records")


def _check_tokenizer_and_template(checks: _Checks, cfg: RunConfig, samples: list, cache_dir: Path) -> None:
    tokenizer_key = "tokenizer.path" if cfg.tokenizer.path else "model.path" if cfg.model.path else "tokenizer"
    holder: dict = {}

    def load() -> str:
        if cfg.tokenizer.path or cfg.model.path:
            holder["tok"] = load_run_tokenizer(cfg)
            return f"loads ({len(holder['tok'])} tokens)"
        holder["tok"], how = _trained_tokenizer(cfg, cache_dir)
        return how

    if not checks.attempt(tokenizer_key, load) or holder.get("tok") is None:
        checks.add("skip", "data.template", "no tokenizer to render with")
        return
    tokenizer = holder["tok"]

    def render() -> str:
        # every source's template (its template_kwargs on top of data.template_kwargs) must build
        specs = [source_template_spec(source, cfg.data, tokenizer) for source in cfg.data.sources]
        templates = [build_template(spec) for spec in specs]
        spec, template = specs[0], templates[0]
        conversation = next((s for s in samples if isinstance(s, Conversation)), None)
        if conversation is None:
            return f"{spec.name}: built (no conversation among the sampled records to render)"
        rendered = template.render(conversation)
        return (f"{spec.name}: renders a sample ({len(rendered.text)} characters, "
                f"{len(rendered.assistant_spans)} trained answer span(s))")

    checks.attempt("data.template", render)


def _check_deepspeed(checks: _Checks, cfg: RunConfig, world: int, on_cuda: bool, base_dir: Path) -> Optional[dict]:
    holder: dict = {}

    def build() -> str:
        holder["ds"] = ds = build_ds_config(cfg, world, on_cuda=on_cuda, base_dir=base_dir)
        stage = (ds.get("zero_optimization") or {}).get("stage", 0)
        return (f"{cfg.train.deepspeed}: DeepSpeed accepts it (ZeRO-{stage}, gradient accumulation "
                f"{grad_accum_steps(cfg, world)} at world size {world})")

    checks.attempt("train.deepspeed", build)
    if "ds" in holder:
        checks.attempt("train.nan_policy", lambda: _nan_policy(cfg, holder["ds"]))
    return holder.get("ds")


def _nan_policy(cfg: RunConfig, ds_config: dict) -> str:
    check_nan_policy_config(cfg.train.nan_policy, ds_config, cfg.model.dtype)
    return f"{cfg.train.nan_policy}: works with this ZeRO stage and dtype"


def _check_resume(checks: _Checks, cfg: RunConfig) -> None:
    mode = cfg.checkpoint.resume

    def resolve() -> str:
        if mode == "none":
            return "none: starts from step 0"
        ckpt = find_latest(Path(cfg.run_dir) / "checkpoints") if mode == "auto" else resolve_resume(mode)
        if ckpt is None:
            return "auto: no checkpoint yet; starts from step 0"
        step = read_trainer_state(ckpt)["step"]
        end = cfg.train.max_steps if cfg.train.stop_at_step is None else cfg.train.stop_at_step
        finished = "; the run is already at its end, a launch does nothing" if step >= end else ""
        return f"{mode}: resumes {ckpt} (step {step}){finished}"

    checks.attempt("checkpoint.resume", resolve)


def _model_dir(cfg: RunConfig) -> str:
    check_model_dir(cfg)
    return f"{cfg.model.path}: a HF model directory"


def check_run(cfg: RunConfig, world: int, *, on_cuda: bool, base_dir: Path, cache_dir: Path, prefix: str = "",
              model_from: Optional[RunConfig] = None) -> tuple[list[Check], Optional[dict]]:
    """Every dry-run check of one run config; returns the results and the DeepSpeed config.

    model_from: a config whose model and tokenizer stand in for this one's (a later stage whose
    model.path is the previous stage's export, which the run has not written yet)."""
    checks = _Checks(prefix)
    ds_config = _check_deepspeed(checks, cfg, world, on_cuda, base_dir)
    _check_resume(checks, cfg)
    model_cfg = cfg if model_from is None else dataclasses.replace(cfg, model=model_from.model,
                                                                   tokenizer=model_from.tokenizer)
    if model_from is not None:
        checks.add("skip", "model.path", f"{cfg.model.path}: written by the previous stage; its model and "
                                         "tokenizer are checked as that stage's")
    elif cfg.model.path:
        checks.attempt("model.path", lambda: _model_dir(cfg))
    if cfg.train.sequence_parallel > 1:
        checks.attempt("train.sequence_parallel", lambda: check_sequence_parallel(model_cfg, world))
    if cfg.model.lora.enabled:
        checks.attempt("model.lora", lambda: adapter_plan(model_skeleton(model_cfg.model, model_cfg.tokenizer.vocab_size),
                                                          cfg.model.lora))
    samples = _check_sources(checks, cfg, cache_dir)
    _check_tokenizer_and_template(checks, model_cfg, samples, cache_dir)
    checks.attempt("data.seq_len", lambda: check_seq_len(model_cfg) or "the model's positions are not stated")
    return checks.results, ds_config


def dry_run(cfg: RunConfig, world: int, *, on_cuda: bool, base_dir: Path) -> tuple[list[Check], dict]:
    """All checks of the run or each of its stages, and the resolved configs to print."""
    with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
        cache_dir = Path(tmp)
        if not cfg.stages:
            results, ds_config = check_run(cfg, world, on_cuda=on_cuda, base_dir=base_dir, cache_dir=cache_dir)
            return results, {"run_config": to_dict(cfg), "deepspeed_config": ds_config, "world_size": world}
        stages = expand_stages(cfg)
        results, resolved_stages = [], []
        model_from: Optional[RunConfig] = None
        for stage in stages:
            starts_from_export = stage.index > 0 and stage.cfg.model.path == str(stages[stage.index - 1].export_dir)
            if starts_from_export and not Path(stage.cfg.model.path, "config.json").is_file():
                model_from = model_from or stages[stage.index - 1].cfg
            else:
                model_from = None
            stage_results, ds_config = check_run(stage.cfg, world, on_cuda=on_cuda, base_dir=base_dir,
                                                 cache_dir=cache_dir, prefix=f"stages[{stage.index}] ({stage.name}) ",
                                                 model_from=model_from)
            results += stage_results
            resolved_stages.append({"name": stage.name, "run_dir": str(stage.run_dir),
                                    "defaults_filled": list(stage.notes), "run_config": to_dict(stage.cfg),
                                    "deepspeed_config": ds_config})
        return results, {"run_config": to_dict(cfg), "stages": resolved_stages,
                         "warnings": check_stage_rules(stages), "world_size": world}
