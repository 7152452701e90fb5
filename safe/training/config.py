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

from safe.core.errors import SafeError
from safe.core.settings import ALL, BadSetting, checked_value, count_or, section_problems, setting
from safe.models.presets import ModelConfig, canonical_preset, preset_with

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


eval_limit = count_or(ALL)  # a sample count, or 'all' for the whole split (the flag's parser)


@dataclass
class DataConfig:
    data_root: str = setting(DEFAULT_DATA_ROOT, "data folder in the layout of the README")
    use_wavcaps: bool = setting(False, "add WavCaps training rows")
    wavcaps_ratio: float = setting(1.0, "fraction of WavCaps rows used (a fixed, seeded subset)")
    on_bad_sample: str = setting("skip", "an unreadable training sample: skip it (counted) or stop with an error",
                                 choices=("skip", "error"))
    allow_outside_paths: bool = setting(False, "accept absolute or escaping media paths in manifests")
    num_workers: int = setting(2, "DataLoader worker processes")
    feature_cache: bool = setting(True, "cache frozen audio-encoder outputs on disk")
    feature_cache_dir: str | None = setting(None, "feature cache folder", default_text="$SAFE_CACHE_DIR/features")
    feature_cache_memory_mb: float = setting(1024, "in-memory layer over the feature cache in the training process "
                                             "(0 = off)")
    wavcaps_blacklist: str | None = setting(None, "file of clip ids WavCaps must not train on (WavCaps' own "
                                            "blacklist JSON, a JSON list or one id per line); AudioCaps val/test "
                                            "clips are always dropped")
    max_audio_eval_samples: int | None = setting(500, "clips per evaluation, or 'all': a seeded random subset when "
                                                 "the split is larger", type=eval_limit)
    max_vl_eval_samples: int | None = setting(500, "VQA questions per evaluation, or 'all': a seeded random subset "
                                              "spread over images when the split is larger", type=eval_limit)
    eval_seed: int = setting(0, "seed of the evaluation subsets and distractor clips: the same in every run, so "
                             "runs compare item for item")
    audio_eval_split: str = setting("val", "audio split evaluated during training (val or test)")
    vl_eval_split: str = setting("val", "VQA split evaluated during training")
    audio_eval_dataset: str = setting("audiocaps", "audio evaluation set", choices=("audiocaps", "clotho"))
    source_weights: dict[str, float] | None = setting(
        None, "share of the training audio stream per source, e.g. audiocaps=1,wavcaps=0.5[,clotho=0.3]; clotho "
        "trains on clotho_train.jsonl", type=str, default_text="every row alike")

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
class RetentionConfig:
    use_vl: bool = setting(True, "train on VQA batches with a distractor clip as well", default_text="the variant's")
    kl_weight: float = setting(1.0, "weight of the KL to the base's answers", default_text="the variant's")
    kl_temperature: float = setting(2.0, "temperature of the KL distillation")
    fisher_weight: float = setting(0.0, "weight of the Fisher penalty, an estimate of the VL answers' KL drift in "
                                   "nats", default_text="the variant's")
    fisher_refresh: int = setting(50, "optimizer steps between Fisher estimates (the anchor moves with it)")
    fisher_samples: int = setting(64, "per-sample gradients per Fisher estimate")
    fisher_kind: str = setting("true", "Fisher from answers sampled from the model (true) or the base's answers "
                               "(empirical)", choices=("true", "empirical"))
    null_space_rank: int = setting(0, "rank of the protected VL gradient subspace", default_text="the variant's")
    null_space_refresh: int = setting(50, "optimizer steps between null-space basis refreshes")
    null_space_samples: int = setting(16, "per-sample VL gradients per null-space basis (>= rank)")
    protect_from_gate: float = setting(0.01, "Fisher and null space start once the largest |gate| reaches this")
    distractor_prob: float = setting(1.0, "probability that a VL retention batch carries a distractor clip")
    vl_fraction: float = setting(0.5, "share of micro-batches that are VL retention batches")
    base_work_cache: bool = setting(True, "cache the base's answers and teacher logits on the VQA training "
                                    "questions once per base, shared by every variant and run (`safe cache-base` "
                                    "fills it ahead)")
    base_work_cache_dir: str | None = setting(None, "base-work cache folder", default_text="$SAFE_CACHE_DIR/base_work")
    teacher_top_k: int = setting(0, "cache the teacher's top K logits + tail mass instead of all of them (0 = "
                                 "exact); the KL's error bound is logged")

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
    variant: str = setting("soft_retention", f"retention variant: {', '.join(VARIANTS)}")  # checked in validate()
    seed: int = setting(42, "training seed")
    output_root: str = setting(DEFAULT_OUTPUT_ROOT, "where run folders are created")
    run_name: str | None = setting(None, "run folder name", default_text="<YYYYmmdd_HHMMSS>_<variant>")
    train_batch_size: int = setting(8, "training samples per micro-batch")
    val_batch_size: int = setting(16, "evaluation batch size")
    num_epochs: int = setting(1, "passes over the training audio (unless --max-steps is set)")
    max_steps: int | None = setting(None, "optimizer steps (overrides --num-epochs)")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    lr_projector: float = setting(2e-4, "learning rate of the audio projector")
    lr_adapter: float = setting(1e-4, "learning rate of the fusion adapter, its gates and LoRA")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on gates, norms and biases)")
    warmup_steps: int | None = setting(None, "linear warm-up steps", default_text="5% of the optimizer steps")
    grad_clip: float = setting(1.0, "gradient norm clip")
    label_smoothing: float = setting(0.1, "label smoothing of the caption loss")
    eval_every: int | None = setting(None, "evaluate every N optimizer steps", default_text="at the end only")
    save_every: int | None = setting(500, "checkpoint every N optimizer steps (also before every evaluation and at "
                                     "the end)")
    log_every: int = setting(10, "log training figures every N optimizer steps")
    generation_max_new_tokens: int = setting(32, "tokens generated per caption or answer in evaluations")
    num_beams: int = setting(1, "beam width of evaluation decoding (1 = greedy)")
    max_consecutive_nonfinite: int = setting(10, "non-finite steps in a row (skipped) before the run stops")
    bf16: bool = setting(True, "bf16 autocast (CUDA only)")
    activation_checkpointing: bool = setting(False, "recompute the frozen decoder layers' activations in the "
                                             "backward: less memory, one extra forward")
    # Off by default: on the toy world it cost CIDEr-D (121.6 -> 82.3 for no_retention at 600 steps): same-length
    # captions there are mostly the same sound, so the batches stop being a fair sample of the data.
    length_grouping: bool = setting(False, "batch training items of similar text length together: less padding, "
                                    "less varied batches")
    resume: str | None = setting(None, "continue the latest run of this variant under --output-root (no value), "
                                 "or the run folder given", nargs="?", const="auto")
    override_on_resume: list[str] | None = setting(None, "settings a resume may change, e.g. max_steps eval_every "
                                                   "(only how long and how often)")
    re_eval: bool = setting(False, "resuming a completed run: evaluate its last checkpoint again instead of stopping")
    save_every_minutes: float | None = setting(30.0, "also checkpoint when this much wall time has passed since the "
                                               "last checkpoint")
    progress: bool = setting(True, "show a progress bar")
    tensorboard: bool | None = setting(None, "write TensorBoard event files", default_text="on when installed")
    wandb_project: str | None = setting(None, "also log to this Weights & Biases project")

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
        """The config a config.json records. Its model section is applied to its preset, so a section written
        before every model setting was recorded (null = the preset's) reads as the model that run built."""
        config = cls()
        model = values.get("model")
        if isinstance(model, dict):
            values = {**values, "model": dataclasses.asdict(preset_with(model.get("preset", config.model.preset),
                                                                        model))}
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
    # The model is the preset with the model settings the user gave: config.json then records every one of them.
    given = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(config.model) if f.name in explicit}
    config.model = preset_with(config.model.preset, given)
    for key, value in preset_train_defaults(config.model.preset, explicit).items():
        setattr(config.train, key, value)  # resolved here, so config.json records the values used
    config = config.validate()
    config.explicit = sorted(explicit)
    return config
