"""Hires: SD / SDXL beyond the training size, windows over the ranks, with asynchronous structure
guidance (ASGDiffusion), in place.

The pipeline's own loop and scheduler run unchanged on every rank, on the whole high-resolution (HR)
latent. What changes is the UNet call, intercepted by `HiresRuntime.unet_call`, which, each step,
1. runs the low-resolution (LR) branch on its rank: one pass over a training-size view of the whole
   image with its own scheduler copy, which yields ε_LR and the normalised cross-attention map M of the
   up-blocks; they are broadcast to every rank (`sync`: mixed in this step; `async`: at the next
   step, so each step mixes in the previous step's guidance and nobody ever waits for the LR pass);
2. denoises this rank's training-size windows of the HR latent and mixes the guidance into each:
   `ε̃ = ε + w_t · M ⊙ (up(ε_LR) − ε)` (M and ε_LR upsampled to the HR grid, then cropped);
3. sums the windows' predictions over the ranks (one all-reduce) and divides by the coverage: the
   overlaps are averaged (MultiDiffusion). Averaging ε equals averaging the windows' next latents,
   because a scheduler step is per-pixel affine in ε.

Structure seeding: the first `structure_fraction` of the steps run the LR branch alone (the HR
latent follows the upsampled LR prediction meanwhile). After them the LR branch's predicted clean
latent, upsampled and re-noised to the next step's noise level with the HR run's own initial noise,
replaces the HR latent (through the step hook), and the windows take over.

The HR latent's windows are balanced over the ranks in units of one UNet pass; the LR pass is one unit
on the last rank (`interleaved`) or that rank's only work (`dedicated`). Checkpoints (`enable_checkpoints`)
save every rank's state every K steps; a resumed run skips the finished steps without computing and
restores the state at the last one, so it gives the same image as an uninterrupted run.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from paragen.comms import Pending, ready
from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.hires import HiresConfig
from paragen.parallel.hires.attention_map import MapRecorder, install_map_processors
from paragen.parallel.hires.guidance import low_res_size, mix, pooled_noise, resize, weight
from paragen.parallel.hires.windows import Assignment, Window, assign, coverage, window_grid
from paragen.parallel.intercept import intercept
from paragen.parallel.partition import check_image_size
from paragen.parallel.step_cache import check_step_cache
from paragen.parallel.steps import StepPlan
from paragen.pipelines.batch_split import repeat_batch
from paragen.pipelines.checkpoint import StepCheckpoints, load_scheduler_state, scheduler_state
from paragen.pipelines.patch.runtime import unet_downsampling
from paragen.pipelines.request_args import check_steps, request_arg, share_generator
from paragen.pipelines.runtime import PipelineRuntime
from paragen.pipelines.scheduler_math import predicted_original
from paragen.pipelines.step_hook import install_step_hook
from paragen.pipelines.vae_decode import ParallelVaeDecoder

LR_SEED = 0x5EED  # the LR branch's own generator (only stochastic schedulers draw from it)


@dataclass
class Guidance:
    """The LR branch's output of one step: ε_LR `[N, C, h, w]` (the UNet's raw batch) and M `[B, 1, h, w]`."""

    step: int
    eps: torch.Tensor
    mask: torch.Tensor


@dataclass
class Layout:
    """One request's geometry: the HR and LR latent sizes, the windows and who denoises which."""

    rows: int
    cols: int
    lr_size: tuple[int, int]
    windows: list[Window]
    assignment: Assignment
    coverage: torch.Tensor
    tokens: slice


