"""Evaluations: measurements of the models a pipeline uses or produces, separate from the stages.

- `labeller`: how well a feedback model labels multiple-choice comparisons (`cai eval labeller`).
- `ratings`: Bradley-Terry Elo ratings with group-bootstrap intervals from soft pairwise judgements.
- `refusal`: a phrase-based detector of replies that engage, refuse and explain, or only refuse.
- `suite`: the evaluate stage's figures from its rows (ratings, harm, failure, evasiveness, judge card).
- `diversity`: word n-gram overlap between prompts, and distinct-n and self-similarity of a set.
- `stats`: the intervals every figure shares (Wilson, bootstrap of a mean).
"""
