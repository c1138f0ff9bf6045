"""The main job (``bif-fast demo``): the language-model demo in ``lm``, the closed-form check in ``linear``."""

from __future__ import annotations

from bif_fast.demo.linear import linear_gaussian_problem, run_demo
from bif_fast.demo.lm import DEMO_QUERIES, demo_corpus, encode_bytes, passage_scores, run_lm_demo, train_tiny_lm

__all__ = [
    "DEMO_QUERIES",
    "demo_corpus",
    "encode_bytes",
    "linear_gaussian_problem",
    "passage_scores",
    "run_demo",
    "run_lm_demo",
    "train_tiny_lm",
]
