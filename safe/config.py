"""Run configuration: dataclasses with validation, retention variants, YAML + CLI overrides.

`RunConfig` is what `config.json` records: every field, resolved, so two runs compare field by field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from safe.config_checks import BadSetting, checked_value, section_problems
from safe.errors import SafeError

DEFAULT_DATA_ROOT = "experiments/full_training/data"
DEFAULT_OUTPUT_ROOT = "experiments/full_training/runs"

# Which retention mechanisms each variant switches on (docs/design.md, "Retention"). Weights are defaults, overridable.
VARIANTS: dict[str, dict[str, Any]] = {
    "no_retention": {"use_vl": False, "kl_weight": 0.0, "fisher_weight": 0.0, "null_space_rank": 0},
    "soft_retention": {"use_vl": True, "kl_weight": 1.0, "fisher_weight": 0.0, "null_space_rank": 0},
    "fisher_retention": {"use_vl": True, "kl_weight": 1.0, "fisher_weight": 1.0, "null_space_rank": 0},
    "nullspace_retention": {"use_vl": True, "kl_weight": 1.0, "fisher_weight": 0.0, "null_space_rank": 8},
    "full_retention": {"use_vl": True, "kl_weight": 1.0, "fisher_weight": 1.0, "null_space_rank": 8},
}



def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise SafeError(f"Unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}.")
    return name


def canonical_preset(name: str) -> str:
    """The preset's canonical name; the user's earlier names `full` and `demo` keep working."""
    from safe.models.presets import get_preset

    return get_preset(name).name


@dataclass
class DataConfig:
    data_root: str = DEFAULT_DATA_ROOT
    use_wavcaps: bool = False
    wavcaps_ratio: float = 1.0
    on_bad_sample: str = "skip"
    allow_outside_paths: bool = False
    num_workers: int = 2
    feature_cache: bool = True  # cache frozen audio-encoder outputs on disk
    feature_cache_dir: str | None = None  # default $SAFE_CACHE_DIR/features or ~/.cache/safe/features
    feature_cache_memory_mb: float = 1024  # in-memory layer over the disk cache, in the training process
    wavcaps_blacklist: str | None = None  # ids WavCaps must not train on (WavCaps' own blacklist JSON accepted)
    max_audio_eval_samples: int | None = 500  # a seeded random subset of the clips when the split is larger
    max_vl_eval_samples: int | None = 500  # a seeded random subset spread over images when the split is larger
    eval_seed: int = 0  # seed of the evaluation subsets and distractors: the same for every run, so runs compare
    audio_eval_split: str = "val"
    vl_eval_split: str = "val"
    audio_eval_dataset: str = "audiocaps"  # audiocaps or clotho
    # Share of the training audio stream per source, e.g. {"audiocaps": 1, "wavcaps": 0.5}; None: every row alike.
    source_weights: dict[str, float] | None = None

    def validate(self) -> "DataConfig":
        """A normalised copy (source weights parsed), or one sentence on the first bad value."""
        from safe.data.mixing import parse_source_weights

        if self.use_wavcaps and not 0.0 < self.wavcaps_ratio <= 1.0:
            raise SafeError(f"--wavcaps-ratio must be in (0, 1], not {self.wavcaps_ratio}.")
        for name in ("audio_eval_split", "vl_eval_split"):
            if not re.fullmatch(r"[A-Za-z0-9_-]+", str(getattr(self, name))):
                raise SafeError(f"--{name.replace('_', '-')} must be a split name such as val or test, "
                                f"not {getattr(self, name)!r}.")
        if self.audio_eval_dataset not in ("audiocaps", "clotho"):
            raise SafeError(f"--audio-eval-dataset must be audiocaps or clotho, not {self.audio_eval_dataset!r}.")
        weights = parse_source_weights(self.source_weights)
        if weights is not None:
            if "wavcaps" in weights and not self.use_wavcaps:
                raise SafeError("--source-weights names wavcaps but WavCaps is off; add --use-wavcaps.")
            if self.use_wavcaps and "wavcaps" not in weights:
                raise SafeError("--use-wavcaps is on but --source-weights gives wavcaps no weight; add wavcaps=W "
                                "(or drop --use-wavcaps).")
        if self.on_bad_sample not in ("skip", "error"):
            raise SafeError(f"--on-bad-sample must be skip or error, not {self.on_bad_sample!r}.")
        if self.num_workers < 0:
            raise SafeError("--num-workers must be >= 0.")
        if self.feature_cache_memory_mb < 0:
            raise SafeError("--feature-cache-memory-mb must be >= 0 (0 turns the in-memory layer off).")
        return dataclasses.replace(self, source_weights=weights)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    base_model: str | None = None  # hub id or local path overriding the preset's base
    audio_encoder: str | None = None  # "clap", "whisper", "tiny-conv" or a path/hub id
    fusion: str = "xattn"
    lora_rank: int = 0
    num_audio_tokens: int | None = None  # None: the preset's default
    xattn_layers: list[int] | None = None  # None: spread over depth
    xattn_gate: str | None = None  # None: the preset's; "layer" (tanh alpha_l) or "token" (per-token gate)
    system_prompt: bool | None = None  # None: the preset's (llava-1.5: LLaVA's vicuna_v1 system message on)
    pad_to_square: bool | None = None  # None: the preset's (llava-1.5: pad images to square with the mean colour)

    def validate(self) -> "ModelConfig":
        """A normalised copy (the preset's canonical name), or one sentence on the first bad value."""
        if self.fusion not in ("xattn", "prefix"):
            raise SafeError(f"--fusion must be xattn or prefix, not {self.fusion!r}.")
        if self.lora_rank < 0:
            raise SafeError("--lora-rank must be >= 0.")
        return dataclasses.replace(self, preset=canonical_preset(self.preset))


@dataclass
class RetentionConfig:
    use_vl: bool = True
    kl_weight: float = 1.0
    kl_temperature: float = 2.0
    fisher_weight: float = 0.0  # weight of the Fisher penalty, an estimate of the VL answers' KL drift in nats
    fisher_refresh: int = 50  # optimizer steps between Fisher estimates (anchor moves with it)
    fisher_samples: int = 64  # per-sample gradients per estimate
    fisher_kind: str = "true"  # "true": answers sampled from the model; "empirical": the base's greedy answers
    null_space_rank: int = 0
    null_space_refresh: int = 50  # optimizer steps between basis refreshes
    null_space_samples: int = 16  # per-sample VL gradients merged into the rank-r basis (>= rank)
    protect_from_gate: float = 0.01  # Fisher and null space start once max|tanh alpha| reaches this
    distractor_prob: float = 1.0
    vl_fraction: float = 0.5  # share of micro-batches that are VL retention batches
    base_work_cache: bool = True  # base answers + teacher logits cached once per base, shared by all runs
    base_work_cache_dir: str | None = None  # default $SAFE_CACHE_DIR/base_work or ~/.cache/safe/base_work
    teacher_top_k: int = 0  # 0: cache the teacher's logits exactly; K: the top K + tail mass (error bound reported)

    def validate(self) -> "RetentionConfig":
        """A copy (nothing to normalise), or one sentence on the first bad value."""
        for name in ("kl_weight", "fisher_weight", "kl_temperature", "protect_from_gate"):
            if getattr(self, name) < 0:
                raise SafeError(f"--{name.replace('_', '-')} must be >= 0.")
        if not 0.0 <= self.distractor_prob <= 1.0:
            raise SafeError("--distractor-prob must be in [0, 1].")
        if self.use_vl and not 0.0 < self.vl_fraction < 1.0:
            raise SafeError("--vl-fraction must be in (0, 1) for variants with retention.")
        if self.null_space_rank < 0 or self.fisher_refresh < 1 or self.null_space_refresh < 1:
            raise SafeError("--null-space-rank must be >= 0 and refresh intervals >= 1.")
        if self.fisher_kind not in ("true", "empirical"):
            raise SafeError(f"--fisher-kind must be true or empirical, not {self.fisher_kind!r}.")
        if self.teacher_top_k < 0:
            raise SafeError("--teacher-top-k must be >= 0 (0 caches the teacher exactly).")
        if self.fisher_samples < 1:
            raise SafeError("--fisher-samples must be >= 1.")
        if self.null_space_rank and self.null_space_samples < self.null_space_rank:
            raise SafeError(f"--null-space-samples ({self.null_space_samples}) must be at least --null-space-rank "
                            f"({self.null_space_rank}): a rank-r basis needs r gradients.")
        return dataclasses.replace(self)


@dataclass
class TrainConfig:
    variant: str = "soft_retention"
    seed: int = 42
    output_root: str = DEFAULT_OUTPUT_ROOT
    run_name: str | None = None  # default <YYYYmmdd_HHMMSS>_<variant>
    train_batch_size: int = 8
    val_batch_size: int = 16
    num_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides num_epochs when set
    gradient_accumulation_steps: int = 1
    lr_projector: float = 2e-4
    lr_adapter: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # None: 5% of the optimizer steps
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    eval_every: int | None = None  # optimizer steps; None: at the end only
    save_every: int | None = 500  # optimizer steps between checkpoints (also with every evaluation and at the end)
    log_every: int = 10
    generation_max_new_tokens: int = 32
    num_beams: int = 1
    max_consecutive_nonfinite: int = 10
    bf16: bool = True  # autocast on CUDA only
    activation_checkpointing: bool = False  # recompute decoder-layer activations in the backward (less memory)
    # Batches of similar text length (about half the padding). Off by default: on the toy world it cost CIDEr-D
    # (121.6 -> 82.3 for no_retention at 600 steps): same-length captions there are mostly the same sound, so the
    # batches stop being a fair sample of the data.
    length_grouping: bool = False
    resume: str | None = None  # "auto" (the newest unfinished run of the variant) or a run directory
    override_on_resume: list[str] | None = None  # settings a resume may change (max_steps, eval_every, ...)
    re_eval: bool = False  # resuming a completed run: evaluate its last checkpoint again instead of stopping
    save_every_minutes: float | None = 30.0  # also checkpoint when this much wall time passed since the last one
    progress: bool = True
    tensorboard: bool | None = None  # None: on when the tensorboard package is installed
    wandb_project: str | None = None

    def validate(self) -> "TrainConfig":
        """A copy (nothing to normalise), or one sentence on the first bad value."""
        check_variant(self.variant)
        positive = ("train_batch_size", "val_batch_size", "num_epochs", "gradient_accumulation_steps",
                    "generation_max_new_tokens", "num_beams", "max_consecutive_nonfinite", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise SafeError(f"--{name.replace('_', '-')} must be >= 1.")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SafeError(f"--{name.replace('_', '-')} must be >= 1.")
        if self.lr_projector <= 0 or self.lr_adapter <= 0:
            raise SafeError("Learning rates must be > 0.")
        return dataclasses.replace(self)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explicit: list[str] = field(default_factory=list, repr=False, compare=False,
                                metadata={"not_a_setting": True})  # the keys a file or flag set

    def to_dict(self) -> dict:
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}

    def value(self, key: str):
        return getattr(getattr(self, field_index()[key]), key)

    def validate(self) -> "RunConfig":
        """A normalised copy of every section (the object itself is left as it was), or one sentence."""
        parts = {}
        for name in SECTIONS:
            part = getattr(self, name)
            bad = section_problems(part)  # values set in code skip apply_overrides' checks
            if bad:
                raise SafeError(f"Bad setting{'s' if len(bad) > 1 else ''}: {' '.join(bad)}")
            parts[name] = part.validate()
        return dataclasses.replace(self, **parts, explicit=list(self.explicit))

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        config = cls()
        apply_overrides(config, values, source="config")
        return config


SECTIONS = ("data", "model", "retention", "train")
# Other names users' files and flags have for a setting.
KEY_ALIASES = {"model_config": "preset"}


def field_index() -> dict[str, str]:
    """Map every field name to its section (names are unique across sections)."""
    index = {}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(RunConfig(), section)):
            index[f.name] = section
    return index


