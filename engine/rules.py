"""SFT rules of thumb, as warnings that say why. They never change the config: users may know better.

- SFT lr is usually ~10% of the pretraining lr: SFT teaches format and behaviour on little data,
  and a pretraining-sized lr overwrites what the base model knows (catastrophic forgetting).
- SFT needs few warmup steps: the model is already trained, there is no early instability to tame.
  A model trained from scratch needs some warmup, but a few percent of the steps is enough there too.
- Fewer epochs the more data there is: 2-3 epochs over a few thousand samples, 1 over a million;
  more epochs memorise the answers (rising eval loss) instead of generalising.
- LoRA trains small adapters whose update starts at zero: it wants a higher lr than full SFT
  (typically 1e-4..3e-4, the ratio to the pretraining lr does not apply), and a trained base: on
  random weights the frozen base has nothing to adapt.
- Across stages (engine/stages.py): continued pretraining trains on every token, SFT only on
  answers; an SFT stage after a cpt stage uses ~10% of its lr; a later SFT stage (domain) should
  not use a higher lr than the SFT stage before it (general), or it overwrites the general skills;
  and a cpt stage after an SFT stage erodes the instruction following learned there.
"""

from __future__ import annotations

from typing import Sequence

from engine.config import RunConfig, Stage

PRETRAINED_SFT_LR_CEILING = 1e-4
MAX_SFT_WARMUP_SHARE = 0.1
LORA_LR_RANGE = (2e-5, 1e-3)
"""LoRA lrs outside this range rarely work: below, adapters barely move; above, training diverges."""
MAX_SFT_REPEAT = 3.0
SFT_EPOCH_LIMITS = ((10_000, 3.0), (100_000, 2.0))
"""(source size below which, epochs allowed): the more samples, the fewer passes; 1 beyond."""
MAX_CPT_EPOCHS = 4.0
"""Repeating pretraining text beyond ~4 epochs adds little and starts to overfit (Muennighoff et
al., 2023, "Scaling Data-Constrained Language Models")."""


def check_rules_of_thumb(cfg: RunConfig) -> list[str]:
    t = cfg.train
    warnings = []
    if t.kind != "sft":
        return warnings
    if cfg.model.lora.enabled:
        low, high = LORA_LR_RANGE
        if not low <= t.lr <= high:
            warnings.append(f"train.lr={t.lr:g} with LoRA (model.lora.r={cfg.model.lora.r}): adapters usually train "
                            f"at 1e-4..3e-4 ({'barely moves' if t.lr < low else 'tends to diverge'} at this lr)")
        if not cfg.model.path:
            warnings.append("model.lora.r > 0 on a model trained from scratch (model.path is empty): the frozen base "
                            "is random weights; train it in full first (a stage), then LoRA on its export")
    elif t.pretrain_lr is not None and t.lr > 0.3 * t.pretrain_lr:
        warnings.append(
            f"train.lr={t.lr:g} is {t.lr / t.pretrain_lr:.0%} of train.pretrain_lr={t.pretrain_lr:g}; SFT "
            "usually uses ~10%: a pretraining-sized lr overwrites what the base model knows"
        )
    elif t.pretrain_lr is None and cfg.model.path and t.lr > PRETRAINED_SFT_LR_CEILING:
        warnings.append(
            f"train.lr={t.lr:g} is high for SFT of a pretrained model (typical 1e-5..5e-5, ~10% of the "
            "pretraining lr); set train.pretrain_lr to have it checked against the real figure"
        )
    if cfg.warmup_steps > MAX_SFT_WARMUP_SHARE * t.max_steps:
        share = f"{cfg.warmup_steps} warmup steps are {cfg.warmup_steps / t.max_steps:.0%} of the run"
        if cfg.model.path:
            why = "SFT starts from a trained model and needs only a few percent"
        else:
            why = ("this model starts from random weights (model.path is empty); a few percent of the steps "
                   "tame its early instability, a longer warmup only delays learning")
        warnings.append(f"{share}; {why}")
    for i, s in enumerate(cfg.data.sources):
        if s.repeat is not None and s.repeat > MAX_SFT_REPEAT:
            warnings.append(
                f"data.sources[{i}].repeat={s.repeat:g}: more than {MAX_SFT_REPEAT:g} epochs over SFT data "
                "tends to memorise answers; prefer more data or fewer epochs (the more data, the fewer)"
            )
    return warnings


def sft_epoch_limit(size: int) -> float:
    for below, limit in SFT_EPOCH_LIMITS:
        if size < below:
            return limit
    return 1.0


def check_epochs(kind: str, names: Sequence[str], sizes: Sequence[int], quotas: Sequence[int]) -> list[str]:
    """Epochs each source gets in the planned run (its quota / its size) against the rule for its size."""
    warnings = []
    for name, size, quota in zip(names, sizes, quotas):
        if not size:
            continue
        epochs = quota / size
        limit = MAX_CPT_EPOCHS if kind == "cpt" else sft_epoch_limit(size)
        if epochs > limit:
            why = ("repeating pretraining text this often adds little and overfits" if kind == "cpt" else
                   f"with {size} samples ~{limit:g} epochs is the usual ceiling; more memorises the answers")
            warnings.append(f"source {name!r} is drawn {epochs:.1f} times over (train.max_steps, its "
                            f"proportion/repeat): {why}; watch its eval loss")
    return warnings


def check_stage_rules(stages: Sequence["Stage"]) -> list[str]:
    """Rules that involve more than one stage, or a stage's kind and its masking."""
    warnings = []
    for i, stage in enumerate(stages):
        t, train_on, label = stage.cfg.train, stage.cfg.data.train_on, f"stage {stage.name!r}"
        if t.kind == "cpt" and train_on != "everything":
            warnings.append(f"{label} is continued pretraining but data.train_on={train_on}: pretraining "
                            "learns from every token; set data.train_on=everything")
        if t.kind == "sft" and train_on == "everything":
            warnings.append(f"{label} is SFT with data.train_on=everything: it learns to write the user's "
                            "turns too; all_assistant trains only the answers")
        for source in stage.cfg.data.sources:
            if t.kind == "sft" and source.train_on == "everything" and train_on != "everything":
                warnings.append(f"{label} is SFT but source {source.name!r} sets train_on=everything: its "
                                "user turns train too; all_assistant trains only the answers")
        earlier = stages[:i]
        if t.kind == "cpt" and any(s.cfg.train.kind == "sft" for s in earlier):
            warnings.append(f"{label}: continued pretraining after an SFT stage erodes the instruction "
                            "following learned there; pretrain first, or mix SFT data into it (replay)")
        last_sft = next((s for s in reversed(earlier) if s.cfg.train.kind == "sft"), None)
        if t.kind == "sft" and last_sft is not None and t.lr > last_sft.cfg.train.lr * 1.001:
            warnings.append(f"{label}: lr {t.lr:g} is above the lr {last_sft.cfg.train.lr:g} of the SFT stage "
                            f"{last_sft.name!r} before it; a later, narrower SFT at a higher lr overwrites "
                            "the general skills (use the same or lower)")
    return warnings
