"""Retention as one component: everything a variant adds to Stage A to keep the base's VL answers.

It owns the VL retention micro-batches (VQA questions presented to the SAFE path with a distractor training clip),
their KL targets (the base's own greedy answers, computed once per question), the teacher pass, the KL loss, the
Fisher penalty, the null-space projection, when each is refreshed, and their checkpoint state. The trainer calls:

    retention.refresh(step)                     Fisher / null space, when due and the audio path is open
    ... caption micro-batches, backward ...
    retention.backward(step)                    VL micro-batches: KL, then the Fisher penalty, backward
    ... gradients averaged across ranks ...
    retention.project_gradients()               null space: the gradient off the protected directions
    with retention.protected_update():          null space: the applied update off them too
        optimizer.step()

`build_retention` returns None for ``no_retention`` (no VL batches at all).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable

import numpy as np
import torch

from safe.data.collate import VQAItems
from safe.retention.fisher import FisherPenalty
from safe.retention.gates import audio_path_open
from safe.retention.kl import kl_distillation
from safe.retention.null_space import NullSpaceProjector
from safe.retention.ranks import Ranks

DISTRACTOR_SALT, FISHER_SALT, NULL_SPACE_SALT = 7, 11, 13


class Retention:
    def __init__(self, model, config, next_vl_batch: Callable[[], VQAItems],
                 distractors: Callable[[list], torch.Tensor],
                 autocast: Callable = contextlib.nullcontext, ranks: Ranks | None = None,
                 log: Callable[[dict], None] = lambda record: None, base_work=None):
        """``next_vl_batch()`` returns the next collated VQA training batch; ``distractors(keys)`` returns encoder
        features of one training clip per key (the same keys, the same clips); ``ranks`` reaches the other ranks
        (one process by default); ``base_work`` (a safe.retention.base_work.BaseWorkCache,
        or None) holds base answers and teacher logits shared by every run of this base."""
        self.model, self.config, self.settings = model, config, config.retention
        self.next_vl_batch, self.distractors, self.autocast = next_vl_batch, distractors, autocast
        self.ranks = ranks or Ranks()
        self.log = log
        self.params = model.named_trainable_parameters()
        self.base_answers: dict[str, str] = {}  # gate-0 greedy answers to training questions: the KL targets
        self.base_work = base_work
        self.fisher = FisherPenalty(self.params) if self.settings.fisher_weight > 0 else None
        self.null_space = NullSpaceProjector(self.params, self.settings.null_space_rank) \
            if self.settings.null_space_rank > 0 else None
        self.vl_samples = 0

    # ---------------------------------------------------------------------------------- VL batches

    def _base_answers(self, collated: VQAItems) -> list[str]:
        """The base model's own greedy answers (gate 0): what KL retention keeps. Computed once per question."""
        ids = [str(i) for i in collated.ids]
        if self.base_work is not None:
            self.base_answers.update(self.base_work.answers(collated))
        missing = [i for i, key in enumerate(ids) if key not in self.base_answers]
        if missing:
            chosen = collated.select(missing)
            batch = self.model.builder.vqa_batch(chosen.images, chosen.questions,
                                                 pixel_values=chosen.pixel_values).to(self.model.device)
            answers = self.model.generate(batch, gate=0.0,
                                          max_new_tokens=self.config.train.generation_max_new_tokens)
            for i, answer in zip(missing, answers):
                self.base_answers[ids[i]] = answer
        return [self.base_answers[key] for key in ids]

    def vl_batch(self, collated: VQAItems, features: torch.Tensor | None, answers: list[str] | None = None):
        """A VQA batch labelled with the base's own answers (or ``answers``), with ``features`` attached."""
        answers = answers if answers is not None else self._base_answers(collated)
        batch = self.model.builder.vqa_batch(collated.images, collated.questions, answers,
                                             pixel_values=collated.pixel_values, ids=collated.ids)
        return batch.with_audio(audio_features=features).to(self.model.device)

    def _distractor_features(self, collated: VQAItems, step: int, micro: int) -> torch.Tensor | None:
        """Distractor clips for a VL micro-batch (with probability ``distractor_prob``), from (seed, step, micro)."""
        rng = np.random.default_rng([self.config.train.seed, step, micro, DISTRACTOR_SALT])
        if rng.random() >= self.settings.distractor_prob:
            return None
        return self.distractors([f"{step}:{micro}:{i}" for i in collated.ids])

    # ------------------------------------------------------------------------------------------ KL

    def kl(self, batch) -> torch.Tensor:
        """T²·KL(p_base ‖ p_safe) on the answer positions; the teacher is the gate-0 model, logits in fp32 (from the
        base-work cache when it holds the batch: then only the student runs)."""
        teacher = self.base_work.teacher(batch) if self.base_work is not None else None
        if teacher is None:
            with torch.no_grad():
                logits = self.model(batch.with_audio(None), gate=0.0).answer_logits()
            if self.base_work is not None:
                self.base_work.put(batch, logits, [self.base_answers[str(i)] for i in batch.ids])
            teacher = logits.float()
        with self.autocast():
            student = self.model(batch, gate=1.0).answer_logits()
        if not torch.is_tensor(teacher):  # a cached top-k teacher: the bucketed KL, its error bound reported
            return teacher.kl(student, self.settings.kl_temperature)
        mask = torch.ones(student.shape[0], device=student.device)
        return kl_distillation(student, teacher, mask, self.settings.kl_temperature)

    def backward(self, step: int, accumulation: int) -> dict[str, torch.Tensor]:
        """Run the VL micro-batches of one optimizer step (KL) and the Fisher penalty, and backpropagate them."""
        zero = torch.zeros((), device=self.model.device)
        losses = {"kl_loss": zero, "fisher_penalty": zero}
        if self.settings.kl_weight > 0:
            fraction = self.settings.vl_fraction
            micro_batches = max(1, round(accumulation * fraction / (1 - fraction)))
            for micro in range(micro_batches):
                collated = self.next_vl_batch()
                batch = self.vl_batch(collated, self._distractor_features(collated, step, micro))
                self.vl_samples += batch.size
                if not batch.has_audio:  # no distractor drawn: the SAFE path is the base, nothing to retain
                    continue
                kl = self.kl(batch)
                (self.settings.kl_weight * kl / micro_batches).backward()
                losses["kl_loss"] = losses["kl_loss"] + kl.detach() / micro_batches
        if self.fisher is not None and self.fisher.fisher is not None:
            penalty = self.fisher.penalty()
            (self.settings.fisher_weight * penalty).backward()
            losses["fisher_penalty"] = penalty.detach()
        return losses

    # ------------------------------------------------------------------------- Fisher / null space

    def _samples(self, count: int, salt: int, step: int):
        """``count`` single VL samples (one question, its image, a distractor clip) drawn from the VL stream, as
        (collated row, features [1, T, D]) pairs."""
        made = 0
        while made < count:
            collated = self.next_vl_batch()
            features = self.distractors([f"{salt}:{step}:{made}:{q}" for q in collated.ids])
            for row in range(collated.size):
                if made == count:
                    return
                yield collated.row(row), features[row:row + 1]
                made += 1

    def _nll(self, batch) -> torch.Tensor:
        """Negative log-likelihood of the batch's answer (summed over its tokens) at gate 1."""
        with self.autocast():
            out = self.model(batch, gate=1.0)
        logits, labels = out.logits[:, :-1].float(), out.labels[:, 1:]
        keep = labels != -100
        return torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")

    def _sampled_answers(self, collated: VQAItems, features: torch.Tensor, step: int, index: int) -> list[str]:
        """Answers drawn from the SAFE model itself (gate 1, the distractor attached): the true Fisher's labels.
        Seeded per (seed, step, sample), and the global random stream is restored, so a resumed run draws the same."""
        prompt = self.model.builder.vqa_batch(collated.images, collated.questions,
                                              pixel_values=collated.pixel_values)
        prompt = prompt.with_audio(audio_features=features).to(self.model.device)
        state = torch.get_rng_state()
        rng = np.random.default_rng([self.config.train.seed, step, index, FISHER_SALT])
        torch.manual_seed(int(rng.integers(2**31)))
        try:
            return self.model.generate(prompt, gate=1.0, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                       max_new_tokens=self.config.train.generation_max_new_tokens)
        finally:
            torch.set_rng_state(state)

    def _fisher_batches(self, step: int):
        """Per-sample batches for the Fisher: answers sampled from the model ("true") or the base's ("empirical")."""
        for index, (collated, features) in enumerate(self._samples(self.settings.fisher_samples, FISHER_SALT, step)):
            answers = self._sampled_answers(collated, features, step, index) \
                if self.settings.fisher_kind == "true" else None
            yield self.vl_batch(collated, features, answers)

    def refresh(self, step: int) -> None:
        """Re-estimate the Fisher and the null-space basis when due, once the audio path is open."""
        if self.fisher is None and self.null_space is None:
            return
        # Taken together: a per-token gate's openness comes from each rank's own batch, and a rank that skipped
        # would leave the others waiting in the estimates' collectives.
        if not self.ranks.any_true(audio_path_open(self.model, self.settings.protect_from_gate)):
            return
        if self.fisher is not None and (self.fisher.fisher is None or step % self.settings.fisher_refresh == 0):
            used = self.fisher.estimate((functools.partial(self._nll, b) for b in self._fisher_batches(step)),
                                        ranks=self.ranks)
            self.log({"event": "fisher_refresh", "step": step, "samples": used, "kind": self.settings.fisher_kind})
        if self.null_space is not None and (self.null_space.basis is None
                                            or step % self.settings.null_space_refresh == 0):
            self.null_space.reset()
            samples = self._samples(self.settings.null_space_samples, NULL_SPACE_SALT, step)
            for index, (collated, features) in enumerate(samples):
                self.null_space.add_owned(index, functools.partial(self._protected_gradient, collated, features),
                                          self.ranks)
            self.log({"event": "null_space_refresh", "step": step, "rank": self.null_space.dimension,
                      "samples": self.null_space.samples, "protected_tensors": len(self.null_space.params)})

    def _protected_gradient(self, collated: VQAItems, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """One sample's VL-likelihood gradient with respect to the null space's protected tensors."""
        assert self.null_space is not None
        names, tensors = list(self.null_space.params), list(self.null_space.params.values())
        grads = torch.autograd.grad(self._nll(self.vl_batch(collated, features)), tensors, allow_unused=True)
        return dict(zip(names, grads))

    # ----------------------------------------------------------------------------- the update

    def project_gradients(self) -> None:
        if self.null_space is not None:
            self.null_space.project_gradients_()

    def protected_update(self):
        return self.null_space.protected_update() if self.null_space is not None \
            else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"base_answers": json.dumps(self.base_answers), "vl_samples": self.vl_samples,
                "fisher": self.fisher.state_dict() if self.fisher else None,
                "null_space": self.null_space.state_dict() if self.null_space else None}

    def load_state_dict(self, state: dict) -> None:
        self.base_answers = json.loads(state["base_answers"])
        self.vl_samples = state.get("vl_samples", 0)
        if self.fisher is not None and state.get("fisher"):
            self.fisher.load_state_dict(state["fisher"])
        if self.null_space is not None and state.get("null_space"):
            self.null_space.load_state_dict(state["null_space"])


def build_retention(model, config, **collaborators) -> Retention | None:
    """The run's retention component; None for variants without VL retention (no_retention)."""
    if not config.retention.use_vl:
        return None
    if "base_work" not in collaborators:
        from safe.retention.base_work import BaseWorkCache

        collaborators["base_work"] = BaseWorkCache.for_run(model, config, log=collaborators.get("log"))
    return Retention(model, config, **collaborators)
