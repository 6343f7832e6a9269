"""Pinned experiments: strict configs, atomic results, staleness, input manifest, FLOP counts.

Everything runs on copies of ``experiments/`` under tmp_path (nothing is written into the repo)
with the tiny preset on the CPU; inputs are synthetic files with their own manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from worldplay.experiments import runner as runner_mod
from worldplay.experiments.flops import stage_flops, vae_decode_flops
from worldplay.experiments.inputs import InputDigestError, InputError, InputManifest
from worldplay.experiments.official_leg import OfficialLegUnavailable
from worldplay.experiments.results import StaleResultError, check_fresh, latest_result, verify_result
from worldplay.experiments.runner import RunOptions, RunRefused, run_experiment
from worldplay.experiments.schema import (
    ATTENTION_BACKENDS,
    ExperimentConfigError,
    experiment_names,
    load_config,
)

REPO_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


# --------------------------------------------------------------------------------------------
# fixtures: a private experiments folder with a synthetic input manifest
# --------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_experiments_dir(root: Path) -> tuple[Path, Path]:
    """(experiments dir with the pinned configs, data dir satisfying its synthetic manifest)."""
    from PIL import Image

    exp = root / "experiments"
    exp.mkdir(parents=True)
    for toml in REPO_EXPERIMENTS.glob("*.toml"):
        if toml.name != "inputs.toml":
            shutil.copy(toml, exp / toml.name)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    repo = InputManifest.load(REPO_EXPERIMENTS / "inputs.toml")
    url = "https://example.invalid/assets/"
    text = ""
    for ident, entry in repo.entries.items():  # the repo's ids, with synthetic files of our own
        path = data / entry.file_name
        if entry.kind == "image":
            Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(path)
        elif entry.kind == "captions":
            path.write_text('image_name,caption\n./assets/img/1.png,"a test caption"\n', encoding="utf-8")
        else:
            path.write_text("{}", encoding="utf-8")
        text += f'[inputs.{ident}]\nkind = "{entry.kind}"\nurl = "{url}{path.name}"\nsha256 = "{_sha(path)}"\n\n'
    (exp / "inputs.toml").write_text(text, encoding="utf-8")
    return exp, data


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    exp, data = make_experiments_dir(tmp_path)
    monkeypatch.setenv("WORLDPLAY_DATA_DIR", str(data))
    monkeypatch.setenv("WORLDPLAY_CACHE_DIR", str(tmp_path / "cache"))
    options = RunOptions(allow_dirty=True, experiments_dir=exp, results_root=tmp_path / "results",
                         video_dir=tmp_path / "videos", scratch_dir=tmp_path / "scratch", progress=False)
    return exp, options


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    exp, _ = make_experiments_dir(root)
    options = RunOptions(allow_dirty=True, experiments_dir=exp, results_root=root / "results",
                         video_dir=root / "videos", progress=False)
    return exp, options, run_experiment("bench-tiny-cpu", options)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def test_pinned_configs_are_valid():
    manifest = InputManifest.load(REPO_EXPERIMENTS / "inputs.toml")
    names = experiment_names(REPO_EXPERIMENTS)
    assert {"bench", "drift-bf16-vs-fp32", "rollouts-samples", "parity-official", "bench-tiny-cpu",
            "drift-tiny-cpu", "rollouts-tiny-cpu"} <= set(names)
    for name in names:
        cfg = load_config(REPO_EXPERIMENTS / f"{name}.toml", input_ids=manifest.kinds())
        assert cfg.device_class == ("cpu-tiny" if name.endswith("-tiny-cpu") else "gpu")
        assert len(cfg.config_hash) == 64


def test_attention_backend_names_match_the_attention_module():
    from worldplay.nn.attention import BACKENDS

    assert set(ATTENTION_BACKENDS) == set(BACKENDS)


BENCH = """kind = "bench"
preset = "tiny"
device = "cpu"
legs = ["native-eager"]
num_chunk = 8
pose = "w-31"
warmup_chunks = 5

