"""The LM seam: every stage talks to models only through `generate` and `score_options`."""

from cai.lm.base import LM, Completion, load_lm

__all__ = ["LM", "Completion", "load_lm"]
