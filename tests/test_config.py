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


def test_the_pre_pool_grid_of_a_real_preset_can_be_turned_off_or_changed_from_the_command_line():
    import argparse

    from safe.training.cli import config_from_args, configure

    parser = argparse.ArgumentParser()
    configure(parser)

    def model(*flags):
        return config_from_args(parser.parse_args(["--model-config", "llava-1.5-7b", *flags])).model

    assert model().pre_pool_steps == 32                                # the preset's grid
    assert model("--pre-pool-steps", "off").pre_pool_steps is None     # off: the projector pools the raw sequence
    assert "pre_pool_steps" in config_from_args(parser.parse_args(["--pre-pool-steps", "off"])).explicit  # a resume
    # compares it with the saved run, as it does "--pre-pool-steps 48"
    assert model("--pre-pool-steps", "48").pre_pool_steps == 48
    for bad in ("0", "none", "-4"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--pre-pool-steps", bad])
    # The words are only words for the flags that take them: a run may be named "off" or "all".
    named = config_from_args(parser.parse_args(["--run-name", "off", "--wandb-project", "all"]))
    assert (named.train.run_name, named.train.wandb_project) == ("off", "all")


def test_a_preset_is_a_model_config_and_config_json_records_the_whole_model():
    import dataclasses

    from safe.models.presets import PRESETS, ModelConfig
    from safe.training.config import RunConfig

    assert ModelConfig() == PRESETS["tiny"]                       # the embedded default is the tiny preset
    config = build_config(cli_values={"preset": "full", "num_audio_tokens": 4, "lora_rank": 8,
                                      "lora_targets": ["q_proj", "k_proj", "v_proj"]})
    recorded = config.to_dict()["model"]
    assert set(recorded) == {f.name for f in dataclasses.fields(ModelConfig)}
    expected = dataclasses.replace(PRESETS["llava-1.5-13b"], num_audio_tokens=4, lora_rank=8,
                                   lora_targets=["q_proj", "k_proj", "v_proj"])
    assert config.model == expected and recorded["clip_seconds"] == 10.0 and recorded["xattn_heads"] == 8
    assert RunConfig.from_dict(config.to_dict()).model == expected     # resume and eval read the same model


def test_a_config_json_from_before_every_model_setting_was_recorded_reads_as_the_model_it_built():
    from safe.models.presets import PRESETS
    from safe.models.pretrained import saved_preset
    from safe.training.config import RunConfig

    # The model section config.json held until now: null meant "the preset's".
    old = {"preset": "llava-1.5-7b", "base_model": None, "audio_encoder": None, "fusion": "prefix", "lora_rank": 0,
           "num_audio_tokens": None, "xattn_layers": None, "xattn_gate": None, "system_prompt": None,
           "pad_to_square": None}
    model = RunConfig.from_dict({"model": old}).model
    assert model == PRESETS["llava-1.5-7b"].replace(fusion="prefix")
    # An adapter's safe_config.json from then named its preset "name" and gave every setting of the time.
    saved = {"name": "tiny", "base_model": "tiny", "audio_encoder": "tiny", "audio_encoder_path": None,
             "audio_features": "patch", "clip_seconds": 4.0, "num_audio_tokens": 8, "pre_pool_steps": None,
             "fusion": "xattn", "xattn_layers": [1, 3], "num_xattn_layers": 2, "xattn_dim": None, "xattn_heads": 4,
             "xattn_gate": "token", "lora_rank": 2, "lora_alpha": None, "lora_targets": ["q_proj", "v_proj"],
             "lora_dropout": 0.0, "tiny_seed": 0, "prompt_style": "tiny", "system_prompt": True,
             "pad_to_square": False}
    assert saved_preset({"preset": saved}) == PRESETS["tiny"].replace(xattn_layers=[1, 3], xattn_gate="token",
                                                                       lora_rank=2)


def test_bad_model_settings_are_one_sentence_errors():
    with pytest.raises(SafeError, match="--prompt-style must be llava_v1 or tiny"):
        build_config(cli_values={"prompt_style": "chatml"})
    with pytest.raises(SafeError, match="--num-audio-tokens must be at least 1"):
        build_config(cli_values={"num_audio_tokens": 0})
    with pytest.raises(SafeError, match="lora_dropout must be at most 1"):
        build_config(cli_values={"lora_dropout": 1.5})
