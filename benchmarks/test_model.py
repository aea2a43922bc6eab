"""Whole-model benchmarks: a TubeViT inference step and a training step, fast vs reference, and
a packed mixed image+video batch vs the same batch padded to its longest sample.

1. test_model_step: impl "reference" (tubevit_fast.reference.model.TubeViT) vs "fast"
   (tubevit_fast.TubeViT, backend "auto") holding the very same state_dict.
     inference  model(video) under no_grad (eval mode)
     train      forward + cross-entropy + backward + AdamW step
   CPU: a reduced width (dim 192, depth 2, heads 3 -> head dim 64), PAPER_TUBES, B=1,
   3x32x224x224, fp32, so the whole file stays around a minute. CUDA: the full TubeViT-B
   (dim 768, depth 12, heads 12) at B=8 and B=32 under bf16 autocast.
   Checked once, untimed: fast logits == reference logits, and the fast model's gradients ==
   the reference's.

2. test_packed_vs_padded: one batch mixing images (3x224x224, 196 tokens) and videos
   (3x32x224x224, 539 tokens): 4+4 at a small width on CPU, 8+8 TubeViT-B (bf16 autocast) on CUDA.
     packed  model(list): tokens packed without padding, varlen attention (the library's path)
     padded  the same model's layers on tokens padded to the longest sample: each block's
             attention and the pooling head run F.scaled_dot_product_attention with a boolean
             key-padding mask (written out below, `padded_logits`); padded query rows are
             computed and discarded (they never reach a valid token: keys are masked)
   Both tokenise with the model's own (fast) tube embedding, so only the encoder differs.
   forward (no_grad) and forward+backward (sum of logits, all parameter gradients).
   extra_info: token_ratio (padded / packed tokens) and attention_work_ratio
   (B * max N^2 / sum N_i^2). Checked once: packed logits == each sample run alone, and
   padded logits == packed logits.

extra_info also holds flops (2 x MACs of the linear layers + 4*H*N^2*Dh attention per block,
x3 for backward; tube embedding and head left out) and peak_memory_bytes / peak_memory_method:
the peak of one untimed call after the timed rounds, above the memory allocated before it
(BenchTools.peak_memory: torch.cuda.max_memory_allocated on CUDA, the CPU profiler's allocation
and free events on CPU). Weights and optimizer state are held before the call and not counted,
and a training step's zero_grad frees the previous step's gradients first, so its peak is net of
them. After each fast / packed case the pair is re-timed in a shuffled order per round
(BenchTools.interleaved): *_interleaved ratios are the ones to trust on a shared machine.
Nothing asserts on time.

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
from tubevit_fast.reference.model import TubeViT as ReferenceTubeViT

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


def _autocast(device: torch.device):
    dtype = STEP[device.type][2]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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


# ---- 1. inference and training step ---------------------------------------------------------

class StepProblem:
    def __init__(self, device: torch.device, batch: int):
        torch.manual_seed(0)
        kwargs = STEP[device.type][0]
        self.kwargs, self.device, self.batch = kwargs, device, batch
        self.models = {"reference": ReferenceTubeViT(num_classes=NUM_CLASSES, **kwargs).to(device)}
        self.models["fast"] = TubeViT(num_classes=NUM_CLASSES, **kwargs).to(device)
        self.models["fast"].load_state_dict(self.models["reference"].state_dict())
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
        """Fast vs reference logits and gradients, on copies (the timed models' weights and
        optimizer states are left alone)."""
        if self.checked:
            return
        ref, fast = (copy.deepcopy(self.models[n]) for n in ("reference", "fast"))
        outs = {}
        for name, model in (("reference", ref), ("fast", fast)):
            with _autocast(self.device):
                logits = model(self.video)
            F.cross_entropy(logits.float(), self.labels).backward()
            outs[name] = logits
        _close("logits", outs["fast"], outs["reference"], self.tol)
        ref_params = dict(ref.named_parameters())
        for name, p in fast.named_parameters():
            _close(f"grad {name}", p.grad, ref_params[name].grad, 10 * self.tol)
        self.checked = True


@functools.cache
def step_problem(device: torch.device, batch: int) -> StepProblem:
    return StepProblem(device, batch)


@pytest.mark.parametrize("config", STEP_CONFIGS, ids=[f"{d.type}-B{b}" for d, b in STEP_CONFIGS])
@pytest.mark.parametrize("step", ["inference", "train"])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_model_step(benchmark, bench, config, step, impl):
    device, batch = config
    p = step_problem(device, batch)
    p.check()
    fn = functools.partial(getattr(p, step), impl)

    def timed():
        result = fn()
        bench.synchronize(device)
        return result

    kwargs = p.kwargs
    rounds, warmup = ROUNDS[device.type]
    amp = STEP[device.type][2]
    benchmark.group = f"model {step} {device.type} B={batch}"
    n_tokens = p.models["fast"].tube_embed.num_tokens(VIDEO[1:])
    flops = encoder_flops([n_tokens] * batch, kwargs["dim"], kwargs["depth"], kwargs["heads"], step == "train")
    benchmark.extra_info.update(op="model", impl=impl, step=step, device=device.type, batch=batch,
                                autocast=None if amp is None else str(amp), tokens_per_sample=n_tokens,
                                threads=torch.get_num_threads(), **kwargs)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = bench.median_of(benchmark)
    benchmark.extra_info["flops"] = flops
    if median:
        benchmark.extra_info["tflops"] = flops / median / 1e12
    key = ("model", step, device.type, batch)
    peak, method = bench.peak_memory(fn, device, key=key + (impl,))
    benchmark.extra_info.update(peak_memory_bytes=peak, peak_memory_method=method)
    if impl == "reference":
        bench.record_baseline(key + ("reference",), benchmark)
        return
    if median is None:
        return
    base = bench.baseline(key + ("reference",), lambda: getattr(p, step)("reference"), device)
    benchmark.extra_info["speedup_vs_reference"] = base / median
    base_peak, _ = bench.peak_memory(lambda: getattr(p, step)("reference"), device, key=key + ("reference",))
    benchmark.extra_info["reference_peak_memory_bytes"] = base_peak
    mixed = bench.interleaved({name: functools.partial(getattr(p, step), name) for name in ("reference", "fast")},
                              device, rounds=INTERLEAVED_ROUNDS[device.type])
    benchmark.extra_info["interleaved_medians_s"] = mixed
    benchmark.extra_info["speedup_vs_reference_interleaved"] = mixed["reference"] / mixed["fast"]
    dtype = "fp32" if amp is None else f"{str(amp).replace('torch.', '')} autocast"
    size = f"dim={kwargs['dim']} depth={kwargs['depth']} heads={kwargs['heads']}"
    bench.add_row(f"TubeViT {step} B={batch}", device.type, dtype, median, base, "reference",
                  peak=peak, baseline_peak=base_peak,
                  notes=f"interleaved {mixed['reference'] / mixed['fast']:.2f}x; {size}; "
                        f"{flops / median / 1e12:.3f} TFLOP/s encoder")


# ---- 2. packed vs padded ---------------------------------------------------------------------

def _masked_sdpa(q, k, v, keep):
    """q (B, Nq, H, D), k/v (B, Nk, H, D), keep (B, Nk) bool -> (B, Nq, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2)


