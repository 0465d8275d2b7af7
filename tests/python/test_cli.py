"""The `scaletrain` executable: bad input exits with code 2 and one clear line; the commands a
user runs work end to end. References: the files the tests write and the documented messages."""

import json
import os
import zlib

import pytest

from conftest import ROOT, cuda_available

TINY = [
    "--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32",
    "--set", "data.train_examples=256", "--set", "data.val_examples=8",
    "--set", "train.max_steps=6", "--set", "train.batch_size=4", "--set", "train.log_every=3",
    "--set", "eval.examples=4", "--set", "eval.max_new_tokens=16", "--set", "train.device=cpu",
]


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture()
def configs(tmp_path):
    files = {
        "malformed.yaml": "model:\n  n_layer: [1, 2\n",
        "unknown.yaml": "train:\n  batchsize: 8\n",
        "negative.yaml": "train:\n  batch_size: -4\n",
        "missing_data.yaml": f"data:\n  source: text\n  path: {tmp_path}/no_such_corpus.txt\n",
        "folder_data.yaml": f"data:\n  source: bin\n  path: {tmp_path}\n",
        "ok.yaml": "train:\n  max_steps: 5\n",
        "two_documents.yaml": "train:\n  max_steps: 5\n---\ntrain:\n  max_steps: 6\n",
        "str_tag.yaml": "train:\n  max_steps: !!str 5\n",
        "custom_tag.yaml": "optim:\n  lr: !fast 1e-3\n",
        "open_quote.yaml": 'train:\n  out_dir: "runs/x\n',
        "a_file": "not a folder\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  out_dir: caf\xe9\n")
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "model_pt_folder" / "model.pt").mkdir(parents=True)
    (tmp_path / "blocked" / "checkpoints").mkdir(parents=True)
    (tmp_path / "blocked" / "checkpoints" / "step_00000004").write_text("a file where a checkpoint goes\n")
    manifest = tmp_path / "typed" / "step_00000002"
    manifest.mkdir(parents=True)
    fields = {"format": 7, "version": 1, "step": 2, "files": []}
    fields["manifest_crc32"] = f"{zlib.crc32(json.dumps(fields, separators=(',', ':')).encode()):08x}"
    (manifest / "manifest.json").write_text(json.dumps(fields))
    return tmp_path


