"""SFT rules of thumb, as warnings that say why. They never change the config: users may know better.

- SFT lr is usually ~10% of the pretraining lr: SFT teaches format and behaviour on little data,
  and a pretraining-sized lr overwrites what the base model knows (catastrophic forgetting).
- SFT needs few warmup steps: the model is already trained, there is no early instability to tame.
- Fewer epochs the more data there is: 2-3 epochs over a few thousand samples, 1 over a million;
  more epochs memorise the answers (rising eval loss) instead of generalising.
"""

from __future__ import annotations

from engine.config import RunConfig

PRETRAINED_SFT_LR_CEILING = 1e-4
MAX_SFT_WARMUP_SHARE = 0.1
MAX_SFT_REPEAT = 3.0


def check_rules_of_thumb(cfg: RunConfig) -> list[str]:
    t = cfg.train
    warnings = []
    if t.kind != "sft":
        return warnings
    if t.pretrain_lr is not None and t.lr > 0.3 * t.pretrain_lr:
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
        warnings.append(
            f"{cfg.warmup_steps} warmup steps are {cfg.warmup_steps / t.max_steps:.0%} of the run; SFT starts "
            "from a trained model and needs only a few percent"
        )
    for i, s in enumerate(cfg.data.sources):
        if s.repeat is not None and s.repeat > MAX_SFT_REPEAT:
            warnings.append(
                f"data.sources[{i}].repeat={s.repeat:g}: more than {MAX_SFT_REPEAT:g} epochs over SFT data "
                "tends to memorise answers; prefer more data or fewer epochs (the more data, the fewer)"
            )
    return warnings
