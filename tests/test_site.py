"""The site's render step on fixture results in a tmp folder (no Sphinx, no browser).

Fixture: a copy of the pinned configs; real runs of ``bench-tiny-cpu`` and ``drift-tiny-cpu``
(seconds on a CPU) and a hand-made ``rollouts-tiny-cpu`` result with two small stand-in video
files (the render step never decodes videos; the real rollouts need the official sample
images, which CI does not have).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from worldplay.experiments.results import write_digests  # noqa: E402
from worldplay.experiments.runner import RunOptions, run_experiment  # noqa: E402
from worldplay.experiments.schema import load_config  # noqa: E402
from worldplay.site import TINY_LABEL, SiteError  # noqa: E402
from worldplay.site.gallery import VideoCard, check_https_url, gallery_markdown  # noqa: E402
from worldplay.site.load import load_site, load_site_config  # noqa: E402
from worldplay.site.pages import render_site  # noqa: E402
from worldplay.site.tables import markdown_table  # noqa: E402
from worldplay.site.text import escape  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["bench-tiny-cpu", "drift-tiny-cpu", "rollouts-tiny-cpu"]
SITE_TOML = f"""required = {json.dumps(REQUIRED)}
[model_card]
bench = ["bench", "bench-tiny-cpu"]
drift = ["drift-bf16-vs-fp32", "drift-tiny-cpu"]
parity = ["parity-official"]
gallery = ["rollouts-samples", "rollouts-tiny-cpu"]
"""


def _fake_rollouts(experiments: Path, results: Path, videos: Path) -> Path:
    """A complete rollouts-tiny-cpu result (right config hash) with two stand-in MP4 files."""
    name = "rollouts-tiny-cpu"
    cfg = load_config(experiments / f"{name}.toml")
    run_id = f"20260101T000000Z-{cfg.config_hash[:8]}"
    out = results / name / run_id
    out.mkdir(parents=True)
    entries, rows, per_video = [], [], {}
    for image, pose in [("img-1", "w-31"), ("img-5", "w-4,right-13,left-14")]:
        vid = f"{name}--{image}--{pose.replace(',', '_')}"
        rel = f"{name}/{run_id}/{vid}.mp4"
        data = f"stand-in video {vid}".encode() * 100
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(data)
        entries.append({"id": vid, "experiment": name, "run_id": run_id, "config_hash": cfg.config_hash, "file": rel,
                        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "frames": 125, "fps": 16.0,
                        "resolution": [64, 96], "input": image, "pose": pose,
                        "prompt_source": "random embeddings (random weights)", "url": ""})
        for chunk in range(8):
            rows.append({"video": vid, "input": image, "pose": pose, "chunk": chunk, "stage": "total", "ms": 10 + chunk,
                         "memory_latents": min(16, 4 * chunk), "retrieved_clip": "" if chunk < 4 else 4 * (chunk - 4)})
        per_video[vid] = {"frames": 125, "retrieved_clips": {str(c): 4 * (c - 4) for c in range(4, 8)},
                          "steady_ms": {"total": {"n": 4, "median": 12.0, "p10": 11.0, "p90": 13.0}}}
    (out / "videos.json").write_text(json.dumps(entries, indent=2) + "\n")
    with open(out / "chunks.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    shutil.copy(experiments / f"{name}.toml", out / "config.toml")
    common = {"experiment": name, "run_id": run_id, "kind": "rollouts", "config_hash": cfg.config_hash,
              "started_utc": "2026-01-01T00:00:00Z", "finished_utc": "2026-01-01T00:00:05Z"}
    (out / "provenance.json").write_text(json.dumps({
        **common, "git": {"commit": "0" * 40, "dirty": False, "changed": [], "source": "git"},
        "command_line": ["python", "-m", "worldplay", "experiment", "run", name],
        "options": {"video_dir": str(videos)}, "cwd": str(ROOT),
        "environment": {"python": "3.11", "torch": "2.13.0+cpu", "cuda": None, "cudnn": None,
                        "platform": "test", "cpu_count": 2, "device_name": "CPU (test)"},
        "hostname": "test", "weights": {"dit": {"kind": "random-init", "describe": "random-init:0", "files": {}}},
        "duration_s": 5.0}))
    (out / "result.json").write_text(json.dumps({
        **common, "description": cfg.description, "device_class": "cpu-tiny", "device_name": "CPU (test)",
        "preset": "tiny", "weights": "random-init:0", "git_commit": "0" * 40, "git_dirty": False, "complete": True,
        "files": ["result.json", "chunks.csv", "provenance.json", "config.toml", "videos.json"],
        "summary": {"videos": 2, "leg": {"name": "native-eager", "settings": {}}, "resolution": [64, 96], "fps": 16,
                    "prompts": "random prompt embeddings", "per_video": per_video}}))
    write_digests(out, cfg.config_hash)  # last, as a run does
    return out


@pytest.fixture(scope="module")
def fixture_tree(tmp_path_factory) -> Path:
    """tmp/{experiments, experiments/results, videos, site.toml}: real tiny bench and drift runs
    plus the hand-made rollouts result."""
    root = tmp_path_factory.mktemp("site-fixture")
    experiments = root / "experiments"
    experiments.mkdir()
    for path in (ROOT / "experiments").glob("*.toml"):
        shutil.copy(path, experiments / path.name)
    results = experiments / "results"
    options = RunOptions(allow_dirty=True, experiments_dir=experiments, results_root=results, progress=False,
                         video_dir=root / "videos", scratch_dir=root / "scratch")
    for name in ("bench-tiny-cpu", "drift-tiny-cpu"):
        run_experiment(name, options)
    _fake_rollouts(experiments, results, root / "videos")
    (root / "site.toml").write_text(SITE_TOML)
    return root


@pytest.fixture
def tree(fixture_tree, tmp_path) -> Path:
    """A private copy that a test may change."""
    copy = tmp_path / "tree"
    shutil.copytree(fixture_tree, copy)
    return copy


def _site(tree: Path, site_toml: str | None = None):
    if site_toml is not None:
        (tree / "site.toml").write_text(site_toml)
    return load_site(tree / "site.toml", experiments_dir=tree / "experiments")


def test_render_pages_charts_and_labels(fixture_tree, tmp_path):
    site = _site(fixture_tree)
    out = tmp_path / "generated"
    files = render_site(site, out)
    names = {p.relative_to(out).as_posix() for p in files}
    pinned = sorted(p.stem for p in (ROOT / "experiments").glob("*.toml") if p.name != "inputs.toml")
    assert {f"experiments/{n}.md" for n in pinned} <= names
    assert {"charts/bench-tiny-cpu-stages.svg", "charts/bench-tiny-cpu-chunks.svg", "charts/drift-tiny-cpu-drift.svg",
            "charts/pose-w-31-8-trajectory.svg"} <= names
    # the memory map is named by its source: the run's recorded selection, or computed here without one
    assert any(n.startswith("charts/pose-w-31-8-seed0-memory-") and n.endswith(".svg") for n in names), sorted(names)

    bench = (out / "experiments/bench-tiny-cpu.md").read_text()
    cfg = load_config(fixture_tree / "experiments/bench-tiny-cpu.toml")
    assert TINY_LABEL in bench
    assert (fixture_tree / "experiments/bench-tiny-cpu.toml").read_text().strip() in bench  # config verbatim
    assert cfg.config_hash in bench and "@misc{" in bench  # provenance + citation carry the hash
    commit = json.loads(next((fixture_tree / "experiments/results/bench-tiny-cpu").glob("*/result.json")).read_text())[
        "git_commit"]
    assert f"code commit {commit}" in bench
    for field in ("commit", "device class, device", "torch / CUDA / cuDNN", "weights", "started / finished (UTC)",
                  "command"):
        assert f"| {escape(field)} |" in bench
    assert "/generated/charts/bench-tiny-cpu-stages.svg" in bench
    # memory map computed from the pose agrees with what the run recorded
    assert "✗" not in bench and "✓" in bench

    gpu = (out / "experiments/bench.md").read_text()
    assert "not yet run" in gpu and TINY_LABEL not in gpu
    index = (out / "fragments/experiments_index.md").read_text()
    assert "not yet run" in index and "fresh" in index
    card = (out / "fragments/model_card_performance.md").read_text()
    assert TINY_LABEL in card and "bench-tiny-cpu" in card and "steady" in card
    assert "Not yet run" in (out / "fragments/model_card_parity.md").read_text()
    gallery = (out / "fragments/model_card_gallery.md").read_text()
    assert gallery.count("grid-item-card") == 2 and gallery.count("Not hosted yet") == 2 and "<video" not in gallery


def test_svg_bytes_identical_over_two_renders(fixture_tree, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    render_site(_site(fixture_tree), first)
    # the second render in a fresh process: nothing carried over in memory
    subprocess.run([sys.executable, "-m", "worldplay.site", "render", "--site-config", str(fixture_tree / "site.toml"),
                    "--experiments-dir", str(fixture_tree / "experiments"), "--out", str(second)], check=True, cwd=ROOT)
    a = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    b = {p.relative_to(second): p.read_bytes() for p in second.rglob("*") if p.is_file()}
    assert a.keys() == b.keys() and len([k for k in a if k.suffix == ".svg"]) >= 5
    different = [str(k) for k in a if a[k] != b[k]]
    assert not different, different
    svg = a[Path("charts/bench-tiny-cpu-stages.svg")].decode()
    assert "<dc:date>" not in svg and "<image" not in svg  # no timestamp, no embedded bitmaps


def test_stale_result_fails_naming_the_experiment(tree):
    path = tree / "experiments/drift-tiny-cpu.toml"
    path.write_text(path.read_text().replace("seed = 0", "seed = 1"))
    with pytest.raises(SiteError) as err:
        _site(tree)
    assert "drift-tiny-cpu" in str(err.value) and "stale" in str(err.value)
    assert "bench-tiny-cpu" not in str(err.value)  # only the stale one is named
    # the command line says the same and exits 1
    done = subprocess.run([sys.executable, "-m", "worldplay.site", "render", "--site-config", str(tree / "site.toml"),
                           "--experiments-dir", str(tree / "experiments"), "--out", str(tree / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "drift-tiny-cpu" in done.stderr and not (tree / "out").exists()


def test_a_description_change_makes_the_result_stale(tree):
    """The description is not hashed, but the page shows it next to the numbers."""
    path = tree / "experiments/drift-tiny-cpu.toml"
    path.write_text(path.read_text().replace("harness check", "a harness check"))
    with pytest.raises(SiteError, match="drift-tiny-cpu.*description differs.*stale"):
        _site(tree)


def test_a_comment_change_keeps_the_result_fresh(tree):
    path = tree / "experiments/drift-tiny-cpu.toml"
    path.write_text("# a comment\n" + path.read_text())
    site = _site(tree)
    assert site.experiments["drift-tiny-cpu"].result is not None
    render_site(site, tree / "generated")
    assert "changed since only in text that does not change the resolved config" in (
        tree / "generated/experiments/drift-tiny-cpu.md").read_text()


def test_missing_required_result_fails_and_unrun_ones_are_listed(tree):
    with pytest.raises(SiteError, match="bench.*no result"):
        _site(tree, SITE_TOML.replace('required = [', 'required = ["bench", '))
    shutil.rmtree(tree / "experiments/results/drift-tiny-cpu")
    with pytest.raises(SiteError, match="drift-tiny-cpu"):
        _site(tree)
    site = _site(tree, SITE_TOML.replace('"drift-tiny-cpu", ', ""))  # not required any more: listed as not run
    assert site.experiments["drift-tiny-cpu"].status == "not yet run"
    assert site.first_for("drift") is None


def test_a_stale_result_fails_even_when_not_required(tree):
    path = tree / "experiments/bench-tiny-cpu.toml"
    path.write_text(path.read_text().replace("repetitions = 3", "repetitions = 2"))
    with pytest.raises(SiteError, match="bench-tiny-cpu"):
        _site(tree, SITE_TOML.replace('"bench-tiny-cpu", ', ""))


def test_site_config_is_strict(tmp_path):
    bad = tmp_path / "site.toml"
    bad.write_text('requried = ["x"]\n')
    with pytest.raises(SiteError, match="requried"):
        load_site_config(bad)
    bad.write_text('[model_card]\nbench = "bench"\n')
    with pytest.raises(SiteError, match="model_card.bench"):
        load_site_config(bad)


def _manifest(tree: Path) -> Path:
    return next((tree / "experiments/results/rollouts-tiny-cpu").glob("*/videos.json"))


def _edit_manifest(tree: Path, edit) -> Path:
    """Change the video manifest and re-seal its result, as a run that wrote it so would have."""
    manifest = _manifest(tree)
    entries = json.loads(manifest.read_text())
    edit(entries)
    manifest.write_text(json.dumps(entries))
    write_digests(manifest.parent, entries[0]["config_hash"] if entries and isinstance(entries[0], dict) else
                  json.loads((manifest.parent / "result.json").read_text())["config_hash"])
    return manifest


@pytest.mark.parametrize("url", ["http://example.org/v.mp4", "file:///tmp/v.mp4", "javascript:alert(1)",
                                 "//example.org/v.mp4", "videos/v.mp4", 'https://example.org/a".mp4',
                                 "https://example.org/a b.mp4", "https:///v.mp4"])
def test_non_https_url_is_refused_at_render_time(tree, url):
    manifest = _edit_manifest(tree, lambda entries: entries[1].update(url=url))
    entries = json.loads(manifest.read_text())
    site = _site(tree)
    with pytest.raises(SiteError) as err:
        render_site(site, tree / "generated")
    assert entries[1]["id"] in str(err.value) and "rollouts-tiny-cpu" in str(err.value)
    assert "https" in str(err.value)


def test_https_check_and_cards():
    assert check_https_url("https://cdn.example.org/v/a%20b.mp4", "x") == "https://cdn.example.org/v/a%20b.mp4"
    base = dict(id="v1", experiment="rollouts-tiny-cpu", run_id="r", input="img-1", pose="w-31", frames=125,
                fps=16.0, resolution=(64, 96), sha256="ab" * 32, bytes=10, tiny=True)
    not_hosted = gallery_markdown([VideoCard(url="", **base)])
    assert "Not hosted yet" in not_hosted and "<video" not in not_hosted and "href" not in not_hosted
    assert "wp-not-hosted" in not_hosted and TINY_LABEL in not_hosted
    hosted = gallery_markdown([VideoCard(url="https://cdn.example.org/v1.mp4?a=1&b=2", **base)])
    assert '<video class="wp-video" controls preload="none"' in hosted
    assert 'src="https://cdn.example.org/v1.mp4?a=1&amp;b=2"' in hosted and "Not hosted yet" not in hosted
    assert gallery_markdown([]).startswith("No rollout results yet")


def test_publish_to_a_local_folder_verifies_and_fills_urls(tree, tmp_path):
    from worldplay.site.publish import publish_manifest, sha256_file

    manifest = _manifest(tree)
    before = json.loads(manifest.read_text())
    target = tmp_path / "host"
    done = publish_manifest(manifest, f"file://{target}", "https://videos.example.org/wp/", log=lambda *_: None)
    after = json.loads(manifest.read_text())
    assert [p.uploaded for p in done] == [True, True]
    for old, new in zip(before, after, strict=True):
        assert {k: v for k, v in new.items() if k != "url"} == {k: v for k, v in old.items() if k != "url"}
        assert new["url"] == f"https://videos.example.org/wp/{old['file']}"
        assert sha256_file(target / old["file"]) == old["sha256"]
    assert not list(manifest.parent.glob(".*"))  # no temp files left beside the manifest
    # a second publish (plain path this time) finds identical copies and uploads nothing
    again = publish_manifest(manifest, str(target), "https://videos.example.org/wp", log=lambda *_: None)
    assert [p.uploaded for p in again] == [False, False]
    # the gallery now shows players for the published videos
    render_site(_site(tree), tree / "generated")
    gallery = (tree / "generated/fragments/gallery.md").read_text()
    assert gallery.count("<video") == 2 and "Not hosted yet" not in gallery


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible HTTP server on localhost (moto), with one bucket."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("wp-videos")
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_publish_to_an_s3_server_through_to_manifest_and_gallery(tree, s3_server, capsys):
    """worldplay publish end to end against S3 over HTTP: upload, read back, https URLs in the
    manifest (the endpoint's http address never), players in the rendered gallery."""
    import s3fs

    from worldplay.cli import main

    manifest = _manifest(tree)
    before = json.loads(manifest.read_text())
    argv = ["publish", "--to", "s3://wp-videos/rollouts", "--endpoint-url", s3_server,
            "--experiments-dir", str(tree / "experiments"), "--video-dir", str(tree / "videos")]
    assert main([*argv, "--base-url", f"{s3_server}/wp-videos/rollouts"]) == 2  # the endpoint's own http URL
    assert "https" in capsys.readouterr().err and json.loads(manifest.read_text()) == before
    assert main([*argv, "--base-url", "https://videos.example.org/wp"]) == 0
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    after = json.loads(manifest.read_text())
    for old, new in zip(before, after, strict=True):
        assert new["url"] == f"https://videos.example.org/wp/{old['file']}"
        with fs.open(f"wp-videos/rollouts/{old['file']}", "rb") as fh:  # the bytes on the server
            assert hashlib.sha256(fh.read()).hexdigest() == old["sha256"]
    assert main([*argv, "--base-url", "https://videos.example.org/wp"]) == 0
    assert capsys.readouterr().out.count("already there") == len(before)  # identical copies: no upload
    render_site(_site(tree), tree / "generated")
    gallery = (tree / "generated/fragments/gallery.md").read_text()
    assert gallery.count("<video") == len(before) and s3_server not in gallery
    assert all(f"https://videos.example.org/wp/{e['file']}" in gallery for e in before)


def test_publish_refuses_a_wrong_local_file_or_a_bad_copy(tree, tmp_path, monkeypatch):
    from worldplay.site import publish

    manifest = _manifest(tree)
    original = manifest.read_text()
    entry = json.loads(original)[0]
    video = tree / "videos" / entry["file"]
    good = video.read_bytes()
    video.write_bytes(good + b"tampered")
    with pytest.raises(publish.PublishError, match="sha256"):
        publish.publish_manifest(manifest, str(tmp_path / "host"), "https://x.example.org", video_dir=tree / "videos",
                                 log=lambda *_: None)
    assert manifest.read_text() == original
    video.write_bytes(good)
    monkeypatch.setattr(publish, "_remote_sha", lambda fs, path: "0" * 64)  # the copy reads back wrong
    with pytest.raises(publish.PublishError, match="was not changed"):
        publish.publish_manifest(manifest, str(tmp_path / "host2"), "https://x.example.org", log=lambda *_: None)
    assert manifest.read_text() == original
    with pytest.raises(SiteError, match="https"):
        publish.publish_manifest(manifest, str(tmp_path / "host3"), "http://x.example.org", log=lambda *_: None)


def test_publish_command_line(tree, tmp_path, capsys):
    from worldplay.cli import main

    args = ["publish", "--experiments-dir", str(tree / "experiments"), "--to", str(tmp_path / "host")]
    assert main([*args, "--base-url", "http://insecure.example.org"]) == 2
    assert "https" in capsys.readouterr().err
    assert main([*args, "--base-url", "https://cdn.example.org/v", "--experiment", "rollouts-tiny-cpu"]) == 0
    assert all(e["url"].startswith("https://cdn.example.org/v/") for e in json.loads(_manifest(tree).read_text()))
    assert main([*args, "--base-url", "https://cdn.example.org/v", "--experiment", "bench-tiny-cpu"]) == 2


def test_markdown_table_escapes_and_formats():
    import pandas as pd
    from markdown_it import MarkdownIt

    from worldplay.site.text import code

    text = markdown_table(pd.DataFrame({"a|b": ["x|y", None], "n": [1.23456, float("nan")]}),
                          formats={"n": "{:.2f}"}, caption="cap")
    assert text.startswith(":::{table} cap") and "| :-- | --: |" in text
    body = text.split("\n\n", 1)[1].rsplit(":::", 1)[0]
    cells = [[c.content for c in t.children] for t in MarkdownIt("commonmark").enable("table").parse(body)
             if t.type == "inline"]
    assert cells == [["a|b"], ["n"], ["x|y"], ["1.23"], ["—"], ["—"]]
    # a code span keeps its pipe in a table too
    rows = markdown_table([{"c": code("a|b")}])
    html = MarkdownIt("commonmark").enable("table").render(rows)
    assert '<td style="text-align:left"><code>a|b</code></td>' in html


def test_unrun_rollouts_show_their_planned_videos(tree):
    shutil.rmtree(tree / "experiments/results/rollouts-tiny-cpu")
    site = _site(tree, SITE_TOML.replace(', "rollouts-tiny-cpu"]', "]", 1))
    render_site(site, tree / "generated")
    card = (tree / "generated/fragments/model_card_gallery.md").read_text()
    planned = load_config(tree / "experiments/rollouts-samples.toml")
    n = len(planned.inputs) * len(planned.poses)
    assert card.count("grid-item-card") == n and card.count("**Not yet run.**") == n
    assert "<video" not in card and "href" not in card and "rollouts-samples" in card
    page = (tree / "generated/fragments/gallery.md").read_text()
    assert f"## {escape('rollouts-samples')}" in page and f"## {escape('rollouts-tiny-cpu')}" in page


# ------------------------------------------------------------------------------------------
# hostile input: output folders, video manifests, publish


def _render(tree: Path, out: Path, capsys) -> tuple[int, str]:
    """``python -m worldplay.site render`` in this process (a subprocess imports the model stack)."""
    from worldplay.site.__main__ import main

    capsys.readouterr()
    rc = main(["render", "--site-config", str(tree / "site.toml"), "--experiments-dir", str(tree / "experiments"),
               "--out", str(out)])
    return rc, capsys.readouterr().err


@pytest.fixture
def no_charts(monkeypatch):
    """Render without drawing charts (the pages still link them): for tests about other things."""
    from worldplay.site.pages import Renderer

    monkeypatch.setattr(Renderer, "chart", lambda self, name, make: f"{self.prefix}/charts/{name}.svg")


def test_render_replaces_only_a_folder_it_made(tree, capsys, no_charts):
    out = tree / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, err = _render(tree, out, capsys)
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "not a folder that render made" in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (tree / "a-file").write_text("x")
    assert _render(tree, tree / "a-file", capsys)[0] == 2 and (tree / "a-file").read_text() == "x"
    # empty, new, and earlier renders are fine
    (out / "notes.txt").unlink()
    assert _render(tree, out, capsys)[0] == 0 and (out / "fragments/gallery.md").is_file()
    (out / "fragments/gallery.md").write_text("stale")
    assert _render(tree, out, capsys)[0] == 0 and (out / "fragments/gallery.md").read_text() != "stale"
    assert _render(tree, tree / "new" / "out", capsys)[0] == 0
    assert not [p.name for p in tree.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_render_refuses_duplicate_video_ids(tree):
    _edit_manifest(tree, lambda entries: entries[1].update(id=entries[0]["id"]))
    with pytest.raises(SiteError, match=r"videos\.json: entry #1 .*is also the id of entry #0"):
        _site(tree)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda e: e[0].update(frames="125"), "field 'frames' must be a whole number >= 1, got \"125\""),
    (lambda e: e[0].update(resolution=[64]), "field 'resolution' must be \\[height, width\\]"),
    (lambda e: e[0].update(input=["img-1"]), "field 'input' must be a string"),
    (lambda e: e[0].update(url=None), "field 'url' must be a string"),
    (lambda e: e[0].pop("file"), "lacks file"),
    (lambda e: e[0].update(file="../../etc/passwd"), "field 'file' must be a relative path"),
    (lambda e: e.append(["not", "an", "object"]), "entry #2: must be a JSON object"),
])
def test_a_bad_video_manifest_is_one_line_naming_file_and_field(tree, capsys, edit, message):
    manifest = _edit_manifest(tree, edit)
    with pytest.raises(SiteError, match=message) as err:
        _site(tree)
    problem = str(err.value).splitlines()[1]  # "the site cannot be rendered:" + one line per problem
    assert str(manifest) in problem and "rollouts-tiny-cpu" in problem and len(str(err.value).splitlines()) == 2
    rc, stderr = _render(tree, tree / "out", capsys)
    assert rc == 1 and "Traceback" not in stderr and str(manifest) in stderr


