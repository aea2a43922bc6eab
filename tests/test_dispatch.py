"""What "auto" picks and how the self-check behaves: the measured preference table on each GPU, the
self-check in every caller mode (no_grad, autocast, inference_mode, torch.compile) and per dtype,
the environment variables, any head dim and float64, and the host syncs a packed batch avoids.
(Autocast itself: tests/test_amp.py.)

The self-check runs on CUDA by default; TUBEVIT_FAST_SELFCHECK=always makes every branch
reachable on the CPU."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TRITON_DEVICE
from tubevit_fast import TubeEmbed, TubeSpec, TubeViT, backends
from tubevit_fast.ops import attention as ops_attention
from tubevit_fast.ops.attention import attention
from tubevit_fast.ops.tube_embed import tube_embed
from tubevit_fast.packing import cu_seqlens_from_lengths, known_bounds
from tubevit_fast.reference.attention import attention_reference

TUBES = (TubeSpec((2, 3, 3), (2, 4, 4)), TubeSpec((1, 4, 4), (3, 4, 4), (0, 2, 0)))
SIZE = (4, 9, 10)


@pytest.fixture
def always_check(monkeypatch):
    """TUBEVIT_FAST_SELFCHECK=always with no verdict cached yet; warnings are errors."""
    monkeypatch.setenv(backends.ENV_SELFCHECK, "always")
    backends.reset_selfchecks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    backends.reset_selfchecks()


def small_model(**kwargs) -> TubeViT:
    torch.manual_seed(0)
    return TubeViT(num_classes=3, tubes=TUBES, dim=24, depth=1, heads=2, **kwargs)


# Compute capabilities as torch.cuda.get_device_capability reports them.
GPUS = {"A100": (8, 0), "H100": (9, 0), "H200": (9, 0), "unknown card (cc 12.0)": (12, 0)}


def fake_gpus(monkeypatch, *capabilities):
    """A machine whose cuda:i reports capabilities[i]: arch_name runs for real on top of it."""
    def get_device_capability(device=None):
        index = device if isinstance(device, int) else torch.device(device or "cuda").index
        return capabilities[index or 0]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)


def fast_verdicts() -> dict:
    """op -> backend of every passed self-check (the fast backends that ran)."""
    return {key[0]: key[1] for key, ok in backends._verdicts.items() if ok}


# ---- the self-check in every caller mode -------------------------------------------------------

MODES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("mode", MODES)
def test_first_call_in_any_mode_checks_cleanly_and_runs_the_fast_backend(mode, always_check):
    model = small_model()
    video = torch.randn(2, 3, *SIZE)
    with MODES[mode]():
        model(video)
    assert fast_verdicts() == {"tube_embed": "torch", "attention": "torch"}
    assert all(backends._verdicts.values())


def test_first_call_inside_torch_compile_fullgraph(always_check):
    """The choice and its check run once at trace time, outside the graph: a whole model compiles
    with fullgraph=True on its first call and matches eager."""
    torch._dynamo.reset()
    model = small_model()
    video = torch.randn(2, 3, *SIZE)
    compiled = torch.compile(model, fullgraph=True)(video)
    assert fast_verdicts() == {"tube_embed": "torch", "attention": "torch"}
    torch.testing.assert_close(compiled, model(video))


def test_first_packed_call_inside_torch_compile_fullgraph(always_check):
    """Packed (varlen) attention compiled on its first call: the check, run at trace time where
    cu_seqlens cannot be read, must pass and the fast backend run."""
    torch._dynamo.reset()
    q = torch.randn(9, 2, 16)
    cu = cu_seqlens_from_lengths([4, 5])

    def f(q):
        return attention(q, q, q, cu, cu, max_seqlen_q=5, max_seqlen_k=5)

    compiled = torch.compile(f, fullgraph=True)(q)
    assert fast_verdicts() == {"attention": "torch"} and all(backends._verdicts.values())
    torch.testing.assert_close(compiled, attention_reference(q, q, q, cu, cu))


def test_packed_model_under_inference_mode(always_check):
    """A list of clips (packed, cu_seqlens built inside inference_mode) in inference mode."""
    model = small_model()
    with torch.inference_mode():
        logits = model([torch.randn(3, *SIZE), torch.randn(3, *SIZE[1:])])
    assert logits.shape == (2, 3)
    with torch.inference_mode():
        cu = cu_seqlens_from_lengths([3, 4])
    assert known_bounds(cu) == (0, 3, 7)


def test_selfcheck_under_activation_checkpointing(always_check):
    """The check's own backward must not run through the caller's checkpoint hooks."""
    from torch.utils.checkpoint import checkpoint

    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    out = checkpoint(lambda x: attention(x, x, x, backend="torch"), q, use_reentrant=False)
    out.sum().backward()
    assert fast_verdicts() == {"attention": "torch"} and all(backends._verdicts.values())


def test_selfcheck_ignores_the_callers_default_device(always_check):
    """Check inputs are made on the CPU and moved, whatever torch.set_default_device says."""
    q = torch.randn(1, 5, 2, 16)
    torch.set_default_device("meta")
    try:
        out = attention(q, q, q, backend="torch")
    finally:
        torch.set_default_device(None)
    assert out.device.type == "cpu" and all(backends._verdicts.values())


def test_selfcheck_leaves_the_callers_rng_alone(always_check):
    model = small_model()
    video = torch.randn(1, 3, *SIZE)
    state = torch.get_rng_state()
    model(video)
    assert backends._verdicts, "no check ran"
    assert torch.equal(torch.get_rng_state(), state)


# Every value TUBEVIT_FAST_SELFCHECK accepts -> (checks on the CPU, checks on a GPU).
SELFCHECK_VALUES = {None: (False, True), "": (False, True), "1": (False, True), "cuda": (False, True),
                    "0": (False, False), "off": (False, False),
                    "always": (True, True), " Always ": (True, True)}


@pytest.mark.parametrize("value", SELFCHECK_VALUES, ids=repr)
def test_selfcheck_variable_decides_where_the_check_runs(value, monkeypatch):
    """Seen from what "auto" picks when every check fails: a check that ran demotes the fast
    backends to the reference (on the CPU and on an H100, where Triton is first)."""
    if value is None:
        monkeypatch.delenv(backends.ENV_SELFCHECK, raising=False)
    else:
        monkeypatch.setenv(backends.ENV_SELFCHECK, value)
    fake_gpus(monkeypatch, GPUS["H100"])

    def wrong_answer(*hook_args):
        def check():
            raise AssertionError("output: error 0.5 over the allowance")
        return check

    monkeypatch.setitem(backends._OPS, "tube_embed", backends.OpHooks(backends._OPS["tube_embed"].unsupported,
                                                                     wrong_answer))
    on_cpu, on_gpu = SELFCHECK_VALUES[value]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picks = [backends.pick("tube_embed", "auto", torch.device("cpu"), torch.float32),
                 backends.pick("tube_embed", "auto", torch.device("cuda", 0), torch.bfloat16)]
    assert picks == ["reference" if on_cpu else "torch", "reference" if on_gpu else "triton"]
    assert any("self-check failed" in str(w.message) for w in caught) == (on_cpu or on_gpu)


def test_a_bad_selfcheck_value_is_refused(monkeypatch):
    monkeypatch.setenv(backends.ENV_SELFCHECK, "sometimes")
    with pytest.raises(ValueError, match="TUBEVIT_FAST_SELFCHECK='sometimes'"):
        backends.pick("tube_embed", "auto", torch.device("cpu"), torch.float32)


# TUBEVIT_FAST_BACKEND -> what "auto" runs on the CPU: (tube_embed, attention). "cuda" names the
# extension, which has attention only: the tube embedding stays on "auto".
BACKEND_VALUES = {None: ("torch", "torch"), "": ("torch", "torch"), "auto": ("torch", "torch"),
                  "reference": ("reference", "reference"), "torch": ("torch", "torch"),
                  "triton": ("triton", "triton"), "cuda": ("torch", "backend 'cuda' needs CUDA tensors")}


@pytest.mark.parametrize("value", BACKEND_VALUES, ids=repr)
def test_backend_variable_overrides_auto(value, monkeypatch):
    if value is None:
        monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    else:
        monkeypatch.setenv(backends.ENV_BACKEND, value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton on CPU tensors, on any machine
    cpu = torch.device("cpu")
    embed, attn = BACKEND_VALUES[value]
    assert backends.pick("tube_embed", "auto", cpu, torch.float32) == embed
    if attn in backends.BACKENDS:
        assert backends.pick("attention", "auto", cpu, torch.float32, 32, "dense") == attn
    else:
        with pytest.raises(RuntimeError, match=attn):
            backends.pick("attention", "auto", cpu, torch.float32, 32, "dense")


@pytest.mark.parametrize("value", ["reference", "torch", "triton", "cuda"])
def test_a_named_backend_beats_the_variable(value, monkeypatch):
    """The variable overrides "auto" only: a backend the caller names runs whatever it says."""
    monkeypatch.setenv(backends.ENV_BACKEND, value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    for named in ("reference", "torch", "triton"):
        assert backends.pick("tube_embed", named, cpu, torch.float32) == named
        assert backends.pick("attention", named, cpu, torch.float32, 32, "dense") == named


def test_a_failing_check_demotes_auto_and_refuses_a_named_backend(always_check, monkeypatch):
    impl = ops_attention._impl("torch")
    real_forward = impl.attention_forward
    monkeypatch.setattr(impl, "attention_forward", lambda *a: (real_forward(*a)[0] * 1.01, real_forward(*a)[1]))
    q = torch.randn(1, 5, 2, 16)
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        out = attention(q, q, q)
    torch.testing.assert_close(out, attention_reference(q, q, q))  # the reference ran
    with pytest.raises(RuntimeError, match="disagrees with the reference"):
        attention(q, q, q, backend="torch")


@pytest.mark.parametrize("broken, broken_first", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-broken-checked-second", "bf16-broken-checked-first"])
def test_selfcheck_verdicts_are_per_dtype(broken, broken_first, always_check, monkeypatch):
    """A backend wrong in one dtype only: "auto" drops it for that dtype and keeps it for the
    other, whichever dtype is checked first, and goes on doing so once the verdicts are cached."""
    impl = ops_attention._impl("torch")
    real_forward = impl.attention_forward

    def forward(q, *args):
        out, lse = real_forward(q, *args)
        return (out + 0.25 if q.dtype == broken else out), lse

    monkeypatch.setattr(impl, "attention_forward", forward)
    fine = torch.bfloat16 if broken == torch.float32 else torch.float32
    picks = {broken: [], fine: []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in ([broken, fine] if broken_first else [fine, broken]) * 2:
            picks[dtype].append(backends.pick("attention", "auto", torch.device("cpu"), dtype, 32, "dense"))
    assert picks == {broken: ["reference", "reference"], fine: ["torch", "torch"]}
    assert sum("self-check failed" in str(w.message) for w in caught) == 1  # checked once per dtype


def test_selfcheck_catches_an_ignored_softmax_scale(monkeypatch):
    """The check runs at a non-default scale: a backend that drops softmax_scale fails it."""
    impl = ops_attention._impl("torch")
    real_forward, real_backward = impl.attention_forward, impl.attention_backward
    monkeypatch.setattr(impl, "attention_forward",
                        lambda q, k, v, cq, ck, mq, mk, scale: real_forward(q, k, v, cq, ck, mq, mk, q.shape[-1] ** -0.5))
    monkeypatch.setattr(impl, "attention_backward",
                        lambda do, q, k, v, o, lse, cq, ck, mq, mk, scale: real_backward(do, q, k, v, o, lse, cq, ck, mq,
                                                                                       mk, q.shape[-1] ** -0.5))
    check = ops_attention._make_selfcheck("torch", torch.device("cpu"), torch.float32, 32, "dense")
    with pytest.raises(AssertionError, match="out: error"):
        check()


# ---- what "auto" prefers -------------------------------------------------------------------------

@pytest.mark.parametrize("gpu", GPUS)
def test_auto_on_each_gpu_uses_its_measured_rows(gpu, monkeypatch):
    """The README's table, end to end from the GPU's compute capability: on an H100/H200 (sm_90)
    "auto" runs the Triton tube embedding and tries Triton before the extension for Dh 128
    attention; an A100 or a card nobody measured gets PyTorch's kernels first."""
    fake_gpus(monkeypatch, GPUS[gpu])
    monkeypatch.setenv(backends.ENV_SELFCHECK, "0")  # the check would need a real GPU
    cuda = torch.device("cuda", 0)
    hopper = GPUS[gpu] == (9, 0)
    assert backends.pick("tube_embed", "auto", cuda, torch.bfloat16) == ("triton" if hopper else "torch")
    assert backends.auto_order("attention", cuda, torch.bfloat16, 128, "dense") == \
        (("torch", "triton", "cuda") if hopper else ("torch", "cuda", "triton"))
    # Rows exist for bf16 only: fp16 is unmeasured on every GPU.
    assert backends.pick("tube_embed", "auto", cuda, torch.float16) == "torch"


