"""The prompts SAFE uses, and the token layout built from them (kept in one place on purpose).

A prompt style is a system prefix plus a VQA and a caption template. The llava-1.5 presets use LLaVA-1.5's own
conversation format as it was trained and evaluated (vicuna_v1: the system message, ``USER: <image>\\n...``, and
the short-answer instruction for VQA); the tiny preset has its own, shorter format (question before the image,
see ``TINY``).

A training example is ``prompt ids + answer ids + eos`` with labels only on the answer and eos, so
the loss teaches the answer and nothing else. The prompt is tokenised exactly as at generation
time, so the teacher-forced and the generated paths see the same prefix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from safe.core.errors import SafeError

IMAGE_TOKEN = "<image>"
DEFAULT_CAPTION_QUESTION = "Describe the sound."
# Prefix-mode audio tokens are spliced right after this text (no vocabulary token is added).
SPLICE_AFTER = "USER:"
IGNORE_INDEX = -100
# LLaVA-1.5's system message (conversation template vicuna_v1).
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class PromptStyle:
    """A conversation format: ``system`` (may be empty) is prepended to both templates."""

    name: str
    system: str
    vqa_template: str       # with {question} and IMAGE_TOKEN
    caption_template: str   # with {question}

    def _head(self) -> str:
        return f"{self.system} " if self.system else ""

    def vqa(self, question: str) -> str:
        return self._head() + self.vqa_template.format(question=question.strip())

    def caption(self, question: str | None = None) -> str:
        return self._head() + self.caption_template.format(question=(question or DEFAULT_CAPTION_QUESTION).strip())

    def splice_prefix(self) -> str:
        """The text up to and including ``USER:``; prefix-mode audio tokens go right after it."""
        return self._head() + SPLICE_AFTER

    def without_system(self) -> "PromptStyle":
        return dataclasses.replace(self, name=f"{self.name}-no-system", system="")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LLAVA_V1 = PromptStyle(
    name="llava_v1", system=VICUNA_SYSTEM,
    vqa_template=f"USER: {IMAGE_TOKEN}\n{{question}}\nAnswer the question using a single word or phrase. ASSISTANT:",
    caption_template="USER: {question} ASSISTANT:")
# The tiny base's own format. The question comes before the image: with causal attention each image token can
# then compare its own object with the question ("is there a red circle?"), which a 4-layer model learns in a
# few hundred steps; with the image first, the binding has to happen at the answer position and yes/no questions
# stalled near 78 % after 1200 steps (toy VQA val). No short-answer instruction: the tiny base only ever answers
# in one word, and the 10 tokens it costs were a third of every training sequence.
TINY = PromptStyle(name="tiny", system="", vqa_template=f"USER: {{question}}\n{IMAGE_TOKEN} ASSISTANT:",
                   caption_template="USER: {question} ASSISTANT:")
STYLES = {style.name: style for style in (LLAVA_V1, TINY)}


def get_style(name: str, system_prompt: bool = True) -> PromptStyle:
    if name not in STYLES:
        raise SafeError(f"Unknown prompt style {name!r}; use one of {', '.join(STYLES)}.")
    style = STYLES[name]
    return style if system_prompt else style.without_system()


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


def splice_position(tokenizer, prompt_ids: list[int], head: list[int]) -> int:
    """Index of the first token after ``USER:`` in ``prompt_ids``.

    ``head`` is the tokenised text up to and including ``USER:`` (the style's ``splice_prefix()``); checking that
    it is a prefix of the prompt keeps the splice point on a token boundary of the very ids the base model sees.
    """
    if prompt_ids[: len(head)] != head:
        raise SafeError(
            f"The tokenizer does not split the prompt after '{SPLICE_AFTER}' on a token boundary; "
            "use --fusion xattn with this base model."
        )
    return len(head)


def encode_examples(tokenizer, prompts: list[str], answers: list[str] | None = None, add_eos: bool = True,
                    splice_prefix: str = SPLICE_AFTER) -> list[Encoded]:
    """Token ids for each prompt (+ answer + eos when answers are given), with batched tokenizer calls (one call per
    distinct text list instead of three per example: the per-call overhead dominated a training step)."""
    head = tokenizer(splice_prefix, add_special_tokens=True)["input_ids"]
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


def encode_example(tokenizer, prompt: str, answer: str | None = None, add_eos: bool = True,
                   splice_prefix: str = SPLICE_AFTER) -> Encoded:
    return encode_examples(tokenizer, [prompt], None if answer is None else [answer], add_eos, splice_prefix)[0]


def _answer_ids(tokenizer, prompt_ids: list[int], full: list[int], answer: str) -> list[int]:
    """Answer ids exactly as they follow the prompt in ``full`` = ids of prompt + " " + answer (sentencepiece
    merges depend on context); the answer alone when the prompt's ids are not a prefix of ``full``. An empty answer
    (a base that stopped at once) is no tokens: joined, its space alone would be a token ("▁") the base never said."""
    if not answer:
        return []
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids):]
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])
