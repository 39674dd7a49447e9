import dataclasses
import json
import typing

import pytest

from config import TrainConfig, build_parser, load_config_file, parse_config
from core.common import UserError


def test_every_field_has_a_flag_with_help():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(flags) == names
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert "--" + f.name.replace("_", "-") in flags[f.name].option_strings


def test_flags_parse_to_field_types():
    cfg = parse_config(["--batch-size", "16", "--lr", "0.01", "--classes", "cat", "dog", "--no-tta",
                        "--data", "x", "--resume"])
    assert cfg.batch_size == 16 and isinstance(cfg.batch_size, int)
    assert cfg.lr == 0.01
    assert cfg.classes == ["cat", "dog"]
    assert cfg.tta is False and cfg.resume is True
    assert cfg.data == "x"
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        origin = typing.get_origin(hints[f.name]) or hints[f.name]
        assert isinstance(value, origin), f.name


def test_documented_defaults():
    cfg = TrainConfig()
    assert (cfg.data, cfg.image_size, cfg.channels, cfg.width, cfg.epochs, cfg.out_dir, cfg.log_dir, cfg.device,
            cfg.patience, cfg.tta, cfg.max_scale, cfg.cutmix) == \
        ("Dataset", 64, 1, 32, 80, "models", "logs", "auto", 0, True, 0.15, 0.0)


def test_flags_not_given_keep_the_base_values():
    # The parser must leave unnamed flags out: filling in their defaults would undo a resumed run's settings.
    base = TrainConfig(data="saved", epochs=5, tta=False, classes=["a", "b"], lr=0.5)
    assert parse_config([], base) == base
    assert parse_config(["--tta"], base) == TrainConfig(data="saved", epochs=5, tta=True, classes=["a", "b"], lr=0.5)


def test_given_flags_override_a_base_config():
    base = TrainConfig(data="saved", epochs=5)
    cfg = parse_config(["--epochs", "9"], base)
    assert cfg.data == "saved" and cfg.epochs == 9


def test_unknown_flag_exits():
    with pytest.raises(SystemExit):
        parse_config(["--no-such-flag"])


def test_round_trip_through_dict():
    cfg = TrainConfig(classes=["a", "b"], lr=0.5)
    assert TrainConfig.from_dict({**cfg.to_dict(), "field_from_the_future": 1}) == cfg


def test_a_run_saved_before_a_field_existed_keeps_what_it_trained_with(tmp_path):
    lacks = ("max_scale", "other_zoom_out", "rotation_weight")
    saved = {k: v for k, v in TrainConfig(epochs=7).to_dict().items() if k not in lacks}
    old = TrainConfig.from_dict(saved)
    assert (old.max_scale, old.other_zoom_out, old.rotation_weight, old.epochs) == (0.0, 0.0, 0.0, 7)  # not today's
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_config_file(tmp_path / "config.json").max_scale == 0.0
    assert TrainConfig.from_dict(TrainConfig().to_dict()).max_scale == 0.15  # a run that saved it keeps its own


def test_help_starts_with_a_description_and_shows_each_default_once():
    parser = build_parser()
    text = parser.format_help()
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith("usage:") and len(usage.splitlines()) == 1
    assert description.startswith("Train a ResNet image classifier")
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert all(h.count("default") == 1 for h in helps.values()), helps
    assert helps["arch"].endswith("(default: 'resnet_small')")
    assert helps["classes"].endswith("(default: every class found)")


@pytest.mark.parametrize("flag, bad", [("--arch", "resnet19"), ("--class-weights", "balanced"), ("--channels", "2"),
                                       ("--novelty-score", "odin"), ("--data-placement", "gpu")])
def test_a_value_outside_a_fixed_set_fails_before_any_data_is_read(flag, bad, tiny_data, tmp_path, capsys):
    import train
    from conftest import train_args

    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_data, tmp_path, flag, bad))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: " in err and bad in err.split("invalid choice: ")[1].split(" ")[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "logs").exists()


def test_choices_accept_every_listed_value():
    cfg = parse_config(["--arch", "resnet50", "--class-weights", "auto", "--channels", "3", "--novelty-score", "none",
                        "--data-placement", "map"])
    assert (cfg.arch, cfg.class_weights, cfg.channels, cfg.novelty_score, cfg.data_placement) == \
        ("resnet50", "auto", 3, "none", "map")
    assert parse_config(["--novelty-score", "knn"]).novelty_score == "knn"


def test_config_file_is_the_base_and_flags_override_it(tmp_path):
    saved = parse_config(["--lr", "0.01", "--classes", "cat", "dog", "--run-name", "old", "--resume"]).to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    cfg = parse_config(["--config", str(path), "--epochs", "7"])
    assert cfg.lr == 0.01 and cfg.classes == ["cat", "dog"] and cfg.epochs == 7 and cfg.config == str(path)
    assert cfg.run_name == "" and cfg.resume is False  # what that invocation did, not a setting


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("{not json", "not a readable JSON file"), ("[1, 2]", "expected a JSON object"),
    ('{"epochs": "5"}', "epochs should be int, not '5'"), ('{"lr": true}', "lr should be float"),
    ('{"arch": "resnet19"}',
     "--arch must be one of resnet_small, resnet18, resnet50, efficientnet_lite0, efficientnet_lite2, not 'resnet19'"),
    ('{"channels": 2}', "--channels must be one of 1, 3, not 2"),
])
def test_a_bad_config_file_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        parse_config(["--config", str(path)])


def test_config_file_and_resume_do_not_go_together(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(UserError, match="give one of them"):
        parse_config(["--config", str(path), "--resume"])


def test_blocks_take_four_stages_of_at_least_one():
    assert parse_config(["--blocks", "1", "2", "2", "1"]).blocks == [1, 2, 2, 1]
    assert TrainConfig().blocks == [1, 1, 1, 1]  # the default network is the one every earlier file holds
    for bad in (["1", "2"], ["1", "0", "1", "1"], []):
        with pytest.raises(UserError, match=r"--blocks takes 4 numbers of at least 1 \(resnet_small's stages\)"):
            parse_config(["--blocks", *bad])


@pytest.mark.parametrize("flag, bad, allowed", [("--cutmix", "1.5", r"\[0, 1\]"), ("--cutmix", "-0.1", r"\[0, 1\]"),
                                                ("--max-scale", "1.0", r"\[0, 1\)"),
                                                ("--other-zoom-out", "2", r"\[0, 1\]")])
def test_shares_out_of_range_are_refused(flag, bad, allowed):
    with pytest.raises(UserError, match=rf"^{flag} must be in {allowed}, not {float(bad)}$"):
        parse_config([flag, bad])


def test_a_negative_label_check_budget_is_refused():
    with pytest.raises(UserError, match=r"^--label-error-budget must be 0 \(off\) or a number of seconds, not -5.0$"):
        parse_config(["--label-error-budget", "-5"])
    assert parse_config(["--label-error-budget", "600"]).label_error_budget == 600.0