def _publish(tree: Path, host: Path, capsys) -> tuple[int, str]:
    from worldplay.cli import main

    capsys.readouterr()
    rc = main(["publish", "--experiments-dir", str(tree / "experiments"), "--to", str(host), "--video-dir",
               str(tree / "videos"), "--base-url", "https://cdn.example.org/v", "--experiment", "rollouts-tiny-cpu"])
    return rc, capsys.readouterr().err


def test_publish_refuses_duplicate_ids_and_changes_nothing(tree, tmp_path, capsys):
    manifest = _edit_manifest(tree, lambda entries: entries[1].update(id=entries[0]["id"]))
    before = manifest.read_text()
    rc, err = _publish(tree, tmp_path / "host", capsys)
    assert rc == 2 and "is also the id of entry #0" in err and len(err.strip().splitlines()) == 1
    assert manifest.read_text() == before and not (tmp_path / "host").exists()


@pytest.mark.parametrize("field", ["file", "id"])
def test_publish_refuses_an_entry_without_file_or_id(tree, tmp_path, capsys, field):
    manifest = _edit_manifest(tree, lambda entries: entries[0].pop(field))
    before = manifest.read_text()
    rc, err = _publish(tree, tmp_path / "host", capsys)
    assert rc == 2 and f"lacks {field}" in err and str(manifest) in err and len(err.strip().splitlines()) == 1
    assert manifest.read_text() == before


