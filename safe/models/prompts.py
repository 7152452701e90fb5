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


def splice_position(tokenizer, prompt_ids: list[int], head: list[int] | None = None) -> int:
    """Index of the first token after ``USER:`` in ``prompt_ids``.

    Found by tokenising ``USER:`` alone (``head``, when the caller already has it) and checking it is a
    prefix of the prompt, so the splice point always lies on a token boundary of the very ids the base model sees.
    """
    head = head if head is not None else tokenizer(SPLICE_AFTER, add_special_tokens=True)["input_ids"]
    if prompt_ids[: len(head)] != head:
        raise SafeError(
            f"The tokenizer does not split the prompt after '{SPLICE_AFTER}' on a token boundary; "
            "use --fusion xattn with this base model."
        )
    return len(head)


def encode_example(tokenizer, prompt: str, answer: str | None = None, add_eos: bool = True) -> Encoded:
    """Token ids for ``prompt`` (+ ``answer`` + eos when an answer is given)."""
    return encode_examples(tokenizer, [prompt], None if answer is None else [answer], add_eos)[0]


def encode_examples(tokenizer, prompts: list[str], answers: list[str] | None = None,
                    add_eos: bool = True) -> list[Encoded]:
    """``encode_example`` for many examples with batched tokenizer calls (one call per distinct text list
    instead of three per example: the per-call overhead dominated a training step's tokenisation)."""
    head = tokenizer(SPLICE_AFTER, add_special_tokens=True)["input_ids"]
    distinct = list(dict.fromkeys(prompts))
    prompt_ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=True)["input_ids"]))
    if answers is not None:
        answers = [a.strip() for a in answers]
        joined = tokenizer([p + " " + a for p, a in zip(prompts, answers)], add_special_tokens=True)["input_ids"]
    out = []
    for i, prompt in enumerate(prompts):
        ids = list(prompt_ids[prompt])
        labels = [IGNORE_INDEX] * len(ids)
        splice = splice_position(tokenizer, ids, head)
        prompt_len = len(ids)
        if answers is not None:
            answer_ids = _answer_ids(tokenizer, ids, list(joined[i]), answers[i])
            if add_eos:
                answer_ids.append(tokenizer.eos_token_id)
            ids += answer_ids
            labels += answer_ids
        out.append(Encoded(ids, labels, splice, prompt_len))
    return out


def _answer_ids(tokenizer, prompt_ids: list[int], full: list[int], answer: str) -> list[int]:
    """Answer ids exactly as they follow the prompt in ``full`` = ids of prompt + " " + answer (sentencepiece
    merges depend on context); the answer alone when the prompt's ids are not a prefix of ``full``."""
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids):]
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])