[weights]
random_init = 0
"""


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("", 'warmup = 3\n'), "warmup"),  # unknown key
        (("num_chunk = 8", 'num_chunk = "8"'), "num_chunk"),  # wrong type
        (("num_chunk = 8", "num_chunk = true"), "num_chunk"),  # a bool is not an int
        (("warmup_chunks = 5", "warmup_chunks = 8"), "warmup_chunks"),  # no steady chunk left
        (('pose = "w-31"', 'pose = "w-30"'), "pose"),  # 31 latents < 8 chunks x 4
        (('pose = "w-31"', 'pose = "jump-3"'), "pose"),  # not a pose string
        (('legs = ["native-eager"]', 'legs = ["native-eager", "official"]'), "legs"),  # official needs wan5b
        (('legs = ["native-eager"]', 'legs = ["native-eager", "native-eager"]'), "legs[1]"),
        (('legs = ["native-eager"]', 'legs = ["native-turbo"]'), "legs[0]"),
        (("random_init = 0", "random_init = 0\npath = '/x'"), "weights"),  # two weight sources
        (("random_init = 0", "seed = 0"), "weights.seed"),  # unknown key in [weights]
        (("random_init = 0", 'hub = "tencent/HY-WorldPlay@main"\nbase = "/b"'), "weights.hub"),  # unpinned
        (("num_chunk = 8", "num_chunk = 8\nresolution = [64, 90]"), "resolution[1]"),
        (('device = "cpu"', 'device = "cuda"'), "device"),  # a *-tiny-cpu name must run on the CPU
        (("num_chunk = 8", 'num_chunk = 8\nattention_backend = "cudnn"'), "attention_backend"),
        (("num_chunk = 8", 'num_chunk = 8\nimage = "img-99"'), "image"),
        (('kind = "bench"', 'kind = "benchmark"'), "kind"),
        # every numeric key has a range, not only a floor (issue 12, item 10)
        (("num_chunk = 8", "num_chunk = 8\nseed = 1e23"), "seed"),
        (("num_chunk = 8", "num_chunk = 8\nseed = 100000000000000000000000"), "seed"),
        (("num_chunk = 8", "num_chunk = 8\nnoise_latents = 1e12"), "noise_latents"),
        (("num_chunk = 8", "num_chunk = 8\nnoise_latents = 1000000000000"), "noise_latents"),
        (("num_chunk = 8", "num_chunk = 1000000"), "num_chunk"),
        (("num_chunk = 8", "num_chunk = 8\nrepetitions = 1000000000"), "repetitions"),
        (("warmup_chunks = 5", "warmup_chunks = 100000000000"), "warmup_chunks"),
        (("random_init = 0", "random_init = 18446744073709551616"), "weights.random_init"),
        (("num_chunk = 8", "num_chunk = 8\nresolution = [64, 70400]"), "resolution[1]"),
        (("num_chunk = 8", "num_chunk = 8\nresolution = [0, 96]"), "resolution[0]"),
    ],
)
def test_bad_config_names_the_key(tmp_path, edit, key):
    old, new = edit
    text = BENCH.replace(old, new, 1) if old else BENCH.replace("[weights]", new + "\n[weights]")
    path = tmp_path / "broken-tiny-cpu.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ExperimentConfigError) as info:
        load_config(path, input_ids={"img-1": "image"})
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and "broken-tiny-cpu.toml" in str(info.value)
    assert len(str(info.value).splitlines()) == 1 and len(str(info.value)) < 500


def test_numeric_ranges_leave_room_for_real_configs(tmp_path):
    path = tmp_path / "wide-tiny-cpu.toml"
    path.write_text(BENCH.replace("num_chunk = 8", "num_chunk = 1024\nnoise_latents = 4096\nseed = 9223372036854775807")
                    .replace('pose = "w-31"', 'pose = "w-4095"'))
    cfg = load_config(path)
    assert (cfg.num_chunk, cfg.noise_latents, cfg.seed) == (1024, 4096, 2**63 - 1)


def test_counts_in_config_messages_are_pluralised(tmp_path):
    path = tmp_path / "one-tiny-cpu.toml"
    one = BENCH.replace("num_chunk = 8", "num_chunk = 1").replace('pose = "w-31"', 'pose = "w-3"')
    for text, fragment in [(one.replace("warmup_chunks = 5", "warmup_chunks = 0\nnoise_latents = 3"),
                            "the 4 latents of 1 chunk"),
                           (one.replace("warmup_chunks = 5", "warmup_chunks = 1"), "of the 1 chunk;"),
                           (one.replace('pose = "w-3"', 'pose = "w-1"').replace("warmup_chunks = 5", "warmup_chunks = 0"),
                            "gives 2 latents")]:
        path.write_text(text)
        with pytest.raises(ExperimentConfigError) as info:
            load_config(path)
        assert fragment in str(info.value) and "1 chunks" not in str(info.value)


def test_two_spellings_of_one_pose_are_refused(tmp_path):
    # both would be written to ...--w-31_right-3.mp4: the second rollout used to fail after the first
    text = REPO_EXPERIMENTS.joinpath("rollouts-tiny-cpu.toml").read_text()
    path = tmp_path / "r-tiny-cpu.toml"
    path.write_text(text.replace('poses = ["w-31", "w-4,right-13,left-14"]', 'poses = ["w-31, right-3", "w-31,right-3"]'))
    with pytest.raises(ExperimentConfigError) as info:
        load_config(path, input_ids={"img-1": "image", "img-5": "image"})
    msg = str(info.value)
    assert info.value.key == "poses[1]"
    assert "'w-31,right-3'" in msg and "'w-31, right-3'" in msg and "'w-31_right-3'" in msg
    assert "--overwrite" not in msg


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"kind = \xff\n", "not UTF-8"),
        (b"seed = " + b"9" * 5000 + b"\n", "not usable TOML"),
        (b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nest too deeply"),
        (b"kind = \n", "not valid TOML"),
        (None, "cannot read: Is a directory"),
    ],
    ids=["not-utf8", "5000-digits", "deep", "syntax", "directory"],
)
def test_unreadable_configs_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "bad-tiny-cpu.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ExperimentConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert fragment in msg and "[Errno" not in msg and len(msg.splitlines()) == 1 and len(msg) < 300


def test_resolution_flags_are_checked_by_the_shared_rule():
    import argparse

    from worldplay.experiments.schema import image_side

    parser = argparse.ArgumentParser(prog="worldplay run", exit_on_error=False)
    parser.add_argument("--height", type=image_side)
    assert parser.parse_args(["--height", "704"]).height == 704
    for bad in ["0", "-32", "50", "70400", "x"]:
        with pytest.raises(argparse.ArgumentError, match="--height"):
            parser.parse_args(["--height", bad])
    with pytest.raises(argparse.ArgumentTypeError, match="multiple of 32"):
        image_side("0")  # 0 used to fall back to the preset's height without a word


def test_rollout_inputs_and_poses_are_checked(tmp_path):
    text = REPO_EXPERIMENTS.joinpath("rollouts-tiny-cpu.toml").read_text()
    path = tmp_path / "r-tiny-cpu.toml"
    path.write_text(text.replace('"img-5"', '"img-55"'))
    with pytest.raises(ExperimentConfigError, match=r"inputs\[1\]"):
        load_config(path, input_ids={"img-1": "image", "img-5": "image"})
    path.write_text(text.replace('"w-31"', '"w-12"'))
    with pytest.raises(ExperimentConfigError, match=r"poses\[0\]"):
        load_config(path, input_ids={"img-1": "image", "img-5": "image"})


def test_hash_covers_resolved_values_not_the_description(tmp_path):
    path = tmp_path / "h-tiny-cpu.toml"
    path.write_text(BENCH)
    base = load_config(path).config_hash
    path.write_text('description = "words"\n' + BENCH)
    assert load_config(path).config_hash == base
    path.write_text(BENCH.replace("num_chunk = 8", "num_chunk = 8\nseed = 0"))  # the default, spelled out
    assert load_config(path).config_hash == base
    path.write_text(BENCH.replace("num_chunk = 8", "num_chunk = 8\nseed = 1"))
    assert load_config(path).config_hash != base


# --------------------------------------------------------------------------------------------
# input manifest
# --------------------------------------------------------------------------------------------


def test_manifest_refuses_a_file_with_a_wrong_digest(tmp_path):
    exp, data = make_experiments_dir(tmp_path)
    manifest = InputManifest.load(exp / "inputs.toml")
    assert manifest.resolve("img-1", data_dir=data, cache_dir=tmp_path / "c") == data / "1.png"
    assert manifest.caption("img-1", data_dir=data, cache_dir=tmp_path / "c") == "a test caption"
    (data / "1.png").write_bytes(b"not the image")
    with pytest.raises(InputDigestError, match="refusing"):
        manifest.resolve("img-1", data_dir=data, cache_dir=tmp_path / "c")
    # the download cache is verified too, and nothing is fetched offline when asked not to
    cache = tmp_path / "c" / "inputs"
    cache.mkdir(parents=True)
    entry = manifest.entry("img-5")
    (cache / f"{entry.sha256[:16]}-5.jpeg").write_bytes(b"bad")
    with pytest.raises(InputDigestError):
        manifest.resolve("img-5", data_dir=tmp_path / "empty", cache_dir=tmp_path / "c")
    with pytest.raises(InputError, match="not available offline"):
        manifest.resolve("captions", data_dir=tmp_path / "empty", cache_dir=tmp_path / "c", download=False)


_ENTRY = 'kind = "image"\nurl = "https://example.com/x.png"\nsha256 = "' + "0" * 64 + '"\n'


@pytest.mark.parametrize(
    "text, field",
    [
        ('inputs = "x"\n', "inputs"),
        ("source = 3\n", "source"),
        ("[inputs]\nx = 3\n", "inputs.x"),
        ("[inputs.x]\n" + _ENTRY.replace('"image"', "3"), "inputs.x.kind"),
        ("[inputs.x]\n" + _ENTRY.replace('"image"', '["image"]'), "inputs.x.kind"),
        ("[inputs.x]\n" + _ENTRY.replace('"https://example.com/x.png"', "5"), "inputs.x.url"),
        ("[inputs.x]\n" + _ENTRY.replace('"https://example.com/x.png"', '"https://example.com/"'), "inputs.x.url"),
        ("[inputs.x]\n" + _ENTRY.replace('"' + "0" * 64 + '"', "5"), "inputs.x.sha256"),
        ('[inputs."../x"]\n' + _ENTRY, "inputs.../x"),
        ("[inputs.x]\n" + _ENTRY + "extra = 1\n", "inputs.x"),
        ("seed = " + "9" * 5000 + "\n", "input manifest"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_named(tmp_path, text, field):
    path = tmp_path / "inputs.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        InputManifest.load(path)
    msg = str(info.value)
    assert f"{path}: {field}" in msg and len(msg.splitlines()) == 1 and len(msg) < 300


def test_manifest_read_errors_have_no_errno_noise(tmp_path):
    for path in (tmp_path / "missing.toml", tmp_path):
        with pytest.raises(InputError) as info:
            InputManifest.load(path)
        assert "[Errno" not in str(info.value) and str(path) in str(info.value)


def test_manifest_download_and_read_errors_have_no_errno_noise(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from worldplay.experiments import inputs

    exp, data = make_experiments_dir(tmp_path)
    manifest = InputManifest.load(exp / "inputs.toml")

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(InputError) as info:
        manifest.resolve("img-1", data_dir=tmp_path / "empty", cache_dir=tmp_path / "c")
    assert "(Name or service not known)" in str(info.value) and "Errno" not in str(info.value)

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(inputs, "sha256_of", unreadable)  # tests run as root: chmod refuses nothing
    with pytest.raises(InputError) as info:
        manifest.resolve("img-1", data_dir=data, cache_dir=tmp_path / "c")
    assert str(info.value).endswith("1.png (from $WORLDPLAY_DATA_DIR (" + str(data) + ")): Permission denied")


def test_manifest_rejects_non_https_urls(tmp_path):
    path = tmp_path / "inputs.toml"
    path.write_text('[inputs.x]\nkind = "image"\nurl = "http://example.com/x.png"\nsha256 = "' + "0" * 64 + '"\n')
    with pytest.raises(InputError, match="https"):
        InputManifest.load(path)


def test_repo_manifest_names_the_official_files():
    manifest = InputManifest.load(REPO_EXPERIMENTS / "inputs.toml")
    assert len(manifest.ids("image")) == 11 and manifest.ids("captions") and manifest.ids("pose")
    for entry in manifest.entries.values():
        assert entry.url.startswith("https://raw.githubusercontent.com/Tencent-Hunyuan/HY-WorldPlay/"
                                    "da2d0c26eb0edb647f56e164ffd966490eb75282/assets/")


# --------------------------------------------------------------------------------------------
# FLOP counts against spec dit.md section 9 and vae_text_pipeline.md 1.12
# --------------------------------------------------------------------------------------------


def test_flop_counts_match_the_spec():
    steady = stage_flops("wan5b", 704, 1280, chunk=5, text_tokens=512)
    first = stage_flops("wan5b", 704, 1280, chunk=0, text_tokens=512)
    expected = {
        (steady["prefill"], 279.06), (steady["step0"], 78.90), (steady["dit"], 594.7),
        (first["step0"], 42.36), (first["dit"], 169.4), (stage_flops("wan5b", 704, 1280, 2, 512)["prefill"], 102.99),
    }
    for got, want in expected:
        assert got / 1e12 == pytest.approx(want, rel=0.005)
    vae_first, vae_steady = vae_decode_flops("wan5b", 704, 1280)
    assert vae_steady / 1e12 == pytest.approx(66.35, rel=0.005)
    assert vae_first / 1e12 == pytest.approx(20.58, rel=0.005)
    assert steady["decode"] / 1e12 == pytest.approx(265.4, rel=0.005)
    assert first["decode"] / 1e12 == pytest.approx(219.6, rel=0.005)


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------


def test_tiny_bench_writes_a_complete_result(tiny_bench):
    exp, options, result_dir = tiny_bench
    assert result_dir.parent == options.results_root / "bench-tiny-cpu"
    assert sorted(p.name for p in result_dir.iterdir()) == ["chunks.csv", "config.toml", "digests.json",
                                                            "provenance.json", "result.json"]
    # the digest manifest, written last, covers every other file and verifies
    digests = json.loads((result_dir / "digests.json").read_text())
    assert sorted(digests["files"]) == ["chunks.csv", "config.toml", "provenance.json", "result.json"]
    assert all(digests["files"][f] == _sha(result_dir / f) for f in digests["files"])
    assert all((result_dir / "digests.json").stat().st_mtime_ns >= (result_dir / f).stat().st_mtime_ns
               for f in digests["files"])
    assert verify_result(result_dir).config_hash == digests["config_hash"]
    assert (result_dir / "config.toml").read_bytes() == (exp / "bench-tiny-cpu.toml").read_bytes()
    result = json.loads((result_dir / "result.json").read_text())
    cfg = load_config(exp / "bench-tiny-cpu.toml")
    assert result["config_hash"] == cfg.config_hash and result["device_class"] == "cpu-tiny"
    assert result["complete"] is True and result["weights"] == "random-init:0"
    summary = result["summary"]
    assert "cpu float32" in summary["matmul_rate"]["label"] and summary["matmul_rate"]["median_tflops"] > 0
    for leg in ("native-eager", "native-fastest"):
        s = summary["legs"][leg]
        assert s["status"] == "ok"
        for stage in ("prefill", "steps", "dit", "decode", "total"):
            stats = s["steady_ms"][stage]
            assert stats["n"] == 3 * 3  # 3 repetitions x chunks 5..7
            assert stats["p10"] <= stats["median"] <= stats["p90"]
        assert s["peak_memory"] and s["achieved"]["total"]["tflops"] > 0
        assert s["retrieved_clips"] == {"4": 0, "5": 4, "6": 8, "7": 12}
    assert set(summary["ratios"]["native-eager / native-fastest"]) == {"prefill", "steps", "dit", "decode", "total"}
    floor = summary["flop_floor"]
    assert floor["total"]["floor_ms"] > 0 and floor["rate_label"] == summary["matmul_rate"]["label"]

    with open(result_dir / "chunks.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"leg", "repetition", "chunk", "stage", "ms", "flops", "memory_latents", "steady"} <= set(rows[0])
    assert {r["repetition"] for r in rows} == {"0", "1", "2"}
    assert {r["stage"] for r in rows if r["chunk"] == "7"} >= {"select", "prefill", "step0", "dit", "decode", "total"}

    prov = json.loads((result_dir / "provenance.json").read_text())
    assert prov["config_hash"] == cfg.config_hash and prov["config"] == cfg.resolved()
    assert prov["git"]["source"] in ("git", "unknown (no git checkout, --allow-dirty)")
    assert "dirty" in prov["git"] and "commit" in prov["git"]
    env = prov["environment"]
    for key in ("python", "torch", "cuda", "cudnn", "hostname", "device_name"):
        assert key in env
    assert prov["weights"]["dit"]["describe"] == "random-init:0"
    assert prov["started_utc"].endswith("Z") and prov["finished_utc"] >= prov["started_utc"]
    assert prov["hostname"] and prov["command_line"] and prov["image"]["kind"] == "synthetic"


def test_editing_a_pinned_config_makes_its_result_stale(tiny_bench):
    exp, options, result_dir = tiny_bench
    kw = dict(experiments_dir=exp, results_root=options.results_root)
    assert check_fresh("bench-tiny-cpu", **kw) == result_dir
    path = exp / "bench-tiny-cpu.toml"
    original = path.read_text()
    try:
        path.write_text(original.replace("repetitions = 3", "repetitions = 4"))
        with pytest.raises(StaleResultError, match="bench-tiny-cpu") as info:
            check_fresh("bench-tiny-cpu", **kw)
        assert info.value.experiment == "bench-tiny-cpu"
    finally:
        path.write_text(original)
    assert check_fresh("bench-tiny-cpu", **kw) == result_dir
    with pytest.raises(StaleResultError, match="drift-tiny-cpu.*no result"):
        check_fresh("drift-tiny-cpu", **kw)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("error", [Interrupt, KeyboardInterrupt])
def test_an_interrupted_run_leaves_no_result(workspace, monkeypatch, error):
    from worldplay.experiments.kinds import rollouts

    real = rollouts.native_rollout

    def failing(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            yield chunk
            if chunk.index == 2:
                raise error("simulated interruption")

    monkeypatch.setattr(rollouts, "native_rollout", failing)
    exp, options = workspace
    with pytest.raises(error):
        run_experiment("rollouts-tiny-cpu", options)
    assert not options.results_root.exists() or list(options.results_root.iterdir()) == []
    assert not options.video_dir.exists() or list(options.video_dir.iterdir()) == []
    assert list(options.scratch_dir.iterdir()) == []
    assert latest_result(options.results_root, "rollouts-tiny-cpu") is None


def test_tiny_rollouts_write_videos_and_manifest_entries(workspace):
    exp, options = workspace
    result_dir = run_experiment("rollouts-tiny-cpu", options)
    videos = json.loads((result_dir / "videos.json").read_text())
    cfg = load_config(exp / "rollouts-tiny-cpu.toml")
    assert len(videos) == 4
    for v in videos:
        path = options.video_dir / v["file"]
        assert path.is_file() and _sha(path) == v["sha256"] and path.stat().st_size == v["bytes"]
        assert v["frames"] == 125 and v["fps"] == 16 and v["resolution"] == [64, 96]
        assert v["config_hash"] == cfg.config_hash and v["url"] == "" and v["experiment"] == "rollouts-tiny-cpu"
    per_video = json.loads((result_dir / "result.json").read_text())["summary"]["per_video"]
    # the walk-out-and-turn-back pose retrieves an old clip (4) instead of the most recent one (12)
    assert per_video["rollouts-tiny-cpu--img-1--w-4_right-13_left-14"]["retrieved_clips"]["7"] == 4


def test_tiny_drift_compares_bf16_with_float32(workspace):
    exp, options = workspace
    result_dir = run_experiment("drift-tiny-cpu", options)
    summary = json.loads((result_dir / "result.json").read_text())["summary"]
    comparison = summary["comparison"]["native-eager vs native-float32"]
    assert len(comparison["per_chunk_mean_abs_diff"]) == 8 and comparison["frames"] == 125
    assert 0 < comparison["max_latent_rel_error"] < 0.1  # bf16 vs float32 differ, but only by rounding
    assert summary["legs"]["native-float32"]["settings"]["dtype"] == "float32"
    assert summary["legs"]["native-float32"]["settings"]["official_rope_tables"] is False
    with open(result_dir / "frames.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 125


# --------------------------------------------------------------------------------------------
# refusals before any model work
# --------------------------------------------------------------------------------------------


def test_official_leg_without_a_checkout_is_skipped_in_a_bench_and_refused_in_parity(monkeypatch, tmp_path):
    """A GPU user's `nox -s bench` with no official checkout runs the native legs and reports the
    official one as skipped, with the reason and the command that prepares a checkout (issue 17)."""
    from worldplay.experiments.context import RunContext
    from worldplay.experiments.kinds.bench import _skip_reason

    monkeypatch.delenv("WORLDPLAY_OFFICIAL", raising=False)
    bench, _, _ = runner_mod.load_experiment("bench", REPO_EXPERIMENTS)
    parity, _, _ = runner_mod.load_experiment("parity-official", REPO_EXPERIMENTS)
    root, reason = runner_mod._check_official(bench, RunOptions())
    assert root is None and reason == runner_mod.SKIPPED_NO_CHECKOUT
    assert "scripts/prepare_official.sh" in reason and (REPO_EXPERIMENTS.parent / "scripts/prepare_official.sh").is_file()
    assert runner_mod._check_official(bench, RunOptions(skip_official=True)) == (None, runner_mod.SKIPPED_BY_FLAG)
    with pytest.raises(OfficialLegUnavailable, match="parity-official.*--official PATH"):
        runner_mod._check_official(parity, RunOptions())
    with pytest.raises(RunRefused, match="only to benches"):
        runner_mod._check_official(parity, RunOptions(skip_official=True))
    with pytest.raises(OfficialLegUnavailable, match="no such directory"):  # a wrong path is still an error
        runner_mod._check_official(bench, RunOptions(official=str(tmp_path / "missing")))
    ctx = RunContext(config=bench, run_id="r", device=torch.device("cpu"), manifest=None, scratch=tmp_path,
                     video_dir=tmp_path, skip_official=True, official_skip_reason=reason)
    assert _skip_reason(ctx) == reason  # what the bench writes as the official leg's "reason"


def test_dirty_or_unknown_trees_are_refused(monkeypatch):
    dirty = {"commit": "a" * 40, "dirty": True, "changed": ["worldplay/x.py"], "source": "git"}
    monkeypatch.setattr(runner_mod, "git_state", lambda: dirty)
    with pytest.raises(RunRefused, match="uncommitted changes.*--allow-dirty"):
        runner_mod.source_state(RunOptions())
    assert runner_mod.source_state(RunOptions(allow_dirty=True))["dirty"] is True
    monkeypatch.setattr(runner_mod, "git_state", lambda: None)
    with pytest.raises(RunRefused, match="--source-commit"):
        runner_mod.source_state(RunOptions())
    assert runner_mod.source_state(RunOptions(source_commit="b" * 40))["commit"] == "b" * 40


def test_gpu_experiments_refuse_to_run_without_cuda(workspace):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    exp, options = workspace
    with pytest.raises(RunRefused, match="CUDA"):
        run_experiment("drift-bf16-vs-fp32", options)
    assert not options.results_root.exists()


def test_cli_list_and_check(tiny_bench, capsys):
    from worldplay.cli import main

    exp, options, result_dir = tiny_bench
    base = ["experiment", "--experiments-dir", str(exp), "--results-root", str(options.results_root)]
    assert main([*base, "list"]) == 0
    assert "bench-tiny-cpu" in capsys.readouterr().out
    assert main([*base, "check", "bench-tiny-cpu"]) == 0
    assert main([*base, "check", "drift-tiny-cpu"]) == 1
    assert "drift-tiny-cpu" in capsys.readouterr().err
    # list agrees with check: a result edited after the run is not shown as fresh
    (result_dir / "notes.txt").write_text("added later")
    try:
        assert main([*base, "list"]) == 0
        assert f"{result_dir.name} (UNVERIFIED)" in capsys.readouterr().out
        assert main([*base, "check", "bench-tiny-cpu"]) == 1
        err = capsys.readouterr().err
        assert "notes.txt: not in digests.json" in err and len(err.strip().splitlines()) == 1
    finally:
        (result_dir / "notes.txt").unlink()


# --------------------------------------------------------------------------------------------
# the official-leg code paths, with a stand-in for the official code (tiny, CPU)
# --------------------------------------------------------------------------------------------


class StandInOfficialRunner:
    """Replays the native eager rollout where the official pipeline would run (same interface
    as worldplay.experiments.official_leg.OfficialRunner)."""

    def __init__(self, root, weights, device, compile):
        from worldplay.models import random_models

        self.compile = compile
        self.models = random_models("tiny", 0, device=device)
        self.device = device

    def environment(self):
        return {"stand_in": True}

    def close(self):
        self.models = None

    def rollout(self, cfg, image_path, text, trajectory, *, desc="", progress=True):
        from worldplay.experiments.legs import native_leg, native_rollout

        leg = native_leg("native-eager", "cpu")
        yield from native_rollout(self.models, leg, cfg, image_path, text, trajectory, self.device, progress=False)


@pytest.fixture
def stand_in_official(tmp_path, monkeypatch):
    import torch

    from worldplay.experiments import official_leg
    from worldplay.experiments.context import RunContext
    from worldplay.experiments.inputs import InputManifest

    monkeypatch.setattr(official_leg, "OfficialRunner", StandInOfficialRunner)
    monkeypatch.setattr(official_leg, "weights_dir", lambda models, cfg, scratch: scratch)
    exp, _ = make_experiments_dir(tmp_path)
    manifest = InputManifest.load(exp / "inputs.toml")
    (tmp_path / "scratch").mkdir()

    def context(config):
        return RunContext(config=config, run_id="test", device=torch.device("cpu"), manifest=manifest,
                          scratch=tmp_path / "scratch", video_dir=tmp_path / "videos", official_root=tmp_path,
                          progress=False)

    return context


def _common(name, kind):
    from worldplay.experiments.schema import WeightsSpec

    return dict(name=name, kind=kind, preset="tiny", device="cpu", weights=WeightsSpec(random_init=0),
                resolution=(64, 96), num_chunk=6, pose="w-23")


def test_parity_against_a_stand_in_official_leg(stand_in_official):
    from worldplay.experiments.kinds import parity
    from worldplay.experiments.schema import ParityConfig

    cfg = ParityConfig(**_common("p-tiny-cpu", "parity"), legs=("native-eager", "official"), floor="compile-toggle")
    out = parity.run(stand_in_official(cfg))
    main = out.summary["comparison"]["native-eager vs official"]
    assert main["mean_abs_diff"] == 0 and main["max_latent_rel_error"] == 0  # the stand-in replays native
    assert "official floor (compile-toggle)" in out.summary["comparison"]
    assert out.summary["legs"]["official-floor"]["settings"]["compile"] is False
    assert {r["comparison"] for r in out.chunk_rows} == {"native-eager vs official", "official floor (compile-toggle)"}
    assert out.provenance["official"]["environment"] == {"stand_in": True}


def test_bench_and_drift_with_a_stand_in_official_leg(stand_in_official):
    from worldplay.experiments.kinds import bench, drift
    from worldplay.experiments.schema import BenchConfig, DriftConfig

    cfg = BenchConfig(**_common("b-tiny-cpu", "bench"), legs=("official", "native-eager"), warmup_chunks=4,
                      repetitions=1)
    out = bench.run(stand_in_official(cfg))
    assert out.summary["legs"]["official"]["status"] == "ok"
    assert "native-eager / official" in out.summary["ratios"]
    assert [r["leg"] for r in out.chunk_rows][0] == "native-eager"  # native legs run first
    dcfg = DriftConfig(**_common("d-tiny-cpu", "drift"), legs=("official", "native-eager"))
    out = drift.run(stand_in_official(dcfg))
    assert out.summary["comparison"]["official vs native-eager"]["mean_abs_diff"] == 0


def test_fastest_settings_on_cuda_are_valid_and_use_every_fast_path(monkeypatch):
    """The one definition of the native-fastest leg: on CUDA, FA4 where it imports (else cuDNN),
    compiled blocks with CUDA graphs, the fused kernels and the fast decoder; every key must be
    a RolloutSettings field (a typo would only show on the GPU)."""
    import worldplay.nn.attention as attention_mod
    from worldplay.rollout import RolloutSettings, fastest_settings

    for usable, backend in ((True, "fa4"), (False, "cudnn")):
        monkeypatch.setattr(attention_mod, "fa4_usable", lambda usable=usable: usable)
        settings = fastest_settings("cuda")
        assert settings == {"attention_backend": backend, "accel": "compile+graphs", "fast_decode": True,
                            "fused_kernels": True}
        RolloutSettings(num_chunk=1, **settings)
    assert fastest_settings("cpu") == {"attention_backend": "sdpa"}


def test_the_readme_lists_every_leg_as_the_leg_table_does():
    """experiments/README.md's legs table is generated: regenerate it when a row changes."""
    from worldplay.experiments.leg_table import ROWS, markdown_table

    text = (Path(__file__).resolve().parents[1] / "experiments" / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- legs-table")
    table = text[text.index("\n", start) + 1: text.index("<!-- /legs-table -->")]
    assert table == markdown_table(), "regenerate with worldplay.experiments.leg_table.markdown_table()"
    assert len(table.splitlines()) == len(ROWS) + 2


def test_a_mistyped_leg_names_the_closest_ones():
    from worldplay.experiments.leg_table import NATIVE, RANKS, names
    from worldplay.experiments.schema import _Bad, _choice

    options = names(NATIVE, RANKS)
    with pytest.raises(_Bad) as info:
        _choice(options)("native-fastest-laen", "legs[0]")
    message = str(info.value)
    assert "'native-fastest-lean'" in message and f"one of {len(options)} names" in message and len(message) < 300
