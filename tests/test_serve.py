"""`worldplay serve` on the tiny CPU preset: the scripted client plays a world, keys become the
chunk actions the pose grammar would give, and the safety rules hold (one player, token and host
checks, hostile messages and uploads refused, a player who leaves frees the GPU within a chunk).
The protocol parser under hostile input is in tests/test_serve_protocol.py."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("aiohttp")
websocket = pytest.importorskip("websocket")

from worldplay.actions import Motion  # noqa: E402
from worldplay.models import random_models, random_text_states  # noqa: E402
from worldplay.rollout import RolloutSettings, WorldPlayPipeline  # noqa: E402
from worldplay.serve import client  # noqa: E402
from worldplay.serve.engine import Engine  # noqa: E402
from worldplay.serve.keys import KeySampler, motion_for  # noqa: E402
from worldplay.serve.protocol import MAX_TEXT_BYTES, MAX_UPLOAD_BYTES, unpack_frame  # noqa: E402
from worldplay.serve.server import RunningServer, ServeOptions, Server, encode_jpegs  # noqa: E402

TOKEN = "a-test-token-of-24-chars"


@pytest.fixture(scope="module")
def pipe():
    models = random_models("tiny", 0, device="cpu", dtype=torch.bfloat16)
    return WorldPlayPipeline(models.dit, models.vae, device="cpu", dtype=torch.bfloat16)


def _engine(pipe, **kwargs) -> Engine:
    return Engine(pipe, RolloutSettings(num_chunk=60, seed=0), (64, 96), lambda prompt: random_text_states("tiny", 0),
                  random_weights=True, **kwargs)


@pytest.fixture
def running(pipe):
    server = RunningServer(Server(_engine(pipe)))
    yield server
    server.stop()


@pytest.fixture
def guarded(pipe):
    server = RunningServer(Server(_engine(pipe), ServeOptions(token=TOKEN)))
    yield server
    server.stop()


def _ws(url: str, path: str = "/ws", **kwargs):
    return websocket.create_connection(url.replace("http://", "ws://") + path, timeout=30, **kwargs)


def _player(url: str, path: str = "/ws", timeout: float = 30, **kwargs):
    """A connection that got the GPU (hello), retrying while the previous player's slot is freed."""
    deadline = time.monotonic() + timeout
    while True:
        ws = _ws(url, path, **kwargs)
        first = _recv_json(ws)
        if first["type"] == "hello":
            return ws
        ws.close()
        assert first["type"] == "busy" and time.monotonic() < deadline, first
        time.sleep(0.1)


def _recv_json(ws) -> dict:
    while True:
        op, data = ws.recv_data()
        if op == websocket.ABNF.OPCODE_TEXT:
            return json.loads(data)
        if op == websocket.ABNF.OPCODE_CLOSE:
            return {"type": "closed", "code": int.from_bytes(data[:2], "big") if data else None,
                    "reason": data[2:].decode(errors="replace")}


def _until(ws, kind: str, limit: int = 500) -> dict:
    for _ in range(limit):
        m = _recv_json(ws)
        if m["type"] in (kind, "closed"):
            return m
    raise AssertionError(f"no {kind} message")


def _http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- keys -> actions: no model ------------------------------------------------------------------


def test_keys_map_to_the_motions_of_the_pose_grammar():
    assert motion_for({"w"}) == Motion("w")
    assert motion_for({"w", "a", "right", "up"}) == Motion("wa", "right+up")
    assert motion_for({"s", "d", "left", "down"}) == Motion("sd", "left+down")
    assert motion_for({"w", "s", "left", "right"}) == Motion()  # opposite keys cancel
    assert motion_for(set(), dx=20, dy=-20) == Motion(rotation="right+up")  # mouse right and up
    assert motion_for({"left"}, dx=50) == Motion(rotation="left")  # keys win over the mouse
    assert motion_for(set(), dx=2, dy=-2) == Motion()  # below the threshold