def apply_overrides(config: RunConfig, values: dict, source: str) -> None:
    """Set fields from a nested ({"train": {...}}) or flat ({"seed": 1}) mapping; unknown keys are errors, and
    values of the wrong type or out of range are refused with one sentence per bad key."""
    index = field_index()
    bad = []
    for key, value in _flat_items(values):
        key = KEY_ALIASES.get(key, key)
        if key not in index:
            raise SafeError(f"Unknown setting {key!r} in {source}; known settings: {', '.join(sorted(index))}.")
        section = getattr(config, index[key])
        try:
            setattr(section, key, checked_value(section, key, value))
        except BadSetting as exc:
            bad.append(str(exc))
    if bad:
        raise SafeError(f"Bad setting{'s' if len(bad) > 1 else ''} from {source}: {' '.join(bad)}")


def _flat_items(values: dict):
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            yield from _flat_items(value)
        else:
            yield key, value


def apply_variant_defaults(config: RunConfig, explicit: set[str]) -> None:
    """Fill the variant's retention switches and weights, except those the user set explicitly."""
    for key, value in VARIANTS[check_variant(config.train.variant)].items():
        if key not in explicit:
            setattr(config.retention, key, value)


# Training settings that belong to a model preset, used where neither the YAML file nor a flag sets them. The tiny
# preset learns the toy world at the demo's measured settings (safe.demo: 10x the real presets' learning rates, 600
# steps); at the real presets' rates a short toy run stays at the base model (audio gain 0.00 after 20 steps).
PRESET_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"lr_projector": 2e-3, "lr_adapter": 2e-3, "max_steps": 600},
}


