"""Noun phrases of a caption, as character spans: what a teacher grounds when it
pseudo-labels image-caption pairs.

With spaCy and an English pipeline installed (`pip install spacy` and
`python -m spacy download en_core_web_sm`), the phrases are spaCy's noun chunks.
Otherwise a rule-based fallback splits the caption at punctuation and at closed-class
words (articles and other determiners, pronouns, prepositions and spatial words such
as "left", conjunctions, auxiliary verbs and "there"); every remaining run of words is
a phrase. It needs no model and suits short descriptive captions ("a red circle left
of a blue star"); it cannot tell a verb or an adverb from a noun, so "a dog runs
quickly" gives "dog runs quickly". Either way a leading determiner is not part of the
span (the shapes captions mark "red circle", not "a red circle").
"""

from __future__ import annotations

import functools
import re
from typing import Callable

Span = tuple[int, int]

DETERMINERS = frozenset(
    "a an the this that these those some any each every no another other its their his her my our your "
    "one two three four five several many few".split()
)
BREAK_WORDS = DETERMINERS | frozenset(
    # pronouns and existentials
    "i you he she it we they me him us them there here what which who whom whose".split()
    # prepositions and spatial relations
    + "of in on at to from by with without into onto over under above below beneath behind beside besides "
      "between near next left right top bottom front back inside outside around along across against "
      "toward towards through up down off out for about like as than".split()
    # conjunctions and auxiliaries
    + "and or but nor so yet while is are was were be been being am has have had do does did "
      "can could will would shall should may might must not".split()
)
_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")
_PUNCTUATION = re.compile(r"[.,;:!?()\[\]\"]")


def rule_based_phrases(caption: str) -> list[Span]:
    """Runs of words between punctuation and BREAK_WORDS, as (start, end) spans."""
    spans: list[Span] = []
    run: list[Span] = []
    last_end = 0

    def close() -> None:
        if run:
            spans.append((run[0][0], run[-1][1]))
            run.clear()

    for match in _WORD.finditer(caption):
        if _PUNCTUATION.search(caption, last_end, match.start()):
            close()
        if match.group().lower() in BREAK_WORDS:
            close()
        else:
            run.append(match.span())
        last_end = match.end()
    close()
    return spans


@functools.lru_cache(maxsize=1)
def _spacy_pipeline() -> Callable | None:
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError):  # spaCy or its English pipeline is not installed
        return None


def spacy_phrases(caption: str, nlp: Callable) -> list[Span]:
    """spaCy noun chunks without a leading determiner."""
    spans = []
    for chunk in nlp(caption).noun_chunks:
        tokens = [t for t in chunk if not (t.i == chunk.start and t.lower_ in DETERMINERS)]
        if tokens:
            spans.append((tokens[0].idx, tokens[-1].idx + len(tokens[-1].text)))
    return spans


def noun_phrases(caption: str, method: str = "auto") -> list[Span]:
    """Character spans of the noun phrases of `caption`, in order. method: "spacy",
    "rules" or "auto" (spaCy when its English pipeline is installed, else the rules)."""
    if method not in ("auto", "spacy", "rules"):
        raise ValueError(f"phrase method must be auto, spacy or rules, got {method!r}")
    nlp = _spacy_pipeline() if method != "rules" else None
    if method == "spacy" and nlp is None:
        raise RuntimeError("phrase method 'spacy' needs spaCy and en_core_web_sm: pip install spacy && "
                           "python -m spacy download en_core_web_sm")
    return spacy_phrases(caption, nlp) if nlp is not None else rule_based_phrases(caption)


def phrase_method() -> str:
    """The method noun_phrases(method="auto") uses on this machine."""
    return "spacy" if _spacy_pipeline() is not None else "rules"
