"""Checkpointing: what a run saves and how it comes back. checkpoint (save a step with the data
position, RNG and trainer state; find the newest complete one; resolve `checkpoint.resume`),
retention (which steps to delete: keep_last, keep_best), save_schedule (when to save: every N steps
or minutes, on a signal), reshard (resume on another world size through DeepSpeed's universal
checkpoint), run_compat (may this config resume that checkpoint), consumption (per-source counters
that travel with the checkpoint)."""
