"""The pipeline's phases: the text encoders and VAE wait on the host through the mask and
training, reading embeddings cached once, with results bit-identical to encoding in the loop."""

import json

import pytest
import torch
from safetensors.torch import load_file

import erase.erasure
from erase.cli.concept import erase_concept_main
from erase.models.sd import StableDiffusionBackend

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("method", ["salun", "esd-u"])
def test_cached_embeddings_with_encoders_on_the_host_change_nothing(
    tiny_sd_args, tmp_path, monkeypatch, method
):
    args = [*tiny_sd_args, "--method", method, "--lr", "1e-3"]
    assert erase_concept_main([*args, "--output", str(tmp_path / "in-loop")]) == 0
    moves = []
    original = StableDiffusionBackend.encoders_to

    def recording(self, device):
        moves.append((str(device), len(self._embeds)))
        original(self, device)

    # On a GPU the encoders move to the host; here, where the host is the device, force the
    # same path: every prompt encoded once up front, then the encoders moved, then back.
    monkeypatch.setattr(erase.erasure, "keeps_encoders", lambda plan: False)
    monkeypatch.setattr(StableDiffusionBackend, "encoders_to", recording)
    encoded_in_loop = []
    original_embed = StableDiffusionBackend.embed
    monkeypatch.setattr(
        StableDiffusionBackend,
        "embed",
        lambda self, prompts: encoded_in_loop.append(moves[:]) or original_embed(self, prompts),
    )
    assert erase_concept_main([*args, "--output", str(tmp_path / "cached")]) == 0
    assert [device for device, _ in moves[:2]] == ["cpu", "cpu"] and moves[0][1] >= 3
    # nothing was encoded between the move to the host and the move back
    assert not any(len(seen) == 1 for seen in encoded_in_loop)
    first, second = (load_file(str(tmp_path / name / WEIGHTS)) for name in ("in-loop", "cached"))
    assert all(torch.equal(first[name], second[name]) for name in first)
    metadata = [
        json.loads((tmp_path / name / "metadata.json").read_text())
        for name in ("in-loop", "cached")
    ]
    results = [run["train_result"] for run in metadata]
    assert results[0]["first_terms"] == results[1]["first_terms"]  # the same losses, bit for bit
    assert results[0]["last_terms"] == results[1]["last_terms"]
    assert metadata[1]["changed_weights"] > 0