def test_publish_refuses_an_edited_result_and_reseals_what_it_writes(tree, tmp_path, capsys):
    from worldplay.experiments.results import verify_result

    manifest = _manifest(tree)
    entries = json.loads(manifest.read_text())
    entries[0]["input"] = "edited by hand"
    manifest.write_text(json.dumps(entries))
    rc, err = _publish(tree, tmp_path / "host", capsys)
    assert rc == 2 and "does not verify" in err and "videos.json" in err
    entries[0]["input"] = "img-1"
    _edit_manifest(tree, lambda e: e[0].update(input="img-1"))
    rc, err = _publish(tree, tmp_path / "host", capsys)
    assert rc == 0, err
    verify_result(manifest.parent)  # the URLs are in, and the digests say so
    assert all(e["url"] for e in json.loads(manifest.read_text()))


# ---------------------------------------------------------------------------------------------
# committed results by default; a local run only when asked, under a banner (issue 17)


def _commit_all(tree: Path) -> None:
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t", "-C", str(tree)]
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "results"], check=True)


def _local_noisy_bench(tree: Path) -> Path:
    """A later, uncommitted bench-tiny-cpu result whose fastest leg's p90 is 3x its median."""
    results = tree / "experiments/results/bench-tiny-cpu"
    committed = sorted(results.iterdir())[-1]
    local = results / "29991231T000000Z-local00"
    shutil.copytree(committed, local)
    result = json.loads((local / "result.json").read_text())
    total = result["summary"]["legs"]["native-fastest"]["steady_ms"]["total"]
    total["p90"] = 3 * total["median"]
    result["run_id"] = local.name
    (local / "result.json").write_text(json.dumps(result))
    write_digests(local, result["config_hash"])
    return local


