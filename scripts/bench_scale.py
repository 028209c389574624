"""Memory and speed of erase-concept at Stable Diffusion v1.4 scale, on random weights.

    python scripts/bench_scale.py                      # CPU: 128 px, batch 1, 2 steps, 3 methods
    python scripts/bench_scale.py --device cuda --resolution 512 --batch-size 8 \
        --mixed-precision bf16 --methods salun,esd-u,esd-x,fmn
    python scripts/bench_scale.py --methods salun --resolution 512 --steps 1 --slope-batch 2
    python scripts/bench_scale.py --methods fmn -- --fmn-ti-steps 0   # erase-concept flags
    python scripts/bench_scale.py --methods uce   # the closed-form edit: its seconds and memory
    python scripts/bench_scale.py --methods salun --harden meta,perturb   # hardening's cost

The model is SD v1.4's architecture built in code, with random weights (nothing is downloaded):
diffusers' UNet2DConditionModel with SD v1.x's config (859.5 M weights), a CLIP ViT-L/14-sized
text encoder (hidden 768, 12 layers, vocabulary 49408, 77 positions) with a word-level tokenizer
made offline, and SD's 4-level VAE. It is saved once under $ERASE_HOME/bench-scale/.

`--arch sdxl` builds SDXL base's architecture instead (diffusers' SDXL UNet config, 2.567 B
weights; CLIP ViT-L and OpenCLIP bigG-sized text encoders; SDXL's VAE). Every method also gets a
breakdown counted on the meta device (no memory used): the bytes of each part of its training
state by the trainer's rules, and the activations one sample's backward keeps, measured by
saved-tensor hooks on a meta forward at `--breakdown-resolution`. On the CPU a method whose count
does not fit the memory available is not run: its breakdown is its report.

Each method runs in a fresh process through `erase.api.run`, the code path of erase-concept, on
tiny generated data (2 DDIM steps per image). Prints JSON per method: peak memory per phase
(CPU: the process's resident set size sampled every 5 ms by a background thread, so a peak
shorter than that can be missed; GPU: torch.cuda.max_memory_allocated, reset at each phase),
the bytes of each part of the training state, seconds per step and the artifact's file sizes.
With `--slope-batch N` each method runs a second time at batch N: the activation memory per
sample is then the difference of the two peaks over the difference of the batches (what does not
grow with the batch cancels), and the projection to `--project-batch` adds it to the first peak.
With `--harden meta,perturb` each method runs again with each `--harden` technique, and
`harden_cost` gives its peak and its median and mean seconds per step over the plain run's (the
cost bounds of hardening: 1.4x the memory, 3x the time; the mean counts a technique that acts
only every `--harden-every` steps at its average).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

PHASES = (
    "load", "data", "eval_before", "mask", "prepare", "train", "edit", "eval_after", "write"
)  # fmt: skip


def model_folder(arch: str = "sd") -> str:
    """Where the v1.4-shaped (or SDXL-shaped) pipeline is cached."""
    from erase.home import erase_home

    name = {"sd": "sd-v1-4-shaped", "sdxl": "sdxl-base-shaped"}[arch]
    return os.path.join(erase_home(), "bench-scale", name)


def build_sd14_shaped(folder: str) -> str:
    """Build SD v1.4's architecture with random weights and save it as a diffusers folder."""
    from erase.testbeds.small_sd import as_pipeline

    pipeline = as_pipeline(**sd14_shaped_components())
    partial = folder + ".partial"
    pipeline.save_pretrained(partial, safe_serialization=True)
    os.replace(partial, folder)
    return folder


def sd14_shaped_components() -> dict:
    """SD v1.4's components with random weights (on the meta device inside `torch.device("meta")`)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.testbeds.tokenizer import build_word_tokenizer
    from erase.testing import TINY_WORDS

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(TINY_WORDS, max_length=77)
    text_encoder = CLIPTextModel(  # CLIP ViT-L/14's text tower, as in SD v1.x
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # diffusers' default UNet is SD v1.x's but for the text width (default 1280; SD v1.x: 768).
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = sd_shaped_vae(sample_size=512)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler
    )


def sd_shaped_vae(**config):
    """Stable Diffusion's 4-level VAE (SD v1.x, 2.x and SDXL share it) with random weights;
    `config` holds what a family sets differently (sample size, scaling, upcast)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        **config,
    )


