"""The digits demo's captions: "a handwritten digit seven" for label 7.

A leaf module (no imports), so that the built-in digits dataset (trainer/data.py), the text cache
(trainer/textcache.py), the toy models and the demo scripts share one wording without importing each other.
"""

from __future__ import annotations

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_prompt(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"