def test_render_shows_committed_results_and_a_local_one_only_when_asked(tree):
    _commit_all(tree)
    local = _local_noisy_bench(tree)
    site = _site(tree)
    shown = site.experiments["bench-tiny-cpu"].result
    assert shown.path != local and not shown.local
    assert site.local_left_out == [f"bench-tiny-cpu/{local.name}"]
    render_site(site, tree / "committed")
    assert "Local, uncommitted run" not in (tree / "committed/experiments/bench-tiny-cpu.md").read_text()

    site = load_site(tree / "site.toml", experiments_dir=tree / "experiments", include_local=True)
    shown = site.experiments["bench-tiny-cpu"].result
    assert shown.path == local and shown.local and site.local_left_out == []
    assert not site.experiments["drift-tiny-cpu"].result.local
    render_site(site, tree / "local")
    page = (tree / "local/experiments/bench-tiny-cpu.md").read_text()
    assert "Local, uncommitted run" in page and "29991231T000000Z-local00" in page
    assert "Local, uncommitted run" not in (tree / "local/experiments/drift-tiny-cpu.md").read_text()
    card = (tree / "local/fragments/model_card_performance.md").read_text()
    assert "Local, uncommitted run" in card and "High variance" in card and "`native-fastest` (p90 3\\.0×" in card  # Markdown-escaped


