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
def test_cached_embeddings_with_encoders_parked_in_a_file_change_nothing(
    tiny_sd_args, tmp_path, monkeypatch, method
):
    args = [*tiny_sd_args, "--method", method, "--lr", "1e-3"]
    with monkeypatch.context() as kept:  # the encoders stay in memory, prompts encoded in the loop
        kept.setattr(erase.erasure, "keeps_encoders", lambda plan: True)
        assert erase_concept_main([*args, "--output", str(tmp_path / "in-loop")]) == 0
    moves = []
    for name in ("encoders_off", "encoders_on"):
        original = getattr(StableDiffusionBackend, name)

        def recording(self, *folder, name=name, original=original):
            moves.append((name, len(self._embeds)))
            original(self, *folder)

        monkeypatch.setattr(StableDiffusionBackend, name, recording)
    sizes = []
    original_train = erase.erasure.train

    def training(accelerator, backend, *rest, **options):
        encoders = (backend.pipe.vae, backend.pipe.text_encoder)
        sizes.extend(sum(p.numel() for p in module.parameters()) for module in encoders)
        return original_train(accelerator, backend, *rest, **options)

    monkeypatch.setattr(erase.erasure, "train", training)
    encoded_in_loop = []
    original_embed = StableDiffusionBackend.embed
    monkeypatch.setattr(
        StableDiffusionBackend,
        "embed",
        lambda self, prompts: encoded_in_loop.append(moves[:]) or original_embed(self, prompts),
    )
    # On the CPU the encoders go into a file, their memory freed, from the mask to the grids
    assert erase_concept_main([*args, "--output", str(tmp_path / "cached")]) == 0
    assert [name for name, _ in moves] == ["encoders_off", "encoders_on"] and moves[0][1] >= 3
    assert sizes == [0, 0]  # no weights of theirs in memory while the UNet trains
    # nothing was encoded between the move off and the move back
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached", "in-loop"]  # no file left


class Strided(torch.nn.Module):
    """Every kind of tensor a frozen encoder holds: fp32 and bf16 weights, a transposed
    (non-contiguous) one, a persistent and a non-persistent int buffer, a shared submodule."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.linear = torch.nn.Linear(5, 3)
        self.bf16 = torch.nn.Parameter(torch.randn(4, 6, generator=generator).bfloat16())
        self.strided = torch.nn.Parameter(torch.randn(7, 2, generator=generator).t())
        self.register_buffer("steps", torch.arange(9))
        self.register_buffer("positions", torch.arange(77).view(1, -1), persistent=False)
        self.shared = self.linear


def test_parked_modules_come_back_bit_for_bit_in_the_same_parameters(tmp_path):
    from erase.offload import ParkedModules

    modules = [Strided(), torch.nn.Embedding(11, 4)]
    before = [[t.detach().clone() for t in (*m.parameters(), *m.buffers())] for m in modules]
    parameters = [list(m.parameters()) for m in modules]
    parked = ParkedModules(modules, str(tmp_path))
    assert all(t.numel() == 0 for m in modules for t in (*m.parameters(), *m.buffers()))
    assert parked.size == sum(t.numel() * t.element_size() for ts in before for t in ts)
    parked.restore()
    for module, saved, same in zip(modules, before, parameters):
        after = [*module.parameters(), *module.buffers()]
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after, saved))
        assert [a.stride() for a in after] == [b.stride() for b in saved]
        assert all(a is b for a, b in zip(module.parameters(), same))
    assert modules[0].shared is modules[0].linear
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing in the folder, ever
