"""The VQA accuracy of the official VQA evaluation (VQAv2, OK-VQA, VizWiz).

An answer scores min(#annotators who gave it / 3, 1), averaged over the 10 subsets of 9
of the 10 reference answers: 0, 1, 2, 3 and 4+ matching annotators give 0, 0.3, 0.6, 0.9
and 1. Before matching, the prediction is normalised as the official code does: punctuation
(kept inside numbers like 1,000 / 2.5), number words -> digits, articles dropped,
apostrophe-less contractions restored. The reference answers get only the punctuation
step, and only when the annotators disagree (the VQAv2 / OK-VQA annotation files are
normalised already); VizWiz's official code normalises them fully (`full_references`).
OK-VQA (paper Appendix C.1) stems both sides with the Porter stemmer (nltk).
"""

from __future__ import annotations

import itertools
import re

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
# The official pattern, whose look-behind is misspelt: a period not followed by a digit is dropped.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")

# The contracted forms the official table restores, in its spelling (mostly with ’).
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn’t’ve didn’t doesn’t don’t hadn’t hadn’t’ve hasn’t haven’t he’d "
    "he’d’ve he’s how’d how’ll how’s I’d’ve I’m I’ve isn’t it’d it’d’ve it’ll let’s ma’am mightn’t mightn’t’ve "
    "might’ve mustn’t must’ve needn’t not’ve o’clock oughtn’t ’ow’s’at shan’t she’d’ve she’s should’ve shouldn’t "
    "shouldn’t’ve somebody’d’ve somebody’ll somebody’s someone’d someone’d’ve someone’ll someone’s something’d "
    "something’d’ve something’ll that’s there’d there’d’ve there’re there’s they’d they’d’ve they’ll they’re "
    "they’ve ’twas wasn’t we’d’ve we've weren’t what’ll what’re what’s what’ve when’s where’d where's where’ve "
    "who’d who’d’ve who’ll who’s who've why’ll why’re why’s won’t would’ve wouldn’t wouldn’t’ve y’all y’all’ll "
    "y’all’d’ve you’d you’d’ve you’ll you’re you’ve"
).split()


def _spellings_without_apostrophes(word: str):
    """Every spelling of `word` with some of its apostrophes left out (not none)."""
    marks = [i for i, c in enumerate(word) if c in "'’"]
    for n in range(1, len(marks) + 1):
        for dropped in itertools.combinations(marks, n):
            yield "".join(c for i, c in enumerate(word) if i not in dropped)


CONTRACTIONS = {spelling: word for word in _CONTRACTED for spelling in _spellings_without_apostrophes(word)}


def strip_punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # a mark beside a space (or any comma-separated number) goes; one inside a word splits it
        if mark + " " in text or " " + mark in text or COMMA_IN_NUMBER.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out)


def normalise_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_answer(text: str) -> str:
    """The official processing of a predicted answer."""
    return normalise_words(strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def porter_stem(text: str) -> str:
    from nltk.stem.porter import PorterStemmer

    stemmer = PorterStemmer()
    return " ".join(stemmer.stem(w) for w in text.split())


def vqa_accuracy(prediction: str, references: list[str], full_references: bool = False, stem: bool = False) -> float:
    """Accuracy in [0, 1] of one predicted answer against the annotators' answers."""
    if not references:
        raise ValueError("VQA accuracy needs the annotators' answers; this question has none")
    answer = normalise_answer(prediction)
    if full_references:
        references = [normalise_answer(r) for r in references]
    elif len(set(references)) > 1:
        references = [strip_punctuation(r) for r in references]
    if stem:
        answer, references = porter_stem(answer), [porter_stem(r) for r in references]
    per_subset = []
    for left_out in range(len(references)):
        matches = sum(r == answer for i, r in enumerate(references) if i != left_out)
        per_subset.append(min(1.0, matches / 3))
    return sum(per_subset) / len(per_subset)
