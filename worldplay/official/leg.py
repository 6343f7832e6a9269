"""The official leg: drive the official HY-WorldPlay WAN pipeline with weights that we provide.

Nothing of the official code lives in this repository. :class:`OfficialLeg` imports it at run
time from a checkout (``official_root``, e.g. the folder that ``scripts/make_official_env.sh``
exports) and rebuilds what ``wan/generate.py`` ``WanRunner`` builds, without the hub:

* distributed init as ``WanRunner.__init__`` (one rank; run under
  ``python3 -m torch.distributed.run --nproc_per_node=1``, which sets ``WORLD_SIZE``: the
  pipeline's ``parallel_run`` flag, the DiT's sequence-parallel branch and the per-latent decode
  path all key on that variable);
* the VAE: ``MyVAE.from_pretrained(weights_dir/"vae", torch_dtype=bf16)``;
* the pipeline: their ``WanPipeline`` with that VAE, a default ``FlowMatchEulerDiscreteScheduler``
  (in few-step mode the pipeline reads only ``scheduler.sigmas.device``; the timesteps are
  hard-coded) and no tokenizer/text encoder (prompt embeddings are passed in);
* ``DistWrapper`` around the same VAE, as ``_init_models`` does (it mounts the context-parallel
  plugins on encoder and decoder and wraps the decoder in ``torch.compile``), installed as
  ``pipe.dist_vae``;
* their ``WanTransformer3DModel`` built from ``weights_dir/"wan_transformer"/config.json``
  exactly as ``from_pretrained(torch_dtype=bf16)`` would build it (default dtype bf16, diffusers'
  ``no_init_weights``) but without reading the 10 GB of base safetensors that the official
  loader reads and then overwrites; ``add_discrete_action_parameters()``; then
  ``weights_dir/"wan_distilled_model"/"model.pt"`` loaded as ``_init_models`` loads it
  (``torch.load`` to the device with ``weights_only=True``, the ``generator`` entry, ``model.`` /
  ``_fsdp_wrapped_module.`` prefixes stripped, ``load_state_dict(strict=True)``,
  ``.to(bfloat16)``).

:meth:`OfficialLeg.rollout` then repeats ``WanRunner.predict`` chunk by chunk (same
``torch.manual_seed`` placement and pipeline arguments) and yields, per chunk, the clean latents,
the decoded uint8 frames, the memory indices and timings. Instrumentation does not change the
numerics: CUDA events are recorded around calls (no extra synchronisation inside the pipeline
call), a forward pre/post hook on the transformer splits the KV prefill (``is_cache=True``) from
the 4 denoising steps, and ``select_mem_frames_wan`` is wrapped in the pipeline module's
namespace to record what it returns.

Compile switch (``compile=``): ``True`` leaves the official ``@torch.compile`` on the DiT block
and the ``torch.compile`` of the VAE decoder active, as shipped. ``False`` sets
``torch._dynamo.config.disable = True`` (and ``TORCH_COMPILE_DISABLE=1`` for child processes).
That flag is read by dynamo each time a compiled frame is entered, not when ``torch.compile``
wraps a function, so it works whenever it is set before the first call, and the official code
runs eagerly through the same Python; it is what ``TORCH_COMPILE_DISABLE=1`` sets at import.

Importing this module imports neither the official code nor diffusers/transformers: the
official code needs its own pinned versions (diffusers 0.35, transformers 4.57), which are put
on ``sys.path`` ahead of the environment's by the launch command (see
``scripts/official_rollout.py``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_json
from ..timing import Clock

OFFICIAL_COMMIT = "da2d0c26eb0edb647f56e164ffd966490eb75282"
STUB_DIR = Path(__file__).resolve().parent / "sageattention_stub"

# WanRunner.predict / generate.py __main__, hard-coded there.
HEIGHT, WIDTH = 704, 1280
CONTEXT_WINDOW_LENGTH = 16
NUM_INFERENCE_STEPS = 50  # ignored in few-step mode, passed as the official CLI default
DEFAULT_NUM_FRAMES = 961  # official --num_frames default; sizes the noise tensor

LAUNCH_HINT = (
    "the official pipeline needs torch.distributed initialised (WORLD_SIZE set); launch with\n"
    "  python3 -m torch.distributed.run --nproc_per_node=1 scripts/official_rollout.py ...\n"
    "(see `python scripts/official_rollout.py --help`)"
)


class OfficialLegError(RuntimeError):
    """The official leg cannot run as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------
