"""--harden: each technique moves only the method's trainable set (SalUn: its masked entries),
the simulated fine-tune of `meta` never reaches the saved weights, bad settings are one line
before any work, the settings are recorded, and a resumed hardened run equals an uninterrupted
one."""

import copy
import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from erase.api import erasure_config
from erase.cli.concept import erase_concept_main
from erase.concepts import resolve_concept
from erase.data import batch_at
from erase.harden import Entry, movable_entries, stream_seed
from erase.harden.meta import GRADIENT, SAVED, Meta, MetaConfig, Spill
from erase.methods import METHODS, declare_optional, denoising_loss
from erase.methods.salun import SalUn, SalUnConfig
from erase.models import load_backend
from erase.saliency import load_mask, pack_bool_mask
from erase.train import TrainConfig

WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def erase_to(tiny_sd_args, output, *extra):
    """Run erase-concept on the tiny pipeline (lr high enough that every step moves weights)."""
    assert erase_concept_main([*tiny_sd_args, "--lr", "1e-3", "--output", str(output), *extra]) == 0
    return load_file(str(output / WEIGHTS))


def base_weights(tiny_sd_dir):
    return {
        name: value.clone() for name, value in load_backend(tiny_sd_dir).unet.state_dict().items()
    }


# meta's simulated attacker keeps its moments as the erasure's optimizer does: 8-bit here
@pytest.mark.parametrize(
    "flags",
    [["--harden", "meta", "--optimizer", "adam8bit"], ["--harden", "perturb"], ["--harden", "ieu"]],
)
def test_salun_hardened_moves_only_masked_weights(tiny_sd_dir, tiny_sd_args, tmp_path, flags):
    base = base_weights(tiny_sd_dir)
    erased = erase_to(tiny_sd_args, tmp_path / "run", *flags)
    mask = load_mask(str(tmp_path / "run" / "mask.safetensors"), load_backend(tiny_sd_dir).unet)
    changed_inside = 0
    for name, value in erased.items():
        assert torch.equal(value[~mask[name]], base[name][~mask[name]]), name
        changed_inside += int((value[mask[name]] != base[name][mask[name]]).sum())
    assert changed_inside > 0


@pytest.mark.parametrize("technique", ["meta", "perturb", "ieu"])
@pytest.mark.parametrize(
    "method_flags",
    [
        ["--method", "esd-x"],
        ["--method", "fmn", "--fmn-ti-steps", "0", "--fmn-cross-attention-only"],
    ],
    ids=["esd-x", "fmn-cross-attention"],
)
def test_hardened_esd_and_fmn_stay_in_their_weight_set(
    tiny_sd_dir, tiny_sd_args, tmp_path, technique, method_flags
):
    base = base_weights(tiny_sd_dir)
    erased = erase_to(tiny_sd_args, tmp_path / "run", *method_flags, "--harden", technique)
    moved = {name for name, value in erased.items() if not torch.equal(value, base[name])}
    assert moved and all("attn2" in name for name in moved), sorted(moved)[:5]


def test_meta_weight_zero_equals_the_unhardened_run_bit_for_bit(tiny_sd_args, tmp_path):
    # A large inner learning rate: any leak of the adapted copy would show in every weight.
    meta = [
        "--harden",
        "meta",
        "--meta-steps",
        "2",
        "--meta-lr-min",
        "1e-2",
        "--meta-lr-max",
        "1e-1",
    ]
    plain = erase_to(tiny_sd_args, tmp_path / "plain")
    zero = erase_to(tiny_sd_args, tmp_path / "zero", *meta, "--meta-weight", "0")
    weighted = erase_to(tiny_sd_args, tmp_path / "weighted", *meta)
    assert all(torch.equal(zero[name], plain[name]) for name in plain)
    assert any(not torch.equal(weighted[name], plain[name]) for name in plain)