def test_third_person_keys_keep_only_the_turn_of_a_chunk_that_moves_and_turns(pipe):
    """`serve --third-person`: the official tps=True labels. Moving and turning at once keeps only
    the rotation class; the labels are action_labels' of the steered path (held to the official
    function in tests/test_pose_third_person.py)."""
    from worldplay.pose import action_labels

    image = torch.zeros(3, 64, 96)
    both = Motion("w", "right")
    labels = {}
    for third_person in (False, True):
        engine = _engine(pipe, third_person=third_person)
        engine.begin(image, "")
        engine.step(Motion("w"))  # chunk 0
        start = engine.session.last_poses.c2w[-1]
        engine.step(both)
        poses = engine.session.last_poses
        labels[third_person] = poses.actions.tolist()
        path = np.concatenate([start[None], poses.c2w])
        assert action_labels(np.linalg.inv(path), third_person=third_person)[1:].tolist() == labels[third_person]
        engine.close()
    assert labels[False] == [both.label] * 4 and both.label // 9 != 0
    assert labels[True] == [both.label % 9] * 4  # the rotation class only


def test_serve_passes_third_person_to_the_engine(monkeypatch):
    import worldplay.serve.engine as engine_module
    from worldplay.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(engine_module, "Engine", fake_engine)
    with pytest.raises(Stop):
        main(["serve", "--preset", "tiny", "--random-init", "0", "--device", "cpu", "--third-person"])
    assert seen["third_person"] is True


def test_a_tap_between_two_chunks_counts_once():
    sampler = KeySampler()
    sampler.keys(frozenset({"w"}), 1)
    sampler.keys(frozenset(), 2)  # released before the chunk starts
    first = sampler.sample()
    assert first.motion == Motion("w") and first.seq == 2
    assert sampler.sample().motion == Motion()
    sampler.keys(frozenset({"a"}), 3)
    assert sampler.sample().keys == ("a",) and sampler.sample().keys == ("a",)  # held: every chunk


# -- playing --------------------------------------------------------------------------------------


def test_the_scripted_client_plays_and_the_server_records_its_keys(running):
    """Keys held from 0 s on steer the chunks after the first (chunk 0 is sampled at the start);
    the chunks the server generated carry the labels of those keys, and a held w for a chunk is
    the pose grammar's w-4 (worldplay.actions, tested in test_session.py)."""
    report = client.run(running.url, "0:w+left", chunks=4, timeout_s=120)
    records = [r for r in running.server.records]
    assert [r["chunk"] for r in records[:4]] == [0, 1, 2, 3]
    assert records[0]["label"] == 0
    assert all(r["keys"] == ["left", "w"] and r["label"] == Motion("w", "left").label for r in records[1:4])
    assert report.frames >= 13 + 16 * 3 - 1
    assert [c["label"] for c in report.chunks[:4]] == [r["label"] for r in records[:4]]
    assert len(report.latencies_s) == 1 and 0 < report.latencies_s[0] < 60
    assert report.sustained_fps is not None and report.sustained_fps > 0


def test_frames_stream_as_jpegs_of_the_session(running, pipe):
    """The frames a page receives are the session's frames: the JPEGs of a session stepped with
    the same motions (no key held: still), byte for byte."""
    ws = _ws(running.url)
    assert _recv_json(ws)["type"] == "hello"
    ws.send(json.dumps({"type": "start", "image": {"sample": "synthetic"}, "prompt": ""}))
    world = _until(ws, "started")["world"]
    got: dict[int, list[bytes]] = {}
    while len(got.get(1, [])) < 16:
        op, data = ws.recv_data()
        if op == websocket.ABNF.OPCODE_BINARY:
            w, chunk, frame, frames, jpeg = unpack_frame(data)
            assert w == world and frames == (13 if chunk == 0 else 16)
            got.setdefault(chunk, []).append(jpeg)
            if frame == 0:
                ws.send(json.dumps({"type": "played", "world": world, "chunk": chunk}))
    ws.close()
    image = running.server.engine.sample_image("synthetic")
    still = pipe.session(image, random_text_states("tiny", 0), RolloutSettings(num_chunk=60, seed=0))
    for index in (0, 1):
        assert got[index] == encode_jpegs(still.step(Motion()).frames.numpy(), ServeOptions().jpeg_quality)


def test_one_player_at_a_time(running):
    first = _ws(running.url)
    assert _recv_json(first)["type"] == "hello"
    second = _ws(running.url)
    busy = _recv_json(second)
    assert busy["type"] == "busy" and "another player" in busy["message"]
    assert _recv_json(second)["type"] == "closed"
    first.close()
    _player(running.url).close()  # the slot frees once the first player's handler has finished


