"""Verification of loss masks by decoding, shared by the template and prepare tests."""

from __future__ import annotations

import numpy as np


def trained_runs(trained: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of trained tokens."""
    edges = np.diff(np.concatenate([[0], trained.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def assert_trained_text(decode, ids: np.ndarray, trained: np.ndarray, expected: list[str]) -> None:
    """Each contiguous run of trained tokens decodes to the expected response text (+ end of turn).

    The one tolerated difference is the documented boundary rule: a token straddling the start of a
    response may carry leading template whitespace, so a run may start with extra whitespace.
    """
    runs = trained_runs(trained)
    got = [decode(ids[s:e].tolist()) for s, e in runs]
    assert len(got) == len(expected), f"{len(got)} trained runs {got!r}, expected {len(expected)}: {expected!r}"
    for text, want in zip(got, expected):
        if text != want:
            extra = text[: len(text) - len(want)]
            assert text.endswith(want) and extra.isspace(), f"trained {text!r} != expected {want!r}"
