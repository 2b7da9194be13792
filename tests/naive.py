"""Slow, obviously-right references (per-token Python loops in float64 numpy) for the MoE fast paths."""

from __future__ import annotations

import numpy as np


def softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def naive_route(h, classifier, capacity):
    """h [B, S, d], classifier [d, E] -> (index [B, S], prob [B, S], keep [B, S]), token by token."""
    h, w = np.asarray(h, np.float64), np.asarray(classifier, np.float64)
    b, s, _ = h.shape
    index, prob, keep = np.zeros((b, s), int), np.zeros((b, s)), np.zeros((b, s), bool)
    for i in range(b):
        taken = {}
        for t in range(s):
            p = softmax(h[i, t] @ w)
            e = int(np.argmax(p))
            taken[e] = taken.get(e, 0) + 1
            index[i, t], prob[i, t] = e, p[e]
            keep[i, t] = capacity is None or taken[e] <= capacity
    return index, prob, keep


def naive_moe(h, wi, wo, index, prob, keep):
    """Per-token loop: y = p * relu(h @ wi[e]) @ wo[e] for kept tokens, 0 for dropped ones."""
    h = np.asarray(h, np.float64)
    wi, wo = np.asarray(wi, np.float64), np.asarray(wo, np.float64)
    out = np.zeros_like(h)
    for i in range(h.shape[0]):
        for t in range(h.shape[1]):
            if keep[i, t]:
                e = index[i, t]
                out[i, t] = prob[i, t] * (np.maximum(h[i, t] @ wi[e], 0.0) @ wo[e])
    return out