# import plumbing


def official_sys_path(official_root: str | os.PathLike) -> list[str]:
    """The entries the official code needs first on ``sys.path``: our sageattention stub, the
    checkout root (``hyvideo.*``, ``wan.*``) and ``wan/`` (``distributed.*``, ``models.*``,
    ``inference.*``, ``platforms``, ``utils``)."""
    root = Path(official_root).resolve()
    return [str(STUB_DIR), str(root), str(root / "wan")]


def set_compile(enabled: bool) -> None:
    """Turn the official ``torch.compile`` calls on (as shipped) or off (eager)."""
    import torch._dynamo

    torch._dynamo.config.disable = not enabled
    if enabled:
        os.environ.pop("TORCH_COMPILE_DISABLE", None)
    else:
        os.environ["TORCH_COMPILE_DISABLE"] = "1"


class _FastvideoAlias:
    """Meta-path finder: ``fastvideo.platforms[.interface]`` -> the checkout's ``platforms[.interface]``.

    ``wan/platforms/cpu.py`` (the platform chosen when no GPU is found) imports them from a
    ``fastvideo`` package that the checkout does not ship. Resolved lazily, at the moment
    ``platforms`` picks the CPU platform, because ``platforms`` and ``distributed`` import each
    other and cannot be imported ahead of time.
    """

    TARGETS = {
        "fastvideo": None,
        "fastvideo.platforms": "platforms",
        "fastvideo.platforms.interface": "platforms.interface",
    }

    def find_spec(self, fullname, path=None, target=None):
        import importlib.util

        if fullname not in self.TARGETS:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=not fullname.endswith(".interface"))

    def create_module(self, spec):
        import importlib
        import types

        target = self.TARGETS[spec.name]
        if target is None:
            module = types.ModuleType(spec.name)
            module.__path__ = []
            return module
        return importlib.import_module(target)

    def exec_module(self, module):
        return None