def test_meta_gradient_is_the_hand_replayed_one_and_the_weights_come_back(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    method = SalUn(
        backend, concept, dataclasses.replace(SalUnConfig(), alpha=0.1, mask_guidance=7.5)
    )
    unet = backend.unet
    named = dict(unet.named_parameters())
    every_other = {
        name: torch.arange(p.numel()).reshape(p.shape) % 2 == 0 for name, p in named.items()
    }
    mask = pack_bool_mask(every_other)
    generator = torch.Generator().manual_seed(3)
    forget = (torch.randn(4, *backend.latent_shape, generator=generator), list(concept.forget) * 4)
    retain = (torch.randn(4, *backend.latent_shape, generator=generator), list(concept.retain) * 4)
    config = MetaConfig(meta_steps=2, meta_optimizer="sgd", meta_lr_min=1e-2, meta_lr_max=1e-1)
    meta = Meta(backend, method, config, TrainConfig(batch_size=2, steps=4, seed=5))
    before = {name: p.detach().clone() for name, p in named.items()}

    unet.requires_grad_(True)
    entries = movable_entries(unet, mask)
    meta.simulate(1, unet, entries, forget, retain)
    gradients = [meta.gradient(index) for index in range(len(entries))]
    assert all(torch.equal(p.detach(), before[name]) for name, p in named.items())
    meta.close()

    # The same simulation by hand, on a copy: SGD on the masked entries, then the forget gradient.
    replay = copy.deepcopy(unet)
    stream = torch.Generator().manual_seed(stream_seed(5, 1, 0))
    low, high = math.log(1e-2), math.log(1e-1)
    lr = math.exp(low + (high - low) * float(torch.rand((), generator=stream)))
    params = list(replay.parameters())
    for inner_step in range(2):
        batch = batch_at(*forget, 2, 1 * 3 + inner_step, 5 + 2)
        grads = torch.autograd.grad(denoising_loss(backend, replay, batch, stream), params)
        with torch.no_grad():
            for (name, param), grad in zip(replay.named_parameters(), grads):
                param[every_other[name]] -= lr * grad[every_other[name]]
    objective, _ = method.forget_loss(
        replay, batch_at(*forget, 2, 5, 7), batch_at(*retain, 2, 5, 8), stream
    )
    expected = torch.autograd.grad(objective, params)
    for (name, _), gradient, wanted in zip(replay.named_parameters(), gradients, expected):
        torch.testing.assert_close(gradient, wanted[every_other[name]], rtol=1e-5, atol=1e-7)
    assert any(gradient.abs().sum() > 0 for gradient in gradients)


def test_a_meta_steps_backward_adds_the_scaled_forget_gradient_as_its_surrogate_would(tiny_sd_dir):
    # The meta gradient joins backward through hooks, one parameter at a time; what reaches the
    # weights must be the gradient of loss + weight * sum(w * g), at a micro-batch's share too.
    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    method = SalUn(backend, concept, dataclasses.replace(SalUnConfig(), alpha=0.1))
    unet = backend.unet
    unet.requires_grad_(True)
    mask = pack_bool_mask(
        {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5
         for n, p in unet.named_parameters()}
    )  # fmt: skip
    entries = movable_entries(unet, mask)
    generator = torch.Generator().manual_seed(3)
    forget = (torch.randn(4, *backend.latent_shape, generator=generator), list(concept.forget) * 4)
    retain = (torch.randn(4, *backend.latent_shape, generator=generator), list(concept.retain) * 4)
    config = MetaConfig(meta_steps=2, meta_weight=3.0, meta_lr_min=1e-2, meta_lr_max=1e-2)
    meta = Meta(backend, method, config, TrainConfig(batch_size=2, steps=4, seed=5))
    step_loss = meta.step_loss(0, unet, entries, forget, retain)
    forget_batch, retain_batch = batch_at(*forget, 2, 0, 5), batch_at(*retain, 2, 0, 6)
    total, terms = step_loss(unet, forget_batch, retain_batch, torch.Generator().manual_seed(9))
    (total * 0.5).backward()
    hooked = [entry.param.grad.clone() for entry in entries]
    unet.zero_grad(set_to_none=True)
    meta.remove_hooks()

    total, _ = method.loss(unet, forget_batch, retain_batch, torch.Generator().manual_seed(9))
    surrogate = sum(
        (entry.values(entry.param) * meta.gradient(index)).sum()
        for index, entry in enumerate(entries)
    )
    ((total + 3.0 * surrogate) * 0.5).backward()
    for entry, got in zip(entries, hooked):
        torch.testing.assert_close(got, entry.param.grad, rtol=1e-5, atol=1e-7)
    assert "forget_after_relearn" in terms
    assert sum(meta.gradient(i).abs().sum() for i in meta.with_gradient) > 0
    meta.close()
    assert meta.spill is None and not meta.hooks


def test_ieu_at_zero_equals_the_unhardened_run_and_moves_further_from_the_base_when_on(
    tiny_sd_dir, tiny_sd_args, tmp_path
):
    base = base_weights(tiny_sd_dir)
    plain = erase_to(tiny_sd_args, tmp_path / "plain")
    off = erase_to(
        tiny_sd_args, tmp_path / "off", "--harden", "ieu", "--ieu-decay", "0", "--ieu-noise", "0"
    )
    on = erase_to(tiny_sd_args, tmp_path / "on", "--harden", "ieu", "--ieu-decay", "0.05")
    assert all(torch.equal(off[name], plain[name]) for name in plain)

    def distance(weights):
        return sum(
            float((weights[name].float() - base[name].float()).square().sum()) for name in base
        )

    assert distance(on) > 2 * distance(plain)


def test_ieu_shakes_the_masked_entries_as_its_formula_replayed_by_hand():
    from types import SimpleNamespace

    from erase.harden.ieu import IEU, IEUConfig

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 5))
    before = param.detach().clone()
    selected = torch.rand(6, 5) < 0.5
    entry = Entry(param, pack_bool_mask({"w": selected}).bits["w"], int(selected.sum()))
    ieu = IEU(None, None, IEUConfig(ieu_decay=0.1, ieu_noise=0.2), SimpleNamespace(steps=5, seed=7))
    ieu.shake(1, [entry])
    noise = torch.randn(6, 5, generator=torch.Generator().manual_seed(stream_seed(7, 1, 3)))
    share = 0.2 * (1 - 1 / 4)  # falls linearly to 0 at the last of 5 steps
    expected = before * 0.9 + share * before.std() * noise
    assert torch.equal(param.detach()[~selected], before[~selected])
    torch.testing.assert_close(param.detach()[selected], expected[selected])
    assert ieu.noise_share(4) == 0.0