def test_auto_reads_the_capability_of_the_tensors_gpu(monkeypatch):
    """A machine with an A100 as cuda:0 and an H100 as cuda:1: each device gets its own rows."""
    fake_gpus(monkeypatch, GPUS["A100"], GPUS["H100"])
    monkeypatch.setenv(backends.ENV_SELFCHECK, "0")
    picks = [backends.pick("tube_embed", "auto", torch.device("cuda", i), torch.bfloat16) for i in (0, 1)]
    assert picks == ["torch", "triton"]


def test_auto_order_follows_the_measured_table_and_defaults_to_torch(monkeypatch):
    fake_gpus(monkeypatch, GPUS["H100"], GPUS["A100"])
    cuda = torch.device("cuda", 0)
    assert backends.auto_order("attention", cuda, torch.bfloat16, 64, "dense") == \
        backends.MEASURED_ORDER[("attention", "sm_90", "bf16", 64, "dense")]
    for unmeasured in [("attention", cuda, torch.float16, 64, "dense"), ("attention", cuda, torch.bfloat16, 64, "varlen"),
                       ("attention", cuda, torch.bfloat16, 48, "dense"), ("tube_embed", cuda, torch.float16)]:
        assert backends.auto_order(*unmeasured)[0] == "torch", unmeasured
    a100 = torch.device("cuda", 1)
    assert backends.auto_order("attention", a100, torch.bfloat16, 64, "dense")[0] == "torch"
    assert backends.auto_order("tube_embed", torch.device("cpu"), torch.float32) == ("torch",)


