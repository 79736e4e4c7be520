"""Sequence parallelism through DeepSpeed Ulysses: the ranks of one group share each sequence.

`train.sequence_parallel: N` splits the world into groups of N consecutive ranks. A group takes one
data-parallel slice of each global batch (data_pipeline/schedule/stream.py, with the data-parallel
rank and size), and each of its ranks holds 1/N of every row: the micro-batch is shifted first and
then cut along the sequence (MicroBatch.sequence_shard), so every target is predicted exactly where
it was, on exactly one rank. Everything outside attention is per token and runs on the shard alone
(embeddings, MLPs, norms, rotary with the shard's global positions, the fused lm_head + masked
cross-entropy: no rank ever holds a whole row's logits). Attention needs the whole sequence:
DeepSpeed's UlyssesSPAttentionHF swaps the sequence split for a head split with one all-to-all
(each rank then holds the whole sequence for 1/N of the heads), runs the core attention, and swaps
back. The core attention here is segment-aware: a packed row attends within each sample only,
the samples found from the gathered position ids (which restart at 0 with every sample), without
a dense [L, L] mask; on CUDA flash_attention_2 does the same through its varlen path.

The loss stays the global mean over response tokens: every rank's shard sums its own targets, the
step's count is taken once per group (on its first rank), and DeepSpeed averages gradients over all
ranks, which the loss scaling already undoes (engine/loss.py). DeepSpeed is deliberately not given
the groups (no `mpu`): with them its ZeRO-1/2 and ZeRO-3 optimizers reduce gradients with different
factors, while without them every stage averages over the whole world, as the tests pin, and ZeRO
partitions over the whole world either way. Evaluation and generation run with
the model in eval mode, where the wrapper steps aside: whole sequences, as without SP.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.config import ConfigError
from engine.segment_attention import segment_causal_attention


@dataclass(frozen=True)
class SequenceParallelLayout:
    """Where this rank sits: group `group` of `groups` (the data-parallel rank and size), and
    position `rank` of `size` inside it."""

    size: int
    rank: int
    group: int
    groups: int

    @classmethod
    def of(cls, rank: int, world_size: int, size: int) -> "SequenceParallelLayout":
        if size < 1 or world_size % size:
            raise ConfigError(f"train.sequence_parallel={size} must divide the world size {world_size} "
                              "(the launcher's process count)")
        return cls(size=size, rank=rank % size, group=rank // size, groups=world_size // size)

    @property
    def enabled(self) -> bool:
        return self.size > 1


def check_heads(size: int, heads: int, kv_heads: int, where: str) -> None:
    """Ulysses splits attention heads across the group: the query heads must divide, and the key/value
    heads must divide or be divided by the group size (DeepSpeed then replicates them)."""
    if heads % size:
        raise ConfigError(f"train.sequence_parallel={size} must divide the number of attention heads, "
                          f"{heads} ({where})")
    if kv_heads % size and size % kv_heads:
        raise ConfigError(f"train.sequence_parallel={size} and the {kv_heads} key/value heads ({where}): one "
                          "must divide the other")


class UlyssesAttention:
    """Puts DeepSpeed's Ulysses attention in place of the model's attention function, and back.

    HF models call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`; that entry is replaced (as
    DeepSpeed's own register_with_transformers does) so that every special case HF keys on the
    implementation name still applies. `restore()` puts the original back (a later stage of the
    same process may run without sequence parallelism)."""

    def __init__(self, model, size: int, micro_batch_size: int):
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if mpu._SEQUENCE_PARALLEL_GROUP is None or mpu.get_sequence_parallel_world_size() != size:
            mpu._release_sequence_parallel_groups()  # a previous stage's groups, of another size
            mpu.initialize_sequence_parallel(sequence_parallel_size=size)
        config = model.config.get_text_config()
        self.key = config._attn_implementation
        if self.key == "sdpa":
            core = segment_causal_attention
        elif self.key.startswith("flash_attention"):
            core = ALL_ATTENTION_FUNCTIONS[self.key]  # varlen from the gathered position ids
        else:
            raise ConfigError(f"model.attn_implementation={self.key}: sequence parallelism needs sdpa or "
                              "flash_attention_2 (eager builds a dense [L, L] mask)")
        self._functions = ALL_ATTENTION_FUNCTIONS
        self._original = ALL_ATTENTION_FUNCTIONS[self.key]
        ulysses = UlyssesSPAttentionHF(
            attn=core, batch_size=micro_batch_size, attn_head_count=config.num_attention_heads,
            attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            kv_head_count=config.num_key_value_heads, num_hidden_layers=config.num_hidden_layers,
            process_group=mpu.get_sequence_parallel_group(), seq_length_is_variable=True,
            disable_in_eval=True,  # evaluation and generation see whole sequences
        )
        ulysses.core_attn_implementation = self.key
        original = self._original

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            if not module.training:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            # The mask HF built covers the local shard only: meaningless after the all-to-all.
            return ulysses(module, query, key, value, None, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[self.key] = attention

    def restore(self) -> None:
        self._functions[self.key] = self._original


def activations_on_host(enabled: bool):
    """train.offload_activations: tensors saved for backward go to (pinned) host memory during the
    forward and come back in backward (torch.autograd.graph.save_on_cpu); a no-op when off."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