def _install_cpu_shims() -> None:
    """CPU smoke runs only (never on CUDA): let the official code import and run without a GPU.

    The ``fastvideo`` alias above; and no-ops for ``torch.cuda.synchronize``, ``set_device`` and
    NVTX, which the pipeline, ``DistController`` and ``decode_next_latent`` call unconditionally.
    (``distribute_data_to_gpus``, which moves data to ``cuda:N``, is replaced after import.)
    None of it changes what is computed.
    """
    if not any(isinstance(f, _FastvideoAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, _FastvideoAlias())

    def noop():  # a distinct function per name: dynamo's rule map refuses one object under two names
        def _noop(*_a, **_k):
            return None

        return _noop

    torch.cuda.synchronize = noop()  # type: ignore[assignment]
    torch.cuda.set_device = noop()  # type: ignore[assignment]
    torch.cuda.nvtx.range_push = noop()  # type: ignore[assignment]
    torch.cuda.nvtx.range_pop = noop()  # type: ignore[assignment]


def _import_official(official_root: Path, cpu: bool) -> dict[str, Any]:
    """Import the official modules the leg uses; return them by short name."""
    if not (official_root / "wan" / "inference" / "pipeline_wan_w_mem_relative_rope.py").is_file():
        raise OfficialLegError(
            f"{official_root}: not an HY-WorldPlay checkout (no wan/inference/pipeline_wan_w_mem_relative_rope.py); "
            "pass the checkout root or the folder exported by scripts/make_official_env.sh"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    for entry in reversed(official_sys_path(official_root)):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    import sageattention

    if Path(sageattention.__file__).resolve().parent.parent != STUB_DIR:
        raise OfficialLegError(
            f"`sageattention` resolves to {sageattention.__file__}, not the stub in {STUB_DIR}; "
            "the official leg must run exact SDPA attention (import the leg before anything imports sageattention)"
        )
    import diffusers

    if not diffusers.__version__.startswith("0.35."):
        raise OfficialLegError(
            f"diffusers {diffusers.__version__} is first on sys.path; the official code pins diffusers==0.35.0 "
            "(install the carried wheels into a --target dir and put it first on PYTHONPATH)"
        )
    if cpu:
        _install_cpu_shims()
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
    from distributed import maybe_init_distributed_environment_and_model_parallel
    from inference import pipeline_wan_w_mem_relative_rope as pipeline_module
    from inference.helper import CHUNK_SIZE, MyVAE
    from models.dits.arwan_w_action_w_mem_relative_rope import WanTransformer3DModel
    from models.par_vae.context_parallel.wrapper_vae import DistWrapper
    from models.par_vae.tools import DistController

    if cpu:

        def distribute_data_to_gpus(data, dim, rank, local_rank, num_gpus, dtype):  # CPU twin
            chunk = data.shape[dim] // num_gpus
            index = [slice(None)] * data.ndim
            index[dim] = slice(rank * chunk, (rank + 1) * chunk)
            return data[tuple(index)].to(dtype=dtype)

        pipeline_module.distribute_data_to_gpus = distribute_data_to_gpus

    return {
        "diffusers": diffusers,
        "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
        "maybe_init": maybe_init_distributed_environment_and_model_parallel,
        "pipeline_module": pipeline_module,
        "CHUNK_SIZE": CHUNK_SIZE,
        "MyVAE": MyVAE,
        "WanTransformer3DModel": WanTransformer3DModel,
        "DistWrapper": DistWrapper,
        "DistController": DistController,
    }


def read_official_commit(official_root: str | os.PathLike) -> str | None:
    """The checkout's commit: ``git rev-parse HEAD`` or the ``COMMIT`` file of an export."""
    root = Path(official_root)
    marker = root / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip() or None
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (root / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


@dataclass
class ChunkResult:
    """One chunk of an official rollout.

    ``latents``: the chunk's 4 clean latents ``[1, C, 4, H/16, W/16]`` float32 on the CPU, read
    from the pipeline's fp32 master tensor (chunk 0's first latent is the encoded image).
    ``frames``: ``[T, H, W, 3]`` uint8 via the official ``(frame * 255).astype(uint8)`` (13 frames
    for chunk 0, then 16). ``memory_indices``: the latent frames prefilled into the KV cache
    (None for chunk 0). ``timings_ms``: ``dit`` (the pipeline call: memory selection, prefill and
    4 steps), ``prefill`` (the ``is_cache=True`` forward, 0 for chunk 0), ``steps`` (sum of the 4
    denoising forwards) with ``step_each``, ``memory_select`` (host wall time of
    ``select_mem_frames_wan``, when called), ``decode`` (the 4 ``decode_next_latent`` calls, each
    including its device-to-host copy) with ``decode_each``, and ``*_wall`` host wall times.
    """

    index: int
    latents: torch.Tensor
    frames: np.ndarray
    memory_indices: list[int] | None
    timings_ms: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int | None = None


# ---------------------------------------------------------------------------------------
# the leg


class OfficialLeg:
    """The official WAN pipeline, built from ``weights_dir`` (see :func:`export_weights`).

    ``weights_dir`` holds ``wan_transformer/config.json``, ``wan_distilled_model/model.pt`` and
    ``vae/{config.json, diffusion_pytorch_model.safetensors}``. ``device`` defaults to
    ``cuda:$LOCAL_RANK``; ``"cpu"`` runs a smoke test with CUDA calls stubbed (see
    :func:`_install_cpu_shims`), meant for tiny configs only.
    """

    def __init__(
        self,
        official_root: str | os.PathLike,
        weights_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        compile: bool = True,
    ):
        if "WORLD_SIZE" not in os.environ:
            raise OfficialLegError(LAUNCH_HINT)
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # WORLD_SIZE > 1: one rank of the official sequence-parallel pipeline (every rank builds
        # this leg; worldplay.experiments.official_leg.ranked_rollout starts them).
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.official_root = Path(official_root).resolve()
        self.weights_dir = Path(weights_dir)
        for rel in ("wan_transformer/config.json", "wan_distilled_model/model.pt", "vae/config.json"):
            if not (self.weights_dir / rel).is_file():
                raise OfficialLegError(
                    f"{self.weights_dir / rel}: missing (write the folder with export_weights)"
                )
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.compile = bool(compile)
        set_compile(self.compile)
        self.mod = _import_official(self.official_root, cpu=self.device.type == "cpu")
        self.chunk_size = int(self.mod["CHUNK_SIZE"])
        self._init_distributed()
        self.pipe = self._init_models()
        self._install_instrumentation()

    # -- construction (WanRunner.__init__ / _init_models) --------------------------------

    def _init_distributed(self) -> None:
        dist = torch.distributed
        if self.device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.mod["maybe_init"](1, sp_size=self.world_size, distributed_init_method="env://")

    def _build_transformer(self):
        """``WanTransformer3DModel.from_pretrained(..., torch_dtype=bf16)`` minus the weights file:
        the same ``from_config`` under default dtype bf16 and ``no_init_weights`` (every parameter
        is overwritten by the strict load that follows, as in the official loader)."""
        from diffusers.models.modeling_utils import no_init_weights

        cls = self.mod["WanTransformer3DModel"]
        config = cls.load_config(str(self.weights_dir / "wan_transformer"))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with no_init_weights():
                model = cls.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        return model.eval()  # from_pretrained returns eval mode; parameters keep requires_grad

    def _load_generator(self, model) -> None:
        """``_init_models``: torch.load to the device, 'generator', strip prefixes, strict load."""
        path = self.weights_dir / "wan_distilled_model" / "model.pt"
        blob = torch.load(path, map_location=self.device, weights_only=True)
        state = blob["generator"]
        state = {(k.replace("model.", "") if k.startswith("model.") else k): v for k, v in state.items()}
        state = {
            (k.replace("_fsdp_wrapped_module.", "") if k.startswith("_fsdp_wrapped_module.") else k): v
            for k, v in state.items()
        }
        model.load_state_dict(state, strict=True)
        del blob, state

    def _init_models(self):
        m = self.mod
        bf16 = torch.bfloat16
        vae = (
            m["MyVAE"]
            .from_pretrained(str(self.weights_dir / "vae"), torch_dtype=bf16)
            .eval()
            .requires_grad_(False)
        )
        scheduler = m["FlowMatchEulerDiscreteScheduler"]()
        pipe = m["pipeline_module"].WanPipeline(
            tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=None
        )
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)

        controller = m["DistController"](self.rank, self.local_rank, self.world_size, None)
        pipe.dist_vae = m["DistWrapper"](vae, controller, None, 4)  # vae_chunk_dim = 4, as _init_models

        transformer = self._build_transformer()
        transformer.add_discrete_action_parameters()
        self._load_generator(transformer)
        pipe.transformer = transformer.to(dtype=bf16)
        pipe.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not pipe.parallel_run or not pipe.par_vae_decode:
            raise OfficialLegError(
                "the pipeline did not switch to its parallel decode path; is WORLD_SIZE set?"
            )
        return pipe

    # -- instrumentation -----------------------------------------------------------------

    def _install_instrumentation(self) -> None:
        self._clock = Clock(self.device)
        self._forward_marks: list[tuple[bool, Any, Any]] = []
        self._memory_calls: list[tuple[list[int], float]] = []
        pending: list[tuple[bool, Any]] = []

        def pre(_module, _args, kwargs):
            pending.append((bool(kwargs.get("is_cache", False)), self._clock.stamp()))

        def post(_module, _args, _kwargs, _output):
            is_cache, start = pending.pop()
            self._forward_marks.append((is_cache, start, self._clock.stamp()))

        transformer = self.pipe.transformer
        transformer.register_forward_pre_hook(pre, with_kwargs=True)
        transformer.register_forward_hook(post, with_kwargs=True)

        module = self.mod["pipeline_module"]
        original = getattr(module, "_worldplay_original_select", None) or module.select_mem_frames_wan
        module._worldplay_original_select = original

        def select_mem_frames_wan(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            self._memory_calls.append(([int(i) for i in out], (time.perf_counter() - t0) * 1000.0))
            return out

        module.select_mem_frames_wan = select_mem_frames_wan

    # -- reporting -----------------------------------------------------------------------

    def environment(self) -> dict[str, Any]:
        """Versions, SDPA backends, compile state and device of this leg (for stats files)."""
        import diffusers
        import torch._dynamo
        import transformers

        env: dict[str, Any] = {
            "official_root": str(self.official_root),
            "official_commit": read_official_commit(self.official_root),
            "expected_commit": OFFICIAL_COMMIT,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "device": str(self.device),
            "compile": self.compile,
            "dynamo_disable": bool(torch._dynamo.config.disable),
            "recompile_limit": getattr(torch._dynamo.config, "recompile_limit", None),
            "attention": "sageattention stub -> torch SDPA (exact)",
            "sdpa_backends": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            },
            "dtype": "bfloat16",
            "weights_dir": str(self.weights_dir),
        }
        if self.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(self.device)
        return env

    # -- rollout (WanRunner.predict) -----------------------------------------------------

    def rollout(
        self,
        image_path: str | os.PathLike,
        prompt_embeds: torch.Tensor,
        viewmats: torch.Tensor,
        Ks: torch.Tensor,
        actions: torch.Tensor,
        num_chunk: int,
        seed: int = 0,
        num_frames: int = DEFAULT_NUM_FRAMES,
    ) -> Iterator[ChunkResult]:
        """Generate ``num_chunk`` chunks as ``WanRunner.predict`` does; yield each as it is done.

        ``prompt_embeds``: ``[1, 512, 4096]`` (cast to the transformer dtype by the pipeline).
        ``viewmats [N, 4, 4]``, ``Ks [N, 3, 3]``, ``actions [N]``: per latent, in the dtypes of
        the official ``pose_to_input`` (float64, float64, int64) with ``N >= 4 * num_chunk``.
        """
        cs = self.chunk_size
        image_path = Path(image_path)
        if not image_path.is_file():
            raise OfficialLegError(f"{image_path}: no such image")
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
            raise OfficialLegError(f"prompt_embeds must be [1, L, D], got {tuple(prompt_embeds.shape)}")
        n = int(viewmats.shape[0])
        if tuple(viewmats.shape) != (n, 4, 4) or tuple(Ks.shape) != (n, 3, 3) or tuple(actions.shape) != (n,):
            raise OfficialLegError(
                f"want viewmats [N,4,4], Ks [N,3,3], actions [N]; got {tuple(viewmats.shape)}, "
                f"{tuple(Ks.shape)}, {tuple(actions.shape)}"
            )
        rounded = num_frames if num_frames % 4 == 1 else num_frames // 4 * 4 + 1  # as the pipeline rounds
        n_latent = (max(rounded, 1) - 1) // 4 + 1
        if num_chunk < 1 or num_chunk * cs > n or num_chunk * cs > n_latent:
            raise OfficialLegError(
                f"num_chunk={num_chunk} needs {num_chunk * cs} latents; the trajectory has {n} and "
                f"num_frames={num_frames} allows {n_latent}"
            )

        pipe, clock = self.pipe, self._clock
        torch.manual_seed(seed)
        run_args = dict(
            prompt=None,
            negative_prompt=None,
            prompt_embeds=prompt_embeds.to(self.device),
            height=HEIGHT,
            width=WIDTH,
            num_frames=num_frames,
            num_inference_steps=NUM_INFERENCE_STEPS,
            guidance_scale=1.0,
            few_step=True,
            first_chunk_size=cs,
            return_dict=False,
            image_path=str(image_path),
            use_memory=True,
            context_window_length=CONTEXT_WINDOW_LENGTH,
        )
        for chunk_i in range(num_chunk):
            start, end = chunk_i * cs, (chunk_i + 1) * cs
            self._forward_marks.clear()
            self._memory_calls.clear()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            clock.sync()
            w0 = time.perf_counter()
            e0 = clock.stamp()
            pipe(
                **run_args,
                chunk_i=chunk_i,
                viewmats=viewmats[start:end].unsqueeze(0),
                Ks=Ks[start:end].unsqueeze(0),
                action=actions[start:end].unsqueeze(0),
                output_type="latent",
            )
            e1 = clock.stamp()
            clock.sync()
            w1 = time.perf_counter()
            latents = pipe.ctx["latents"][:, :, start:end].detach().float().cpu().clone()

            decode_marks, videos = [clock.stamp()], []
            for _ in range(4):
                videos.append(pipe.decode_next_latent(output_type="np"))
                decode_marks.append(clock.stamp())
            clock.sync()
            w2 = time.perf_counter()
            frames = np.concatenate([(v[0] * 255).astype(np.uint8) for v in videos], axis=0)

            marks = list(self._forward_marks)
            prefill = [clock.ms(a, b) for is_cache, a, b in marks if is_cache]
            steps = [clock.ms(a, b) for is_cache, a, b in marks if not is_cache]
            decode_each = [clock.ms(a, b) for a, b in zip(decode_marks, decode_marks[1:], strict=False)]
            if self._memory_calls:
                memory_indices, select_ms = self._memory_calls[-1]
            elif chunk_i > 0:
                memory_indices, select_ms = list(range(chunk_i * cs)), None
            else:
                memory_indices, select_ms = None, None
            timings: dict[str, Any] = {
                "dit": clock.ms(e0, e1),
                "prefill": sum(prefill),
                "steps": sum(steps),
                "step_each": steps,
                "memory_select": select_ms,
                "decode": clock.ms(decode_marks[0], decode_marks[-1]),
                "decode_each": decode_each,
                "dit_wall": (w1 - w0) * 1000.0,
                "decode_wall": (w2 - w1) * 1000.0,
                "forward_calls": len(marks),
            }
            peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
            yield ChunkResult(chunk_i, latents, frames, memory_indices, timings, peak)


# ---------------------------------------------------------------------------------------
# weights


def _plain_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    t = t.to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # a view of a larger storage: save only its own bytes
    return t


def export_weights(
    dit_state_dict: dict[str, torch.Tensor],
    dit_config: dict[str, Any],
    vae_module_or_state_dict: torch.nn.Module | dict[str, torch.Tensor],
    vae_config: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    vae_dtype: torch.dtype | None = None,
) -> dict[str, Path]:
    """Write one set of weights in the published on-disk layouts, for both legs to load.

    * ``wan_transformer/config.json``: the diffusers ``WanTransformer3DModel`` config
      (``DiTConfig.to_dict()``); no safetensors (both loaders use only the config).
    * ``wan_distilled_model/model.pt``: ``{"generator": {"model." + key: bf16 tensor},
      "generator_ema": <the same dict>}`` via ``torch.save`` (the shared dict and tensors are
      pickled once).
    * ``vae/config.json`` + ``vae/diffusion_pytorch_model.safetensors``: the VAE
      (``VAEConfig.to_dict()``; our keys equal diffusers'), in its own dtype unless ``vae_dtype``.

    Returns the paths written. Readers: ``worldplay.checkpoint.load_dit(out/"wan_transformer",
    worldplay_weights=out/"wan_distilled_model"/"model.pt")``, ``load_vae(out/"vae")`` and
    :class:`OfficialLeg`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    paths = {
        "dit_config": out / "wan_transformer" / "config.json",
        "model_pt": out / "wan_distilled_model" / "model.pt",
        "vae_config": out / "vae" / "config.json",
        "vae_weights": out / "vae" / "diffusion_pytorch_model.safetensors",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)

    dcfg = dict(dit_config)
    dcfg.setdefault("_class_name", "WanTransformer3DModel")
    atomic_write_json(paths["dit_config"], dcfg, sort_keys=True)
    generator = {f"model.{k}": _plain_tensor(v, torch.bfloat16) for k, v in dit_state_dict.items()}
    tmp = paths["model_pt"].with_name("model.pt.tmp")
    torch.save({"generator": generator, "generator_ema": generator}, tmp)
    tmp.replace(paths["model_pt"])
    del generator

    vcfg = dict(vae_config)
    vcfg.setdefault("_class_name", "AutoencoderKLWan")
    atomic_write_json(paths["vae_config"], vcfg, sort_keys=True)
    vstate = (
        vae_module_or_state_dict.state_dict()
        if isinstance(vae_module_or_state_dict, torch.nn.Module)
        else vae_module_or_state_dict
    )
    tensors = {k: _plain_tensor(v, vae_dtype) for k, v in vstate.items()}
    tmp = paths["vae_weights"].with_name("diffusion_pytorch_model.safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(paths["vae_weights"])
    return paths
