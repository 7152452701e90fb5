"""Retention: what keeps the base's VL answers while the audio path learns (docs/design.md, "Retention")."""

from safe.retention.component import Retention, build_retention
from safe.retention.fisher import FisherPenalty
from safe.retention.kl import kl_distillation
from safe.retention.null_space import NullSpaceProjector

__all__ = ["FisherPenalty", "NullSpaceProjector", "Retention", "build_retention", "kl_distillation"]
