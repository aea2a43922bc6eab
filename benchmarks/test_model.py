"""Whole-model benchmarks: a TubeViT inference step and a training step, the fast model against
plain PyTorch, on a batch of videos and on a mixed image+video batch.

Baselines (same state_dict, each impl with its own copy of the weights and its own optimizer):
  reference      tubevit_fast.reference.model.TubeViT: Conv3d per tube, explicit-softmax attention
  sdpa           the same model with F.scaled_dot_product_attention in every attention (blocks and
                 pooling head): the strongest plain-PyTorch model, eager
  sdpa_compiled  torch.compile of `sdpa` (CUDA only: compiling on a 2-core CPU takes minutes)
  fast           tubevit_fast.TubeViT, backend "auto"

1. test_model_step, a batch of videos:
     inference  model(video) under no_grad (eval mode)
     train      forward + cross-entropy + backward + AdamW step
   CPU: a reduced width (dim 192, depth 2, heads 3 -> head dim 64), PAPER_TUBES, B=1,
   3x32x224x224, fp32, so the whole file stays around a minute. CUDA: the full TubeViT-B
   (dim 768, depth 12, heads 12) at B=8 and B=32 under bf16 autocast.
   Checked once, untimed: every impl's logits and the fast model's gradients == the reference's.

2. test_mixed_batch: one batch mixing images (3x224x224, 196 tokens) and videos (3x32x224x224,
   539 tokens): 4+4 at a small width on CPU, 8+8 TubeViT-B (bf16 autocast) on CUDA; inference
   and a training step as above.
     packed         the fast model on the list: tokens packed without padding, varlen attention
     sdpa_padded    plain PyTorch without varlen attention: the `sdpa` model's Conv3d tokens padded
                    to the longest sample, F.scaled_dot_product_attention with a boolean key-padding
                    mask in every attention (`padded_logits`); padded query rows are computed and
                    discarded (they never reach a valid token: keys are masked)
     sdpa_padded_compiled  torch.compile of that (CUDA only)
   extra_info: token_ratio (padded / packed tokens) and attention_work_ratio
   (B * max N^2 / sum N_i^2). Checked once: packed logits == each sample run alone through the
   reference, and padded logits == packed logits.

The summary rows compare `fast` / `packed` with the strongest plain-PyTorch baseline measured in
the run (the faster of the eager and compiled SDPA models) and give the ratio to the reference
too. extra_info also holds flops (2 x MACs of the linear layers + 4*H*N^2*Dh attention per block,
x3 for backward; tube embedding and head left out) and peak_memory_bytes / peak_memory_method:
the peak of one untimed call after the timed rounds, above the memory allocated before it
(BenchTools.peak_memory: torch.cuda.max_memory_allocated on CUDA, the CPU profiler's allocation
and free events on CPU). Weights and optimizer state are held before the call and not counted,
and a training step's zero_grad frees the previous step's gradients first, so its peak is net of
them. After each fast case the pair (fast, strongest baseline) is re-timed in a shuffled order
per round (BenchTools.interleaved): *_interleaved ratios are the ones to trust on a shared
machine. Nothing asserts on time.

    pytest benchmarks/test_model.py --benchmark-only
"""
from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from tubevit_fast import TubeViT
from tubevit_fast.reference import model as reference

NUM_CLASSES = 400
VIDEO, IMAGE = (3, 32, 224, 224), (3, 224, 224)
STEP = {  # device -> (model kwargs, batches, autocast dtype or None)
    "cpu": ({"dim": 192, "depth": 2, "heads": 3}, [1], None),
    "cuda": ({"dim": 768, "depth": 12, "heads": 12}, [8, 32], torch.bfloat16),
}
MIXED = {  # device -> (model kwargs, images, videos)
    "cpu": ({"dim": 192, "depth": 2, "heads": 3}, 4, 4),
    "cuda": ({"dim": 768, "depth": 12, "heads": 12}, 8, 8),
}
ROUNDS = {"cpu": (8, 1), "cuda": (20, 3)}
INTERLEAVED_ROUNDS = {"cpu": 5, "cuda": 10}  # the shuffled-order cross-check after the fast case
_DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
STEP_CONFIGS = [(d, b) for d in _DEVICES for b in STEP[d.type][1]]
STEPS = ["inference", "train"]


