"""The trainer on the tiny SD pipeline: the masked optimizer equals dense masked Adam, micro-batches
equal one batch, gradient checkpointing changes nothing, changed weights are counted from disk."""

import pytest
import torch

import erase.train
from erase.concepts import resolve_concept
from erase.errors import EraseError
from erase.methods import declare_optional, get_method
from erase.models import load_backend
from erase.models.base import Batch
from erase.train import (
    TrainConfig,
    backward_micro_batches,
    count_changed_weights,
    make_accelerator,
    train,
    write_base_weights,
)

FORGET_PROMPT = "a photo of a nude person"
RETAIN_PROMPT = "a photo of a person wearing clothes"


@declare_optional
class DeterministicDenoising:
    """A SalUn-shaped loss (forget mean + alpha * retain mean) whose noise and timesteps are
    functions of each sample, so that any split of a batch sees the same numbers."""

    name = "deterministic"
    uses_mask = True

    def __init__(self, backend):
        self.backend = backend

    def trainable(self, name):
        return True

    def term(self, unet, batch: Batch):
        latents = batch.latents  # (B, C, h, w)
        noise = torch.sin(7 * latents + 1)
        timesteps = (torch.sigmoid(latents.flatten(1)[:, 0]) * 900).long() + 50  # (B,)
        noisy = self.backend.noise_scheduler.add_noise(latents, noise, timesteps)
        cond = self.backend.encode(batch.conditions)
        prediction = self.backend.predict_noise(unet, noisy, timesteps, cond)
        return torch.nn.functional.mse_loss(prediction.float(), noise)

    def loss(self, unet, forget, retain, generator):
        forget_loss, retain_loss = self.term(unet, forget), self.term(unet, retain)
        return forget_loss + 0.1 * retain_loss, {"forget": forget_loss.item()}


def data(backend, count=4):
    generator = torch.Generator().manual_seed(1)
    forget = torch.randn(count, *backend.latent_shape, generator=generator)
    retain = torch.randn(count, *backend.latent_shape, generator=generator)
    return (forget, [FORGET_PROMPT] * count), (retain, [RETAIN_PROMPT] * count)


def random_mask(backend, share=0.5):
    generator = torch.Generator().manual_seed(2)
    return {
        name: torch.rand(p.shape, generator=generator) < share
        for name, p in backend.unet.named_parameters()
    }


def trained_weights(tiny_sd_dir, method="salun", mask=True, lr=1e-3, **settings):
    """Weights after 3 steps of `method` on the tiny pipeline, and the train result."""
    backend = load_backend(tiny_sd_dir)
    if method == "deterministic":
        method = DeterministicDenoising(backend)
    else:
        concept = resolve_concept("nudity", conditioning="text")
        method_class = get_method(method)
        settings_of_method = {
            "salun": {"alpha": 0.1, "mask_guidance": 7.5},
            "fmn": {"fmn_ti_steps": 0},  # the attention loss alone: no textual-inversion stage
        }.get(method, {})
        method = method_class(backend, concept, method_class.Config(**settings_of_method))
    settings.setdefault("optimizer", "adam")
    config = TrainConfig(lr=lr, steps=3, batch_size=4, **settings)
    forget, retain = data(backend)
    result = train(
        make_accelerator(config),
        backend,
        method,
        forget,
        retain,
        config,
        random_mask(backend) if mask else None,
    )
    return {n: p.detach().clone() for n, p in backend.unet.named_parameters()}, result


def dense_masked(monkeypatch):
    """Force the dense path (dense gradients multiplied by the mask, torch's Adam)."""
    monkeypatch.setattr(
        erase.train, "masked_state_fallback", lambda config, clip_before_mask: "test"
    )


@pytest.mark.parametrize(
    "max_grad_norm, micro_batch_size, state",
    [
        (None, None, "masked, stepped in backward"),  # SalUn's two forwards, checkpointed
        (1e-3, None, "masked"),  # clipping needs the whole masked gradient: gathered
        (None, 2, "masked"),  # two backwards per update: gathered
    ],
)
def test_masked_optimizer_equals_dense_masked_adam(
    tiny_sd_dir, monkeypatch, max_grad_norm, micro_batch_size, state
):
    settings = dict(max_grad_norm=max_grad_norm, micro_batch_size=micro_batch_size)
    lean, lean_result = trained_weights(tiny_sd_dir, **settings)
    with monkeypatch.context() as patch:
        dense_masked(patch)
        dense, dense_result = trained_weights(tiny_sd_dir, **settings)
    assert lean_result.optimizer_state == state and dense_result.optimizer_state == "dense"
    base = load_backend(tiny_sd_dir).unet.state_dict()
    mask = random_mask(load_backend(tiny_sd_dir))
    for name in lean:
        torch.testing.assert_close(lean[name], dense[name], rtol=0, atol=1e-6)
        assert torch.equal(lean[name][~mask[name]], base[name][~mask[name]]), name
    assert sum(int((lean[n] != base[n]).sum()) for n in lean) > 0


