"""KL distillation to the base: T²·KL(p_base ‖ p_safe) on the answer positions of VL samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 2.0) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student), averaged over the positions where ``mask`` is true (answer positions).

    Both distributions are taken at temperature T, in fp32; T² keeps the gradient's scale independent of T
    (Hinton et al.'s convention)."""
    mask = mask.to(torch.float32)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return temperature**2 * (per_position * mask).sum() / mask.sum().clamp(min=1.0)
