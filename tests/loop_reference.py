"""Plain-float helpers shared by the loop references of the similarity and loss tests."""
import math
from typing import List

import torch


def unit(vector: torch.Tensor) -> List[float]:
    """Return ``vector`` divided by its L2 norm, as a list of floats."""
    values = [float(x) for x in vector]
    norm = math.sqrt(sum(x * x for x in values))
    return [x / norm for x in values]


def dot(u: List[float], v: List[float]) -> float:
    return sum(x * y for x, y in zip(u, v))


def softmax_average(scores: List[float], tau: float) -> float:
    """Return sum_j softmax_j(scores / tau) * scores_j."""
    top = max(scores)
    exps = [math.exp((s - top) / tau) for s in scores]
    total = sum(exps)
    return sum(e / total * s for e, s in zip(exps, scores))
