"""The model's fixed numbers and the project's defaults, in one torch-free place.

Every other module imports these (``git grep`` finds one definition each): the CLI, the
experiment schema and the site need them without importing torch, and one value defined twice
drifts (the default prompt: one extra "." costs about 2/255 of pixel drift).
"""

from __future__ import annotations

#: Latents the model generates per chunk (16 frames; 13 for the first chunk).
CHUNK_LATENTS = 4
#: Memory slots of the context buffer: the selected memory latents (recent window + retrieved clip).
MEMORY_SLOTS = 16
#: Denoising forwards per chunk of the distilled sampler.
DENOISING_STEPS = 4
#: Latents of the seeded noise tensor: (961 - 1) // 4 + 1, the official CLI's default --num_frames 961.
OFFICIAL_NOISE_LATENTS = 241

#: (height, width) of each model preset.
PRESET_RESOLUTION = {"wan5b": (704, 1280), "tiny": (64, 96)}

#: Names of worldplay.nn.attention.BACKENDS ("sdpa": the dispatcher's choice; the others pin one
#: kernel); a test checks that both agree.
ATTENTION_BACKENDS = ("sdpa", "fa4", "cudnn", "flash", "efficient", "math")

#: The prompt of the official and NVIDIA runs, byte for byte. No trailing period: FD measured
#: that one extra "." token alone costs about 2/255 of pixel drift against the official output.
DEFAULT_PROMPT = "First-person view walking around ancient Athens, with Greek architecture and marble structures"
