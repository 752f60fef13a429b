"""Evaluations: measurements of the models a pipeline uses or produces, separate from the stages.

- `labeller`: how well a feedback model labels multiple-choice comparisons (`cai eval labeller`).
- `ratings`: Bradley-Terry Elo ratings with group-bootstrap intervals from soft pairwise judgements.
"""
