import pytest

from kbricks import build_config, load_config
from kbricks.config import apply_overrides, parse_override
from kbricks.errors import ConfigError

BASE = {"data": {"name": "digits"}, "model": {"name": "mlp"}}


def test_defaults_and_types():
    cfg = build_config(BASE)
    assert cfg.train.epochs == 10 and cfg.optim.name == "sgd" and cfg.method.name == "supervised"


def test_unknown_key_error_names_full_path():
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "data": {"name": "digits", "augment": {"crop_pading": 2}}})
    assert "data.augment.crop_pading: unknown key" in str(info.value)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as info:
        build_config(BASE, ["train.epochs=many"])
    assert "train.epochs" in str(info.value) and "'many'" in str(info.value)


def test_missing_required_section():
    with pytest.raises(ConfigError, match="model: required key is missing"):
        build_config({"data": {"name": "digits"}})


def test_method_params_validated_by_the_method():
    cfg = build_config(BASE, ["method.label_smoothing=0.1"])
    assert cfg.method.params() == {"label_smoothing": 0.1}
    with pytest.raises(ConfigError, match="method.temperature: unknown key"):
        build_config(BASE, ["method.temperature=4"])
    with pytest.raises(ConfigError, match="method.label_smoothing"):
        build_config(BASE, ["method.label_smoothing=2"])


def test_unknown_names_fail_at_load_time():
    with pytest.raises(ConfigError, match="unknown model 'resnet99'; valid models: .*resnet20"):
        build_config(BASE, ["model.name=resnet99"])
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        build_config(BASE, ["data.name=imagenet"])
    with pytest.raises(ConfigError, match="unknown method 'foo'"):
        build_config(BASE, ["method.name=foo"])
    with pytest.raises(ConfigError, match=r"model 'mlp' \(model.kwargs\) got unknown argument\(s\) \['depth'\]"):
        build_config(BASE, ["model.kwargs.depth=3"])
    with pytest.raises(ConfigError, match="must not set"):
        build_config(BASE, ["model.kwargs.num_classes=3"])


def test_override_values_are_parsed_as_yaml():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=hello") == ("a", "hello")
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("noequals")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("a..b=1")


def test_overrides_create_nested_keys_and_refuse_scalars():
    out = apply_overrides({"a": {"b": 1}}, ["a.c.d=2", "a.b=3"])
    assert out == {"a": {"b": 3, "c": {"d": 2}}}
    with pytest.raises(ConfigError, match="a.b is not a mapping"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])


def test_tasks_need_exactly_one_kind():
    cfg = build_config({**BASE, "data": {"name": "digits", "tasks": {"split": 5}}})
    assert cfg.data.tasks.split == 5
    with pytest.raises(ConfigError, match="exactly one of split / partition / latents"):
        build_config({**BASE, "data": {"name": "digits", "tasks": {"split": 2, "latents": ["shape"]}}})


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)


def test_shipped_configs_are_valid():
    import glob
    import os

    from conftest import REPO

    paths = glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    assert len(paths) >= 15
    continual = [p for p in paths if load_config(p).is_continual]  # one loader for every kind of run
    assert len(continual) >= 4
