"""An example reward function for question/answer data in GSM8K's shape: 1.0 when the response's
final number equals the one after ``####`` in the record's ``answer`` column, else 0.0.

Use it with ``reward.functions: [{path: examples/rewards/math_answer.py:reward}]``; the prompt
records need an ``answer`` column. It is plain Python: copy it beside your data and change it.
"""
import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text):
    """The number after the last '####' if there is one, else the last number of the text."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def reward(prompts, responses, answer, **columns):
    scores = []
    for response, want in zip(responses, answer):
        if want is None:
            scores.append(None)  # a record without an answer: no score
            continue
        got = last_number(response)
        scores.append(1.0 if got is not None and got == last_number(str(want)) else 0.0)
    return scores
