"""Named rule-based rewards for GRPO (`reward = exact_match` in a grpo stage): completion text and the
record's reference answer -> a float. Pure functions on strings; the step function detokenises.

  exact_match  1.0 when the completion, stripped of surrounding whitespace, equals the reference
  contains     1.0 when the reference occurs in the completion
  prefix       1.0 when the completion starts with the reference
"""

from __future__ import annotations

from collections.abc import Callable


def exact_match(completion: str, reference: str) -> float:
    return float(completion.strip() == reference.strip())


def contains(completion: str, reference: str) -> float:
    return float(reference.strip() in completion)


def prefix(completion: str, reference: str) -> float:
    return float(completion.strip().startswith(reference.strip()))


VERIFIERS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "contains": contains, "prefix": prefix}


def verifier(name: str) -> Callable[[str, str], float]:
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; expected one of {', '.join(sorted(VERIFIERS))}") from None
