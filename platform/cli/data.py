"""`cmx data ...`: convert ImageFolders to FFCV `.beton`, inspect, verify, export built-in data.

Thin commands: validate, call `cmx.pipelines.beton` / `fashion_mnist`, print. Library errors are
`CmxError`s that `cmx.cli.main` prints as one line. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from cmx.cli.options import json_option
from cmx.cli.signals import set_cleanup_grace
from cmx.core.errors import DataError
from cmx.core.paths import check_dir_target, data_dir
from cmx.pipelines.beton import (
    ConversionReport,
    convert_image_folder,
    convert_with_val_split,
    inspect_beton,
    report_dict,
    verify_beton,
)
from cmx.pipelines.fashion_mnist import export_fashion_mnist
from cmx.pipelines.images import DEFAULT_VAL_FRACTION

# Literal copies of the FFCV ImageNet defaults in cmx.pipelines.beton (importing it here would
# pull numpy into `cmx --help`); tests/test_data_cli.py checks that the two agree.
DEFAULT_MAX_RESOLUTION = 500
DEFAULT_WRITE_MODE = "proportion"
DEFAULT_JPEG_QUALITY = 90
DEFAULT_COMPRESS_PROBABILITY = 0.5
WRITE_MODES = ("smart", "jpg", "raw", "proportion")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# Stopping a conversion means killing its writers and removing one temp file: seconds at most.
DATA_CLEANUP_GRACE_S = 15.0


@click.group("data")
def data() -> None:
    """Convert, inspect and verify datasets (FFCV .beton files and ImageFolders)."""
    set_cleanup_grace(DATA_CLEANUP_GRACE_S)


@data.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--max-resolution",
    type=int,
    default=DEFAULT_MAX_RESOLUTION,
    show_default=True,
    help="Longest side stored (images are shrunk, never enlarged); 0 keeps every size.",
)
@click.option(
    "--write-mode",
    type=click.Choice(WRITE_MODES),
    default=DEFAULT_WRITE_MODE,
    show_default=True,
    help="raw pixels, JPEG, JPEG for large images (smart), or a random share as JPEG.",
)
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=DEFAULT_JPEG_QUALITY, show_default=True)
@click.option(
    "--compress-probability",
    type=click.FloatRange(0, 1),
    default=DEFAULT_COMPRESS_PROBABILITY,
    show_default=True,
    help="Share of images stored as JPEG with --write-mode proportion.",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Writer processes  [default: all CPUs; FFCV ImageNet uses 16]",
)
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Convert only N images, spread evenly over the classes (quick runs).",
)
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--val-out",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Also carve a validation split from SRC into FILE (e.g. val.beton); OUT gets the rest.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    metavar="F",
    help=f"With --val-out: share of each class carved into it  [default: {DEFAULT_VAL_FRACTION:.4g}]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="With --val-out: which images the carve takes.")
@json_option("Print the report as JSON.")
def convert(
    src: Path,
    out: Path,
    max_resolution: int,
    write_mode: str,
    jpeg_quality: int,
    compress_probability: float,
    workers: int | None,
    limit: int | None,
    strict: bool,
    overwrite: bool,
    val_out: Path | None,
    val_fraction: float | None,
    seed: int,
    as_json: bool,
) -> None:
    """Convert the ImageFolder SRC (SRC/<class>/<image>) to the FFCV file OUT (e.g. train.beton).

    With --val-out, a stratified, seeded share of each class goes to a second file instead (a
    validation split carved from a training folder; keep the real test set apart from both).
    """

    check_dir_target(
        out.expanduser().absolute().parent, "OUT's folder", "give OUT a path inside a folder, e.g. data/train.beton"
    )
    if val_out is None and val_fraction is not None:
        raise click.UsageError("--val-fraction needs --val-out FILE (where the validation split goes)")
    options: dict[str, Any] = dict(
        max_resolution=max_resolution or None,
        write_mode=write_mode,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
        workers=workers,
        limit=limit,
        strict=strict,
        overwrite=overwrite,
        progress=not as_json,
    )
    if val_out is not None:
        check_dir_target(val_out.expanduser().absolute().parent, "--val-out's folder", "give a path inside a folder")
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        train, val = convert_with_val_split(src, out, val_out, val_fraction=fraction, seed=seed, **options)
        if as_json:
            click.echo(json.dumps({"train": report_dict(train), "val": report_dict(val)}, indent=2))
            return
        click.echo(
            f"carved {fraction:.4g} of each class into validation (seed {seed}): "
            f"{train.num_samples} train / {val.num_samples} val images"
        )
        _show_report(val)
        _show_report(train)
        return
    report = convert_image_folder(src, out, **options)
    if as_json:
        click.echo(json.dumps(report_dict(report), indent=2))
        return
    _show_report(report)


def _show_report(report: ConversionReport) -> None:
    """What one conversion wrote and skipped."""
    click.echo(
        f"wrote {report.out} ({report.num_samples} images, {len(report.class_names)} classes, "
        f"{_human_bytes(report.file_bytes)}, {report.seconds:.1f} s)"
    )
    click.echo(f"classes: {report.sidecar}")
    if report.ignored:
        click.echo(f"ignored {len(report.ignored)} non-image file(s)")
    if report.skipped_links:
        click.echo(
            f"skipped {len(report.skipped_links)} linked folder(s) already scanned (symlink loops or repeats), "
            f"e.g. {report.skipped_links[0]}"
        )
    if report.skipped:
        click.secho(f"skipped {len(report.skipped)} unreadable image(s):", fg="yellow", err=True)
        for path, reason in report.skipped:
            click.echo(f"  {path}: {reason}", err=True)


@data.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@json_option("Print as JSON.")
def inspect_command(file: Path, as_json: bool) -> None:
    """Show samples, classes with counts, image sizes, fields and file size of FILE.beton."""

    info = inspect_beton(file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}  {_human_bytes(info['file_bytes'])}, {info['num_samples']} samples")
    click.echo("fields: " + ", ".join(f"{k} ({v})" for k, v in info["fields"].items()))
    if "stored_width" in info:
        w, h = info["stored_width"], info["stored_height"]
        click.echo(
            f"stored size: width {w['min']}-{w['max']} (median {w['median']:g}), "
            f"height {h['min']}-{h['max']} (median {h['median']:g}); "
            f"{info['jpeg_fraction']:.0%} JPEG"
        )
    if "source_width" in info:
        w, h = info["source_width"], info["source_height"]
        click.echo(f"source size: width {w['min']}-{w['max']}, height {h['min']}-{h['max']}")
    click.echo(f"classes: {info['num_classes']}" + ("" if info["sidecar"] else " (no sidecar: names are indices)"))
    for name, count in info["class_counts"].items():
        click.echo(f"  {count:>8}  {name}")
    if info.get("skipped"):
        click.echo(f"skipped at conversion: {len(info['skipped'])} file(s)")


@data.command("verify")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--max-errors", type=int, default=20, show_default=True, help="Errors to list.")
def verify(file: Path, max_errors: int) -> None:
    """Decode every sample of FILE.beton; exit 1 if any fails."""

    report = verify_beton(file, progress=True)
    if report.ok:
        click.echo(f"ok: {report.decoded} of {report.num_samples} samples decode, labels in range")
        return
    for index, message in report.errors[:max_errors]:
        click.echo(f"  sample {index}: {message}", err=True)
    raise DataError(
        f"{file}: {len(report.errors)} of {report.num_samples} samples failed to decode",
        "re-create it with `cmx data convert`",
    )


@data.group("builtin")
def builtin() -> None:
    """Export datasets that ship with the system (offline)."""


@builtin.command("fashion-mnist")
@click.argument("dir", type=click.Path(path_type=Path), required=False)
@click.option(
    "--limit-per-class",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Export only the first N images of each class (per split).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DEFAULT_VAL_FRACTION,
    show_default="1/6: 10,000 of the 60,000 training images",
    help="Share of each class of the official train split carved into val.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Which images the val carve takes.")
@click.option("--no-beton", is_flag=True, help="Only the ImageFolders, no .beton files.")
@click.option("--workers", type=click.IntRange(1), default=None, metavar="N", help="Writer processes.")
def fashion_mnist(
    dir: Path | None,
    limit_per_class: int | None,
    val_fraction: float,
    seed: int,
    no_beton: bool,
    workers: int | None,
) -> None:
    """Export Fashion-MNIST (Debian dataset-fashion-mnist) to DIR/train, DIR/val, DIR/test, *.beton.

    train and val are carved from the official train split (stratified, seeded); test is the
    official test split, for the final score only (set it as data.test_path; a sweep never
    searches on it). DIR defaults to $CMX_HOME/data/fashion-mnist.
    """

    out = dir or data_dir() / "fashion-mnist"
    res = export_fashion_mnist(
        out,
        limit_per_class=limit_per_class,
        val_fraction=val_fraction,
        seed=seed,
        write_betons=not no_beton,
        progress=os.environ.get("TQDM_DISABLE", "") in ("", "0"),
        workers=workers,
    )
    verb = "already complete" if res.skipped else "exported"
    click.echo(
        f"{verb}: {res.root} ({res.num_train} train / {res.num_val} val / {res.num_test} test, "
        f"{len(res.class_names)} classes)"
    )
    click.echo(
        f"  val: {res.val_fraction:.4g} of each class of the official train split (seed {res.seed}); "
        "test: the official test split"
    )
    click.echo(f"  folders: {res.train_dir}  {res.val_dir}  {res.test_dir}")
    if res.train_beton:
        click.echo(f"  betons:  {res.train_beton}  {res.val_beton}  {res.test_beton}")
