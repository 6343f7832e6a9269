"""Experiments are named by what they measure; runs filed under an earlier (card) name are kept.

`bench` was `bench-h100` until the GPUs lent changed from H100s to H200s: its committed runs
stay in `experiments/results/bench-h100/`, count for `bench` while it has none of its own (the
config hashes the same: names and descriptions are not hashed), and are listed as its history
with the card each ran on. Fixture: copies of the committed configs and results; no model runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worldplay.experiments.results import (
    DigestError,
    check_fresh,
    earlier_result_dirs,
    result_dirs,
    write_digests,
)
from worldplay.experiments.schema import ExperimentConfigError, load_config
from worldplay.site import SiteError
from worldplay.site.load import load_site
from worldplay.site.pages import render_site

ROOT = Path(__file__).resolve().parents[1]
OLD = "bench-h100"
SITE_TOML = """required = ["bench"]
[model_card]
bench = ["bench"]
"""


@pytest.fixture
def tree(tmp_path) -> Path:
    exp = tmp_path / "experiments"
    exp.mkdir()
    for name in ("bench", "inputs"):
        shutil.copy(ROOT / "experiments" / f"{name}.toml", exp / f"{name}.toml")
    shutil.copytree(ROOT / "experiments/results" / OLD, exp / "results" / OLD)
    (tmp_path / "site.toml").write_text(SITE_TOML)
    return tmp_path


def _site(tree: Path):
    return load_site(tree / "site.toml", experiments_dir=tree / "experiments")


def test_the_rename_keeps_the_hash_and_the_old_runs_count():
    cfg = load_config(ROOT / "experiments/bench.toml")
    assert cfg.earlier_names == (OLD,) and "H100" not in cfg.description
    latest_old = result_dirs(ROOT / "experiments/results", OLD)[-1]
    recorded = json.loads((latest_old / "result.json").read_text())
    assert recorded["config_hash"] == cfg.config_hash  # the name and the description are not hashed
    assert check_fresh("bench") == latest_old


def test_the_site_shows_the_old_run_with_its_card_and_every_earlier_run(tree):
    site = _site(tree)
    exp = site.experiments["bench"]
    assert exp.result.filed_as == OLD and exp.result.name == "bench"
    runs = earlier_result_dirs(tree / "experiments/results", exp.config)
    assert [r.path for r in exp.history] == runs and len(runs) == 4
    assert [r.same_config for r in exp.history] == [False, True, True, True]  # the first run had another config
    out = tree / "generated"
    render_site(site, out)
    page = (out / "experiments/bench.md").read_text()
    assert "Earlier run, filed as `bench-h100`" in page and "NVIDIA H100 80GB HBM3" in page
    assert "## Earlier runs" in page and page.count("`bench-h100`") >= 5
    assert "experiments/bench-h100.toml" in page  # the config shown is the one that ran
    for run in exp.history:
        assert run.run_id in page
    summary = (out / "fragments/model_card_summary.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in summary and "filed as `bench-h100`" in summary
    card = (out / "fragments/model_card_performance.md").read_text()
    assert "Earlier run, filed as" in card and "NVIDIA H100 80GB HBM3" in card


def test_a_run_under_the_new_name_wins_and_the_old_ones_stay_history(tree):
    old = result_dirs(tree / "experiments/results", OLD)[-1]
    new = tree / "experiments/results/bench/29990101T000000Z-e7e6c500"
    shutil.copytree(old, new)
    result = json.loads((new / "result.json").read_text())
    result.update(run_id=new.name, experiment="bench", device_name="NVIDIA H200")
    (new / "result.json").write_text(json.dumps(result))
    shutil.copy(tree / "experiments/bench.toml", new / "config.toml")  # a run copies the config it read
    write_digests(new, result["config_hash"])
    site = _site(tree)
    exp = site.experiments["bench"]
    assert exp.result.path == new and exp.result.filed_as is None and len(exp.history) == 4
    render_site(site, tree / "generated")
    page = (tree / "generated/experiments/bench.md").read_text()
    assert "Earlier run, filed as" not in page and "## Earlier runs" in page and "NVIDIA H200" in page


def test_an_edited_earlier_run_is_an_error_naming_the_file(tree):
    run = result_dirs(tree / "experiments/results", OLD)[1]  # not even the one shown
    (run / "chunks.csv").write_text((run / "chunks.csv").read_text().replace(",", ";", 1))
    with pytest.raises(SiteError, match=r"bench-h100/.*chunks\.csv: differs"):
        _site(tree)
    with pytest.raises(DigestError):
        check_fresh("bench", experiments_dir=tree / "experiments",
                    result_dir=result_dirs(tree / "experiments/results", OLD)[1])


def test_without_a_same_config_run_it_is_not_run(tree):
    path = tree / "experiments/bench.toml"
    path.write_text(path.read_text().replace("repetitions = 2", "repetitions = 3"))
    with pytest.raises(SiteError, match="bench.*no result.*earlier names"):
        _site(tree)


@pytest.mark.parametrize("value, message", [
    ('["bench"]', "own name 'bench'"),
    ('["Bench H100"]', "not an experiment name"),
    ('"bench-h100"', "expected a non-empty list"),
    ('["bench-h100", "bench-h100"]', "listed twice"),
])
def test_bad_earlier_names_are_refused(tmp_path, value, message):
    text = (ROOT / "experiments/bench.toml").read_text().replace('earlier_names = ["bench-h100"]',
                                                                  f"earlier_names = {value}")
    (tmp_path / "bench.toml").write_text(text)
    with pytest.raises(ExperimentConfigError, match=rf"earlier_names.*{message}"):
        load_config(tmp_path / "bench.toml")