def explicit_settings(yaml_values: dict | None, cli_values: dict | None) -> set[str]:
    """Names of the settings the user set (in the YAML file, or as flags: a None flag is "not given")."""
    names = {key for key, value in (cli_values or {}).items() if value is not None}
    for key, value in (yaml_values or {}).items():
        names |= set(value) if key in SECTIONS and isinstance(value, dict) else {key}
    return {KEY_ALIASES.get(name, name) for name in names}


def preset_train_defaults(preset: str, explicit: set[str]) -> dict[str, Any]:
    """The preset's training defaults that apply: those the user did not set (max_steps also yields to
    num_epochs)."""
    skip = set(explicit) | ({"max_steps"} if "num_epochs" in explicit else set())
    return {k: v for k, v in PRESET_TRAIN_DEFAULTS.get(canonical_preset(preset), {}).items() if k not in skip}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SafeError(f"Config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SafeError(f"Config file {path} is not valid YAML: {exc}.") from None
    if not isinstance(values, dict):
        raise SafeError(f"Config file {path} must hold a mapping of settings.")
    return values


def build_config(yaml_values: dict | None = None, cli_values: dict | None = None) -> RunConfig:
    """Defaults < the preset's and the variant's defaults < YAML file < command-line flags, then validated.

    The returned config remembers which settings the file and the flags gave (``config.explicit``): a resumed run
    takes every setting from its own config.json, and refuses a given one that differs."""
    config = RunConfig()
    yaml_values = yaml_values or {}
    cli_values = {k: v for k, v in (cli_values or {}).items() if v is not None}
    flat_yaml = {}
    for key, value in yaml_values.items():
        flat_yaml.update(value if key in SECTIONS and isinstance(value, dict) else {key: value})
    variant = cli_values.get("variant", flat_yaml.get("variant", config.train.variant))
    config.train.variant = check_variant(cast(str, variant))  # anything else: check_variant refuses it
    explicit = explicit_settings(yaml_values, cli_values)
    apply_variant_defaults(config, explicit=explicit)
    apply_overrides(config, flat_yaml, source="the config file")
    apply_overrides(config, cli_values, source="the command line")
    for key, value in preset_train_defaults(config.model.preset, explicit).items():
        setattr(config.train, key, value)  # resolved here, so config.json records the values used
    config = config.validate()
    config.explicit = sorted(explicit)
    return config
