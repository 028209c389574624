"""Shared fixtures: tiny models built in code, offline, cached in a throwaway ERASE_HOME."""

import os
import tempfile

# Set before anything imports huggingface_hub: no test may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ERASE_HOME"] = tempfile.mkdtemp(prefix="erase-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from erase.testing import save_tiny_sd  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    """A tiny random Stable Diffusion pipeline saved as a diffusers folder."""
    return save_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd") / "pipeline"))


@pytest.fixture(scope="session")
def tiny_sd_args(tiny_sd_dir) -> list[str]:
    """erase-concept flags for a seconds-long run on the tiny pipeline."""
    return [
        "--model",
        tiny_sd_dir,
        "--concept",
        "nudity",
        "--steps",
        "2",
        "--num-forget",
        "2",
        "--num-retain",
        "2",
        "--gen-steps",
        "2",
    ]
