import os

import pytest
import torch

# Tests run on CPU with the tiny preset; keep them deterministic and light on 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# `nox -s tests` skips the tests marked slow (minutes each on 2 cores); CI (.ci/run) and anyone
# who wants everything sets WORLDPLAY_ALL_TESTS=1.
ALL_TESTS_ENV = "WORLDPLAY_ALL_TESTS"


def pytest_collection_modifyitems(config, items):
    if os.environ.get(ALL_TESTS_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow: set {ALL_TESTS_ENV}=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class RerunGraph:
    """Stands in for :class:`worldplay.graphs.CapturedCall` on the CPU: the warm-up calls really
    run (then ``restore``), the "capture" only records the function, and every replay re-runs it
    on the static inputs and writes into the one output tensor, as a real graph does."""

    captures = replays = 0

    def __init__(self, fn, statics, pool=None, warmups=2, restore=None):
        self.fn, self.statics, self.output = fn, statics, None
        for _ in range(warmups):
            fn()
        if restore is not None:
            restore()
        type(self).captures += 1

    def __call__(self, **inputs):
        for name, value in inputs.items():
            self.statics[name].copy_(value)
        type(self).replays += 1
        out = self.fn()
        if self.output is None:
            self.output = out
        elif isinstance(out, torch.Tensor):
            self.output.copy_(out)
        return self.output


@pytest.fixture
def rerun_graph():
    """A fresh :class:`RerunGraph` class (its capture/replay counters at zero)."""
    return type("RerunGraph", (RerunGraph,), {"captures": 0, "replays": 0})


def tiny_pipeline_inputs(dtype: torch.dtype | None = None):
    """A tiny-preset pipeline on the CPU (random weights, seed 0), a random image and text
    states: what the rollout comparison tests share. ``dtype`` None: the preset's default."""
    from worldplay.models import random_models, random_text_states
    from worldplay.rollout import WorldPlayPipeline

    kwargs = {} if dtype is None else {"dtype": dtype}
    models = random_models("tiny", 0, device="cpu", **kwargs)
    pipe = WorldPlayPipeline(models.dit, models.vae, device="cpu", **kwargs)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return pipe, image, random_text_states("tiny", 0)