def test_a_required_experiment_with_only_a_local_result_fails_naming_the_flag(tree, tmp_path):
    drift = tree / "experiments/results/drift-tiny-cpu"
    shutil.move(drift, tmp_path / "drift")
    _commit_all(tree)
    shutil.move(tmp_path / "drift", drift)  # back, but not committed

    def render(*extra):
        return subprocess.run([sys.executable, "-m", "worldplay.site", "render", "--site-config",
                               str(tree / "site.toml"), "--experiments-dir", str(tree / "experiments"),
                               "--out", str(tree / "out"), *extra], capture_output=True, text=True, cwd=ROOT)

    run = render()
    assert run.returncode == 1
    assert "drift-tiny-cpu" in run.stderr and "only a local, uncommitted one" in run.stderr
    assert "--include-local" in run.stderr
    run = render("--include-local")
    assert run.returncode == 0, run.stderr
    assert "Local, uncommitted run" in (tree / "out/experiments/drift-tiny-cpu.md").read_text()


def test_captions_name_only_columns_their_tables_have(fixture_tree, tmp_path):
    """A caption that points at columns (*after candidates*) sits on a table that has them; the model
    card's trajectory tables (computed from the pose, nothing recorded) say so instead."""
    out = tmp_path / "generated"
    render_site(_site(fixture_tree), out)
    checked = 0
    for page in out.rglob("*.md"):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith(":::{table}") and "columns after *candidates*" in line:
                header = next(lines[j] for j in range(i + 1, len(lines)) if lines[j].startswith("| "))
                cells = [c.strip() for c in header.strip("|").split("|")]
                assert cells.index("candidates") < len(cells) - 1, (page, header)
                checked += 1
    assert checked  # the bench's recorded selection
    trajectories = (out / "fragments/model_card_trajectories.md").read_text()
    assert "columns after" not in trajectories and "computed from the pose" in trajectories


def test_peak_memory_of_a_ranked_leg_is_shown_per_rank():
    from worldplay.site.pages import _peak

    mem = {"rank0 (cuda:0)": {"peak_allocated_gib": 20.718, "peak_reserved_gib": 20.77},
           "rank1 (cuda:1)": {"peak_allocated_gib": 19.5, "peak_reserved_gib": 19.61}}
    assert _peak(mem) == ("rank0 (cuda:0): 20.7 GiB allocated (20.8 reserved); "
                          "rank1 (cuda:1): 19.5 GiB allocated (19.6 reserved)")
    assert "{" not in _peak({"rank0 (cpu)": {"host_peak_rss_mib": 409.8}})