def padded_logits(model, samples) -> tuple[torch.Tensor, int]:
    """The model's logits with every sample's tokens padded to the longest one and a key-padding
    mask in every attention (blocks and pooling head); returns (logits, padded token count)."""
    packed, cu_seqlens, longest = model.pack(samples)  # the same tokenisation as the packed path
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
        x = x + attn.proj(_masked_sdpa(q, k, v, keep).reshape(batch, longest, dim))
        x = x + block.mlp(block.norm2(x))
    x = model.norm(x)
    pool = model.attn_pool
    H, Dh = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent).expand(batch, 1, -1).view(batch, 1, H, Dh)
    k, v = pool.kv(x).view(batch, longest, 2, H, Dh).unbind(2)
    pooled = pool.proj(_masked_sdpa(q, k, v, keep).reshape(batch, dim))
    pooled = pooled + pool.mlp(pool.norm(pooled))
    return model.head(pooled), batch * longest


class MixedProblem:
    def __init__(self, device: torch.device):
        torch.manual_seed(0)
        kwargs, images, videos = MIXED[device.type]
        self.kwargs, self.device = kwargs, device
        self.model = TubeViT(num_classes=NUM_CLASSES, **kwargs).to(device)
        gen = torch.Generator().manual_seed(2)
        # Interleaved images and videos, as a data loader would mix them.
        shapes = [IMAGE, VIDEO] * min(images, videos) + [IMAGE] * (images - videos) + [VIDEO] * (videos - images)
        self.samples = [torch.randn(*s, generator=gen).to(device) for s in shapes]
        embed = self.model.tube_embed
        self.lengths = [embed.num_tokens(s.shape[1:]) for s in self.samples]
        self.tol = 1e-4 if STEP[device.type][2] is None else 5e-2
        self.checked = False

    def logits(self, impl: str):
        with _autocast(self.device):
            if impl == "packed":
                return self.model(self.samples)
            return padded_logits(self.model, self.samples)[0]

    def run(self, impl: str, backward: bool):
        if not backward:
            with torch.no_grad():
                return self.logits(impl)
        params = [p for p in self.model.parameters()]
        out = self.logits(impl)
        return torch.autograd.grad(out.float().sum(), params)

    def check(self) -> None:
        if self.checked:
            return
        with torch.no_grad(), _autocast(self.device):
            packed = self.model(self.samples)
            alone = torch.cat([self.model([s]) for s in self.samples])
            padded = padded_logits(self.model, self.samples)[0]
        _close("packed vs per-sample logits", packed, alone, self.tol)
        _close("padded vs packed logits", padded, packed, self.tol)
        self.checked = True