def build_sdxl_shaped(folder: str) -> str:
    """Build SDXL base's architecture with random weights and save it as a diffusers folder."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(**sdxl_shaped_components(), add_watermarker=False)
    partial = folder + ".partial"
    pipeline.save_pretrained(partial, safe_serialization=True)
    os.replace(partial, folder)
    return folder


def sdxl_shaped_components() -> dict:
    """SDXL base 1.0's components with random weights (stabilityai/stable-diffusion-xl-base-1.0's
    configs: UNet 2.567 B weights, CLIP ViT-L and OpenCLIP bigG text towers, the VAE)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erase.testbeds.tokenizer import build_word_tokenizer
    from erase.testing import TINY_WORDS

    torch.manual_seed(0)
    tokenizers = [build_word_tokenizer(TINY_WORDS, max_length=77) for _ in range(2)]

    def text_config(width, layers, heads, act):
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=1280,
            bos_token_id=tokenizers[0].bos_token_id,
            eos_token_id=tokenizers[0].eos_token_id,
            pad_token_id=tokenizers[0].pad_token_id,
        )

    text_encoder = CLIPTextModel(text_config(768, 12, 12, "quick_gelu"))  # CLIP ViT-L/14
    text_encoder_2 = CLIPTextModelWithProjection(text_config(1280, 32, 20, "gelu"))  # bigG
    unet = UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled 1280
    )
    vae = sd_shaped_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    with torch.device("cpu"):  # its tables are real tensors even when the weights are meta
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        )
    return dict(
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
    )


