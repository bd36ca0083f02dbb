"""`cmx models`: list the ConvMixer registry and inspect one variant with overrides.

torch is imported inside the commands so `cmx --help` stays instant. Models are built on the meta
device here: counting parameters and FLOPs of ConvMixer-1536/20 then costs no memory or init time.
"""

from __future__ import annotations

import json
from typing import Any

import click

from cmx.cli.options import json_option, set_option
from cmx.core.config import apply_overrides
from cmx.core.errors import ModelError


def kernel_summary(kernel_sizes: list[tuple[int, ...]]) -> str:
    """Run-length summary of per-block kernels: `9`, `3x2,5x2`, `[3/5/7/9]x8`."""
    runs: list[list[Any]] = []
    for k in kernel_sizes:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    if len(runs) == 1 and len(runs[0][0]) == 1:
        return str(runs[0][0][0])
    parts = []
    for k, n in runs:
        text = str(k[0]) if len(k) == 1 else "[" + "/".join(map(str, k)) + "]"
        parts.append(f"{text}x{n}")
    return ",".join(parts)


def parse_overrides(sets: tuple[str, ...]) -> dict[str, Any]:
    """`--set key=value` strings (YAML values) to constructor overrides; `model.key` also works."""
    data = apply_overrides({}, list(sets))
    nested = data.pop("model", None)
    if isinstance(nested, dict):
        data = {**nested, **data}
    elif nested is not None:
        raise ModelError("--set model=...: give a field, e.g. --set model.dim=512")
    for key, value in data.items():
        if isinstance(value, dict):
            raise ModelError(f"--set {key}.…: {key!r} is not a section", "use e.g. --set dim=512")
    return data


def _summary(name: str, overrides: dict[str, Any], resolution: int | None) -> dict[str, Any]:
    """Arch config, params and GFLOPs of one variant, built on the meta device."""
    import torch

    from cmx.models import count_flops, count_params, create_model, get_model_cfg

    cfg = get_model_cfg(name)
    with torch.device("meta"):
        model = create_model(name, **overrides)
    res = resolution or cfg.input_size
    return {
        "name": name,
        "arch": model.arch_config,
        "kernels": kernel_summary(model.kernel_sizes),
        "kernel_sizes": [list(k) for k in model.kernel_sizes],
        "params": count_params(model),
        "gflops": count_flops(model, res) / 1e9,
        "resolution": res,
        "default_resolution": cfg.input_size,
        "tokens": (res // model.patch_size) ** 2,
        "note": cfg.note,
        "model": model,
    }


@click.group()
def models() -> None:
    """The ConvMixer registry: every variant, its size and cost."""


@models.command("list")
@click.option(
    "--filter",
    "pattern",
    default="*",
    show_default=True,
    metavar="GLOB",
    help="Only names matching this shell pattern.",
)
@json_option()
def list_command(pattern: str, as_json: bool) -> None:
    """List registered variants with params and GFLOPs at their default resolution."""
    from cmx.models import list_models

    rows = [_summary(n, {}, None) for n in list_models(pattern)]
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "model"} for r in rows], indent=2))
        return
    from rich.table import Table

    table = Table(title=f"ConvMixer variants ({len(rows)})")
    for col in ("name", "dim", "depth", "kernel", "patch", "act", "params", "GFLOPs", "res", "classes"):
        table.add_column(col, justify="left" if col in ("name", "kernel", "act") else "right")
    for r in rows:
        a = r["arch"]
        table.add_row(
            r["name"],
            str(a["dim"]),
            str(a["depth"]),
            r["kernels"],
            str(a["patch_size"]),
            a["act_layer"],
            _millions(r["params"]),
            f"{r['gflops']:.3g}",
            str(r["resolution"]),
            str(a["num_classes"]),
        )
    _console().print(table)
    click.echo("GFLOPs: forward pass of one image at the default resolution, 2 FLOPs per multiply-add.")


@models.command("info")
@click.argument("name")
@set_option("Override a constructor argument; VALUE is YAML, e.g. kernel_size=[[3,5,7,9],9,9,9].", dest="sets")
@click.option(
    "--resolution",
    type=click.IntRange(min=1),
    default=None,
    metavar="PX",
    help="Input size for GFLOPs [default: the variant's].",
)
@click.option("--layers", is_flag=True, help="Also print one row per block.")
@json_option("Print JSON instead of tables.")
def info_command(name: str, sets: tuple[str, ...], resolution: int | None, layers: bool, as_json: bool) -> None:
    """Show one variant's architecture, parameters and GFLOPs, with optional overrides."""
    overrides = parse_overrides(sets)
    s = _summary(name, overrides, resolution)
    model = s.pop("model")
    model.validate_input_size(s["resolution"], s["resolution"])
    if as_json:
        click.echo(json.dumps({**s, "overrides": overrides}, indent=2))
        return
    import yaml
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{name}[/]" + (f"  ({s['note']})" if s["note"] else ""))
    if overrides:
        console.print("overrides: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    console.print(yaml.safe_dump(s["arch"], sort_keys=False, default_flow_style=None).rstrip())
    console.print(
        f"params: {s['params']:,} ({_millions(s['params'])})\n"
        f"GFLOPs: {s['gflops']:.4g} at {s['resolution']} px ({s['tokens']} tokens)\n"
        f"default resolution: {s['default_resolution']} px\n"
        f"kernels per block: {s['kernels']}"
    )
    if layers:
        table = Table(title="blocks")
        for col in ("block", "kernel", "params", "drop_path"):
            table.add_column(col, justify="right")
        for i, block in enumerate(model.blocks):
            dp = getattr(block[0].drop_path, "drop_prob", 0.0)
            kernel = "/".join(map(str, model.kernel_sizes[i]))
            n = sum(p.numel() for p in block.parameters())
            table.add_row(str(i), kernel, f"{n:,}", f"{dp:.3f}")
        console.print(table)


def _console() -> Any:
    """A rich console; when piped, wide enough that names are never cut (rich defaults to 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))


def _millions(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:.1f}M"  # the paper's precision: 51.6M, 21.1M, 24.4M
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"