def _autocast(device: torch.device):
    dtype = STEP[device.type][2]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _dtype_label(device: torch.device) -> str:
    amp = STEP[device.type][2]
    return "fp32" if amp is None else f"{str(amp).replace('torch.', '')} autocast"


def encoder_flops(lengths, dim: int, depth: int, heads: int, backward: bool) -> int:
    """2 x MACs of qkv, proj, fc1, fc2 per token plus 4 N^2 dim attention per sample, per block."""
    tokens = sum(lengths)
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim)
    attn = sum(4 * n * n * dim for n in lengths)
    fwd = depth * (linear + attn)
    return 3 * fwd if backward else fwd


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = want.detach().abs().max().item() + 1.0
    err = (got.detach().float() - want.detach().float()).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


# ---- the plain-PyTorch baseline: the reference model with SDPA ----------------------------------

def _sdpa(q, k, v, keep=None):
    """q (B, Nq, H, D), k/v (B, Nk, H, D), keep (B, Nk) bool or None -> (B, Nq, H, D)."""
    mask = None if keep is None else keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class _SDPAAttend:
    def _attend(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        if cu_seqlens_q is not None:
            raise ValueError("the SDPA baseline runs padded batches (padded_logits), not packed ones")
        return _sdpa(q, k, v)


class SDPAAttention(_SDPAAttend, reference.Attention):
    pass


class SDPAAttentionPool(_SDPAAttend, reference.AttentionPoolLatent):
    pass


def sdpa_model(model: reference.TubeViT) -> reference.TubeViT:
    """`model` (a reference TubeViT) with SDPA in every attention, in place."""
    for module in model.modules():
        if type(module) is reference.Attention:
            module.__class__ = SDPAAttention
        elif type(module) is reference.AttentionPoolLatent:
            module.__class__ = SDPAAttentionPool
    return model


def make_models(device: torch.device, kwargs: dict, impls: list[str], compiled_fn=None) -> dict:
    """One model per impl, all with the same initial state_dict. "*_compiled" entries hold
    torch.compile(compiled_fn or the module) of an SDPA model."""
    torch.manual_seed(0)
    ref = reference.TubeViT(num_classes=NUM_CLASSES, **kwargs).to(device)
    models = {}
    for impl in impls:
        if impl in ("fast", "packed"):
            model = TubeViT(num_classes=NUM_CLASSES, **kwargs).to(device)
            model.load_state_dict(ref.state_dict())
        elif impl == "reference":
            model = copy.deepcopy(ref)
        else:
            model = sdpa_model(copy.deepcopy(ref))
        models[impl] = model
    return models


def strongest(bench, key, impls: list[str]) -> tuple[str, float] | tuple[None, None]:
    """The fastest plain-PyTorch SDPA impl of this run (name, median) among those measured."""
    timed = [(bench.baselines[key + (i,)], i) for i in impls if key + (i,) in bench.baselines]
    if not timed:
        return None, None
    median, name = min(timed)
    return name, median


# ---- 1. inference and training step ---------------------------------------------------------

def step_impls(device: torch.device) -> list[str]:
    return ["reference", "sdpa"] + (["sdpa_compiled"] if device.type == "cuda" else []) + ["fast"]


ALL_STEP_IMPLS = ["reference", "sdpa", "sdpa_compiled", "fast"]


class StepProblem:
    def __init__(self, device: torch.device, batch: int):
        kwargs = STEP[device.type][0]
        self.kwargs, self.device, self.batch = kwargs, device, batch
        impls = step_impls(device)
        self.models = make_models(device, kwargs, [i for i in impls if not i.endswith("_compiled")])
        if "sdpa_compiled" in impls:
            self.models["sdpa_compiled"] = torch.compile(sdpa_model(copy.deepcopy(self.models["reference"])))
        gen = torch.Generator().manual_seed(1)
        self.video = torch.randn(batch, *VIDEO, generator=gen).to(device)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
        self.optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in self.models.items()}
        self.tol = 1e-4 if STEP[device.type][2] is None else 5e-2
        self.checked = False

    def inference(self, impl: str):
        model = self.models[impl].eval()
        with torch.no_grad(), _autocast(self.device):
            return model(self.video)

    def train(self, impl: str):
        model, optim = self.models[impl].train(), self.optims[impl]
        optim.zero_grad(set_to_none=True)
        with _autocast(self.device):
            loss = F.cross_entropy(model(self.video).float(), self.labels)
        loss.backward()
        optim.step()
        return loss

    def check(self) -> None:
        """Every impl's logits and the fast model's gradients vs the reference, on copies (the
        timed models' weights and optimizer states are left alone)."""
        if self.checked:
            return
        outs, grads = {}, {}
        for name in ("reference", "fast", "sdpa"):
            model = copy.deepcopy(self.models[name])
            with _autocast(self.device):
                logits = model(self.video)
            F.cross_entropy(logits.float(), self.labels).backward()
            outs[name], grads[name] = logits, dict(model.named_parameters())
        for name in ("fast", "sdpa"):
            _close(f"{name} logits", outs[name], outs["reference"], self.tol)
        for name, p in grads["fast"].items():
            _close(f"grad {name}", p.grad, grads["reference"][name].grad, 10 * self.tol)
        self.checked = True


