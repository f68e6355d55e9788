"""The one running average both sides keep (the parent's speeds for ETAs, a step worker's step and
admission times): exponentially weighted, starting at its first sample."""

from __future__ import annotations


def ewma(previous: float, sample: float, weight: float = 0.2) -> float:
    """`previous` 0 means no sample yet: the first one is taken as it is."""
    return sample if previous == 0 else previous + weight * (sample - previous)