def resident_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PhaseMemory:
    """Peak memory per phase: sampled RSS on the CPU, the CUDA allocator's peak on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: list[tuple[float, int]] = []
        self.boundaries: list[tuple[str, float]] = []
        self.cuda_peaks: dict[str, int] = {}
        self.cuda_ends: dict[str, int] = {}  # memory allocated as each phase ended
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def start(self) -> None:
        self.start_time = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            self.samples.append((time.perf_counter(), resident_bytes()))
            time.sleep(0.005)

    def on_phase(self, phase: str) -> None:
        """Called by the erasure when `phase` ends."""
        self.boundaries.append((phase, time.perf_counter()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peaks[phase] = torch.cuda.max_memory_allocated(self.device)
            self.cuda_ends[phase] = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        self.running = False
        self.thread.join()

    def report(self) -> dict:
        """Peak MB per phase: RSS on the CPU (and on a GPU, the CUDA peak too)."""
        peaks, begin, allocated = {}, self.start_time, 0
        for phase, end in self.boundaries:
            inside = [rss for t, rss in self.samples if begin <= t <= end]
            peaks[phase] = {
                "rss_mb": round(max(inside, default=0) / 2**20, 1),
                "start_rss_mb": round(inside[0] / 2**20, 1) if inside else 0,
            }
            if phase in self.cuda_peaks:
                peaks[phase]["cuda_mb"] = round(self.cuda_peaks[phase] / 2**20, 1)
                peaks[phase]["start_cuda_mb"] = round(allocated / 2**20, 1)
                allocated = self.cuda_ends[phase]
            begin = end
        return peaks


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# -- the breakdown on the meta device --------------------------------------------------------


class FlashLikeAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device, keeping for backward what
    the fused kernels (flash / memory-efficient, diffusers' default on a GPU) keep: q, k, v, the
    output and the log-sum-exp, never the (Q, K) probabilities that the math path on meta keeps."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, logsumexp)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


class SavedBytes:
    """Saved-tensor hooks that keep the running and peak bytes autograd holds for backward
    (a tensor saved by several operations is counted once; the weights are not activations)."""

    def __init__(self, weights):
        self.weight_ids = {id(w) for w in weights}
        self.live: dict[int, list] = {}  # id -> [tensor, times saved]
        self.now = self.peak = 0

    def pack(self, tensor):
        if id(tensor) in self.weight_ids:
            return tensor
        entry = self.live.setdefault(id(tensor), [tensor, 0])
        if entry[1] == 0:
            self.now += tensor.numel() * tensor.element_size()
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return SavedHandle(self, id(tensor))

    def unpack(self, handle):
        return handle if isinstance(handle, torch.Tensor) else self.live[handle.key][0]


class SavedHandle:
    """What autograd holds for one saved tensor; releasing it frees the bytes when it is the last."""

    def __init__(self, owner: SavedBytes, key: int):
        self.owner, self.key = owner, key

    def __del__(self):
        entry = self.owner.live[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            tensor = self.owner.live.pop(self.key)[0]
            self.owner.now -= tensor.numel() * tensor.element_size()


def unet_inputs(unet, resolution: int, batch: int, arch: str) -> dict:
    """Meta inputs of one UNet call at `resolution` pixels (latents 8x smaller)."""
    side = resolution // 8
    inputs = dict(
        sample=torch.empty(batch, unet.config.in_channels, side, side, device="meta"),
        timestep=torch.full((batch,), 500, device="meta"),
        encoder_hidden_states=torch.empty(
            batch, 77, unet.config.cross_attention_dim, device="meta"
        ),
    )
    if arch == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, 1280, device="meta"),
            "time_ids": torch.empty(batch, 6, device="meta"),
        }
    return inputs


# What diffusers' gradient checkpointing recomputes as one unit in backward.
CHECKPOINTED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


def activation_bytes(unet, resolution: int, arch: str, checkpointing: bool) -> int:
    """Peak bytes autograd keeps for one sample's forward and backward through `unet` (meta).
    With checkpointing: what the checkpoints keep plus the largest block, which backward
    recomputes with its activations (measured without checkpointing)."""

    counter = SavedBytes(list(unet.parameters()))
    unet.disable_gradient_checkpointing()
    blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINTED_BLOCKS]
    largest_block, starts = [0], {}

    def before(module, inputs):
        starts[id(module)] = counter.now

    def after(module, inputs, output):
        largest_block[0] = max(largest_block[0], counter.now - starts[id(module)])

    hooks = [b.register_forward_pre_hook(before) for b in blocks]
    hooks += [b.register_forward_hook(after) for b in blocks]
    peak_without = saved_peak(unet, resolution, arch, counter)
    for hook in hooks:
        hook.remove()
    if not checkpointing:
        return peak_without
    unet.enable_gradient_checkpointing()
    try:
        kept = saved_peak(unet, resolution, arch, SavedBytes(list(unet.parameters())))
    finally:
        unet.disable_gradient_checkpointing()
    return kept + largest_block[0]


def saved_peak(unet, resolution: int, arch: str, counter: SavedBytes) -> int:
    """Run one sample's forward and backward on the meta device under `counter`'s hooks."""
    import torch.nn.functional as functional

    unet.train()
    original = functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        return FlashLikeAttention.apply(query, key, value)

    functional.scaled_dot_product_attention = attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            output = unet(**unet_inputs(unet, resolution, 1, arch)).sample
            output.float().square().mean().backward()
    finally:
        functional.scaled_dot_product_attention = original
        unet.zero_grad(set_to_none=True)
    return counter.peak


def method_for_breakdown(name: str):
    """The registered method, enough of it to ask which weights it trains."""
    from erase.methods import get_method

    method_class = get_method(name)
    method = method_class.__new__(method_class)
    method.config = method_class.Config()
    if method_class.trains_text_encoder:
        method.layers = None  # AdvUnlearn's default: every layer (text_encoder_full)
    return method


def moment_bytes(numel: int, optimizer: str, masked: bool) -> int:
    """Bytes of Adam's two moments over `numel` entries of one tensor: fp32 (8 per entry), or
    8-bit codes with one fp32 absmax per block of 256 (erase's masked optimizer pads each
    parameter to whole blocks; bitsandbytes' Adam8bit keeps fp32 moments below 4096 entries)."""
    if optimizer != "adam8bit" or (not masked and numel < 4096):
        return 8 * numel
    blocks = -(-numel // 256)
    return 2 * ((blocks * 256 if masked else numel) + 4 * blocks)


def breakdown(
    arch: str,
    methods: list[str],
    resolution: int,
    optimizer: str = "adam",
    mask_offload: str = "memory",
) -> dict:
    """Per method, the bytes of each part of the training state at the reference settings, by
    the trainer's rules (erase/train.py, erase/optim.py, erase/erasure.py), and the activations,
    all counted on the meta device; `needed_mb` per phase on the device (a GPU) with
    micro-batches of 1 and the whole batch, and `host_mb`: what waits in host memory (the mask
    phase's dense gradient, unless `mask_offload` is "disk", and the text encoders and VAE
    while the UNet trains, which on the CPU wait in a file instead: `file_mb`)."""
    from erase.concepts import resolve_concept
    from erase.optim import MaskedAdam

    with torch.device("meta"):
        components = sdxl_shaped_components() if arch == "sdxl" else sd14_shaped_components()
    unet = components["unet"]
    encoders = [components[n] for n in ("text_encoder", "text_encoder_2", "vae") if n in components]
    encoder_bytes = sum(module_bytes(m) for m in encoders)
    weights = list(unet.parameters())
    numel = sum(w.numel() for w in weights)
    concept = resolve_concept("nudity", conditioning="text")
    text_backend = type("TextBackend", (), {"conditioning": "text"})()  # for defaults()
    per_checkpointing = {
        on: activation_bytes(unet, resolution, arch, on) for on in (True, False)
    }  # one sample, one UNet call with backward
    reports = {}
    for name in methods:
        method = method_for_breakdown(name)
        trained = [(n, w) for n, w in unet.named_parameters() if method.trainable(n)]
        trained_numel = sum(w.numel() for _, w in trained)
        state = {"weights": 4 * numel}
        if method.trains_text_encoder:  # AdvUnlearn: the encoder trains through the UNet
            per_sample = per_checkpointing[True]
            reports[name] = text_encoder_breakdown(arch, components, method, per_sample, optimizer)
            reports[name]["resolution"] = resolution
            continue
        if method.edit is not None:  # closed-form (UCE): no gradient, optimizer or activations
            state["encoders"] = encoder_bytes
            reports[name] = closed_form_breakdown(arch, numel, trained, state)
            continue
        batch = method.defaults(text_backend, concept, 800)["batch_size"]
        # the encoders wait on the host unless the method runs the text encoder (FMN)
        on_host = not getattr(method, "runs_text_encoder", False)
        if not on_host:
            state["encoders"] = encoder_bytes
        masked = round(0.5 * numel)
        flat_gradient = 4 * masked  # MaskedAdam's buffer of masked gradient values
        if getattr(method, "uses_mask", False):  # MaskedAdam over the top 50 %
            # A trainer whose MaskedAdam steps inside backward holds one parameter's masked
            # gradient at a time (not with micro-batches, which need the buffer).
            stepped = hasattr(MaskedAdam, "step_in_backward")
            state.update(
                gradients=max(2 * w.numel() for w in weights) if stepped else flat_gradient,
                # half of each parameter's entries, each padded to whole blocks
                optimizer=sum(moment_bytes(w.numel() // 2, optimizer, True) for w in weights),
                mask=sum(-(-w.numel() // 8) for w in weights),
            )
        else:  # stepped in backward: one parameter's gradient at a time, Adam's two moments
            state.update(
                gradients=max(4 * w.numel() for _, w in trained),
                optimizer=sum(moment_bytes(w.numel(), optimizer, False) for _, w in trained),
            )
            if name.startswith("esd"):
                state["frozen_copy"] = 4 * trained_numel
        checkpointing = getattr(method, "gradient_checkpointing", True)
        per_sample = per_checkpointing[checkpointing]
        calls = 2 if name == "salun" else 1  # SalUn: the forget term's and the retain loss's
        train = sum(state.values())
        phases = {
            "train_micro_batch_1": train + calls * per_sample,
            f"train_batch_{batch}": train + batch * calls * per_sample,
        }
        host = {"encoders": encoder_bytes if on_host else 0}
        files = {}
        if getattr(method, "uses_mask", False):
            phases["train_micro_batch_1"] += flat_gradient - state["gradients"]
            # The mask phase: each parameter's gradient goes to the host as soon as backward
            # has made it, so the device holds the weights, the largest parameter's gradient
            # and the activations of the guided batch (2 calls per sample).
            mask_device = state["weights"] + max(4 * w.numel() for w in weights)
            mask_device += state.get("encoders", 0)
            phases["mask_batch_8"] = mask_device + 8 * 2 * per_checkpointing[True]
            phases["mask_batch_1"] = mask_device + 2 * per_checkpointing[True]
            if mask_offload == "disk":  # --mask-offload disk: summed in a file
                files["mask_gradients"] = 4 * numel
            else:
                host["mask_gradients"] = 4 * numel
        reports[name] = {
            "arch": arch,
            "counted_on": "meta device (no memory used)",
            "resolution": resolution,
            "optimizer": optimizer,
            "mask_offload": mask_offload if getattr(method, "uses_mask", False) else None,
            "reference_batch_size": batch,
            "unet_weights": numel,
            "trained_weights": masked if method.uses_mask else trained_numel,
            "gradient_checkpointing": checkpointing,
            "state_mb": {k: round(v / 2**20, 1) for k, v in state.items()},
            "host_mb": {k: round(v / 2**20, 1) for k, v in host.items()},
            # on the CPU the frozen encoders wait in a file too (erase/offload.py)
            "file_mb": {k: round(v / 2**20, 1) for k, v in files.items()},
            "activation_mb_per_sample_per_unet_call": round(per_sample / 2**20, 1),
            "activation_mb_without_checkpointing": round(per_checkpointing[False] / 2**20, 1),
            "needed_mb": {k: round(v / 2**20) for k, v in phases.items()},
        }
    return reports


def text_encoder_breakdown(arch: str, components: dict, method, per_sample: int, optimizer):
    """AdvUnlearn's need: the whole model on the device (the encoder trains, the UNet and VAE
    serve it), Adam's moments and one gradient at a time for the trained encoder weights, and the
    activations of one backward through the UNet for the forget sample and the retain batch."""
    encoder = components["text_encoder"]
    trained = [w for n, w in encoder.named_parameters() if method.trainable(n)]
    unet_bytes = module_bytes(components["unet"])
    state = {
        "weights": unet_bytes + module_bytes(encoder),
        "encoders": module_bytes(components["vae"]),
        "gradients": max(4 * w.numel() for w in trained),
        "optimizer": sum(moment_bytes(w.numel(), optimizer, False) for w in trained),
    }
    calls = 1 + method.config.advunlearn_retain_batch  # forget sample + retain batch, one graph
    train = sum(state.values())
    return {
        "arch": arch,
        "counted_on": "meta device (no memory used)",
        "optimizer": optimizer,
        "reference_batch_size": 1,
        "unet_weights": sum(w.numel() for w in components["unet"].parameters()),
        "trained_weights": sum(w.numel() for w in trained),
        "trained_module": "text_encoder",
        "gradient_checkpointing": True,
        "state_mb": {k: round(v / 2**20, 1) for k, v in state.items()},
        "host_mb": {},
        "activation_mb_per_sample_per_unet_call": round(per_sample / 2**20, 1),
        "needed_mb": {
            f"train_forget_1_retain_{calls - 1}": round((train + calls * per_sample) / 2**20)
        },
    }


def closed_form_breakdown(arch: str, numel: int, edited: list, state: dict) -> dict:
    """A closed-form edit's need: the model, and while one projection (out, in) is solved its
    float64 copy, the (in, in) system and the solution (the base values of the edited weights
    go to a file, not to memory)."""
    solve = max(8 * (2 * w.shape[0] * w.shape[1] + w.shape[1] ** 2) for _, w in edited)
    state = {**state, "solve": solve}
    return {
        "arch": arch,
        "counted_on": "meta device (no memory used)",
        "closed_form": True,
        "unet_weights": numel,
        "edited_weights": sum(w.numel() for _, w in edited),
        "state_mb": {k: round(v / 2**20, 1) for k, v in state.items()},
        "needed_mb": {"edit": round(sum(state.values()) / 2**20)},
    }


def mask_offload(args: argparse.Namespace) -> str:
    """erase-concept's --mask-offload among the flags after `--` (default memory)."""
    flags = [f for flag in args.extra for f in flag.split("=", 1)]
    return flags[flags.index("--mask-offload") + 1] if "--mask-offload" in flags else "memory"


def available_bytes() -> int:
    """MemAvailable of this machine (Linux)."""
    with open("/proc/meminfo") as file:
        fields = dict(line.split(":", 1) for line in file)
    return int(fields["MemAvailable"].split()[0]) * 1024


def breakdown_resolution(args: argparse.Namespace) -> int:
    """The resolution of the breakdown every report carries: 1024 px SDXL, 512 px SD."""
    return args.breakdown_resolution or (1024 if args.arch == "sdxl" else 512)


def not_run_reports(args: argparse.Namespace) -> dict:
    """On the CPU, the methods whose counted need at --resolution does not fit this machine's
    available memory are not run: their reports are their breakdowns. `args.methods` keeps the
    others."""
    methods = args.methods.split(",")
    if args.device != "cpu":
        return {}
    here = breakdown(args.arch, methods, args.resolution, args.optimizer, mask_offload(args))
    room = available_bytes() - 4 * 2**30  # Python, torch, data, allocator retention (1-5 GB)
    reports = {}
    for method in methods:
        needed, host = here[method]["needed_mb"], here[method].get("host_mb", {})
        # on the CPU the host is the device: what waits there counts too (the encoders wait
        # in a file, the mask's gradients too with --mask-offload disk)
        train = needed.get("train_micro_batch_1", 0)
        mask = needed.get("mask_batch_1", 0) + host.get("mask_gradients", 0)
        if 2**20 * max(train, mask, needed.get("edit", 0)) > room:
            counted = breakdown(
                args.arch, [method], breakdown_resolution(args), args.optimizer, mask_offload(args)
            )[method]
            reports[method] = {
                "not_run": f"needs more than this machine's {room / 2**30:.1f} GiB to spare",
                "breakdown_here": here[method],
                "breakdown": counted,
            }
    args.methods = ",".join(m for m in methods if m not in reports)
    return reports


def estimated_state(backend, metadata: dict) -> dict:
    """The state as counted from shapes, for code that does not report it (today's main)."""
    unet = backend.unet
    weights = module_bytes(unet)
    trained = metadata["train_result"]["trained_parameters"] * 4
    state = {"weights": weights, "gradients": trained, "optimizer": 2 * trained}
    state["base_copy"] = weights  # the full clone that counted changed weights
    if metadata["method"] == "salun":
        state["mask"] = metadata["total_weights"]  # one bool per weight
    if metadata["method"].startswith("esd"):
        state["frozen_copy"] = trained
    return state


def artifact_sizes(folder: str) -> dict:
    """Bytes of every file of the output folder, by relative path."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def run_one(args: argparse.Namespace) -> dict:
    """One method through erase-concept's code path (erase.api.run) in this process; returns its
    measurements."""
    from erase.api import run
    from erase.cli.concept import build_parser, config_from_args
    from erase.methods import get_method

    device = torch.device(args.device)
    work = tempfile.mkdtemp(prefix="bench-scale-")
    # the artifact (3.4 GB at SD scale) and the generated data go when the process ends
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    flags = [
        "--model", args.model, "--concept", "nudity", "--method", args.method,
        "--num-forget", str(args.num_images), "--num-retain", str(args.num_images),
        "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--resolution", str(args.resolution), "--gen-steps", "2",
        "--mixed-precision", args.mixed_precision, "--optimizer", args.optimizer,
        "--output", os.path.join(work, "out"), "--cache-dir", os.path.join(work, "data"),
    ]  # fmt: skip
    flags += args.extra
    config = config_from_args(build_parser().parse_args(flags))
    memory = PhaseMemory(device)
    memory.start()
    result = run(config, on_phase=memory.on_phase)
    memory.stop()
    metadata = result.metadata
    if metadata["closed_form"]:
        return closed_form_report(args, memory, result)
    backend, train_result = result.backend, metadata["train_result"]
    state = train_result.get("state_bytes") or estimated_state(backend, metadata)
    state = dict(state)
    method = get_method(args.method)
    frozen = sum(module_bytes(module) for module in backend.frozen_modules())
    off_device = {}  # waiting in a file (CPU) or host memory (GPU) through mask and training
    if method.trains_text_encoder:  # state_bytes' weights are the encoder's; the UNet serves it
        state["weights"] += module_bytes(backend.unet)
        state["encoders"] = module_bytes(backend.pipe.vae)
    elif method.runs_text_encoder:  # FMN's textual inversion: the encoders stay
        state["encoders"] = frozen
    else:
        off_device["encoders"] = frozen
    state["total"] = sum(state.values())
    step_seconds = train_result.get("step_seconds") or [
        metadata["timings_s"]["train"] / train_result["steps"]
    ]
    report = {
        "method": args.method,
        "device": str(device),
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "micro_batch_size": train_result.get("micro_batch_size"),
        "mixed_precision": args.mixed_precision,
        "optimizer": args.optimizer,
        "steps": args.steps,
        "extra_flags": args.extra,
        "state_measured": bool(train_result.get("state_bytes")),
        "peak_mb": memory.report(),
        "peak_rss_mb": round(max(rss for _, rss in memory.samples) / 2**20, 1),
        "state_mb": {k: round(v / 2**20, 1) for k, v in state.items()},
        "off_device_mb": {k: round(v / 2**20, 1) for k, v in off_device.items()},
        "seconds_per_step": [round(s, 2) for s in step_seconds],
        "timings_s": metadata["timings_s"],
        "artifact_bytes": artifact_sizes(result.output),
        "changed_weights": metadata["changed_weights"],
        "total_weights": metadata["total_weights"],
    }
    if device.type == "cuda":
        report["peak_cuda_mb"] = max(v.get("cuda_mb", 0) for v in report["peak_mb"].values())
    counted = breakdown(
        args.arch, [args.method], breakdown_resolution(args), args.optimizer, mask_offload(args)
    )
    report["breakdown"] = counted[args.method]
    return report


def closed_form_report(args: argparse.Namespace, memory, result) -> dict:
    """A closed-form method's measurements (UCE): the edit's seconds and every phase's peak."""
    metadata = result.metadata
    report = {
        "method": args.method,
        "device": str(args.device),
        "closed_form": True,
        "extra_flags": args.extra,
        "edit_s": metadata["edit_s"],
        "peak_mb": memory.report(),
        "peak_rss_mb": round(max(rss for _, rss in memory.samples) / 2**20, 1),
        "timings_s": metadata["timings_s"],
        "edit_result": metadata["edit_result"],
        "artifact_bytes": artifact_sizes(result.output),
        "changed_weights": metadata["changed_weights"],
        "total_weights": metadata["total_weights"],
    }
    if torch.device(args.device).type == "cuda":
        report["peak_cuda_mb"] = max(v.get("cuda_mb", 0) for v in report["peak_mb"].values())
    report["breakdown"] = breakdown(args.arch, [args.method], breakdown_resolution(args))[
        args.method
    ]
    return report


def peak_mb(report: dict) -> float:
    """The run's peak: the CUDA allocator's on a GPU, the resident set's on the CPU."""
    return report.get("peak_cuda_mb") or report["peak_rss_mb"]


def activation_projection(report: dict, batch: int) -> dict:
    """Activation bytes per sample (the train phase's peak above its starting memory and the
    state training creates: gradients and moments), and the projected total for `batch` samples:
    the whole state plus `batch` times that. An upper bound: whatever else the train phase holds
    (allocator slack, per-parameter temporaries) counts as activations."""
    train = report["peak_mb"]["train"]
    created = report["state_mb"].get("gradients", 0) + report["state_mb"].get("optimizer", 0)
    start, peak = train["start_rss_mb"], train["rss_mb"]
    if "cuda_mb" in train:
        start, peak = train["start_cuda_mb"], train["cuda_mb"]
    per_sample = (peak - start - created) / report["batch_size"]
    return {
        "activation_mb_per_sample": round(per_sample, 1),
        f"projected_total_mb_batch_{batch}": round(
            report["state_mb"]["total"] + batch * per_sample
        ),
    }


def phase_peak_mb(report: dict, phase: str) -> float:
    """A phase's peak: the CUDA allocator's on a GPU, the resident set's on the CPU."""
    peaks = report["peak_mb"].get(phase, {})
    return peaks.get("cuda_mb") or peaks.get("rss_mb", 0.0)


def slope_projection(small: dict, large: dict, batch: int) -> dict:
    """The peak at `batch` samples from runs at two batch sizes. The phases whose work grows with
    the batch (the mask's gradient, training) are projected from their own slope: the difference
    of their peaks over the difference of the batches, so that what does not grow with the batch
    cancels; the other phases (data, grid, write) keep their measured peak."""
    extra = large["batch_size"] - small["batch_size"]
    per_sample, projected = {}, {}
    for phase in small["peak_mb"]:
        low, high = phase_peak_mb(small, phase), phase_peak_mb(large, phase)
        if phase in ("mask", "train") and low:
            per_sample[phase] = round((high - low) / extra, 1)
            projected[phase] = round(low + (batch - small["batch_size"]) * per_sample[phase])
        elif low or high:
            projected[phase] = round(max(low, high))
    return {
        "batches_measured": [small["batch_size"], large["batch_size"]],
        "peaks_mb": [peak_mb(small), peak_mb(large)],
        "activation_mb_per_sample": per_sample,
        f"projected_phase_peaks_mb_batch_{batch}": projected,
        f"projected_peak_mb_batch_{batch}": max(projected.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="salun,esd-u,fmn")
    parser.add_argument("--arch", default="sd", choices=["sd", "sdxl"], help="model shape")
    parser.add_argument(
        "--breakdown-resolution", type=int, default=None, help="default: 512 sd, 1024 sdxl"
    )
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--optimizer", default="adam", choices=["adam", "adam8bit"], help="erase-concept's"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--num-images", type=int, default=None, help="default: max(2, batch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="default: the cached v1.4-shaped folder")
    parser.add_argument(
        "--project-batch", type=int, default=8, help="project the total for this batch size"
    )
    parser.add_argument(
        "--harden",
        default="",
        help="also run each method with each of these --harden techniques (comma-separated; "
        "a technique's own flags may follow its name: 'meta --meta-steps 5,perturb')",
    )
    parser.add_argument(
        "--slope-batch",
        type=int,
        default=None,
        help="also run each method at this batch size and project from the two peaks' slope",
    )
    # erase-concept flags after `--` go to every run (e.g. `-- --fmn-ti-steps 0`)
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.num_images = args.num_images or max(2, args.batch_size)
    args.extra = list(passthrough)
    if args.micro_batch_size:
        args.extra += ["--micro-batch-size", str(args.micro_batch_size)]
    if args.no_gradient_checkpointing:
        args.extra.append("--no-gradient-checkpointing")
    if args.method:
        print("BENCH-JSON " + json.dumps(run_one(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scale.py: --device cuda but no CUDA GPU is visible")
    reports = not_run_reports(args)  # counted only; args.methods keeps the methods that fit
    if not args.methods:
        print(json.dumps(reports, indent=2))
        return
    args.model = args.model or model_folder(args.arch)
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        (build_sdxl_shaped if args.arch == "sdxl" else build_sd14_shaped)(args.model)
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    for method in args.methods.split(","):
        reports[method] = run_child(args, method, env, args.batch_size)
        if "error" in reports[method] or reports[method].get("closed_form"):
            continue  # a closed-form edit has no activations to project
        reports[method]["projection"] = activation_projection(reports[method], args.project_batch)
        if args.slope_batch:
            large = run_child(args, method, env, args.slope_batch)
            reports[method][f"batch_{args.slope_batch}"] = large
            if "error" not in large:
                reports[method]["slope_projection"] = slope_projection(
                    reports[method], large, args.project_batch
                )
        for technique in filter(None, (spec.strip() for spec in args.harden.split(","))):
            hardened = run_child(
                args, method, env, args.batch_size, ["--harden", *technique.split()]
            )
            reports[f"{method} --harden {technique}"] = hardened
            if "error" not in hardened:
                hardened["harden_cost"] = harden_cost(reports[method], hardened)
    print(json.dumps(reports, indent=2))


def harden_cost(plain: dict, hardened: dict) -> dict:
    """A hardened run's peak memory and median seconds per step over the plain run's."""

    def median_step(report: dict) -> float:
        seconds = sorted(report["seconds_per_step"])
        return seconds[len(seconds) // 2]

    def mean_step(report: dict) -> float:  # a technique that acts every N steps shows here
        return round(sum(report["seconds_per_step"]) / len(report["seconds_per_step"]), 2)

    return {
        "peak_ratio": round(peak_mb(hardened) / peak_mb(plain), 3),
        "step_seconds_ratio": round(median_step(hardened) / median_step(plain), 3),
        "mean_step_seconds_ratio": round(mean_step(hardened) / mean_step(plain), 3),
        "peak_mb": [peak_mb(plain), peak_mb(hardened)],
        "median_step_s": [median_step(plain), median_step(hardened)],
        "mean_step_s": [mean_step(plain), mean_step(hardened)],
    }


def run_child(
    args: argparse.Namespace, method: str, env: dict, batch_size: int, extra: list[str] = ()
) -> dict:
    """One method at `batch_size` in a fresh process, with erase-concept flags `extra` after
    those given after `--`; its report, or {"error": last line}."""
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # erase-concept flags after `--`
    flags = [*argv[:cut], "--method", method, "--batch-size", str(batch_size)]
    flags += ["--model", args.model, "--num-images", str(max(args.num_images, batch_size))]
    passthrough = [*argv[cut:], *extra]
    if passthrough and passthrough[0] != "--":
        passthrough.insert(0, "--")
    command = [sys.executable, __file__, *flags, *passthrough]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH-JSON ")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1].removeprefix("BENCH-JSON "))


if __name__ == "__main__":
    main()
