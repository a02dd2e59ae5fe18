"""An example reward plugin: load it with ``--reward rewards/examples/my_reward.py:score``.

A reward function takes the batch's prompts and completions plus every dataset column by name,
and returns one float (or None: "not applicable") per completion.
"""

from __future__ import annotations

import asyncio


def score(prompts, completions, answer=None, completion_ids=None, step=0, **kwargs):
    """1.0 when the completion mentions the `answer` column, minus 0.001 per token; None
    for samples without an answer."""
    if answer is None:  # the dataset has no `answer` column
        return [None] * len(completions)
    scores = []
    for completion, gold, ids in zip(completions, answer, completion_ids or [[]] * len(answer)):
        if isinstance(completion, list):  # chat data: a list of messages
            completion = completion[-1]["content"]
        if gold is None:
            scores.append(None)
            continue
        scores.append(float(str(gold) in completion) - 0.001 * len(ids))
    return scores


async def judge(prompts, completions, **kwargs):
    """An async reward: awaited concurrently with the other reward functions (e.g. API calls)."""
    await asyncio.sleep(0)  # stands in for an HTTP request to a judge
    return [min(len(c), 100) / 100 for c in completions]
