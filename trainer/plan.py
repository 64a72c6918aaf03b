"""`flashdmd plan`: the per-GPU memory budget of a job spec, counted on the meta device.

Parameters are counted from the teacher's real configs (only the `config.json` files are read; networks are
built under `accelerate.init_empty_weights`, so no weights are loaded or allocated). Bytes follow what the
trainer does with each network:

- trainable nets (generator, fake score, D heads or DMD2's latent head): fp32 weights and optimiser states
  (trainer.optim's sizes); `train.sharding: fsdp` divides the two denoisers' by the GPU count (the heads stay
  DDP replicas);
- frozen nets: the teacher UNet (bf16 under bf16 mixed precision, as the Distiller casts it), the VAE (fp32),
  the text encoders (fp32; none with memory.text_cache), the SAM encoder (fp32), and for stage 2 the reference
  policy (fp32, or bf16 with memory.ref_bf16) and the reward model (fp32, or bf16 with memory.reward_bf16);
- the phase of an iteration that holds the most (generator, fake-score or RL update): that network's gradients
  (accumulated over train.grad_accum micro-batches), its activations (trainer/plan_act.py, from shapes), the
  tensors kept across the micro-batches, and under FSDP the unsharded units (trainer/plan_dist.py);
- DDP's gradient buckets (trainer/plan_dist.py) for every DDP-wrapped network on several GPUs;
- a margin: the CUDA context (outside torch's allocator) and the measured reserved/allocated ratio.
`flashdmd plan --trace` checks these rows against a trace of the real iteration (trainer/trace.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.errors import InputError
from trainer.plan_nets import Arch, Net, count, latent_head_net, load_arch, lora_params

GIB = 2.0**30
CUDA_CONTEXT_GIB = 0.6  # CUDA context + cuBLAS/cuDNN workspaces: not in torch's counters
# Peak reserved / peak allocated of torch's caching allocator. The only measurement of the flash trainer on a
# GPU: 108.80 / 89.22 GiB = 1.22 (H200, SDXL stage 1, foreach AdamW, bench/results/train_step_gpu.json, run of
# 2026-11-26, result "flash-ttur1"); dmd2 measured 90.27 / 84.56 = 1.07 in the same run. The plan takes the
# flash figure, the larger one.
RESERVED_RATIO = 1.22


# -------------------------------------------------------------------- the budget
@dataclass
class Row:
    component: str
    params: int  # elements counted (0 for estimates)
    bytes: float  # per GPU
    note: str = ""
    kind: str = "state"  # state (held all run) | peak (held during the peak phase) | margin


@dataclass
class Plan:
    title: str
    gpus: int
    gpu_mem_gib: float
    rows: list[Row]
    peak_phase_bytes: float = 0.0  # what the heaviest phase of an iteration holds beside the state rows
    peak_phase: str = ""

    def total(self) -> float:
        """Peak allocated bytes: everything held all run, plus the heaviest update's phase."""
        return sum(r.bytes for r in self.rows if r.kind == "state") + self.peak_phase_bytes

    @property
    def peak_allocated_gib(self) -> float:
        return self.total() / GIB

    @property
    def reserved_gib(self) -> float:
        """Predicted peak reserved by torch's allocator."""
        return self.peak_allocated_gib * RESERVED_RATIO

    @property
    def needed_gib(self) -> float:
        return self.reserved_gib + CUDA_CONTEXT_GIB

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.gpu_mem_gib

    def figures(self) -> dict[str, float]:
        """Bytes by row name (the tests compare these with measured tensors)."""
        return {r.component: r.bytes for r in self.rows}