@functools.cache
def step_problem(device: torch.device, batch: int) -> StepProblem:
    return StepProblem(device, batch)


@pytest.mark.parametrize("config", STEP_CONFIGS, ids=[f"{d.type}-B{b}" for d, b in STEP_CONFIGS])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("impl", ALL_STEP_IMPLS)
def test_model_step(benchmark, bench, config, step, impl):
    device, batch = config
    if impl not in step_impls(device):
        pytest.skip(f"{impl} is not benchmarked on {device.type}")
    p = step_problem(device, batch)
    p.check()
    fn = functools.partial(getattr(p, step), impl)

    timed = bench.synchronized(fn, device)

    kwargs = p.kwargs
    rounds, warmup = ROUNDS[device.type]
    benchmark.group = f"model {step} {device.type} B={batch}"
    n_tokens = p.models["fast"].tube_embed.num_tokens(VIDEO[1:])
    flops = encoder_flops([n_tokens] * batch, kwargs["dim"], kwargs["depth"], kwargs["heads"], step == "train")
    benchmark.extra_info.update(op="model", impl=impl, step=step, device=device.type, batch=batch,
                                autocast=_dtype_label(device), tokens_per_sample=n_tokens,
                                threads=torch.get_num_threads(), **kwargs)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = bench.median_of(benchmark)
    benchmark.extra_info["flops"] = flops
    if median:
        benchmark.extra_info["tflops"] = flops / median / 1e12
    key = ("model", step, device.type, batch)
    peak, method = bench.peak_memory(fn, device, key=key + (impl,))
    benchmark.extra_info.update(peak_memory_bytes=peak, peak_memory_method=method)
    if impl != "fast":
        bench.record_baseline(key + (impl,), benchmark)
        return
    if median is None:
        return
    _report_against_baselines(bench, benchmark, key, device, median, peak, fn,
                              functools.partial(getattr(p, step)), step_impls(device)[1:-1],
                              f"TubeViT {step} B={batch}",
                              f"dim={kwargs['dim']} depth={kwargs['depth']} heads={kwargs['heads']}; "
                              f"{flops / median / 1e12:.3f} TFLOP/s encoder")