def test_measured_table_rows_are_well_formed():
    for (op, arch, dtype, head_dim, layout), order in backends.MEASURED_ORDER.items():
        assert op in backends._IMPLEMENTED and arch.startswith("sm_") and dtype in backends.DTYPE_NAMES.values()
        assert (head_dim is None) == (layout is None) == (op == "tube_embed")
        assert set(order) <= set(backends._IMPLEMENTED[op]) and "reference" not in order
        assert "torch" in order and len(set(order)) == len(order)


# ---- any head dim and float64 -------------------------------------------------------------------

def test_odd_head_dims_and_float64_run_on_reference_and_auto():
    torch.manual_seed(0)
    model = TubeViT(num_classes=3, tubes=TUBES, dim=48, depth=1, heads=4, backend="reference")  # head dim 12
    fast = TubeViT(num_classes=3, tubes=TUBES, dim=48, depth=1, heads=4)
    fast.load_state_dict(model.state_dict())
    video = torch.randn(2, 3, *SIZE)
    torch.testing.assert_close(fast(video), model(video))
    golden = model.double()(video.double())
    torch.testing.assert_close(fast.double()(video.double()), golden, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("head_dim", [1, 12, 200, 256])
def test_any_head_dim_on_the_torch_backend(head_dim):
    q, k, v = (torch.randn(2, n, 2, head_dim, dtype=torch.float64) for n in (5, 6, 6))
    out = attention(q, k, v, backend="torch", softmax_scale=0.2)
    torch.testing.assert_close(out, attention_reference(q, k, v, softmax_scale=0.2), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(backends.unavailable_reason("attention", "triton", TRITON_DEVICE) is not None,
                    reason="Triton backend unavailable here")
def test_fast_backends_refuse_what_they_cannot_take_and_auto_skips_them(monkeypatch):
    q = torch.randn(1, 4, 2, 12, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton' supports head dims \(32, 64, 80, 96, 128\), got 12"):
        attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' runs float32/float16/bfloat16 only"):
        attention(q.double(), q.double(), q.double(), backend="triton")
    # "auto" with Triton first in line passes over it for such inputs.
    monkeypatch.setattr(backends, "auto_order", lambda *args: ("triton", "torch"))
    torch.testing.assert_close(attention(q, q, q), attention(q, q, q, backend="torch"))
    video = torch.randn(1, 3, *SIZE, dtype=torch.float64, device=TRITON_DEVICE)
    embed = TubeEmbed(TUBES, 3, 12).double().to(TRITON_DEVICE)
    with pytest.raises(ValueError, match="backend 'triton' runs float32/float16/bfloat16 only"):
        tube_embed(video, embed.weights, embed.biases, TUBES, backend="triton")
    assert embed(video).dtype == torch.float64


def test_head_dims_outside_1_to_256_are_refused():
    q = torch.randn(1, 4, 2, 300)
    with pytest.raises(ValueError, match="head dim 300 is not supported: head dims run from 1 to 256"):
        attention(q, q, q)


# ---- packed batches: validated once where they are built -----------------------------------------

def test_packed_cu_seqlens_carry_their_host_bounds():
    cu = cu_seqlens_from_lengths([3, 0, 4])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 7]
    assert known_bounds(cu) == (0, 3, 3, 7)
    assert known_bounds(torch.tensor([0, 3, 3, 7], dtype=torch.int32)) is None
    cu[1] = 5  # changed after it was built: the record no longer holds
    assert known_bounds(cu) is None
    with pytest.raises(TypeError, match="must be integers"):
        cu_seqlens_from_lengths([2.7, 3.9])  # int() would have truncated them
    with pytest.raises(ValueError, match=r"got \[2, -1\]"):
        cu_seqlens_from_lengths(n for n in (2, -1))  # a generator is read once


def test_attention_trusts_recorded_bounds_and_rechecks_modified_ones(monkeypatch):
    q = torch.randn(7, 2, 16)
    cu = cu_seqlens_from_lengths([3, 4])
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real_tolist(self))
    assert ops_attention.check_attention_inputs(q, q, q, cu, cu)[:2] == (4, 4)
    assert reads == []  # no device read-back
    cu[1] = 9
    with pytest.raises(ValueError, match="non-decreasing"):
        ops_attention.check_attention_inputs(q, q, q, cu, cu)
    assert reads


def test_a_packed_forward_reads_cu_seqlens_back_for_no_layer(monkeypatch):
    """TubeViT.pack builds cu_seqlens from host lengths; no attention layer syncs to check them."""
    model = small_model(backend="reference")
    samples = [torch.randn(3, *SIZE[1:]), torch.randn(3, *SIZE)]
    checked = []
    real_check = ops_attention._check_cu_seqlens

    def spy(cu_q, cu_k, q, k):
        checked.append((known_bounds(cu_q) is not None, known_bounds(cu_k) is not None))
        return real_check(cu_q, cu_k, q, k)

    monkeypatch.setattr(ops_attention, "_check_cu_seqlens", spy)
    from tubevit_fast import patch
    patch(model, backend="torch")(samples)
    assert checked and all(a and b for a, b in checked)  # blocks and the pooling head


# ---- autotune keys ------------------------------------------------------------------------------

def test_attention_autotune_key_has_a_size_class():
    from tubevit_fast.kernels import attention as kernels

    for tuned in (kernels._attention_fwd_kernel, kernels._attention_bwd_dkdv_kernel, kernels._attention_bwd_dq_kernel):
        assert "size_class" in tuned.keys
    assert kernels._size_class(2, 2) != kernels._size_class(32, 12)


def test_fp32_attention_launches_keep_the_fp32_configs():
    from tubevit_fast.kernels import attention as kernels

    for tuned, half, single in ((kernels._attention_fwd_kernel, kernels._FWD_CONFIGS, kernels._FWD_CONFIGS_FP32),
                                (kernels._attention_bwd_dkdv_kernel, kernels._DKDV_CONFIGS, kernels._DKDV_CONFIGS_FP32),
                                (kernels._attention_bwd_dq_kernel, kernels._DQ_CONFIGS, kernels._DQ_CONFIGS_FP32)):
        assert tuned.early_config_prune(tuned.configs, {}, DOT_PRECISION="ieee") == single
        assert tuned.early_config_prune(tuned.configs, {}, DOT_PRECISION="tf32") == half
