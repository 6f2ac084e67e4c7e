"""Settings declared once (nanoseek.settings): flags, JSON and checks all come from the field declarations."""

import argparse
import json

import pytest

from nanoseek.cli import build_parser
from nanoseek.errors import ConfigError
from nanoseek.rl.config import GRPORunConfig, RLGuardConfig
from nanoseek.settings import add_arguments, given, resumable
from nanoseek.train.config import GuardConfig, SFTConfig, TrainConfig


def test_flags_are_derived_with_their_defaults_in_the_help():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig, exclude=("guard",))
    actions = {a.dest: a for a in parser._actions}
    assert actions["lr"].option_strings == ["--lr"] and "(default: 0.0003)" in actions["lr"].help
    assert actions["price_per_device_hour"].option_strings == ["--price-per-hour"]
    assert set(actions["compile"].option_strings) == {"--compile", "--no-compile"}
    assert actions["betas"].nargs == 2 and actions["data"].nargs == "+"
    # SFT shows its own defaults, not pretraining's
    parser = argparse.ArgumentParser()
    add_arguments(parser, SFTConfig, only=("lr", "max_steps"))
    assert "(default: 0.0001)" in {a.dest: a for a in parser._actions}["lr"].help


def test_only_given_flags_become_overrides():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig, exclude=("guard",))
    assert given(parser.parse_args([]), TrainConfig) == {}
    args = parser.parse_args(["--max-steps", "7", "--no-decay-embeddings", "--betas", "0.8", "0.9"])
    assert given(args, TrainConfig) == {"max_steps": 7, "decay_embeddings": False, "betas": [0.8, 0.9]}


def test_every_command_builds_its_flags():
    parser = build_parser()
    for command in ("pretrain", "sft", "distill", "grpo"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([command, "--help"])
        assert exc.value.code == 0


def test_unknown_json_key_is_refused_naming_key_and_file(tmp_path):
    path = tmp_path / "train_config.json"
    data = TrainConfig(preset="tiny").to_dict()
    path.write_text(json.dumps({**data, "learning_rate": 1e-3}))
    with pytest.raises(ConfigError, match=r"train_config\.json.*'learning_rate'"):
        TrainConfig.load(path)
    path.write_text(json.dumps({**data, "guard": {**data["guard"], "bogus": 1}}))
    with pytest.raises(ConfigError, match=r"train_config\.json.*'bogus'"):
        TrainConfig.load(path)


@pytest.mark.parametrize("cls,field,value,why", [
    (TrainConfig, "lr", 0.0, "> 0"), (TrainConfig, "max_steps", 2.5, "integer"),
    (TrainConfig, "val_fraction", 1.5, "<= 1"), (GuardConfig, "on_spike", "panic", "one of"),
    (GRPORunConfig, "group_size", 1, ">= 2"), (RLGuardConfig, "on_kl", "skip", "one of"),
    (SFTConfig, "cold_start_n", 0, ">= 1"), (GRPORunConfig, "temperature", float("nan"), "finite"),
])
def test_bad_values_name_the_field_and_value(cls, field, value, why, tmp_path):
    with pytest.raises(ConfigError, match=f"{field}.*{why}"):
        cls(**{field: value})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(ConfigError, match=rf"c\.json.*{field}"):
        cls.load(path)


def test_json_round_trip_keeps_every_field(tmp_path):
    cfg = SFTConfig(init_from="/x", cold_start=["arithmetic:2"], cold_start_n=10, cold_start_answer_only=0.5,
                    betas=(0.8, 0.9), guard=GuardConfig(on_spike="rollback"))
    cfg.save(tmp_path / "c.json")
    assert SFTConfig.load(tmp_path / "c.json") == cfg
    run = GRPORunConfig(init_from="/x", betas=(0.5, 0.6), guard=RLGuardConfig(on_length="rollback"))
    run.save(tmp_path / "g.json")
    assert GRPORunConfig.load(tmp_path / "g.json") == run


def test_resumable_fields_are_declared_with_the_field():
    assert {"max_steps", "checkpoint_every", "device", "guard"} <= resumable(TrainConfig)
    assert not {"lr", "seq_len", "batch_size", "seed"} & resumable(TrainConfig)
    assert {"steps", "eval_every", "guard"} <= resumable(GRPORunConfig)
    assert not {"lr", "group_size", "prompts_per_step", "seed"} & resumable(GRPORunConfig)