def _report_against_baselines(bench, benchmark, key, device, median, peak, fast_fn, run, plain_impls, label, notes,
                              fast_name="fast"):
    """extra_info and summary rows of a fast case: speedups vs the reference and vs the strongest
    plain-PyTorch impl of this run, the latter cross-checked interleaved."""
    ref = bench.baseline(key + ("reference",), lambda: run("reference"), device)
    benchmark.extra_info["speedup_vs_reference"] = ref / median
    name, base = strongest(bench, key, plain_impls)
    if name is None:
        name = plain_impls[0]
        base = bench.baseline(key + (name,), lambda: run(name), device)
    benchmark.extra_info.update(strongest_baseline=name, speedup_vs_strongest=base / median)
    base_peak, _ = bench.peak_memory(lambda: run(name), device, key=key + (name,))
    benchmark.extra_info["strongest_peak_memory_bytes"] = base_peak
    mixed = bench.interleaved({name: lambda: run(name), fast_name: fast_fn}, device,
                              rounds=INTERLEAVED_ROUNDS[device.type])
    benchmark.extra_info["interleaved_medians_s"] = mixed
    benchmark.extra_info["speedup_vs_strongest_interleaved"] = mixed[name] / mixed[fast_name]
    bench.add_row(label, device.type, _dtype_label(device), median, base, name, peak=peak, baseline_peak=base_peak,
                  notes=f"{ref / median:.2f}x vs reference (medians); {notes}", interleaved=mixed[name] / mixed[fast_name],
                  spread=bench.run_spread(benchmark, key + (name,)))


# ---- 2. a mixed image + video batch ------------------------------------------------------------

def padded_logits(model, samples) -> torch.Tensor:
    """The model's logits with every sample's tokens padded to the longest one and a key-padding
    mask in every attention (blocks and pooling head): how plain PyTorch runs a mixed batch."""
    packed, cu_seqlens, longest = model.pack(samples)  # the model's own tokenisation (Conv3d here)
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    batch, dim = len(lengths), packed.shape[-1]
    keep = torch.arange(longest, device=packed.device)[None, :] < torch.tensor(lengths, device=packed.device)[:, None]
    x = packed.new_zeros(batch, longest, dim)
    x[keep] = packed
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        q, k, v = attn.qkv(h).view(batch, longest, 3, attn.num_heads, attn.head_dim).unbind(2)
        x = x + attn.proj(_sdpa(q, k, v, keep).reshape(batch, longest, dim))
        x = x + block.mlp(block.norm2(x))
    x = model.norm(x)
    pool = model.attn_pool
    H, Dh = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent).expand(batch, 1, -1).view(batch, 1, H, Dh)
    k, v = pool.kv(x).view(batch, longest, 2, H, Dh).unbind(2)
    pooled = pool.proj(_sdpa(q, k, v, keep).reshape(batch, dim))
    pooled = pooled + pool.mlp(pool.norm(pooled))
    return model.head(pooled)


def mixed_impls(device: torch.device) -> list[str]:
    return ["reference", "sdpa_padded"] + (["sdpa_padded_compiled"] if device.type == "cuda" else []) + ["packed"]


ALL_MIXED_IMPLS = ["reference", "sdpa_padded", "sdpa_padded_compiled", "packed"]


