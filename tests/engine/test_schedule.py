import math

import pytest
import torch

from engine.schedule import lr_ratio, warmup_cosine


def test_first_step_moves_peak_at_warmup_and_floor_at_the_end():
    ratios = [lr_ratio(s, warmup=4, total=20, min_ratio=0.1) for s in range(1, 21)]
    assert ratios[0] == pytest.approx(0.25)  # not 0: no step is wasted
    assert ratios[3] == pytest.approx(1.0)
    assert ratios[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ratios[3:], ratios[4:]))  # monotone decay after warmup
    mid = 4 + (20 - 4) / 2
    assert lr_ratio(int(mid), warmup=4, total=20, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_warmup_starts_at_peak():
    assert lr_ratio(1, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


def test_scheduler_applies_the_ratio_of_the_step_about_to_run():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = warmup_cosine(opt, warmup=2, total=6, min_ratio=0.0)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * lr_ratio(s, warmup=2, total=6, min_ratio=0.0) for s in range(1, 7)])
    assert seen[0] == pytest.approx(1.0) and seen[-1] == pytest.approx(0.0)
