"""May this config resume that checkpoint? Compare the resolved run configs key by key.

A checkpoint stores the resolved run config it was trained with (run_config.json). Resuming with a
config that changes what the run *means* would silently produce a model nobody asked for, so it is
refused with every differing key listed:

  model architecture and precision, the tokenizer, everything that decides which tokens are trained
  on (data sources, template, masking, seq_len, truncation, packing, data seed), the global batch
  size, the training seed and kind.

Everything else is benign and only reported: logging, checkpoint cadence, run_dir, the lr and the
optimizer hyper-parameters (a deliberate mid-run change), the DeepSpeed template (another ZeRO
stage loads through the universal format), data.prepared_dir / num_proc / log_sample_ids.

train.max_steps is allowed here; whether the data schedule survives the change is decided by the
data stream, whose state fingerprints the per-source quotas derived from the run length
(data_pipeline/schedule/stream.py): a schedule that would repeat or skip samples is refused there, naming
the changed inputs. When it is allowed, the cosine lr schedule stretches to the new max_steps.
"""

from __future__ import annotations

from typing import Any

from engine.config import ConfigError, RunConfig, to_dict

ABSENT = "<absent>"

# A changed key is refused when it equals one of these or lies below one ("model.from_scratch" covers
# "model.from_scratch.hidden_size"; "data.sources" covers "data.sources[0].path").
MEANINGFUL_KEYS = (
    "model.path", "model.from_scratch", "model.dtype", "model.lora",
    "tokenizer",
    "data.sources", "data.template", "data.train_on", "data.seq_len", "data.truncation", "data.on_error",
    "data.packing", "data.seed", "data.dedup",
    "train.global_batch_size", "train.seed", "train.kind",
)


class ResumeConfigError(ConfigError):
    """The run config changes the meaning of the run being resumed."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': [1, {'c': 2}]}} -> {'a.b[0]': 1, 'a.b[1].c': 2}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        out = {f"{prefix}.len": len(tree)}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


def _is_meaningful(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in MEANINGFUL_KEYS)


def config_differences(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: key -> (saved, now). Missing keys read as <absent>."""
    a, b = flatten(saved), flatten(now)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, ABSENT) != b.get(k, ABSENT)}


def check_resume_config(saved: dict, now: dict, *, checkpoint: str) -> list[str]:
    """Raise ResumeConfigError on a meaningful change; return the benign changes, one line each."""
    diffs = config_differences(saved, now)
    defaults = flatten(to_dict(RunConfig()))
    # A key newer than the checkpoint reads <absent> there; at its default it changes nothing.
    refused = [k for k in diffs if _is_meaningful(k) and not (diffs[k][0] == ABSENT and diffs[k][1] == defaults.get(k))]
    lines = {k: f"{k}: checkpoint {diffs[k][0]!r} -> now {diffs[k][1]!r}" for k in diffs}
    if refused:
        raise ResumeConfigError(
            f"{checkpoint}/run_config.json: cannot resume, the config changes the run's meaning:\n  "
            + "\n  ".join(lines[k] for k in refused)
            + "\nRestore these keys, start a new run_dir, or set checkpoint.resume=none to start over."
        )
    return [lines[k] for k in diffs]