class MixedProblem:
    def __init__(self, device: torch.device):
        kwargs, images, videos = MIXED[device.type]
        self.kwargs, self.device = kwargs, device
        self.models = make_models(device, kwargs, ["reference", "sdpa_padded", "packed"])
        self.forwards = {"reference": self.models["reference"], "packed": self.models["packed"],
                         "sdpa_padded": functools.partial(padded_logits, self.models["sdpa_padded"])}
        if device.type == "cuda":
            model = self.models["sdpa_padded_compiled"] = sdpa_model(copy.deepcopy(self.models["reference"]))
            self.forwards["sdpa_padded_compiled"] = torch.compile(functools.partial(padded_logits, model))
        gen = torch.Generator().manual_seed(2)
        # Interleaved images and videos, as a data loader would mix them.
        shapes = [IMAGE, VIDEO] * min(images, videos) + [IMAGE] * (images - videos) + [VIDEO] * (videos - images)
        self.samples = [torch.randn(*s, generator=gen).to(device) for s in shapes]
        self.labels = torch.randint(0, NUM_CLASSES, (len(shapes),), generator=gen).to(device)
        embed = self.models["packed"].tube_embed
        self.lengths = [embed.num_tokens(s.shape[1:]) for s in self.samples]
        self.optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in self.models.items()}
        self.tol = 1e-4 if STEP[device.type][2] is None else 5e-2
        self.checked = False

    def logits(self, impl: str):
        with _autocast(self.device):
            return self.forwards[impl](self.samples)

    def inference(self, impl: str):
        self.models[impl].eval()
        with torch.no_grad():
            return self.logits(impl)

    def train(self, impl: str):
        self.models[impl].train()
        self.optims[impl].zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.logits(impl).float(), self.labels)
        loss.backward()
        self.optims[impl].step()
        return loss

    def check(self) -> None:
        if self.checked:
            return
        with torch.no_grad(), _autocast(self.device):
            packed = self.models["packed"](self.samples)
            alone = torch.cat([self.models["reference"]([s]) for s in self.samples])
            padded = padded_logits(self.models["sdpa_padded"], self.samples)
        _close("packed vs per-sample reference logits", packed, alone, self.tol)
        _close("padded vs packed logits", padded, packed, self.tol)
        self.checked = True


@functools.cache
def mixed_problem(device: torch.device) -> MixedProblem:
    return MixedProblem(device)


@pytest.mark.parametrize("device", _DEVICES, ids=[d.type for d in _DEVICES])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("impl", ALL_MIXED_IMPLS)
def test_mixed_batch(benchmark, bench, device, step, impl):
    if impl not in mixed_impls(device):
        pytest.skip(f"{impl} is not benchmarked on {device.type}")
    p = mixed_problem(device)
    p.check()
    fn = functools.partial(getattr(p, step), impl)

    timed = bench.synchronized(fn, device)

    kwargs = p.kwargs
    batch, longest, packed_tokens = len(p.lengths), max(p.lengths), sum(p.lengths)
    padded_tokens = batch * longest
    work_packed = sum(n * n for n in p.lengths)
    work_padded = batch * longest * longest
    lengths = [longest] * batch if impl.startswith("sdpa_padded") else p.lengths
    flops = encoder_flops(lengths, kwargs["dim"], kwargs["depth"], kwargs["heads"], step == "train")
    rounds, warmup = ROUNDS[device.type]
    benchmark.group = f"model mixed batch {step} {device.type}"
    benchmark.extra_info.update(
        op="model_mixed", impl=impl, step=step, device=device.type, lengths=p.lengths,
        packed_tokens=packed_tokens, padded_tokens=padded_tokens, token_ratio=padded_tokens / packed_tokens,
        attention_work_packed=work_packed, attention_work_padded=work_padded,
        attention_work_ratio=work_padded / work_packed, flops=flops, autocast=_dtype_label(device),
        threads=torch.get_num_threads(), **kwargs)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = bench.median_of(benchmark)
    if median:
        benchmark.extra_info["tflops"] = flops / median / 1e12
    key = ("model_mixed", step, device.type)
    peak, method = bench.peak_memory(fn, device, key=key + (impl,))
    benchmark.extra_info.update(peak_memory_bytes=peak, peak_memory_method=method)
    if impl != "packed":
        bench.record_baseline(key + (impl,), benchmark)
        return
    if median is None:
        return
    images = sum(1 for s in p.samples if s.dim() == 3)
    _report_against_baselines(bench, benchmark, key, device, median, peak, fn, functools.partial(getattr(p, step)),
                              mixed_impls(device)[1:-1], f"TubeViT mixed {images}img+{batch - images}vid {step}",
                              f"dim={kwargs['dim']} depth={kwargs['depth']}; padding costs tokens "
                              f"x{padded_tokens / packed_tokens:.2f}, attention work x{work_padded / work_packed:.2f}",
                              fast_name="packed")