@pytest.fixture
def eager(pipe):
    """A server that does not wait for playback (lead 16): only the disconnect can stop it."""
    server = RunningServer(Server(_engine(pipe), ServeOptions(lead=16)))
    yield server
    server.stop()


def test_a_player_who_leaves_mid_chunk_frees_the_gpu_within_that_chunk(eager):
    """Each chunk takes 1 s here; the player leaves while chunk 1 is generated. No chunk starts
    after that one, and the next player gets the GPU."""
    running = eager
    engine = running.server.engine
    step, started = engine.step, threading.Event()

    def slow_step(motion):
        started.set()
        time.sleep(1.0)
        return step(motion)

    engine.step = slow_step
    ws = _ws(running.url)
    _recv_json(ws)
    ws.send(json.dumps({"type": "start", "image": {"sample": "synthetic"}, "prompt": ""}))
    world = _until(ws, "started")["world"]
    _until(ws, "chunk")
    started.clear()
    ws.send(json.dumps({"type": "played", "world": world, "chunk": 0}))  # lets chunk 1 start
    assert started.wait(10)
    ws.close()  # mid-chunk
    left_at = engine.steps
    time.sleep(3.0)  # three chunk times
    assert engine.steps <= left_at + 1  # at most the chunk in flight finished
    _player(running.url, timeout=2.0).close()


def test_restart_and_a_new_start_begin_new_worlds(running):
    ws = _ws(running.url)
    _recv_json(ws)
    ws.send(json.dumps({"type": "start", "image": {"sample": "synthetic"}, "prompt": ""}))
    first = _until(ws, "started")["world"]
    assert _until(ws, "chunk")["chunk"] == 0
    ws.send(json.dumps({"type": "reset"}))
    second = _until(ws, "started")["world"]
    assert second > first
    m = _until(ws, "chunk")
    while m["world"] != second:  # a chunk of the old world may still have been on its way
        m = _until(ws, "chunk")
    assert m["chunk"] == 0
    ws.send(json.dumps({"type": "start", "image": {"sample": "no-such-image"}, "prompt": ""}))
    error = _until(ws, "error")
    assert "no sample image 'no-such-image'" in error["message"] and error["fatal"] is False
    ws.close()


def test_a_world_stops_at_max_chunks(pipe):
    server = RunningServer(Server(_engine(pipe, max_chunks=2)))
    try:
        ws = _ws(server.url)
        _recv_json(ws)
        ws.send(json.dumps({"type": "start", "image": {"sample": "synthetic"}, "prompt": ""}))
        world = _until(ws, "started")["world"]
        for chunk in range(2):
            assert _until(ws, "chunk")["chunk"] == chunk
            ws.send(json.dumps({"type": "played", "world": world, "chunk": chunk}))
        full = _until(ws, "full")
        assert "2-chunk limit" in full["message"]
        ws.close()
    finally:
        server.stop()


# -- hostile clients --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, expect", [
    ("{not json", "not valid JSON"),
    ('{"type": "keys", "down": ["w"], "seq": NaN}', "not a number JSON allows"),
    ('{"type": "keys", "down": ["jump"], "seq": 1}', "unknown key"),
    ('{"type": "start", "image": {"sample": "synthetic"}, "prompt": "", "extra": 1}', "unknown"),
    ("[" * 4000 + "]" * 4000, "not valid JSON"),
])
def test_malformed_messages_end_the_connection(running, payload, expect):
    ws = _ws(running.url)
    _recv_json(ws)
    ws.send(payload)
    error = _recv_json(ws)
    assert error["type"] == "error" and expect in error["message"] and "\n" not in error["message"]
    closed = _recv_json(ws)
    assert closed["type"] == "closed" and closed["code"] == 1008


def test_oversized_and_binary_messages_end_the_connection(running):
    ws = _ws(running.url)
    _recv_json(ws)
    ws.send(json.dumps({"type": "start", "image": {"sample": "synthetic"}, "prompt": "x" * MAX_TEXT_BYTES}))
    assert _recv_json(ws)["code"] == 1009  # message too big: closed by the WebSocket layer
    ws = _player(running.url)
    ws.send_binary(b"\x00" * 64)
    error = _recv_json(ws)
    assert error["type"] == "error" and "binary messages are not accepted" in error["message"]
    assert _recv_json(ws)["code"] == 1008
    _player(running.url).close()  # the slot is free again


# -- exposure: token, host, origin ------------------------------------------------------------------


