"""Evaluations: measurements of the models a pipeline uses or produces, separate from the stages.

- `labeller`: how well a feedback model labels multiple-choice comparisons (`cai eval labeller`).
- `refusal`: a phrase-based detector of replies that engage, refuse and explain, or only refuse.
"""
