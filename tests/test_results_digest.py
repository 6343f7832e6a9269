"""Results are tamper-evident: the digest manifest, its checks, sealing, and bad result files.

The fixture is a copy of the committed experiments (pinned configs and sealed results): no
model runs here. ``tests/test_experiments.py`` checks that a real run writes the manifest.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from worldplay.experiments.results import (
    DIGESTS_FILE,
    DigestError,
    ResultError,
    StaleResultError,
    check_fresh,
    latest_result,
    seal_result,
    verify_result,
    write_digests,
)
from worldplay.experiments.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench-tiny-cpu"
SEALED = ["bench-tiny-cpu", "drift-tiny-cpu", "rollouts-tiny-cpu"]


@pytest.fixture
def experiments(tmp_path) -> Path:
    """experiments/ with every pinned config and the committed (sealed) results of SEALED."""
    exp = tmp_path / "experiments"
    exp.mkdir()
    for path in (ROOT / "experiments").glob("*.toml"):
        shutil.copy(path, exp / path.name)
    for name in SEALED:
        run = latest_result(ROOT / "experiments" / "results", name)
        shutil.copytree(run, exp / "results" / name / run.name)
    return exp


def _run(exp: Path, name: str = NAME) -> Path:
    return latest_result(exp / "results", name)


class Done:
    def __init__(self, returncode: int, captured):
        self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


def _cli(capsys, exp: Path, *args: str) -> Done:
    """``worldplay experiment --experiments-dir EXP ARGS`` in this process (a subprocess would
    import the whole model stack for each call)."""
    from worldplay.cli import main

    capsys.readouterr()
    return Done(main(["experiment", "--experiments-dir", str(exp), *args]), capsys.readouterr())


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def test_committed_results_are_sealed_and_verify():
    """Every committed result folder has its digests, and they hold (see `experiment seal`)."""
    from worldplay.experiments.results import result_dirs
    from worldplay.experiments.schema import experiment_names

    results = ROOT / "experiments" / "results"
    dirs = [d for name in experiment_names(ROOT / "experiments") for d in result_dirs(results, name)]
    assert len(dirs) >= 13
    for run in dirs:
        copy = verify_result(run)
        assert (run / DIGESTS_FILE).is_file() and copy.config_hash == json.loads((run / "result.json").read_text())[
            "config_hash"]


def test_a_sealed_result_is_fresh(capsys, experiments):
    assert check_fresh(NAME, experiments_dir=experiments) == _run(experiments)
    done = _cli(capsys, experiments, "check", NAME)
    assert done.returncode == 0 and "fresh" in done.stdout


def test_an_edited_number_in_result_json_is_refused(capsys, experiments):
    path = _run(experiments) / "result.json"
    _edit_json(path, lambda d: d["summary"]["legs"]["native-eager"]["steady_ms"]["total"].update(median=0.001))
    with pytest.raises(DigestError, match=r"result\.json: differs from its sha256 in digests\.json"):
        check_fresh(NAME, experiments_dir=experiments)
    done = _cli(capsys, experiments, "check", NAME)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "result.json" in done.stderr and "git checkout" in done.stderr


def test_an_edited_row_of_chunks_csv_is_refused(experiments):
    path = _run(experiments) / "chunks.csv"
    rows = list(csv.reader(io.StringIO(path.read_text())))
    rows[1][rows[0].index("ms")] = "0.5"
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue())
    with pytest.raises(DigestError, match=r"chunks\.csv: differs"):
        check_fresh(NAME, experiments_dir=experiments)


def test_a_pasted_config_hash_does_not_make_a_stale_result_fresh(experiments):
    """Edit the pinned config, paste its new hash into result.json: still refused, naming the file."""
    pinned = experiments / f"{NAME}.toml"
    pinned.write_text(pinned.read_text().replace("repetitions = 3", "repetitions = 2"))
    new_hash = load_config(pinned).config_hash
    run = _run(experiments)
    _edit_json(run / "result.json", lambda d: d.update(config_hash=new_hash))
    with pytest.raises(DigestError, match=r"result\.json"):
        check_fresh(NAME, experiments_dir=experiments)
    # ... and re-sealing the edited folder by hand does not help: config.toml still says the old value
    write_digests(run, new_hash)
    with pytest.raises(DigestError, match=r"provenance\.json: config hash a61e8c15b8fe\.\.\. differs from "):
        check_fresh(NAME, experiments_dir=experiments)


def test_a_renamed_or_copied_run_folder_is_refused(experiments):
    """A run folder copied under a later name (its digests intact) would show as a newer run."""
    run = _run(experiments)
    copy = run.parent / "29991231T000000Z-copied00"
    shutil.copytree(run, copy)
    with pytest.raises(DigestError, match=r"names run '.*' but lies in folder '29991231T000000Z-copied00'"):
        check_fresh(NAME, experiments_dir=experiments)
    verify_result(run)  # the original still holds


def test_an_added_or_missing_file_is_refused(experiments):
    run = _run(experiments)
    (run / "notes.txt").write_text("added later")
    with pytest.raises(DigestError, match=r"notes\.txt: not in digests\.json"):
        verify_result(run)
    (run / "notes.txt").unlink()
    (run / "chunks.csv").unlink()
    with pytest.raises(DigestError, match=r"chunks\.csv: listed in digests\.json but missing"):
        verify_result(run)


def test_a_result_without_digests_is_refused_with_how_to_seal_it(capsys, experiments):
    (_run(experiments) / DIGESTS_FILE).unlink()
    done = _cli(capsys, experiments, "check", NAME)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"python -m worldplay experiment seal {NAME}" in done.stderr


def test_the_site_refuses_an_edited_result(experiments, tmp_path):
    pytest.importorskip("pandas")
    from worldplay.site import SiteError
    from worldplay.site.load import load_site

    site_toml = tmp_path / "site.toml"
    site_toml.write_text(f'required = ["{NAME}"]\n')
    assert load_site(site_toml, experiments_dir=experiments).experiments[NAME].result is not None
    _edit_json(_run(experiments) / "result.json", lambda d: d.update(device_name="a faster GPU"))
    with pytest.raises(SiteError, match=rf"{NAME}.*result\.json: differs from its sha256"):
        load_site(site_toml, experiments_dir=experiments)


def test_a_description_edit_makes_the_result_stale(capsys, experiments):
    pinned = experiments / f"{NAME}.toml"
    pinned.write_text(pinned.read_text().replace('description = """', 'description = """Edited: ', 1))
    assert load_config(pinned).config_hash == json.loads((_run(experiments) / "result.json").read_text())["config_hash"]
    with pytest.raises(StaleResultError, match="description differs"):
        check_fresh(NAME, experiments_dir=experiments)
    done = _cli(capsys, experiments, "check", NAME)
    assert done.returncode == 1 and "description" in done.stderr and "Traceback" not in done.stderr


def test_a_comment_edit_keeps_the_result_fresh(experiments):
    pinned = experiments / f"{NAME}.toml"
    pinned.write_text("# a comment the resolved config does not see\n" + pinned.read_text())
    assert check_fresh(NAME, experiments_dir=experiments) == _run(experiments)


@pytest.mark.parametrize(("content", "message"), [
    ("[]", "must hold a JSON object, got a list"),
    ('"text"', "must hold a JSON object, got a string"),
    ("{", "unreadable"),
    ('{"experiment": "x"}', "field 'kind' is missing"),
])
def test_a_malformed_result_json_is_one_line_naming_the_file(capsys, experiments, content, message):
    run = _run(experiments)
    (run / "result.json").write_text(content)
    write_digests(run, "0" * 64)  # sealed as it is: the check must still refuse it cleanly
    with pytest.raises(ResultError, match=message):
        verify_result(run)
    done = _cli(capsys, experiments, "check", NAME)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "result.json" in done.stderr


def test_a_result_json_field_of_the_wrong_type_is_named(experiments):
    run = _run(experiments)
    _edit_json(run / "result.json", lambda d: d.update(summary=[]))
    write_digests(run, json.loads((run / "result.json").read_text())["config_hash"])
    with pytest.raises(ResultError, match=r"result\.json: field 'summary' must be an object, got a list"):
        verify_result(run)


# ------------------------------------------------------------------------------------------
# sealing results committed before digests existed


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def committed(experiments) -> Path:
    """The experiments folder as a git repository, one result committed without its digests."""
    (_run(experiments) / DIGESTS_FILE).unlink()
    _git(experiments, "init", "-q")
    _git(experiments, "add", "-A")
    _git(experiments, "commit", "-q", "-m", "results")
    return experiments


def test_seal_writes_digests_for_a_committed_result(capsys, committed):
    run = _run(committed)
    done = _cli(capsys, committed, "seal", NAME)
    assert done.returncode == 0, done.stderr
    assert f"{NAME}: sealed" in done.stdout and (run / DIGESTS_FILE).is_file()
    assert check_fresh(NAME, experiments_dir=committed) == run
    assert seal_result(run) is False  # already sealed


@pytest.mark.parametrize("change", ["edit", "add", "stage"])
def test_seal_refuses_a_folder_that_differs_from_git(capsys, committed, change):
    run = _run(committed)
    if change == "edit":
        _edit_json(run / "result.json", lambda d: d.update(device_name="x"))
    elif change == "add":
        (run / "notes.txt").write_text("x")
    else:
        _edit_json(run / "result.json", lambda d: d.update(device_name="x"))
        _git(committed, "add", "-A")
    with pytest.raises(ResultError, match="differs from what is committed in git"):
        seal_result(run)
    assert not (run / DIGESTS_FILE).exists()
    done = _cli(capsys, committed, "seal", "--all")
    assert done.returncode == 2 and "not sealed" in done.stderr and "Traceback" not in done.stderr


def test_seal_refuses_a_result_that_is_not_committed(experiments):
    (_run(experiments) / DIGESTS_FILE).unlink()
    _git(experiments, "init", "-q")
    with pytest.raises(ResultError, match="not committed to git"):
        seal_result(_run(experiments))


@pytest.mark.parametrize(("file", "content", "message"), [
    ("chunks.csv", 'a,b\n1,2,3\n"x', "not a readable CSV table"),
    ("provenance.json", "[]", "must hold a JSON object, got a list"),
    ("provenance.json", '{"environment": "gpu"}', "field 'environment' must be a JSON object"),
])
def test_the_site_names_a_malformed_result_file(experiments, tmp_path, file, content, message):
    """Sealed as it is (a run that wrote it so): render still refuses in one line, no traceback."""
    pytest.importorskip("pandas")
    from worldplay.site import SiteError
    from worldplay.site.load import load_site

    run = _run(experiments)
    (run / file).write_text(content)
    if file == "provenance.json":  # keep the config hash check satisfied
        data = json.loads(content)
        if isinstance(data, dict):
            data["config_hash"] = json.loads((run / "result.json").read_text())["config_hash"]
            (run / file).write_text(json.dumps(data))
    write_digests(run, json.loads((run / "result.json").read_text())["config_hash"])
    site_toml = tmp_path / "site.toml"
    site_toml.write_text(f'required = ["{NAME}"]\n')
    with pytest.raises((SiteError, ResultError), match=message) as err:
        load_site(site_toml, experiments_dir=experiments)
    assert f"{file}:" in str(err.value)