@functools.cache
def mixed_problem(device: torch.device) -> MixedProblem:
    return MixedProblem(device)


@pytest.mark.parametrize("device", _DEVICES, ids=[d.type for d in _DEVICES])
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["padded", "packed"])
def test_packed_vs_padded(benchmark, bench, device, pass_, impl):
    p = mixed_problem(device)
    p.check()
    backward = pass_ != "forward"

    def timed():
        result = p.run(impl, backward)
        bench.synchronize(device)
        return result

    kwargs = p.kwargs
    batch, longest, packed_tokens = len(p.lengths), max(p.lengths), sum(p.lengths)
    padded_tokens = batch * longest
    work_packed = sum(n * n for n in p.lengths)
    work_padded = batch * longest * longest
    lengths = p.lengths if impl == "packed" else [longest] * batch
    flops = encoder_flops(lengths, kwargs["dim"], kwargs["depth"], kwargs["heads"], backward)
    rounds, warmup = ROUNDS[device.type]
    benchmark.group = f"model mixed batch {pass_} {device.type}"
    benchmark.extra_info.update(
        op="model_mixed", impl=impl, pass_=pass_, device=device.type, lengths=p.lengths,
        packed_tokens=packed_tokens, padded_tokens=padded_tokens, token_ratio=padded_tokens / packed_tokens,
        attention_work_packed=work_packed, attention_work_padded=work_padded,
        attention_work_ratio=work_padded / work_packed, flops=flops,
        threads=torch.get_num_threads(), **kwargs)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = bench.median_of(benchmark)
    if median:
        benchmark.extra_info["tflops"] = flops / median / 1e12
    key = ("model_mixed", pass_, device.type)
    peak, method = bench.peak_memory(lambda: p.run(impl, backward), device, key=key + (impl,))
    benchmark.extra_info.update(peak_memory_bytes=peak, peak_memory_method=method)
    if impl == "padded":
        bench.record_baseline(key + ("padded",), benchmark)
        return
    if median is None:
        return
    base = bench.baseline(key + ("padded",), lambda: p.run("padded", backward), device)
    benchmark.extra_info["speedup_vs_padded"] = base / median
    base_peak, _ = bench.peak_memory(lambda: p.run("padded", backward), device, key=key + ("padded",))
    benchmark.extra_info["padded_peak_memory_bytes"] = base_peak
    mixed = bench.interleaved({name: functools.partial(p.run, name, backward) for name in ("padded", "packed")},
                              device, rounds=INTERLEAVED_ROUNDS[device.type])
    benchmark.extra_info["interleaved_medians_s"] = mixed
    benchmark.extra_info["speedup_vs_padded_interleaved"] = mixed["padded"] / mixed["packed"]
    amp = STEP[device.type][2]
    dtype = "fp32" if amp is None else f"{str(amp).replace('torch.', '')} autocast"
    images = sum(1 for s in p.samples if s.dim() == 3)
    bench.add_row(f"TubeViT mixed {images}img+{batch - images}vid {pass_}", device.type, dtype, median, base,
                  "padded+mask", peak=peak, baseline_peak=base_peak,
                  notes=f"interleaved {mixed['padded'] / mixed['packed']:.2f}x; dim={kwargs['dim']} depth={kwargs['depth']}; tokens x{padded_tokens / packed_tokens:.2f}, "
                        f"attn work x{work_padded / work_packed:.2f} when padded")