def make_plan(spec: Any, *, gpus: int | None = None, gpu_mem_gib: float = 80.0, arch: Arch | None = None) -> Plan:
    """The per-GPU budget of a validated distill or rl spec on `gpus` GPUs (default train.num_processes)."""
    from trainer.optim import adamw_state_bytes
    from trainer.plan_act import (
        denoiser_graph_bytes,
        disc_nets,
        precision_scale,
        sam_graph_bytes,
        text_bytes,
        vae_decode_graph_bytes,
    )
    from trainer.plan_dist import DDP_GRADIENT_AS_BUCKET_VIEW, fsdp_gather_bytes, shard_units

    if spec.kind not in ("distill", "rl"):
        raise InputError(f"kind: {spec.kind} jobs train nothing; plan a distill or rl spec")
    arch = arch or load_arch(spec.model.teacher, spec.model.revision)
    t, m = spec.train, spec.memory
    n = gpus or t.num_processes
    shard = n if t.sharding == "fsdp" else 1
    bf16 = t.mixed_precision == "bf16"
    den = arch.denoiser
    den_cfg = dict(den.config)
    vae_scale = 2 ** (len(arch.configs["vae"]["block_out_channels"]) - 1)
    res = spec.model.resolution or int(den_cfg["sample_size"]) * vae_scale
    latent = res // vae_scale
    lora = spec.model.lora
    kind = spec.optim.optimizer

    # trainable nets: weights, gradients, optimiser states (the denoisers sharded under fsdp)
    trainable: list[Net] = []
    for name in ("generator", "fake_score"):
        net = count(name, den)
        if lora is not None:
            from trainer.models import LORA_TARGETS

            targets = lora.target_modules or LORA_TARGETS["transformer" if "transformer" in arch.nets else "unet"]
            extra = lora_params(den, lora.rank, targets)
            net = Net(name, net.sizes + extra, extra, net.buffers)
        else:
            net.trainable = list(net.sizes)
        trainable.append(net)
    sam = sam_enc = None
    use_gan = bool(spec.distill.gan_weight) and spec.data.has_real_images
    if use_gan and spec.distill.mode == "flash":
        sam, heads, sam_enc = disc_nets(spec)
        trainable.append(heads)
    elif use_gan:
        trainable.append(latent_head_net(arch, latent))
    # FSDP shards the two denoisers only; the D heads / latent head stay DDP replicas (trainer/distill.py).
    split = {net.name: (shard if net.name in ("generator", "fake_score") else 1) for net in trainable}
    ddp_nets = [net for net in trainable if n > 1 and split[net.name] == 1]
    rows: list[Row] = []

    def sh(net: Net) -> str:
        return f" / {split[net.name]} (fsdp)" if split[net.name] > 1 else ""

    for net in trainable:
        rows.append(Row(f"{net.name} weights", net.params, (4 * net.params + 4 * net.buffers) / split[net.name],
                        f"fp32{sh(net)}"))
    opt_note = {"adamw": "AdamW fp32 2x4 B", "adamw8bit": "8-bit AdamW 2x1 B + absmax"}[kind]
    for net in trainable:
        rows.append(Row(f"{net.name} optimiser", net.trainable_params,
                        adamw_state_bytes(net.trainable, kind) / split[net.name], opt_note + sh(net)))
    if spec.kind == "rl" and m.rl_optimizer == "separate":
        g = trainable[0]
        rows.append(Row("rl optimiser (generator)", g.trainable_params, adamw_state_bytes(g.trainable, kind) / shard,
                        opt_note + " (memory.rl_optimizer: separate)" + sh(g)))
    for net in ddp_nets:  # trainer/plan_dist.py: the Reducer's buckets, held all run
        view = DDP_GRADIENT_AS_BUCKET_VIEW
        rows.append(Row(f"{net.name} DDP gradient buckets", net.trainable_params, 4 * net.trainable_params,
                        "fp32, the gradients are views into them" if view else "fp32, beside a .grad copy"))

    # frozen nets
    rows.append(Row(f"teacher {'unet' if 'unet' in arch.nets else 'transformer'}", sum(count('t', den).sizes),
                    (2 if bf16 else 4) * count("t", den).params, "bf16" if bf16 else "fp32", "state"))
    rows.append(Row("vae", count("v", arch.nets["vae"]).params, 4 * count("v", arch.nets["vae"]).params, "fp32"))
    te = [k for k in arch.nets if k.startswith("text_encoder")]
    te_params = sum(count(k, arch.nets[k]).params for k in te)
    rows.append(Row("text encoders", te_params, 0 if m.text_cache else 4 * te_params,
                    "cached: on the CPU (memory.text_cache)" if m.text_cache else f"fp32 ({len(te)})"))
    if sam is not None:
        rows.append(Row("sam encoder", sam.params, 4 * sam.params, "fp32, frozen"))
    if spec.kind == "rl":
        g = trainable[0]
        rows.append(Row("reference policy p_ref", g.params, (2 if m.ref_bf16 else 4) * g.params,
                        "bf16 (memory.ref_bf16)" if m.ref_bf16 else "fp32 copy of G"))
        if spec.rl.reward.kind == "lrm":
            r_params = count("r", den).params + te_params
            rows.append(Row("reward model (LRM)", r_params, (2 if m.reward_bf16 else 4) * r_params,
                            "unet + text encoders, " + ("bf16 (memory.reward_bf16)" if m.reward_bf16 else "fp32")))

    # The phases of an iteration (Distiller.step): each network's update runs over all micro-batches, and its
    # gradients live from its first backward to its optimiser step (zero_grad(set_to_none) then frees them),
    # so only the running phase's network holds gradients. One micro-batch: backward frees the graph as the
    # gradients fill in, max(activations, gradients + the net's own graph). Later micro-batches add that to the
    # gradients already held. A net called twice with grad in one loss (flash: x = G(x_tau) and Eq. 9's G at
    # t_hat) gets a second full set: autograd sums both uses' contributions in buffers before accumulating.
    b, ckpt, accum = t.batch_size, t.gradient_checkpointing, t.grad_accum
    act = precision_scale(t.mixed_precision)  # the UNet and SAM graph estimates are counted under autocast
    rank = lora.rank if lora is not None else None  # SD3's MMDiT keeps less with LoRA (plan_act.mmdit_graph_bytes)
    g_graph = denoiser_graph_bytes(den_cfg, latent, b, ckpt, t.mixed_precision, rank)
    gen_acts = {"generator graphs": 2 * g_graph if use_gan else g_graph}
    if sam_enc is not None:
        gen_acts["vae decode graph"] = precision_scale(t.mixed_precision, vae=True) * vae_decode_graph_bytes(arch.configs["vae"], latent, b,
                                                                    m.vae_decode_checkpointing)
        gen_acts["sam encoder graph"] = act * sam_graph_bytes(sam_enc, list(spec.distill.discriminator.blocks), b,
                                                              ckpt, m.sam_sdpa)
    twice = sam_enc is not None
    phases: dict[str, tuple[dict[str, float], Net, float, int, bool]] = {
        "generator phase": (gen_acts, trainable[0], g_graph, accum, twice),
        "fake-score phase": ({"fake-score graph": g_graph}, trainable[1], g_graph, accum, False)}
    if spec.kind == "rl":
        pairs = (spec.rl.batch_size or b) * len(spec.rl.timesteps)
        p_graph = denoiser_graph_bytes(den_cfg, latent, pairs, ckpt, t.mixed_precision, rank)
        phases["rl update"] = ({"policy graph (pairs)": p_graph}, trainable[0], p_graph, 1, False)

    def grad_bytes(net: Net, micro: int) -> float:
        if net in ddp_nets and DDP_GRADIENT_AS_BUCKET_VIEW:
            return 0.0  # the gradients are the buckets (a state row)
        if split[net.name] > 1 and micro > 1:
            return 4.0 * net.trainable_params  # FSDP2 accumulates unsharded until the synchronising micro-batch
        return 4.0 * net.trainable_params / split[net.name]

    def second_set(net: Net, two: bool) -> float:
        # A net used twice in one loss with grad (Eq. 9): autograd sums both uses' contributions in buffers of
        # the whole net before accumulating. FSDP2 converts a unit's gradient as its backward ends, so the sum
        # stays per unit (the trace of sdxl-4step-8gpu shows no second set).
        return 4.0 * net.trainable_params if two and split[net.name] == 1 else 0.0

    def phase_bytes(acts: dict[str, float], net: Net, own: float, micro: int, two: bool) -> float:
        grads = grad_bytes(net, micro)
        if micro == 1:
            return max(sum(acts.values()), grads + own)
        return grads + max(sum(acts.values()), second_set(net, two) + own)

    name, (acts, net, own, micro, two) = max(phases.items(), key=lambda kv: phase_bytes(*kv[1]))
    peak = phase_bytes(acts, net, own, micro, two)
    if grad_bytes(net, micro):
        note = ("fp32, held across train.grad_accum micro-batches" if micro > 1 else "fp32")
        note += ", unsharded until the sync (fsdp)" if split[net.name] > 1 and micro > 1 else sh(net)
        rows.append(Row(f"{net.name} gradients", net.trainable_params, grad_bytes(net, micro),
                        f"{note}, in the {name}", "peak"))
    for comp, nbytes in acts.items():
        rows.append(Row(f"activations: {comp}", 0, nbytes, f"estimate, batch {b} at {res}²", "peak"))
    if micro > 1 and second_set(net, two) and second_set(net, two) + own > sum(acts.values()):
        rows.append(Row(f"{net.name} gradient buffers", net.trainable_params, 4.0 * net.trainable_params,
                        "fp32: the two uses' contributions, summed before they accumulate", "peak"))
    # Held through the whole iteration (Distiller.step builds every micro-batch first): the real images, the
    # detached generator latents x, the decoded fakes for D (bf16 under autocast) and the text conditioning.
    c_lat = int(den_cfg.get("in_channels", 4))
    per_sample = c_lat * latent * latent * 4 + text_bytes(den_cfg)
    if sam_enc is not None:
        per_sample += 3 * res * res * (4 + (2 if bf16 else 4))
    kept = float(accum * b * per_sample)
    rows.append(Row("kept across micro-batches", 0, kept, f"{accum} x batch {b}: latents x, conditioning"
                    + (", real images, decoded fakes" if sam_enc is not None else ""), "peak"))
    peak += kept
    if shard > 1:
        gather, gnote = fsdp_gather_bytes(net.params if split[net.name] > 1 else 0, shard_units(den), 2 if bf16 else 4)
        rows.append(Row("FSDP unsharded (gathered) weights", 0, gather, gnote, "peak"))
        peak += gather
    title = (f"{spec.name or spec.kind} ({spec.kind}, {arch.family}) on {n} GPU{'s' if n > 1 else ''} x "
             f"{gpu_mem_gib:g} GiB, sharding {t.sharding}, {t.mixed_precision}, optimizer {kind}, "
             f"batch {b} x grad_accum {t.grad_accum} x {n} = {b * t.grad_accum * n} at {res}²")
    plan = Plan(title, n, gpu_mem_gib, rows, peak, name)
    rows.append(Row("allocator slack", 0, plan.reserved_gib * GIB - plan.total(),
                    f"reserved = allocated x {RESERVED_RATIO} (measured)", "margin"))
    rows.append(Row("CUDA context", 0, CUDA_CONTEXT_GIB * GIB, "outside torch's counters", "margin"))
    return plan


def format_plan(plan: Plan) -> str:
    unit, div = ("GiB", GIB) if plan.total() >= GIB else ("MiB", 2.0**20)  # tiny models read in MiB
    lines = [f"# {plan.title}", "",
             f"| component | params (M) | {unit} / GPU | note |", "|---|---:|---:|---|"]
    for r in plan.rows:
        params = f"{r.params / 1e6:,.1f}" if r.params else ""
        lines.append(f"| {r.component} | {params} | {r.bytes / div:.2f} | {r.note} |")
    lines += ["", f"- peak phase: the {plan.peak_phase}: gradients, activations and kept tensors = "
              f"{plan.peak_phase_bytes / GIB:.2f} GiB",
              f"- peak allocated (weights, states, frozen nets + peak phase): **{plan.peak_allocated_gib:.1f} GiB**",
              f"- peak reserved (allocator): {plan.reserved_gib:.1f} GiB; with the CUDA context: "
              f"**{plan.needed_gib:.1f} GiB of {plan.gpu_mem_gib:g}**",
              f"- verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}"
              + ("" if plan.fits else " (levers: optim.optimizer adamw8bit, memory.*, train.sharding fsdp, "
                 "model.lora, train.batch_size)")]
    return "\n".join(lines)