@dataclass
class HiresRuntime(PipelineRuntime):
    """What `parallelize` attaches to a pipeline in hires mode as `pipe.paragen`."""

    hires: HiresConfig = field(default_factory=HiresConfig)
    window: int = 64
    unet_factor: int = 8
    recorder: MapRecorder = field(default_factory=MapRecorder)
    unet_forward: Any = None  # the UNet's own forward
    checkpoints: StepCheckpoints | None = None
    trace: list[tuple[int, int]] = field(default_factory=list)  # (HR step, LR step whose guidance it used)
    # per request
    layout: Layout | None = None
    seed_step: int = 0
    noise: torch.Tensor | None = None
    lr_scheduler: Any = None
    lr_latent: torch.Tensor | None = None
    lr_generator: torch.Generator | None = None
    guidance: Pending[Guidance] | None = None
    x0_lr: torch.Tensor | None = None
    generator: Any = None

    @property
    def comm(self):
        """The ranks sharing the windows."""
        return self.mesh.group("patch")

    @property
    def owns_lr(self) -> bool:
        return self.comm.rank == self.layout.assignment.lr_rank

    def enable_checkpoints(self, checkpoints: StepCheckpoints) -> None:
        """Save every rank's state as `checkpoints` says, and continue from its resume step (checked, with
        the folder, before any collective: `StepCheckpoints.open`)."""
        self.checkpoints = checkpoints

    # ---- the request ---------------------------------------------------------------------------
    def check_step_cache(self, config) -> None:
        check_step_cache(config, self.hires)

    def prepare_call(self, pipe, bound: inspect.BoundArguments) -> None:
        """Check the request and lay out the windows on every rank before any collective."""
        vae_factor = pipe.vae_scale_factor
        trained = pipe.unet.config.sample_size * vae_factor
        height, width = request_arg(bound, "height") or trained, request_arg(bound, "width") or trained
        check_steps(bound)
        check_image_size(height, width, vae_factor=vae_factor, unet_factor=1, patch=1, decode_parts=1)
        if min(height, width) < self.window * vae_factor:
            raise ValueError(f"hires needs a size of at least the window ({self.window * vae_factor} px on each "
                             f"side); got {height}x{width} (for smaller images run without --hires)")
        rows, cols = height // vae_factor, width // vae_factor
        windows = window_grid(rows, cols, self.window, self.hires.stride or max(1, self.window // 2))
        self.layout = Layout(
            rows, cols, low_res_size(rows, cols, self.window, self.unet_factor), windows,
            assign(len(windows), self.comm.size, self.hires.placement), coverage(rows, cols, windows, pipe.device),
            _prompt_tokens(pipe, request_arg(bound, "prompt")),
        )
        install_step_hook(pipe.scheduler, lambda latents: self.on_step_end(pipe, latents))
        share_generator(bound, self.mesh.group("world"))
        self.generator = request_arg(bound, "generator")

    def begin_request(self) -> None:
        super().begin_request()
        self.trace, self.guidance, self.x0_lr, self.noise = [], None, None, None

    def capture_noise(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        """`prepare_latents`' result passes here: keep the HR run's unit initial noise."""
        self.noise = latents / sigma
        return latents

    # ---- the UNet call ---------------------------------------------------------------------------
    def unet_call(self, pipe, forward, *args, **kwargs):
        """The HR noise prediction of one step: LR branch, guided windows, overlaps averaged."""
        self.unet_forward = forward
        args, kwargs = list(args), dict(kwargs)
        sample = args.pop(0) if args else kwargs.pop("sample")
        timestep = args.pop(0) if args else kwargs.pop("timestep")
        return_dict = kwargs.pop("return_dict", True)
        self.start_step(pipe)
        self.plan.begin_step()
        step = self.plan.step
        if step == 0:
            self._start_lr(pipe)
        if self.checkpoints is not None and self.checkpoints.skipped(step):  # restored at its last step
            eps = torch.zeros_like(sample)
        elif step < self.seed_step:
            guide = self._lr_step(pipe, step, timestep, args, kwargs, sample.shape[0], stale=False).wait()
            self.guidance = ready(guide)  # what an async first HR step mixes in
            eps = resize(guide.eps, sample.shape[-2:])
        else:
            eps = self._hr_step(pipe, step, sample, timestep, args, kwargs)
        self.record_step()
        if return_dict:
            return UNet2DConditionOutput(sample=eps)
        return (eps,)

    def _start_lr(self, pipe) -> None:
        """At the request's first step: the LR branch's scheduler copy, latent and generator."""
        total = self.plan.total_steps
        self.seed_step = min(round(self.hires.structure_fraction * total), total - 1)
        if self.noise is None:
            raise ValueError("hires needs the pipeline to create its latents with prepare_latents")
        self.lr_scheduler = copy.deepcopy(pipe.scheduler)
        self.lr_latent = pooled_noise(self.noise, self.layout.lr_size) * self.lr_scheduler.init_noise_sigma
        self.lr_generator = torch.Generator(device=self.noise.device).manual_seed(LR_SEED)

    def _lr_step(self, pipe, step: int, timestep, args: list, kwargs: dict, batch: int, stale: bool) -> Pending[Guidance]:
        """Run the LR pass of `step` on its rank and start broadcasting it (on the stale group if `stale`)."""
        layout = self.layout
        channels = pipe.unet.config.out_channels
        eps = torch.empty(batch, channels, *layout.lr_size, dtype=self.noise.dtype, device=self.noise.device)
        cfg = pipe.do_classifier_free_guidance
        mask = torch.zeros(batch // 2 if cfg else batch, 1, *layout.lr_size, dtype=eps.dtype, device=eps.device)
        seeding = step == self.seed_step - 1
        x0 = torch.empty(mask.shape[0], channels, *layout.lr_size, dtype=eps.dtype, device=eps.device) if seeding else None
        if self.owns_lr:
            eps, mask, x0_now = self._lr_pass(pipe, timestep, args, kwargs, cfg, seeding)
            x0 = x0_now if seeding else None
        parts = [eps, mask] + ([x0] if seeding else [])
        sent = self.comm.broadcast_async(torch.cat([p.reshape(-1) for p in parts]), self.layout.assignment.lr_rank,
                                         "hires.guidance", stale=stale)

        def unpack() -> Guidance:
            pieces = [piece.view_as(p) for piece, p in zip(torch.split(sent.wait(), [p.numel() for p in parts]), parts)]
            if seeding:
                self.x0_lr = pieces[2]
            return Guidance(step, pieces[0], pieces[1])

        return Pending([], unpack)

    def _lr_pass(self, pipe, timestep, args: list, kwargs: dict, cfg: bool, seeding: bool):
        """One step of the LR branch (its owner only): ε_LR, M, and x̂0 when the HR latent is seeded next."""
        sched, latent = self.lr_scheduler, self.lr_latent
        model_input = sched.scale_model_input(torch.cat([latent] * 2) if cfg else latent, timestep)
        record = self.hires.guidance_weight > 0
        if record:
            half = latent.shape[0]
            self.recorder.start(self.layout.lr_size, self.layout.tokens, slice(half, 2 * half) if cfg else slice(None))
        with self.cache_site("low-resolution"):
            eps = self.unet_forward(model_input, timestep, *args, return_dict=False, **kwargs)[0]
        mask = self.recorder.stop() if record else latent.new_zeros(latent.shape[0], 1, *latent.shape[-2:])
        guided = eps
        if cfg:
            uncond, cond = eps.chunk(2)
            guided = uncond + pipe.guidance_scale * (cond - uncond)
        x0 = predicted_original(sched, latent, guided, timestep) if seeding else None
        step_kwargs = {"generator": self.lr_generator} if "generator" in inspect.signature(sched.step).parameters else {}
        self.lr_latent = sched.step(guided, timestep, latent, return_dict=False, **step_kwargs)[0]
        return eps, mask.to(eps.dtype), x0

    def _hr_step(self, pipe, step: int, sample: torch.Tensor, timestep, args: list, kwargs: dict) -> torch.Tensor:
        """Guided windows of this rank, summed over the ranks, divided by the coverage.

        The guidance enters only at the windows' outputs, so every rank denoises its windows first and
        waits for the guidance after them: in `sync` the LR pass of this step overlaps the windows of
        the other ranks, and the wait is for whatever of it is left; `async` does not wait at all."""
        total, asynchronous = self.plan.total_steps, self.hires.guidance == "async"
        batch = sample.shape[0]
        if asynchronous and self.guidance is not None:
            guidance = self.guidance
        else:  # sync, or an async request's first step with nothing earlier to use
            guidance = self._lr_step(pipe, step, timestep, args, kwargs, batch, stale=False)
        if asynchronous and step + 1 < total:  # the next step's guidance, computed now, used then
            self.guidance = self._lr_step(pipe, step, timestep, args, kwargs, batch, stale=True)
        layout = self.layout
        mine = [layout.windows[i] for i in layout.assignment.windows[self.comm.rank]]
        predictions = []
        for first in range(0, len(mine), self.hires.window_batch):
            group = mine[first : first + self.hires.window_batch]
            call_args, call_kwargs = repeat_batch(args, kwargs, batch, len(group))
            crops = torch.cat([win.crop(sample) for win in group])
            with self.cache_site(("windows", first)):
                out = self.unet_forward(crops, timestep, *call_args, return_dict=False, **call_kwargs)[0]
            predictions += zip(group, out.chunk(len(group)))
        guide = guidance.wait()
        self.trace.append((step, guide.step))
        w = weight(step, self.seed_step, total, self.hires.guidance_weight, self.hires.guidance_decay)
        eps_lr = resize(guide.eps, (layout.rows, layout.cols))
        mask = resize(guide.mask, (layout.rows, layout.cols)).repeat(batch // guide.mask.shape[0], 1, 1, 1)
        summed = torch.zeros(sample.shape, dtype=torch.float32, device=sample.device)
        for win, eps in predictions:
            win.crop(summed).add_(mix(eps, win.crop(eps_lr), win.crop(mask), w).float())
        self.comm.all_reduce(summed, "hires.eps")
        return (summed / layout.coverage).to(sample.dtype)

    # ---- step ends: seeding, checkpoints, resume ----------------------------------------------------
    def on_step_end(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """After the scheduler step of step `i`: restore a resumed run, seed the HR latent, save a checkpoint."""
        i, saved = self.plan.step, self.checkpoints
        if saved is not None and saved.restores_after(i):
            latents = self._restore(pipe, latents)
        elif i == self.seed_step - 1 and not (saved is not None and saved.skipped(i)):
            t_next = pipe.scheduler.timesteps[i + 1 : i + 2]
            up = resize(self.x0_lr, latents.shape[-2:])
            latents = pipe.scheduler.add_noise(up, self.noise.to(up.dtype), t_next)
            self.x0_lr = None
        if saved is not None and saved.saves_after(i, self.plan.total_steps):
            saved.save(i, pipe.scheduler, self.generator, latents, **self._own_state())
        return latents

    def _own_state(self) -> dict:
        """What a checkpoint holds beyond the latents, the scheduler and the generator."""
        state: dict[str, Any] = {}
        if self.guidance is not None:
            guide = self.guidance.wait()
            state["guidance"] = {"step": guide.step, "eps": guide.eps, "mask": guide.mask}
        if self.owns_lr:
            state["lr"] = {"latent": self.lr_latent, "scheduler": scheduler_state(self.lr_scheduler),
                           "generator": self.lr_generator.get_state()}
        return state

    def _restore(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        state = self.checkpoints.restore(pipe.scheduler, self.generator)
        if "guidance" in state:
            g = state["guidance"]
            self.guidance = ready(Guidance(g["step"], g["eps"], g["mask"]))
        if self.owns_lr:
            lr = state["lr"]
            self.lr_latent = lr["latent"]
            load_scheduler_state(self.lr_scheduler, lr["scheduler"])
            self.lr_generator.set_state(lr["generator"])
        return state["latents"].to(latents.dtype)


def _prompt_tokens(pipe, prompt) -> slice:
    """The prompt's own tokens (after the start token) whose attention makes the guidance mask."""
    texts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not texts or getattr(pipe, "tokenizer", None) is None:
        return slice(1, None)
    longest = max(len(pipe.tokenizer(text).input_ids) for text in texts)
    limit = pipe.tokenizer.model_max_length
    return slice(1, max(2, min(longest - 1, limit - 1)))


def check(pipe, config: ParallelConfig, options: HiresConfig) -> None:
    """Refuse a window the UNet cannot down-sample, or a stride that leaves gaps."""
    window = options.window or pipe.unet.config.sample_size
    factor = unet_downsampling(pipe.unet)
    if window % factor:
        raise ValueError(f"the hires window ({window} latent pixels) must be a multiple of the UNet's "
                         f"down-sampling factor {factor}")
    if options.stride is not None and options.stride > window:
        raise ValueError(f"hires stride ({options.stride}) is larger than the window ({window}): "
                         "the windows would leave gaps")


def install(pipe, config: ParallelConfig, options: HiresConfig):
    """Make a checked SD or SDXL pipeline generate beyond its training size across the ranks of `config`."""
    mesh = ParallelMesh(config, pipe.device)
    runtime = HiresRuntime(config, mesh, StepPlan(mesh.group("patch"), label_prefix="hires."),
                           ParallelVaeDecoder(pipe.vae, mesh.group("world")),
                           hires=options, window=options.window or pipe.unet.config.sample_size,
                           unet_factor=unet_downsampling(pipe.unet))
    install_map_processors(pipe.unet, options.map_layers, runtime.recorder)
    intercept(pipe.unet, "forward", lambda forward, *a, **k: runtime.unet_call(pipe, forward, *a, **k), tag="hires.unet")
    intercept(pipe, "prepare_latents",
              lambda prepare, *a, **k: runtime.capture_noise(prepare(*a, **k), pipe.scheduler.init_noise_sigma), tag="hires.latents")
    runtime.install(pipe)
    return pipe
