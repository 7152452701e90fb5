"""VQA v2 accuracy as defined by the official VQA evaluation (GT Vision Lab / EvalAI).

Answer normalisation (`normalize_answer`), in the official order:

1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is *deleted* when the
   text has that mark next to a space, or has a digit-comma-digit group anywhere ("3,000" -> "3000");
   otherwise it becomes a space ("t-shirt" -> "t shirt", "yes!" -> "yes");
   then every period *not followed by a digit* is deleted, so "yes." -> "yes" but "2.5" stays;
3. lowercase, split on whitespace, number words zero..ten (and "none") become digits, the articles
   a / an / the are dropped, and apostrophe-less contractions get their apostrophe back
   ("dont" -> "don't", "whats" -> "what's"); words are re-joined with single spaces.

Accuracy of one question (`vqa_accuracy`), as the official `vqaEval.py` computes it: the prediction gets the
whole normalisation above; the annotators' answers are compared as stored, except that when they disagree (more
than one distinct answer) each gets the punctuation step (2) only. Then, for each of the n annotators, leave that
annotator out and score min(1, matches among the other n-1 / 3); the question's accuracy is the mean over the n
subsets. With 10 answers, k matching answers give 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, 4+.

The ground truth is deliberately not given the number-word, article and contraction steps, because the official
script does not give it them: a prediction "none" becomes "0" and so matches no annotator who wrote "none", as on
the evaluation server (GT-Vision-Lab/VQA issue 7), and "dog" matches no annotator who wrote "the dog". A figure
meant to sit beside published ones must follow the same rule, quirks included.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

from safe.core.errors import SafeError

# Marks handled by the punctuation step (the period has its own rule below).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit: keeps decimals ("2.5", ".5") intact.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contractions table as "written-form restored-form" pairs. Entries whose key has a
# capital letter are left out: they can never fire because matching happens after lowercasing.
# "somebody'd -> somebodyd" is the official table's own (reversed) entry, kept for fidelity.
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't
hed he'd | hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's
isnt isn't | itd it'd | itd've it'd've | it'dve it'd've | itll it'll | maam ma'am
mightnt mightn't | mightnt've mightn't've | mightn'tve mightn't've | mightve might've
mustnt mustn't | mustve must've | neednt needn't | notve not've | oclock o'clock
oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at | 'ow'sat 'ow's'at | shant shan't
shed've she'd've | she'dve she'd've | shouldve should've | shouldnt shouldn't
shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll
somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's
somethingd something'd | somethingd've something'd've | something'dve something'd've
somethingll something'll | thats that's | thered there'd | thered've there'd've
there'dve there'd've | therere there're | theres there's | theyd they'd | theyd've they'd've
they'dve they'd've | theyll they'll | theyre they're | theyve they've | twas 'twas
wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've | werent weren't
whatll what'll | whatre what're | whats what's | whatve what've | whens when's
whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've
who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll | whyre why're
whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll
yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd
youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
_CONTRACTIONS = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " | ").split("|") if pair.strip()
)


def _strip_punctuation(text: str) -> str:
    # The delete-or-space decision looks at the text as it was before any mark was touched.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise one answer the way the official VQA evaluation does (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer() needs a str, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def _accuracy_of_normalized(prediction: str, answers: Sequence[str]) -> float:
    matches = sum(answer == prediction for answer in answers)
    if len(answers) == 1:
        # Leaving the only annotator out leaves nobody to agree with; fall back to exact match.
        return float(matches)
    # Leaving out a matching annotator leaves matches-1 others; any other annotator leaves matches.
    # Sum of min(3, matches among the others) over all n subsets, divided by 3n: exact fractions
    # (0.3, 0.6, 0.9 come out as the nearest floats, no accumulated rounding).
    credit = matches * min(3, matches - 1) + (len(answers) - matches) * min(3, matches)
    return credit / (3 * len(answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy (0..1) of one predicted answer against the annotators' answers.

    Works for any number of answers (VQA v2 has 10): the mean over the leave-one-annotator-out
    subsets of min(1, matches/3), the prediction normalised and the answers treated as the official
    script treats them (module docstring). With a single answer the subsets would be empty, so that
    case is plain exact match (0 or 1).
    """
    if isinstance(answers, str):
        raise TypeError("vqa_accuracy() needs a list of ground-truth answers, not a single string")
    if len(answers) == 0:
        raise SafeError("vqa_accuracy() got an empty list of ground-truth answers; "
                        "every VQA question needs its annotators' answers (10 in VQA v2).")
    stored = [str(answer) for answer in answers]
    if len(set(stored)) > 1:  # the official script touches the answers only when the annotators disagree
        stored = [_strip_punctuation(answer) for answer in stored]
    return _accuracy_of_normalized(normalize_answer(prediction), stored)


def vqa_score(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]],
              answer_types: Mapping[Hashable, str] | None = None) -> dict:
    """Score a set of predictions; accuracies on the 0-100 scale of the VQA tables.

    Scores every question in `predictions` (each must have ground truth in `answers`; extra
    questions in `answers` are ignored, so a subset can be evaluated). Returns
    ``{"accuracy", "n", "per_question"}`` plus ``"per_answer_type"`` (type -> accuracy) when
    `answer_types` (question id -> "yes/no" | "number" | "other") is given. Values are not rounded
    (the official script rounds to 2 decimals for display).
    """
    if not predictions:
        raise SafeError("vqa_score() got no predictions; evaluate at least one VQA question.")
    missing = [qid for qid in predictions if qid not in answers]
    if missing:
        raise SafeError(f"{len(missing)} predicted question id(s) have no ground-truth answers "
                        f"(first: {missing[:5]!r}); check that predictions and answers use the same "
                        f"question ids and id type (int vs str).")
    if answer_types is not None:
        untyped = [qid for qid in predictions if qid not in answer_types]
        if untyped:
            raise SafeError(f"{len(untyped)} predicted question id(s) have no answer type "
                            f"(first: {untyped[:5]!r}); pass answer_types for every question or none.")

    per_question = {qid: 100.0 * vqa_accuracy(pred, answers[qid]) for qid, pred in predictions.items()}
    result: dict = {
        "accuracy": sum(per_question.values()) / len(per_question),
        "n": len(per_question),
        "per_question": per_question,
    }
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for qid, acc in per_question.items():
            by_type.setdefault(str(answer_types[qid]), []).append(acc)
        result["per_answer_type"] = {kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}
    return result