@pytest.mark.parametrize("to_file", [True, False], ids=["file", "host-memory"])
def test_the_spill_gives_back_every_tensor_bit_for_bit(tmp_path, to_file):
    # odd sizes and mixed dtypes: no entry's place may depend on its neighbours' alignment
    tensors = [torch.randn(3, 5), torch.randn(7).to(torch.bfloat16), torch.randn(2, 3, 3)]
    entries = [Entry(torch.nn.Parameter(t), None, t.numel()) for t in tensors]
    spill = Spill(entries, str(tmp_path), to_file=to_file)
    for index, tensor in enumerate(tensors):
        spill.put(SAVED, index, tensor)
        spill.put(GRADIENT, index, -tensor)
    for index, tensor in enumerate(tensors):
        for slot, wanted in ((SAVED, tensor), (GRADIENT, -tensor)):
            got = spill.take(slot, index)
            assert got.dtype == wanted.dtype and torch.equal(
                got.view(torch.uint8), wanted.view(torch.uint8)
            )
    spill.close()
    assert not os.listdir(tmp_path)


class NoForgetObjective:
    """A method whose loss mixes its terms and declares no forget objective."""

    @dataclasses.dataclass
    class Config:
        pass

    uses_mask = False
    name = "plain"

    @staticmethod
    def defaults(backend, concept, num_forget):
        return {}


