"""scaletrain._C configuration binding. Reference: the YAML values written by each test."""

import pytest

import scaletrain


def test_defaults_and_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  batch_size: 12\n")
    config = scaletrain.load_config(str(path), ["train.batch_size=7", "data.tasks=[dimmatch]"])
    assert config["model"]["n_layer"] == 3
    assert config["train"]["batch_size"] == 7
    assert config["data"]["tasks"] == ["dimmatch"]
    assert config["model"]["attention"] == "sdpa"  # default kept
    assert isinstance(config["optim"]["lr"], float)
    assert scaletrain.load_config()["train"]["batch_size"] == 32


def test_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: -3\n")
    with pytest.raises(scaletrain.ConfigError) as info:
        scaletrain.load_config(str(path))
    assert info.value.key == "train.batch_size"
    assert str(info.value) == f"{path}:2:15: train.batch_size: got '-3', expected an integer in [1, 1048576]"
    assert isinstance(info.value, ValueError)
    with pytest.raises(scaletrain.ConfigError, match="did you mean 'model.n_layer'"):
        scaletrain.load_config(None, ["model.n_layers=2"])
    with pytest.raises(scaletrain.ConfigError, match="expected KEY=VALUE"):
        scaletrain.load_config(None, ["model.n_layer"])
    with pytest.raises(scaletrain.ConfigError, match="cannot open"):
        scaletrain.load_config(str(tmp_path / "missing.yaml"))


def test_yaml_round_trip_and_reference(tmp_path):
    text = scaletrain.config_yaml(None, ["optim.lr=0.00125", "train.out_dir=a b"])
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert scaletrain.config_yaml(str(path)) == text
    assert scaletrain.load_config(str(path))["train"]["out_dir"] == "a b"
    reference = scaletrain.config_reference()
    for section, values in scaletrain.load_config().items():
        for key in values:
            assert f"`{section}.{key}`" in reference


def test_version_and_build_info():
    info = scaletrain.build_info()
    assert scaletrain.__version__ == info["version"]
    import torch

    assert torch.__version__.startswith(info["torch_version"])


def test_bad_files_raise_config_error(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"train:\n  out_dir: caf\xe9\n")
    with pytest.raises(scaletrain.ConfigError, match=r"latin1.yaml:2:15: malformed YAML: byte 0xe9 is not UTF-8"):
        scaletrain.load_config(str(latin1))
    with pytest.raises(scaletrain.ConfigError, match="path: got an empty path"):
        scaletrain.load_config("")
    second = tmp_path / "second.yaml"
    second.write_text("train:\n  max_steps: 5\n---\ntrain:\n  max_steps: 6\n")
    with pytest.raises(scaletrain.ConfigError, match="a second document"):
        scaletrain.load_config(str(second))
    with pytest.raises(scaletrain.ConfigError, match=r"train.max_steps: got !!str '5'"):
        scaletrain.load_config(None, ["train.max_steps=!!str 5"])
    open_quote = tmp_path / "open_quote.yaml"
    open_quote.write_text("train:\n  out_dir: 'runs/x\n")
    with pytest.raises(scaletrain.ConfigError, match=r"open_quote.yaml:2:12: .*single-quoted string is never closed"):
        scaletrain.load_config(str(open_quote))
    # !!str on a string key is what the key holds anyway
    assert scaletrain.load_config(None, ["train.out_dir=!!str 42"])["train"]["out_dir"] == "42"