BAD_INPUTS = [
    (["train", "--config", "{d}/nope.yaml"], "config file '{d}/nope.yaml': cannot open (No such file or directory)"),
    (["train", "--config", "{d}/malformed.yaml"], "{d}/malformed.yaml:3:1: malformed YAML"),
    (["train", "--config", "{d}/unknown.yaml"], "train.batchsize: unknown key (did you mean 'train.batch_size'?)"),
    (["train", "--config", "{d}/negative.yaml"], "train.batch_size: got '-4', expected an integer in [1, 1048576]"),
    (["train", "--config", "{d}/missing_data.yaml"], "data.path '{d}/no_such_corpus.txt': cannot open"),
    (["train", "--config", "{d}/folder_data.yaml"], "data.path '{d}': not a regular file"),
    (["train", "--config", "{d}/ok.yaml", "--set", "train.max_steps"], "--set 'train.max_steps': expected KEY=VALUE"),
    (["train", "--config", "{d}/ok.yaml", "--set", "optim.lr=fast"], "optim.lr: got 'fast', expected a finite number > 0.0"),
    (["train", "--config", "{d}/ok.yaml", "--set", "model.n_embd=100", "--set", "model.n_head=3"],
     "model.n_head: got 3, expected a divisor of model.n_embd (100)"),
    (["train", "--config", "{d}/ok.yaml", "--set", "amp.precision=fp8"], "amp.precision: got 'fp8'"),
    (["train", "--config", "{d}/ok.yaml", "--set", "amp.loss_scale=dynamic"],
     "amp.loss_scale: got 'dynamic', but amp.precision is fp32"),
    (["train", "--config", "{d}/ok.yaml", "--set", "amp.precision=fp16", "--set", "amp.loss_scale=0"],
     "amp.loss_scale: got '0', expected auto, dynamic, none or a positive number"),
    (["train", "--config", "{d}/ok.yaml", "--set", "amp.low_precision_params=true"],
     "amp.low_precision_params: true needs amp.precision bf16 or fp16 (got fp32)"),
    (["train", "--config", "{d}/ok.yaml", "--resume", "{d}/no_checkpoint"],
     "checkpoint '{d}/no_checkpoint': no such checkpoint folder"),
    (["train", "--config", "{d}/ok.yaml", "--resume", "{d}"],
     "checkpoint '{d}': no manifest.json (not a checkpoint, or one whose writing did not finish)"),
    (["train", "--config", "{d}/ok.yaml", "--set", 'train.out_dir=""', "--resume", "auto"],
     "--resume auto: no checkpoint folder to look in (checkpoint.dir and train.out_dir are both empty)"),
    (["train", "--config", "{d}/ok.yaml", "--set", 'train.out_dir=""', "--set", "checkpoint.every=5"],
     'checkpoint.dir: got "" with train.out_dir also "", expected a folder for the checkpoints'),
    (["train", "--config", "{d}/ok.yaml", "--set", "checkpoint.keep=0"],
     "checkpoint.keep: got '0', expected an integer >= 1"),
    (["train"], "--config is required"),
    (["train", "--config"], "--config"),
    (["fly"], "unknown command 'fly' (expected train, eval, data, config or info)"),
    (["trian", "--config", "x"], "did you mean 'train'?"),
    (["train", "--config", "{d}/ok.yaml", "--bogus"], "--bogus"),
    (["--log-level", "loud", "info"], "--log-level: got 'loud', expected one of trace, debug, info, warn, error, off"),
    (["data", "--count", "-1"], "--count"),
    (["data", "--split", "test"], "--split"),
    (["eval"], "expected either --run DIR or --config FILE --model FILE"),
    (["eval", "--run", "{d}/no_run"], "config file '{d}/no_run/config.yaml': cannot open"),
    (["eval", "--run", "{d}", "--config", "{d}/ok.yaml"], "expected either --run DIR or --config FILE --model FILE"),
    (["eval", "--config", "{d}/ok.yaml", "--model", "{d}/ok.yaml"], "'{d}/ok.yaml': not a saved model"),
    ([], "A subcommand is required"),
    (["train", "--config", "{d}/ok.yaml", "--profile", "{d}/p.json", "--profile-steps", "3,200"],
     "--profile-steps: steps 3 to 202 are not all in this run (steps 0 to "),
    (["train", "--config", "{d}/ok.yaml", "--profile", "{d}/no/such/p.json", "--profile-steps", "0,2"],
     "--profile: folder '{d}/no/such' does not exist"),
    (["train", "--config", "{d}/ok.yaml", "--profile", "{d}/p.json", "--profile-steps", "-1,2"],
     "--profile-steps: got -1,2, expected FIRST,COUNT with FIRST >= 0 and COUNT >= 1"),
    (["train", "--config", ""], "--config: got an empty path (an unset shell variable?), expected a YAML file"),
    (["config", "--config", ""], "--config: got an empty path"),
    (["train", "--config", "{d}/two_documents.yaml"],
     "{d}/two_documents.yaml:4:1: malformed YAML: a second document (after '---'); expected one configuration"),
    (["train", "--config", "{d}/str_tag.yaml"], "train.max_steps: got !!str '5', expected an integer >= 1"),
    (["train", "--config", "{d}/custom_tag.yaml"], "optim.lr: got !fast '1e-3', expected a finite number > 0.0"),
    (["train", "--config", "{d}/open_quote.yaml"],
     "{d}/open_quote.yaml:2:12: malformed YAML: a double-quoted string is never closed"),
    (["train", "--config", "{d}/latin1.yaml"],
     "{d}/latin1.yaml:2:15: malformed YAML: byte 0xe9 is not UTF-8 (expected UTF-8 text)"),
    (["train", "--config", "{d}/pipe.yaml"], "config file '{d}/pipe.yaml': not a regular file (a named pipe"),
    (["data", "--set", "data.source=text", "--set", "data.path={d}/pipe.yaml"],
     "data.path '{d}/pipe.yaml': not a regular file (a named pipe"),
    (["data", "-n", "9223372036854775808"], "got 9223372036854775808, expected at most 9223372036854775807"),
    (["eval", "--run", "{d}", "--examples", "1e3"], "expected a whole number >= 0"),
    (["train", "--config", "{d}/ok.yaml", "--set", "amp.precision=fp16", "--set", "amp.init_scale=0.5"],
     "amp.init_scale: got 0.5, expected a number in [amp.min_scale, amp.max_scale] = [1.0, 16777216.0]"),
    (["train", "--config", "{d}/ok.yaml", "--set", "amp.max_scale=1e39"],
     "amp.max_scale: got '1e39', expected a finite number in (0.0, 3.4028234663852886e+38]"),
    (["train", "--config", "{d}/ok.yaml", "--set", "train.out_dir={d}/a_file/run"],
     "train.out_dir: the folder '{d}/a_file/run' cannot be written"),
    (["train", "--config", "{d}/ok.yaml", "--set", "train.out_dir={d}/model_pt_folder"],
     "train.save_model: '{d}/model_pt_folder/model.pt' is a folder or another non-file"),
    (["train", "--config", "{d}/ok.yaml", "--set", "train.out_dir={d}/run", "--set", "checkpoint.every=2",
      "--set", "checkpoint.dir={d}/a_file"], "checkpoint.dir: the folder '{d}/a_file' cannot be written"),
    (["train", "--config", "{d}/ok.yaml", "--set", "train.out_dir={d}/blocked", "--set", "checkpoint.every=2"],
     "train.out_dir: '{d}/blocked/checkpoints/step_00000004' is not a folder (a file or a link), and this run "
     "writes its step 4 checkpoint there"),
    (["train", "--config", "{d}/ok.yaml", "--resume", "{d}/typed/step_00000002"],
     "checkpoint '{d}/typed/step_00000002': manifest.json is not a scaletrain checkpoint manifest"),
    (["train", "--config", "{d}/ok.yaml", "--set", "model.n_embd=65536", "--set", "model.n_layer=1024"],
     "model: 5.278e+13 parameters (model.n_layer 1024, model.n_embd 65536, model.vocab_size 258) need 768.01 TiB "
     "for weights, gradients and AdamW state before any activation, but "),  # cpu or cuda:0
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) or "(none)" for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(cli, configs, args, message):
    line = one_error_line(cli(*[a.format(d=configs) for a in args]))
    assert message.format(d=configs) in line


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is present")
def test_cuda_without_gpu_is_a_clean_error(cli, configs):
    line = one_error_line(cli("train", "--config", configs / "ok.yaml", "--set", "train.device=cuda"))
    assert "train.device: got 'cuda', but torch sees no CUDA device" in line


