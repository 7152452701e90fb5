"""The two prompts SAFE uses, and the token layout built from them (kept in one place on purpose).

A training example is ``prompt ids + answer ids + eos`` with labels only on the answer and eos, so
the loss teaches the answer and nothing else. The prompt is tokenised exactly as at generation
time, so the teacher-forced and the generated paths see the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from safe.errors import SafeError

IMAGE_TOKEN = "<image>"
VQA_PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
CAPTION_PROMPT = "USER: {question} ASSISTANT:"
DEFAULT_CAPTION_QUESTION = "Describe the sound."
# Prefix-mode audio tokens are spliced right after this text (no vocabulary token is added).
SPLICE_AFTER = "USER:"
IGNORE_INDEX = -100


def vqa_prompt(question: str) -> str:
    return VQA_PROMPT.format(question=question.strip())


def caption_prompt(question: str | None = None) -> str:
    return CAPTION_PROMPT.format(question=(question or DEFAULT_CAPTION_QUESTION).strip())


def expand_image_token(prompt: str, num_image_tokens: int) -> str:
    """Expand ``<image>`` to the vision tower's patch count, as LlavaProcessor does."""
    return prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)


@dataclass
class Encoded:
    """One example as token ids (unpadded)."""

    input_ids: list[int]
    labels: list[int]        # IGNORE_INDEX on prompt tokens
    splice_pos: int          # index right after the "USER:" tokens (prefix fusion inserts audio here)
    prompt_len: int


def splice_position(tokenizer, prompt_ids: list[int]) -> int:
    """Index of the first token after ``USER:`` in ``prompt_ids``.

    Found by tokenising ``USER:`` alone and checking it is a prefix of the prompt, so the splice
    point always lies on a token boundary of the very ids the base model sees.
    """
    head = tokenizer(SPLICE_AFTER, add_special_tokens=True)["input_ids"]
    if prompt_ids[: len(head)] != head:
        raise SafeError(
            f"The tokenizer does not split the prompt after '{SPLICE_AFTER}' on a token boundary; "
            "use --fusion xattn with this base model."
        )
    return len(head)


def encode_example(tokenizer, prompt: str, answer: str | None = None, add_eos: bool = True) -> Encoded:
    """Token ids for ``prompt`` (+ ``answer`` + eos when an answer is given)."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    labels = [IGNORE_INDEX] * len(prompt_ids)
    ids = list(prompt_ids)
    if answer is not None:
        answer_ids = _answer_ids(tokenizer, prompt, prompt_ids, answer.strip())
        if add_eos:
            answer_ids.append(tokenizer.eos_token_id)
        ids += answer_ids
        labels += answer_ids
    return Encoded(ids, labels, splice_position(tokenizer, prompt_ids), len(prompt_ids))


def _answer_ids(tokenizer, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """Answer ids exactly as they follow the prompt (sentencepiece merges depend on context)."""
    full = list(tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"])
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids):]
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])
