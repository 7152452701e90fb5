import pytest

from safe.core.errors import SafeError
from safe.training.config import VARIANTS, build_config, canonical_preset, load_yaml


def test_variant_defaults_and_overrides():
    config = build_config(cli_values={"variant": "no_retention"})
    assert not config.retention.use_vl and config.retention.kl_weight == 0.0
    config = build_config(cli_values={"variant": "full_retention", "fisher_weight": 3.0})
    assert config.retention.use_vl and config.retention.fisher_weight == 3.0
    assert config.retention.null_space_rank == VARIANTS["full_retention"]["null_space_rank"]


def test_yaml_values_are_overridden_by_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seed: 7\n  lr_adapter: 0.5\nkl_weight: 2.0\nvariant: fisher_retention\n")
    config = build_config(load_yaml(path), {"seed": 9, "lr_projector": None})
    assert config.train.seed == 9 and config.train.lr_adapter == 0.5
    assert config.retention.kl_weight == 2.0 and config.train.variant == "fisher_retention"
    assert config.train.lr_projector == 2e-3  # None on the command line means "not given": the tiny preset's default
    assert build_config(cli_values={"model_config": "llava-1.5-7b", "lr_projector": None}).train.lr_projector == 2e-4


def test_bad_values_are_one_sentence_errors(tmp_path):
    with pytest.raises(SafeError, match="Unknown variant 'nope'; choose one of: no_retention"):
        build_config(cli_values={"variant": "nope"})
    with pytest.raises(SafeError, match="Unknown setting 'sed'"):
        build_config({"sed": 1})
    with pytest.raises(SafeError, match="train-batch-size"):
        build_config(cli_values={"train_batch_size": 0})
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(SafeError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")


def test_preset_aliases():
    assert canonical_preset("full") == "llava-1.5-13b" and canonical_preset("demo") == "tiny"
    with pytest.raises(SafeError, match="Unknown model config"):
        canonical_preset("gpt")


def test_validate_returns_a_normalised_copy_and_leaves_the_original_alone():
    from safe.training.config import RunConfig

    config = RunConfig()
    config.model.preset = "demo"                                  # an alias of tiny
    config.data.source_weights = "audiocaps=1"
    checked = config.validate()
    assert (checked.model.preset, checked.data.source_weights) == ("tiny", {"audiocaps": 1.0})
    assert (config.model.preset, config.data.source_weights) == ("demo", "audiocaps=1")   # untouched
    assert checked.model is not config.model and checked.train is not config.train


def test_every_setting_is_a_flag_that_shows_its_real_default_and_reaches_the_config():
    import argparse
    import dataclasses

    from safe.training.cli import config_from_args, configure
    from safe.training.config import SECTIONS, RunConfig

    parser = argparse.ArgumentParser()
    configure(parser)
    actions = {action.dest: action for action in parser._actions}
    for section in SECTIONS:
        for spec in dataclasses.fields(type(getattr(RunConfig(), section))):
            action = actions[spec.metadata["flag"].get("dest", spec.name)]     # declared once, in the dataclass
            assert action.default is None                                      # "not given": YAML and presets apply
            shown = spec.metadata["flag"].get("default_text", spec.default)
            if not isinstance(shown, bool) and shown is not None:
                assert f"(default {shown}" in action.help.replace("%%", "%"), (spec.name, action.help)
    config = config_from_args(parser.parse_args([
        "--override-on-resume", "max_steps", "eval_every", "--re-eval", "--save-every-minutes", "5",
        "--grad-clip", "0.5", "--xattn-layers", "1", "3", "--max-vl-eval-samples", "all", "--preset", "demo"]))
    assert config.train.override_on_resume == ["max_steps", "eval_every"] and config.train.re_eval is True
    assert (config.train.save_every_minutes, config.train.grad_clip) == (5.0, 0.5)
    assert config.model.xattn_layers == [1, 3] and config.data.max_vl_eval_samples is None
    assert config.model.preset == "tiny"