def test_log_level_before_or_after_the_command(cli):
    assert cli("--log-level", "warn", "data", "-n", "1").returncode == 0
    assert cli("data", "-n", "1", "--log-level", "error").returncode == 0


def test_help_and_version(cli):
    result = cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout
    assert "--set KEY=VALUE" in cli("train", "--help").stdout
    assert cli("--version").stdout.startswith("scaletrain ")


def test_data_prints_samples(cli):
    result = cli("data", "--split", "val", "-n", "3", "--format", "jsonl")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3 and all(r["split"] == "val" and r["program"] for r in rows)
    text = cli("data", "-n", "2").stdout
    assert text.count("=> ") == 2
    assert "train  " in cli("data", "--stats").stdout


def test_data_shows_text_windows(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus\n" for i in range(300)))
    args = ["data", "--set", "data.source=text", "--set", f"data.path={corpus}", "--set", "model.block_size=32"]
    val = cli(*args, "--split", "val", "-n", "50").stdout
    windows = val.split("--- window ")[1:]
    assert 0 < len(windows) < 50  # only as many as the validation split holds
    assert len(set(w.split("\n", 1)[1] for w in windows)) == len(windows)  # no repeats
    assert "train tokens" in cli(*args, "--stats").stdout


def test_config_resolves_and_documents(cli, configs):
    resolved = cli("config", "--config", configs / "ok.yaml", "--set", "train.batch_size=3").stdout
    assert "  max_steps: 5\n" in resolved and "  batch_size: 3\n" in resolved
    assert "| `train.batch_size` |" in cli("config", "--reference").stdout


def test_train_then_eval_a_run(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", "--config", "configs/tiny_cpu.yaml", *TINY, "--set", f"train.out_dir={out}",
                 cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert "== summary: 6 steps on cpu" in result.stdout
    assert "before training" in result.stdout and "after training" in result.stdout
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "model.pt"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["after"]["examples"] == 4
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [3, 6]
    evaluated = cli("eval", "--run", out, "--show", "1")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{out}/model.pt: val loss {summary['after']['val_loss']:.4f}" in evaluated.stdout
    assert evaluated.stdout.count("request:") == 1


@pytest.mark.gpu
def test_info_and_training_on_gpu(cli, tmp_path):
    info = cli("info").stdout
    assert "CUDA devices: " in info and "kernel image sm_" in info and "runs" in info
    result = cli("train", "--config", "configs/tiny_cpu.yaml", *TINY, "--set", "train.device=cuda",
                 "--set", f"train.out_dir={tmp_path}/gpu", cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert "steps on cuda:0" in result.stdout
