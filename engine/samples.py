"""Greedy answers to log.sample_prompts, before, during and after training (a quick look at what the
model learnt; TensorBoard text and the before -> after report at the end of a run)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def generate_answers(engine, tokenizer, prompts: list[str], max_new_tokens: int, zero_stage: int) -> list[str]:
    """Greedy answers to chat prompts. Every rank calls this (ZeRO-3 gathers collectively)."""
    lm = engine.module.lm
    was_training = lm.training
    lm.eval()
    answers = []
    device = engine.device
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(device)
        with torch.no_grad():
            out = lm.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                synced_gpus=zero_stage == 3 and dist.is_initialized() and dist.get_world_size() > 1,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    if was_training:
        lm.train()
    return answers


def before_after_report(prompts: list[str], before: list[str], after: list[str], expected: list[str]) -> str:
    lines = ["", "answers before -> after training:"]
    for i, (p, b, a) in enumerate(zip(prompts, before, after)):
        lines.append(f"  Q: {p}")
        if expected:
            lines.append(f"     expected: {expected[i]!r}")
        lines += [f"     before:   {b!r}", f"     after:    {a!r}"]
    if expected:
        right = [sum(x.strip() == e.strip() for x, e in zip(answers, expected)) for answers in (before, after)]
        lines.append(f"  exact answers: {right[0]}/{len(expected)} before, {right[1]}/{len(expected)} after")
    return "\n".join(lines)


def samples_markdown(prompts: list[str], answers: list[str]) -> str:
    return "\n\n".join(f"**Q:** {p}\n\n**A:** {a}" for p, a in zip(prompts, answers))
