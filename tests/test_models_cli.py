"""`cmx models list` and `cmx models info`: in-process through Click, and once as the real console script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from support.cli import run_cmx

from cmx.cli.main import cli, main
from cmx.models import list_models


def test_models_list_shows_every_variant_with_params() -> None:
    r = CliRunner().invoke(cli, ["models", "list"])
    assert r.exit_code == 0, r.output
    for name in list_models():
        assert name in r.output
    assert "51.6M" in r.output and "21.1M" in r.output and "24.4M" in r.output
    assert "[3/5/7/9]x8" in r.output and "3x2,5x2,7x2,9x2" in r.output


def test_models_list_json_and_filter() -> None:
    r = CliRunner().invoke(cli, ["models", "list", "--filter", "convmixer_768*", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [row["name"] for row in rows] == ["convmixer_768_32"]
    assert rows[0]["arch"]["act_layer"] == "relu" and rows[0]["resolution"] == 224
    assert 41e0 < rows[0]["gflops"] < 42e0


def test_models_info_with_overrides() -> None:
    args = [
        "models",
        "info",
        "convmixer_tiny",
        "--set",
        "kernel_size=[[3,5],5,7,9]",
        "--set",
        "model.dim=32",
        "--layers",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "dim: 32" in r.output
    assert "params:" in r.output and "GFLOPs:" in r.output
    assert "3/5" in r.output  # the per-block table shows the mixed block


def test_models_info_json_counts() -> None:
    r = CliRunner().invoke(cli, ["models", "info", "convmixer_nano", "--json", "--resolution", "64"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["resolution"] == 64 and info["default_resolution"] == 32 and info["tokens"] == 32 * 32
    d, c, k, p, n = 16, 3, 3, 2, 10  # nano: dim, in_chans, kernel, patch, classes; depth 2
    stem = c * d * p * p + d + 2 * d  # conv + bias, BN
    block = (d * k * k + d + 2 * d) + (d * d + d + 2 * d)  # depthwise + BN, pointwise + BN
    assert info["params"] == stem + 2 * block + d * n + n


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["models", "info", "convmixer_tny"], "unknown model 'convmixer_tny' — did you mean 'convmixer_tiny'?"),
        (["models", "info", "convmixer_tiny", "--set", "dimm=8"], "unknown argument 'dimm' — did you mean 'dim'?"),
        (["models", "info", "convmixer_tiny", "--set", "kernel_size=[3,5]"], "list has 2 entries but depth is 4"),
        (
            ["models", "info", "convmixer_1536_20", "--resolution", "5"],
            "patch_size=7 is larger than the input image 5x5",
        ),
    ],
)
def test_models_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2  # ModelError is a ConfigError
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_models_module_imports_no_torch() -> None:
    code = "import sys, cmx.cli.models; assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_console_script_models_list() -> None:
    out = run_cmx("models", "list")
    assert out.returncode == 0, out.stderr
    assert "convmixer_256_8_ks5_p2" in out.stdout
