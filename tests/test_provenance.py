"""Provenance records the environment that matters to the numbers, and never a credential."""

from __future__ import annotations

import json
import os
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from worldplay.experiments.provenance import NAMED_ENV_PREFIXES, RECORDED_ENV, environment, selected_env

HOSTILE = {
    "WORLDPLAY_AUTH": "s3cret-worldplay-auth",
    "TORCH_HUB_AUTH": "s3cret-hub-auth",
    "NCCL_CREDENTIALS": "s3cret-nccl-credentials",
    "CUDA_PASSWD": "s3cret-cuda-passwd",
    "TORCHINDUCTOR_REMOTE_CACHE_URL": "https://user:s3cret-url@cache.example",
    "PYTORCH_CUDA_ALLOC_CONF_BACKUP": "s3cret-near-miss",  # an allowed name's prefix is not the name
    "HF_TOKEN": "hf_s3cretToken",
}


def test_hostile_names_are_not_recorded_but_allowed_ones_are():
    allowed = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "NCCL_NVLS_ENABLE": "0",
               "OMP_NUM_THREADS": "2"}
    with mock.patch.dict(os.environ, {**HOSTILE, **allowed}):
        env = environment("cpu")
    text = json.dumps(env)
    assert "s3cret" not in text
    assert {k: env["env"][k] for k in allowed} == allowed
    # The other names are listed, so a reader sees they were set; never their values.
    assert set(HOSTILE) <= set(env["env_names_only"])
    assert not set(env["env_names_only"]) & set(env["env"])


@settings(max_examples=80, deadline=None)
@given(prefix=st.sampled_from(NAMED_ENV_PREFIXES),
       rest=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=24))
def test_no_unlisted_variable_value_is_recorded(prefix, rest):
    name = prefix + rest
    marker = "value-that-must-not-leak-7f3a"
    with mock.patch.dict(os.environ, {name: marker}):
        recorded = selected_env()
    if name in RECORDED_ENV:
        assert recorded[name] == marker
    else:
        assert marker not in recorded.values()
