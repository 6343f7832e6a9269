"""The per-input kind: config checks, the spread, the thumbnail of the frame the model received,
a real tiny run of ``per-input-tiny-cpu`` and its page and model-card table.

CI has no official sample images, so the run uses stand-ins of the same sizes (img-4 1344x704,
img-10 880x464) under the same ids, in a copy of the experiments folder whose input manifest
carries their sha256 (the pinned config, and so its hash, is unchanged).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from worldplay.experiments.inputs import sha256_of  # noqa: E402
from worldplay.experiments.kinds.per_input import THUMBNAIL_WIDTH, spread, thumbnail_png  # noqa: E402
from worldplay.experiments.runner import RunOptions, run_experiment  # noqa: E402
from worldplay.experiments.schema import ExperimentConfigError, load_config  # noqa: E402
from worldplay.media import conditioning_geometry, load_image  # noqa: E402
from worldplay.site import TINY_LABEL, SiteError, charts  # noqa: E402
from worldplay.site.load import load_site  # noqa: E402
from worldplay.site.pages import render_site  # noqa: E402
from worldplay.site.text import escape  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "per-input-tiny-cpu"
GPU_TOML = (ROOT / "experiments" / "per-input.toml").read_text()


def _write(tmp_path: Path, text: str, name: str = "per-input") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("old, new, key, words", [
    ('parity_legs = ["native-eager", "official"]', 'parity_legs = ["native-eager", "native-float32"]',
     "parity_legs[1]", "reference leg is shared"),
    ('speed_legs = ["native-fastest", "official"]\nparity_legs = ["native-eager", "official"]',
     'speed_legs = ["official", "native-fastest"]\nparity_legs = ["official", "native-fastest"]',
     "speed_legs[0]", "reference (second) entry"),
    ('inputs = ["img-1", "img-2", "img-4", "img-6", "img-10"]', 'inputs = ["img-1", "img-99"]', "inputs[1]",
     "not an image id"),
    ("warmup_chunks = 5", "warmup_chunks = 8", "warmup_chunks", "no steady-state chunk"),
    ('speed_legs = ["native-fastest", "official"]', 'speed_legs = ["native-2gpu", "official"]', "speed_legs[0]",
     "expected one of"),
])
def test_config_errors_name_the_key(tmp_path, old, new, key, words):
    from worldplay.experiments.inputs import InputManifest

    assert old in GPU_TOML
    ids = InputManifest.load(ROOT / "experiments" / "inputs.toml").kinds()
    with pytest.raises(ExperimentConfigError) as err:
        load_config(_write(tmp_path, GPU_TOML.replace(old, new)), input_ids=ids)
    assert err.value.key == key and words in str(err.value)


def test_the_official_leg_needs_the_real_size_on_a_gpu(tmp_path):
    text = GPU_TOML.replace('preset = "wan5b"', 'preset = "tiny"').replace('device = "cuda"', 'device = "cpu"')
    text = text.replace("resolution = [704, 1280]", "resolution = [64, 96]").replace('"flash"', '"sdpa"')
    with pytest.raises(ExperimentConfigError, match="official leg runs only"):
        load_config(_write(tmp_path, text, "per-input-tiny-cpu"))


def test_pinned_configs_resolve_with_the_shared_reference():
    gpu = load_config(ROOT / "experiments" / "per-input.toml")
    assert gpu.legs == ("native-fastest", "official", "native-eager") and gpu.needs_official
    assert gpu.inputs == ("img-1", "img-2", "img-4", "img-6", "img-10")
    tiny = load_config(ROOT / "experiments" / f"{NAME}.toml")
    assert not tiny.needs_official and tiny.speed_legs[1] == tiny.parity_legs[1] == "native-float32"


def test_spread_max_over_min_and_cv():
    def entry(ms):
        return {"legs": {"a": {"steady_ms": {"dit": {"median": ms}}}}}

    out = spread({"x": entry(100.0), "y": entry(110.0), "z": entry(90.0)}, ("a",))["a"]["dit"]
    assert out["min_ms"] == 90.0 and out["max_ms"] == 110.0 and out["inputs"] == 3
    assert out["max_over_min_minus_1"] == pytest.approx(110 / 90 - 1, abs=1e-6)
    assert out["cv"] == pytest.approx(np.std([100, 110, 90]) / 100, abs=1e-6)


def _columns_image(path: Path, width: int, height: int) -> Path:
    """Vertical bands: red at the far left and right (cropped away at a 96:64 aspect), green and
    blue in the middle half."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, :, 1] = 200
    a[:, width // 2:, :] = (0, 0, 220)
    a[:, : width // 20] = (255, 0, 0)
    a[:, -(width // 20):] = (255, 0, 0)
    Image.fromarray(a).save(path)
    return path


def test_thumbnail_is_the_cropped_frame_the_model_receives(tmp_path):
    wide = _columns_image(tmp_path / "wide.png", 400, 128)  # 3.1:1 -> scaled to 64 high, centre crop 96
    geometry = conditioning_geometry(wide, 96, 64)
    assert geometry["cropped"] and not geometry["upscaled"] and geometry["resized_size"] == [200, 64]
    assert geometry["crop_box"] == [52, 0, 148, 64]
    thumb = np.asarray(Image.open(io.BytesIO(thumbnail_png(wide, 96, 64))).convert("RGB")).astype(int)
    frame = ((load_image(wide, 96, 64).permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)
    assert thumb.shape == frame.shape == (64, 96, 3)
    assert np.abs(thumb - frame).mean() < 2.0  # 256-colour palette of a few colours: close to exact
    assert (thumb[..., 0] < 100).all()  # the red bands lay outside the crop
    big = Image.open(io.BytesIO(thumbnail_png(wide, 1280, 704)))
    assert big.size == (THUMBNAIL_WIDTH, 176)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, request) -> Path:
    """A copy of experiments/ with stand-in inputs, and a real run of per-input-tiny-cpu."""
    root = tmp_path_factory.mktemp("per-input")
    experiments = root / "experiments"
    experiments.mkdir()
    for path in (ROOT / "experiments").glob("*.toml"):
        shutil.copy(path, experiments / path.name)
    data = root / "data"
    data.mkdir()
    manifest = (experiments / "inputs.toml").read_text()
    for ident, file, size in (("img-4", "4.png", (1344, 704)), ("img-10", "10.png", (880, 464))):
        rng = np.random.default_rng(len(file))
        pixels = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize(size, Image.BILINEAR).save(data / file)
        start = manifest.index(f"[inputs.{ident}]")
        line = manifest.index("sha256 = ", start)
        end = manifest.index("\n", line)
        manifest = manifest[:line] + f'sha256 = "{sha256_of(data / file)}"' + manifest[end:]
    (experiments / "inputs.toml").write_text(manifest)
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setenv("WORLDPLAY_DATA_DIR", str(data))
    options = RunOptions(allow_dirty=True, experiments_dir=experiments, results_root=experiments / "results",
                         progress=False, video_dir=root / "videos", scratch_dir=root / "scratch")
    run_experiment(NAME, options)
    (root / "site.toml").write_text(f'required = ["{NAME}"]\n[model_card]\nper_input = ["per-input", "{NAME}"]\n')
    return root


def _result(tree: Path) -> tuple[Path, dict]:
    run = next((tree / "experiments" / "results" / NAME).glob("*/result.json"))
    return run.parent, json.loads(run.read_text())


def test_one_row_per_input_with_both_legs_parity_and_geometry(tree):
    run, result = _result(tree)
    s = result["summary"]
    assert list(s["inputs"]) == ["img-4", "img-10"]
    for e in s["inputs"].values():
        test, ref = (e["legs"][leg]["steady_ms"] for leg in s["speed_legs"])
        assert e["ratio"]["dit"] == pytest.approx(ref["dit"]["median"] / test["dit"]["median"], rel=1e-3)
        assert e["parity"]["frames"] == 13 + 16 and len(e["parity"]["per_chunk_mean_abs_diff"]) == 2
        assert e["parity"]["mean_abs_diff"] > 0  # bf16 against float32 differs
        assert e["thumbnail"] in result["files"] and (run / e["thumbnail"]).is_file()
        assert e["thumbnail"] in json.loads((run / "digests.json").read_text())["files"]
        assert Image.open(run / e["thumbnail"]).size == (96, 64)
    assert s["inputs"]["img-4"]["geometry"]["crop_box"] == [13, 0, 109, 64]  # 1344x704 -> 122x64, centre 96
    assert s["inputs"]["img-10"]["geometry"]["source_size"] == [880, 464]
    assert s["spread"]["native-fastest"]["dit"]["inputs"] == 2
    frames = (run / "frames.csv").read_text().splitlines()
    assert frames[0].startswith("input,") and sum(line.startswith("img-10,") for line in frames) == 29


def test_card_table_shows_every_input_with_its_thumbnail(tree, tmp_path):
    out = tmp_path / "generated"
    render_site(load_site(tree / "site.toml", experiments_dir=tree / "experiments"), out)
    run, result = _result(tree)
    card = (out / "fragments/model_card_per_input.md").read_text()
    assert TINY_LABEL in card and "`per-input`" in card  # labelled, and says the GPU run will replace it
    for ident in ("img-4", "img-10"):
        src = f"/generated/thumbnails/{NAME}/{ident}.png"
        assert f"]({src}) | `{ident}` |" in card
        assert (out / src.removeprefix("/generated/")).read_bytes() == (run / f"thumbnails/{ident}.png").read_bytes()
    assert escape("1344×704, downscaled ×0.0909 to 122×64, centre crop x 13–109, y 0–64 → 96×64") in card
    ratio = result["summary"]["inputs"]["img-10"]["ratio"]["dit"]
    assert f"| {ratio:.2f}× |".replace(".", "\\.") in card
    assert "Spread of the steady DiT median across inputs" in card
    page = (out / f"experiments/{NAME}.md").read_text()
    assert f"/generated/charts/{NAME}-drift.svg" in page and "Parity per input and chunk" in page
    site = load_site(tree / "site.toml", experiments_dir=tree / "experiments")
    res = site.experiments[NAME].result
    fig = charts.drift_curves(res.frames, res.chunks[res.chunks["row"] == "parity"], title="t", tiny=True)
    assert [t.get_text() for t in fig.legends[0].texts] == ["img-4", "img-10"]  # one curve per input


def test_a_thumbnail_edited_after_the_run_stops_the_render(tree, tmp_path):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    run, _ = _result(copy)
    (run / "thumbnails/img-4.png").write_bytes(b"not the frame")
    with pytest.raises(SiteError, match="img-4.png"):
        load_site(copy / "site.toml", experiments_dir=copy / "experiments")


class _StandInOfficial:
    """Stands in for the official runner: each chunk is the eager leg's frames shifted by one
    level (so parity is exactly 1.0), with fixed timings (so the ratio is known)."""

    compile = False

    def __init__(self, eager_of):
        self.eager_of = eager_of
        self.calls: list[str] = []

    def rollout(self, cfg, image_path, text, trajectory, *, desc, progress):
        self.calls.append(desc)
        for c in self.eager_of(image_path):
            shifted = np.where(c.frames < 255, c.frames + 1, c.frames - 1).astype(np.uint8)
            yield type(c)(c.index, frames=shifted, latents=c.latents, timings_ms={"dit": 2000.0, "decode": 1000.0,
                                                                                   "total": 3000.0},
                          memory_indices=c.memory_indices, retrieved_clip=c.retrieved_clip)

    def close(self):
        pass


def test_an_official_reference_runs_after_every_native_leg_and_serves_both(tree, tmp_path, monkeypatch):
    """The GPU config's shape (reference = official) on the tiny preset, with a stand-in runner."""
    import dataclasses

    import torch

    from worldplay.experiments.context import RunContext
    from worldplay.experiments.inputs import InputManifest
    from worldplay.experiments.kinds import paired, per_input

    cfg = dataclasses.replace(load_config(tree / "experiments" / f"{NAME}.toml"),
                              speed_legs=("native-fastest", "official"), parity_legs=("native-eager", "official"))
    eager: dict[str, list] = {}
    real_run_native = paired.run_native
    order: list[str] = []

    def run_native(ctx, name, models, inputs):
        chunks, info = real_run_native(ctx, name, models, inputs)
        order.append(name)
        if name == "native-eager":
            eager[str(inputs.image_path)] = chunks
        return chunks, info

    runner = _StandInOfficial(lambda path: eager[str(path)])
    monkeypatch.setattr(paired, "run_native", run_native)
    monkeypatch.setattr(paired, "official_weights", lambda ctx, models: order.append("export") or tmp_path)
    monkeypatch.setattr(paired, "make_official_runner", lambda ctx, weights, compile, provenance: runner)
    ctx = RunContext(config=cfg, run_id="test", device=torch.device("cpu"),
                     manifest=InputManifest.load(tree / "experiments" / "inputs.toml"), scratch=tmp_path,
                     video_dir=tmp_path / "videos", progress=False)
    out = per_input.run(ctx)
    assert order == ["native-fastest", "native-eager"] * 2 + ["export"]  # the native legs first, then official
    assert runner.calls == ["img-4 official", "img-10 official"]
    for e in out.summary["inputs"].values():
        assert e["parity"]["mean_abs_diff"] == 1.0 and e["parity"]["memory_selection_identical"]
        fastest = e["legs"]["native-fastest"]["steady_ms"]["dit"]["median"]
        assert e["ratio"]["dit"] == pytest.approx(2000.0 / fastest, rel=1e-3)
        assert e["legs"]["official"]["steady_ms"]["decode"]["median"] == 1000.0
    assert set(out.files) == {"thumbnails/img-4.png", "thumbnails/img-10.png"}