def one_line(capsys, argv) -> str:
    assert erase_concept_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--harden", "metta"], "did you mean meta"),
        (["--harden", "meta", "--meta-steps", "-1"], "--meta-steps must be 1 or more"),
        (["--harden", "meta", "--meta-lr-min=-1e-4"], "--meta-lr-min and --meta-lr-max"),
        (["--harden", "perturb", "--perturb-steps", "-2"], "--perturb-steps must be 0 or more"),
        (["--harden", "perturb", "--meta-steps", "2"], "not a setting of --harden perturb"),
        (["--harden", "ieu", "--ieu-decay", "1"], "--ieu-decay must be in [0, 1)"),
        (["--harden", "ieu", "--ieu-noise=-0.1"], "--ieu-noise must be 0 or more"),
        (["--meta-steps", "2"], "add --harden TECHNIQUE"),
        (["--harden", "meta", "--method", "plain"], "does not declare (forget_loss)"),
    ],
)
def test_bad_hardening_is_one_line_before_any_work(
    tiny_sd_args, tmp_path, capsys, monkeypatch, flags, says
):
    monkeypatch.setitem(METHODS, "plain", declare_optional(NoForgetObjective))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("erase.erasure.load_backend", no_loading)
    err = one_line(capsys, [*tiny_sd_args, "--output", str(tmp_path / "run"), *flags])
    assert says in err and err.startswith("erase-concept: error:"), err
    assert not any(tmp_path.iterdir())


def test_settings_land_in_metadata_json_and_the_model_card(tiny_sd_args, tmp_path):
    erase_to(tiny_sd_args, tmp_path / "run", "--harden", "meta", "--meta-steps", "2")
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert metadata["harden"] == metadata["settings"]["harden"] == "meta"
    assert metadata["settings"]["harden_config"] == {"meta_steps": 2}
    assert metadata["harden_config"]["meta_steps"] == 2
    assert metadata["harden_config"]["meta_batch_size"] == 8  # resolved: SalUn's batch size
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| hardening | meta `{" in card and '"meta_steps": 2' in card


@pytest.mark.parametrize("technique", ["meta", "perturb", "ieu"])
def test_a_resumed_hardened_run_equals_an_uninterrupted_one(
    tiny_sd_args, tmp_path, monkeypatch, technique
):
    import erase.train

    flags = ["--harden", technique, "--steps", "4", "--checkpoint-every", "2"]
    if technique == "perturb":  # the checkpoint falls on the boundary where the noise is mixed in
        flags = [
            "--harden",
            technique,
            "--steps",
            "2",
            "--perturb-steps",
            "2",
            "--checkpoint-every",
            "2",
        ]
    save = erase.train.save_checkpoint

    def die_after_first_save(accelerator, folder, step):
        save(accelerator, folder, step)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(erase.train, "save_checkpoint", die_after_first_save)
        with pytest.raises(KeyboardInterrupt):
            erase_to(tiny_sd_args, tmp_path / "run", *flags)
    resumed = erase_to(tiny_sd_args, tmp_path / "run", *flags, "--resume")
    straight = erase_to(tiny_sd_args, tmp_path / "straight", *flags)
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert metadata["train_result"]["resumed_from"] == 2


def test_the_api_and_bench_take_harden():
    from erase.cli.bench import build_parser, config_from_args

    config = erasure_config("nudity", harden="perturb", perturb_noise=0.2)
    assert (config.harden, config.harden_config) == ("perturb", {"perturb_noise": 0.2})
    args = build_parser().parse_args(
        ["--model", "sd-v1-4", "--concept", "nudity", "--methods", "salun,esd-u", "--output", "b"]
        + ["--method-flags", "salun=--harden meta --meta-steps 2"]
    )
    bench = config_from_args(args)
    assert bench.method_settings["salun"] == {"harden": "meta", "meta_steps": 2}
