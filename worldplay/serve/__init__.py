"""``worldplay serve``: play the world model live in a browser.

A local web app (aiohttp): choose a sample image or upload one, give a prompt, then drive with
WASD (move) and the arrow keys or the mouse (look). The keys held are sampled once per chunk into
that chunk's action (:mod:`worldplay.serve.keys`), a :class:`~worldplay.session.WorldSession`
generates the chunk in the server's model thread, and its frames stream to the page as JPEGs
over a WebSocket while the next chunk is generated. The page plays them at 16 fps and shows a
top-down map of the camera path, the frame rate and the key-to-frame latency.

Transport: a WebSocket carrying JSON control messages and one JPEG per frame. The model
produces frames in bursts of 16 per chunk, so a video codec's inter-frame compression or
WebRTC's jitter buffer and congestion control buy little on a local link, while JPEG needs
nothing beyond Pillow (already a dependency), works on a CPU-only machine, and decodes in the
browser with ``createImageBitmap``; no front-end build step. Over a slow network WebRTC
(aiortc) with a video track would save bandwidth: the protocol's frame message is the one
place to change.

Modules: :mod:`~worldplay.serve.protocol` (wire format and limits), :mod:`~worldplay.serve.keys`
(key and mouse state -> one :class:`~worldplay.actions.Motion` per chunk),
:mod:`~worldplay.serve.engine` (the model side), :mod:`~worldplay.serve.server` (the app, its
safety rules), :mod:`~worldplay.serve.client` (a scripted player that measures latency, fps and
stalls), ``static/`` (the page).
"""