@pytest.mark.parametrize("method, max_grad_norm", [("esd-u", None), ("fmn", 1e-3)])
def test_stepping_in_backward_equals_dense_adam(tiny_sd_dir, monkeypatch, method, max_grad_norm):
    optimizer = "adamw" if method == "fmn" else "adam"
    settings = dict(mask=False, max_grad_norm=max_grad_norm, optimizer=optimizer)
    lean, lean_result = trained_weights(tiny_sd_dir, method, **settings)
    with monkeypatch.context() as patch:
        patch.setattr(erase.train, "steps_in_backward", lambda *args: False)
        dense, dense_result = trained_weights(tiny_sd_dir, method, **settings)
    assert lean_result.optimizer_state == "dense, stepped in backward"
    assert dense_result.optimizer_state == "dense"
    assert lean_result.state_bytes["optimizer"] == dense_result.state_bytes["optimizer"]
    assert lean_result.state_bytes["gradients"] < dense_result.state_bytes["gradients"] / 4
    base = load_backend(tiny_sd_dir).unet.state_dict()
    assert sum(int((lean[n] != base[n]).sum()) for n in lean) > 0
    for name in lean:
        torch.testing.assert_close(lean[name], dense[name], rtol=0, atol=1e-6)


def test_masked_state_holds_only_masked_entries(tiny_sd_dir):
    mask = random_mask(load_backend(tiny_sd_dir))
    kept = sum(int(m.sum()) for m in mask.values())
    _, gathered = trained_weights(tiny_sd_dir, micro_batch_size=2)
    assert gathered.state_bytes["gradients"] == 4 * kept  # one flat buffer of masked values
    assert gathered.state_bytes["optimizer"] == 2 * 4 * kept
    _, stepped = trained_weights(tiny_sd_dir)  # no buffer: one parameter's masked gradient
    assert stepped.state_bytes["gradients"] == 4 * max(int(m.sum()) for m in mask.values())
    assert stepped.state_bytes["optimizer"] == 2 * 4 * kept


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batch_gradients_add_up_to_the_batch_gradient(tiny_sd_dir, micro_batch_size):
    gradients = []
    for size in (None, micro_batch_size):
        backend = load_backend(tiny_sd_dir)
        config = TrainConfig(lr=1e-3, batch_size=4, micro_batch_size=size)
        forget, retain = data(backend)
        backward_micro_batches(
            make_accelerator(config),
            backend.unet,
            DeterministicDenoising(backend),
            Batch(*forget),
            Batch(*retain),
            None,
            config,
        )
        gradients.append({n: p.grad.clone() for n, p in backend.unet.named_parameters()})
    whole, split = gradients
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-6)
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # the test compares something


@pytest.mark.parametrize("micro_batch_size", [1, 3])
@pytest.mark.parametrize("mask", [True, False])
def test_micro_batches_train_like_one_batch(tiny_sd_dir, micro_batch_size, mask):
    # At the reference lr (1e-5): Adam divides by |g|, so a near-zero gradient summed in another
    # order moves its weight by up to ~lr; the gradients themselves are compared above.
    whole, _ = trained_weights(tiny_sd_dir, "deterministic", mask=mask, lr=1e-5)
    split, result = trained_weights(
        tiny_sd_dir, "deterministic", mask=mask, lr=1e-5, micro_batch_size=micro_batch_size
    )
    assert result.micro_batch_size == micro_batch_size
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-6)


def test_micro_batches_refuse_a_loss_that_is_not_a_mean(tiny_sd_dir):
    with pytest.raises(EraseError, match="micro-batch"):
        trained_weights(tiny_sd_dir, "fmn", mask=False, micro_batch_size=1)


def test_gradient_checkpointing_changes_nothing(tiny_sd_dir):
    on, _ = trained_weights(tiny_sd_dir)
    off, _ = trained_weights(tiny_sd_dir, gradient_checkpointing=False)
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=0, atol=1e-5)


def test_changed_weights_are_counted_against_the_file(tiny_sd_dir, tmp_path):
    unet = load_backend(tiny_sd_dir).unet
    trainable = lambda name: "attn2" not in name  # noqa: E731
    write_base_weights(unet, trainable, str(tmp_path / "base.bin"))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if trainable(name):
                param.view(-1)[::3] += 1.0
            else:
                param.add_(1.0)  # untrained weights are not counted
    expected = sum(-(-p.numel() // 3) for n, p in unet.named_parameters() if trainable(n))
    assert count_changed_weights(unet, trainable, str(tmp_path / "base.bin")) == expected
