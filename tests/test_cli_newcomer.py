"""What a newcomer meets first (issue 17): the full model refused on a CPU, defaults in --help,
--version, progress without carriage returns off a terminal, the text extra named when missing."""

from __future__ import annotations

import argparse
import io
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import worldplay
from worldplay.cli import Progress, UsageError, _check_cpu_preset, build_parser, describe_failure, main
from worldplay.nn.text import (
    TEXT_EXTRA,
    TEXT_EXTRA_INSTALL,
    TextExtraMissing,
    clean_prompt,
    require_text_extra,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


def test_full_model_on_a_cpu_is_refused_before_anything_is_built(tmp_path, image, capsys, monkeypatch):
    import worldplay.models as models

    monkeypatch.setattr(models, "random_models", lambda *a, **k: pytest.fail("a model was built"))
    out = tmp_path / "v.mp4"
    code = main(["run", "--image", str(image), "--pose", "w-3", "--num-chunk", "1", "--random-init", "0",
                 "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--preset tiny" in err and "--allow-cpu-full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start.png"]


def test_allow_cpu_full_lets_the_full_model_through_and_tiny_needs_nothing():
    cpu = torch.device("cpu")
    _check_cpu_preset(argparse.Namespace(preset="wan5b", allow_cpu_full=True), cpu)
    _check_cpu_preset(argparse.Namespace(preset="tiny", allow_cpu_full=False), cpu)
    with pytest.raises(UsageError, match="--preset tiny"):
        _check_cpu_preset(argparse.Namespace(preset="wan5b", allow_cpu_full=False), cpu)


def _subcommand_help(name: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[name].format_help().split())  # argparse wraps lines: compare words


@pytest.mark.parametrize("name", ["run", "serve"])
def test_help_shows_defaults(name):
    text = _subcommand_help(name)
    assert "(default: 0)" in text  # --seed
    assert f"(default: {Path.home() / '.cache' / 'worldplay' / 'prompts'})" in text  # --text-cache
    assert "(default: wan5b)" in text  # --preset
    assert "default: None" not in text and "default: False" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"worldplay {worldplay.__version__}"


def test_progress_off_a_terminal_is_plain_lines(tmp_path, image, capsys):
    out = tmp_path / "v.mp4"
    assert main(["run", "--image", str(image), "--pose", "w-7", "--num-chunk", "2", "--preset", "tiny",
                 "--random-init", "0", "--device", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("worldplay: building the tiny model with random weights")
    assert [line.split(" (")[0] for line in lines[1:]] == ["worldplay: chunk 1/2 done", "worldplay: chunk 2/2 done"]


def test_progress_on_a_terminal_is_a_bar_and_no_progress_is_silent():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    assert list(Progress(enabled=True, stream=term).chunks(iter("ab"), 2)) == ["a", "b"]
    assert "chunks" in term.getvalue() and "2/2" in term.getvalue()
    quiet = Terminal()
    progress = Progress(enabled=False, stream=quiet)
    progress.line("loading")
    assert list(progress.chunks(iter("ab"), 2)) == ["a", "b"] and quiet.getvalue() == ""


def test_existing_stats_file_names_the_mp4_given(tmp_path, image, capsys):
    out = tmp_path / "walk.mp4"
    out.with_suffix(".json").write_text("{}")
    code = main(["run", "--image", str(image), "--pose", "w-3", "--num-chunk", "1", "--preset", "tiny",
                 "--random-init", "0", "--device", "cpu", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}" in err and "--overwrite" in err and "walk.json" in err
    assert not out.exists()


@pytest.mark.parametrize("package", TEXT_EXTRA)
def test_missing_text_package_is_one_line_naming_the_extra(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import of it now fails, as if not installed
    with pytest.raises(TextExtraMissing) as exc:
        require_text_extra()
    assert package in str(exc.value) and TEXT_EXTRA_INSTALL in str(exc.value)
    status, line = describe_failure(exc.value)
    assert status == 2 and "\n" not in line


def test_prompt_cleaning_without_ftfy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(TextExtraMissing, match=r"ftfy.*worldplay\[text\]"):
        clean_prompt("a prompt")


def test_text_extra_is_the_one_list_and_imageio_is_not_required():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {req.split(">")[0].split("=")[0].split("[")[0] for req in project["optional-dependencies"]["text"]}
    assert names == set(TEXT_EXTRA)
    core = {req.split(">")[0] for req in project["dependencies"]}
    assert "imageio" not in core and not set(TEXT_EXTRA) & core