def test_a_token_guards_the_socket_and_the_uploads(guarded):
    status, body = _http(f"{guarded.url}/api/upload", "POST", b"x")
    assert status == 401 and "token" in json.loads(body)["error"]
    with pytest.raises(websocket.WebSocketBadStatusException, match="401"):
        _ws(guarded.url)
    with pytest.raises(websocket.WebSocketBadStatusException, match="401"):
        _ws(guarded.url, f"/ws?token={TOKEN[:-1]}x")
    _player(guarded.url, f"/ws?token={TOKEN}").close()
    _player(guarded.url, header=[f"Authorization: Bearer {TOKEN}"]).close()
    assert _http(f"{guarded.url}/")[0] == 200  # the page itself is public code


def test_without_a_token_only_loopback_names_are_served(running):
    """A DNS-rebinding page (its own name resolving to 127.0.0.1) gets nothing."""
    status, body = _http(f"{running.url}/", headers={"Host": "evil.example:80"})
    assert status == 403 and "only to localhost" in json.loads(body)["error"]
    assert _http(f"{running.url}/", headers={"Host": "localhost"})[0] == 200


def test_a_cross_origin_page_cannot_drive_the_server(running):
    with pytest.raises(websocket.WebSocketBadStatusException, match="403"):
        _ws(running.url, origin="http://evil.example")
    host = running.url.removeprefix("http://")
    ws = _ws(running.url, origin=f"http://{host}")
    assert _recv_json(ws)["type"] == "hello"
    ws.close()
    status, _ = _http(f"{running.url}/api/upload", "POST", b"x", headers={"Origin": "http://evil.example"})
    assert status == 403


# -- uploads -----------------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_an_uploaded_image_starts_a_world(running):
    status, body = _http(f"{running.url}/api/upload", "POST", _png(120, 80))
    assert status == 200
    upload = json.loads(body)
    assert upload["width"] == 96 and upload["height"] == 64  # loaded at the server's size, like --image
    ws = _ws(running.url)
    _recv_json(ws)
    ws.send(json.dumps({"type": "start", "image": {"upload": upload["upload"]}, "prompt": ""}))
    assert _until(ws, "started")["type"] == "started"
    assert _until(ws, "chunk")["chunk"] == 0
    ws.close()


@pytest.mark.parametrize("body, status, expect", [
    (b"", 400, "empty"),
    (b"GIF89a-not-really", 400, "the uploaded image is not a readable image"),
    (_png(64, 64)[:100], 400, "the uploaded image could not be decoded"),
    (b"\0" * (MAX_UPLOAD_BYTES + 1), 413, "limit"),
])
def test_bad_uploads_are_refused_in_one_line(running, body, status, expect):
    got, text = _http(f"{running.url}/api/upload", "POST", body)
    message = json.loads(text)["error"]
    assert got == status and expect in message and "\n" not in message
    assert "worldplay-serve-" not in message  # no server-side temporary path


def test_an_unknown_upload_is_a_clear_error(running):
    ws = _ws(running.url)
    _recv_json(ws)
    ws.send(json.dumps({"type": "start", "image": {"upload": "0" * 32}, "prompt": ""}))
    assert "upload it again" in _until(ws, "error")["message"]
    ws.close()


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, expect", [
    (["--host", "0.0.0.0"], "give --token"),
    (["--host", "0.0.0.0", "--token", "short"], "at least 16"),
    (["--port", "70000"], "--port 70000"),
    (["--lead", "0"], "--lead 0"),
    (["--checkpoint", "/nowhere"], "exclude each other"),
])
def test_serve_refuses_bad_options_before_loading_anything(capsys, monkeypatch, extra, expect):
    import worldplay.models as models
    from worldplay.cli import main

    monkeypatch.setattr(models, "random_models", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["serve", "--preset", "tiny", "--random-init", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1, err


def test_worldplay_serve_plays_from_the_command_line():
    """`worldplay serve --preset tiny --random-init 0` serves a world that the scripted client
    plays; Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "worldplay", "serve", "--preset", "tiny", "--random-init", "0",
                             "--device", "cpu", "--port", "0"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("worldplay serve: open http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split("open ", 1)[1].split("/ ", 1)[0]
        report = client.run(url, "0:d", chunks=3, timeout_s=120)
        assert [c["label"] for c in report.chunks] == [0, Motion("d").label, Motion("d").label]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "worldplay serve: stopped" in err
