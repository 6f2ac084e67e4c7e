"""The `nanoseek` command line: info, error handling, stubs, convert and the speedrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_info_v3_json():
    res = run_cli("info", "--preset", "v3", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["total_params"] == pytest.approx(671e9, rel=0.005)
    assert d["active_params"] == pytest.approx(37e9, rel=0.03)
    assert d["mtp_params"] == pytest.approx(11.5e9, rel=0.03)
    assert d["kv_latent_values_per_token_per_layer"] == 576
    for key in ("active_params_no_embedding", "bf16_bytes", "fp8_bytes", "kv_mha_values_per_token",
                "kv_cache_ratio", "training_flops_per_token"):
        assert key in d


def test_unknown_preset_is_one_line_exit_2():
    res = run_cli("info", "--preset", "nope")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]


def test_missing_config_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    res = run_cli("info", "--config", str(missing))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and str(missing) in res.stderr


def test_info_text_from_config_file(tmp_path, capsys):
    nanoseek.get_preset("tiny").save(tmp_path / "config.json")
    assert main(["info", "--config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "total parameters" in out and "KV cache" in out


@pytest.mark.parametrize("argv,needs", [(["sft", "--out", "x"], "--init-from"),
                                         (["distill", "--out", "x"], "--teacher")])
def test_sft_and_distill_name_their_required_inputs(argv, needs, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needs in err and len(err.splitlines()) == 1


def test_unknown_option_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["info", "--preset", "tiny", "--bogus"])
    assert exc.value.code == 2


def test_tokenizer_args_are_passed_through(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "train", "--help"])
    assert exc.value.code == 0
    assert "--vocab-size" in capsys.readouterr().out


def test_convert_roundtrip(tmp_path, capsys):
    torch.manual_seed(0)
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny"))
    nanoseek.save(model, tmp_path / "src")
    assert main(["convert", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"),
                 "--dtype", "float32", "--max-shard-size", "200KB"]) == 0
    assert len(list((tmp_path / "dst").glob("model-*.safetensors"))) > 1
    back = nanoseek.load(tmp_path / "dst")
    want = model.state_dict()
    for name, tensor in back.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=name)
