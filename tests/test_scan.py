"""The parallel scan equals the sequential definition: values, gradients, dtypes, edge cases, memory."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import scan
from scan import bit_reversed, blocked_scan, exclusive_scan, selective_scan, selective_scan_ref

OPTIONS = list(itertools.product([False, True], repeat=4))  # z, delta_bias, delta_softplus, reverse


def make_inputs(batch, dim, length, state, dtype=torch.float64, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return dict(u=randn(batch, dim, length), delta=(torch.rand(batch, dim, length, generator=g, dtype=torch.float64)
                                                    * delta_scale).to(dtype),
                A=-torch.rand(dim, state, generator=g, dtype=torch.float64).mul(2).add(0.1).to(dtype),
                B=randn(batch, state, length), C=randn(batch, state, length), D=randn(dim),
                z=randn(batch, dim, length), delta_bias=randn(dim) * 0.5)


def select(inputs, use_z, use_bias):
    x = dict(inputs)
    if not use_z:
        x.pop("z")
    if not use_bias:
        x.pop("delta_bias")
    return x


@pytest.mark.parametrize("use_z,use_bias,softplus,reverse", OPTIONS)
def test_parallel_gradcheck(use_z, use_bias, softplus, reverse):
    inputs = select(make_inputs(1, 2, 5, 3), use_z, use_bias)
    names = list(inputs)

    def fn(*tensors):
        return selective_scan(**dict(zip(names, tensors)), delta_softplus=softplus, reverse=reverse,
                              backend="parallel")

    tensors = [t.requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("length", [1, 7, 64, 1000])
@pytest.mark.parametrize("use_z,use_bias,softplus,reverse", OPTIONS)
def test_parallel_equals_definition(length, use_z, use_bias, softplus, reverse):
    inputs = select(make_inputs(2, 3, length, 4, seed=length), use_z, use_bias)
    results = []
    for backend in ("ref", "parallel"):
        x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = selective_scan(**x, delta_softplus=softplus, reverse=reverse, backend=backend)
        grads = torch.autograd.grad(y, list(x.values()), torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        results.append((y, grads))
    (y_ref, g_ref), (y_par, g_par) = results
    torch.testing.assert_close(y_par, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(inputs, g_par, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_chunk_and_block_boundaries_do_not_matter(monkeypatch):
    inputs = make_inputs(2, 3, 50, 4)
    outputs = []
    for chunk, block in ((1, 1), (3, 2), (16, 1), (16, 4), (64, 8), (64, 64)):  # 3 rounds up to 4
        monkeypatch.setattr(scan, "CHUNK", chunk)
        monkeypatch.setattr(scan, "BLOCK", block)
        x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = selective_scan(**x, delta_softplus=True, reverse=True, backend="parallel")
        outputs.append(torch.cat([y.flatten()] + [g.flatten() for g in torch.autograd.grad(y.sum(), list(x.values()))]))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["ref", "parallel", "triton"])
def test_bf16_autocast_leaves_the_scan_in_fp32(backend):
    """Training runs the model under bf16 autocast: the scan must neither break (fp32 buffers) nor
    round its sums to bf16 there. On the CPU, autocast turns matmuls into bf16 as on a GPU."""
    if backend == "triton" and scan.triton is None:
        pytest.skip("Triton is not installed (it comes with CUDA builds of torch)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.float().to(device) for k, v in make_inputs(2, 6, 37, 4).items()}
    results = []
    for enabled in (False, True):
        x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=enabled):
            y = selective_scan(**x, delta_softplus=True, backend=backend)
            grads = torch.autograd.grad(y.sum(), list(x.values()))
        results.append([y] + list(grads))
    for name, a, b in zip(["y"] + list(inputs), *results):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def loop_states(a, b, h0, reverse):
    """The states before and after each step of h_t = a_t h_{t-1} + b_t, in natural time order."""
    h, before, after = h0, [None] * len(a), [None] * len(a)
    for t in (reversed(range(len(a))) if reverse else range(len(a))):
        before[t] = h
        h = after[t] = a[t] * h + b[t]
    return torch.stack(before), torch.stack(after)


@pytest.mark.parametrize("reverse", [False, True])
def test_blocked_scan_closed_form(reverse):
    q, P = 4, 8  # 32 steps: 8 blocks of 4
    a, b = torch.rand(q * P, 2, 3, dtype=torch.float64), torch.randn(q * P, 2, 3, dtype=torch.float64)
    h0 = torch.randn(2, 3, dtype=torch.float64)
    before, after = loop_states(a, b, h0, reverse)
    steps = bit_reversed(P, "cpu") * q + torch.arange(q)[:, None]  # (q, P): step j of block p
    decay = a[steps].prod(0)                                          # each block's product of a
    states = torch.empty(q + 1, P, 2, 3, dtype=torch.float64)
    (states[:q] if reverse else states[1:]).copy_(b[steps])  # b in the slots of the states after each step
    blocked_scan(a[steps], decay, states, h0, reverse)
    torch.testing.assert_close(states[1:] if reverse else states[:q], before[steps])
    torch.testing.assert_close(states[:q] if reverse else states[1:], after[steps])
    states[q if reverse else 0] = before[steps][q - 1 if reverse else 0]  # given entry states: pass 3 alone
    (states[:q] if reverse else states[1:]).copy_(b[steps])
    blocked_scan(a[steps], None, states, None, reverse)
    torch.testing.assert_close(states[:q] if reverse else states[1:], after[steps])


@pytest.mark.parametrize("reverse", [False, True])
def test_exclusive_scan_closed_form(reverse):
    a, b = torch.rand(16, 2, 3, dtype=torch.float64), torch.randn(16, 2, 3, dtype=torch.float64)
    h0 = torch.randn(2, 3, dtype=torch.float64)
    before, _ = loop_states(a, b, h0, reverse)
    order = bit_reversed(16, "cpu")
    assert order.tolist() == [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15]
    torch.testing.assert_close(exclusive_scan(a[order], b[order], h0, reverse), before[order])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    inputs = make_inputs(2, 8, 200, 16, dtype=dtype)
    y = selective_scan(**inputs, delta_softplus=True, backend="parallel")
    assert y.dtype == dtype
    y_ref = selective_scan_ref(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True)
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 1e-2
    x = {k: v.clone().requires_grad_() for k, v in inputs.items() if v.dim() == 3}
    y = selective_scan(**{**inputs, **x}, delta_softplus=True, backend="parallel")
    y.float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in x.values())


def test_large_delta_stays_finite_and_exact():
    inputs = make_inputs(2, 4, 300, 8, delta_scale=20.0)  # delta up to 20
    inputs["A"] = -torch.linspace(0.5, 16.0, 32, dtype=torch.float64).view(4, 8)  # A down to -16
    inputs.pop("delta_bias")
    for reverse in (False, True):
        x = {k: v.float().requires_grad_() for k, v in inputs.items()}
        y = selective_scan(**x, reverse=reverse, backend="parallel")
        grads = torch.autograd.grad(y.sum(), list(x.values()))
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
        y_ref = selective_scan_ref(**inputs, reverse=reverse)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_very_negative_A_does_not_underflow():
    # exp(A) underflows to 0 in fp32 below A = -104, but exp(delta A) with a small delta does not:
    # the parallel scan raises exp(A / s) to the power delta s, with s large enough for any A.
    inputs = make_inputs(2, 4, 40, 8, delta_scale=0.02)
    inputs["A"] = -torch.linspace(50.0, 800.0, 32, dtype=torch.float64).view(4, 8)
    inputs.pop("delta_bias")
    x = {k: v.float().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(**x, backend="parallel")
    grads = torch.autograd.grad(y.sum(), list(x.values()))
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y_ref = selective_scan_ref(**ref)
    grads_ref = torch.autograd.grad(y_ref.sum(), list(ref.values()))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(inputs, grads, grads_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item(),
                                   msg=f"gradient of {name}")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out


def test_memory_is_bounded_by_a_chunk():
    batch, dim, length, state = 2, 256, 8192, 16
    inputs = make_inputs(batch, dim, length, state, dtype=torch.float32)
    x = {k: v.requires_grad_() for k, v in inputs.items()}
    with LargestTensor() as tracker:
        y = selective_scan(**x, delta_softplus=True, backend="parallel")
        torch.autograd.grad(y.sum(), [x["u"], x["delta"], x["B"], x["C"]])
    full = batch * dim * length * state  # 268 MB in fp32
    # the largest: the states entering every block of BLOCK = 16 steps, saved for the backward
    assert tracker.largest <= full // 16, f"a tensor of {tracker.largest} elements (full: {full})"
    assert tracker.largest >= batch * dim * length  # the tracker saw the (B, D, L) tensors


def test_input_errors_name_the_argument():
    inputs = make_inputs(2, 3, 10, 4)
    wrong = dict(inputs, B=inputs["B"].transpose(1, 2))  # (batch, L, N) instead of (batch, N, L)
    with pytest.raises(ValueError, match=r"B \(batch, N, L\) must have shape \(2, 4, 10\), got \(2, 10, 4\)"):
        selective_scan(**wrong)
    with pytest.raises(ValueError, match="delta_bias must have shape"):
        selective_scan(**dict(inputs, delta_bias=torch.zeros(5)))
    with pytest.raises(ValueError, match="backend='cuda-magic' is not one of"):
        selective_scan(**inputs, backend="cuda-magic")


#################################################################################
#        The Triton kernel: on the CPU through TRITON_INTERPRET=1 (conftest)    #
#################################################################################

@pytest.mark.skipif(scan.triton is None, reason="Triton is not installed (it comes with CUDA builds of torch)")
@pytest.mark.parametrize("use_z,use_bias,softplus,reverse", OPTIONS)
def test_triton_equals_definition(use_z, use_bias, softplus, reverse, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(scan, "TRITON_TILE_BYTES", 32)  # 8 fp32 steps: 37 steps are five tiles
    monkeypatch.setattr(scan, "TRITON_BLOCK_D", 4)  # 6 channels: a whole block and a part one
    monkeypatch.setattr(scan, "TRITON_FORWARD_BLOCK_D", 4)
    for length in (1, 37):
        inputs = select(make_inputs(2, 6, length, 4, seed=length), use_z, use_bias)
        x = {k: v.float().to(device).requires_grad_() for k, v in inputs.items()}
        dy = torch.randn(2, 6, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
        y = selective_scan(**x, delta_softplus=softplus, reverse=reverse, backend="triton")
        grads = torch.autograd.grad(y, list(x.values()), dy.float().to(device))
        ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y_ref = selective_scan_ref(**ref, delta_softplus=softplus, reverse=reverse)
        grads_ref = torch.autograd.grad(y_ref, list(ref.values()), dy)
        # fp32 against fp64: errors relative to each tensor's scale (a negative delta grows the state)
        torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-5 * y_ref.abs().max().item())
        for name, a, b in zip(inputs, grads, grads_ref):
            torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item(),
                                       msg=f"gradient of {name}")


@pytest.mark.skipif(scan.triton is None, reason="Triton is not installed (it comes with CUDA builds of torch)")
def test_triton_takes_channel_major_layouts_as_they_are(monkeypatch):
    # DiM's mixer keeps its tensors channel-major, (D, B, L) and (N, B, L) in memory: the kernels read
    # them, and write y and the gradients, in that layout, and give what they give for (B, D, L).
    monkeypatch.setattr(scan, "TRITON_TILE_BYTES", 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.float().to(device) for k, v in make_inputs(3, 5, 19, 4, seed=7).items()}
    plain = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    channel_major = {k: (v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() == 3 else v.clone()).requires_grad_()
                     for k, v in inputs.items()}
    gapped_z = torch.cat([inputs["z"], inputs["z"]], dim=1)[:, 5:].requires_grad_()  # batch stride 2 D L: copied
    channel_major["z"] = gapped_z
    dy = torch.randn(3, 5, 19, device=device)
    results = []
    for x in (plain, channel_major):
        y = selective_scan(**x, delta_softplus=True, backend="triton")
        results.append((y, torch.autograd.grad(y, list(x.values()), dy)))
    (y, grads), (y_cm, grads_cm) = results
    assert torch.equal(y, y_cm) and y_cm.stride() == channel_major["u"].stride()
    for name, a, b, x in zip(inputs, grads, grads_cm, channel_major.values()):  # delta_bias: a sum over (B, L)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"gradient of {name}")
        if x is not gapped_z:
            assert b.stride() == x.stride(), f"gradient of {name} laid out as {b.stride()}, not {x.stride()}"


@pytest.mark.skipif(scan.triton is None, reason="Triton is not installed (it comes with CUDA builds of torch)")
def test_triton_64_bit_offsets_give_the_32_bit_results(monkeypatch):
    # The kernels switch to 64-bit offsets from 2**31 elements on (the next test, on a GPU); here the
    # switch is forced at a small size, through the interpreter on a CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.float().to(device) for k, v in make_inputs(2, 5, 19, 4, seed=3).items()}
    results = []
    for wide_from in (scan.WIDE_ELEMENTS, 0):
        monkeypatch.setattr(scan, "WIDE_ELEMENTS", wide_from)
        x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = selective_scan(**x, delta_softplus=True, backend="triton")
        out = scan.conv_silu(x["u"], x["A"], x["D"], backend="triton")         # A as (D, k = 4) weights
        results.append([y, out, *torch.autograd.grad((y.sum(), out.sum()), list(x.values()))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31 elements need a GPU's memory (run on the device)")
def test_triton_kernels_address_tensors_of_more_than_2_31_elements():
    # A sampling batch of 2,000 at DiM-S/2 on 64 px (4,000 with guidance) holds 3.1e9 elements a tensor,
    # where 32-bit offsets wrap. The last item, the farthest from the start, must be what it is alone.
    batch, dim, length, state = 1025, 2048, 1024, 16                            # 2.15e9 elements
    g = torch.Generator(device="cuda").manual_seed(0)

    def channel_major(scale=1.0):  # (B, D, L) stored (D, B, L), as the mixer keeps it
        return (torch.randn(dim, batch, length, device="cuda", generator=g) * scale).bfloat16().transpose(0, 1)
    u, delta, z = channel_major(), channel_major(0.5), channel_major()
    A = -torch.rand(dim, state, device="cuda", generator=g) - 0.1
    B, C = (torch.randn(batch, state, length, device="cuda", generator=g).bfloat16() for _ in range(2))
    D, bias = torch.randn(dim, device="cuda", generator=g), torch.randn(dim, device="cuda", generator=g)
    results = []
    for x, b, c in (((u, delta, z), B, C), ((u[-1:].contiguous(), delta[-1:].contiguous(), z[-1:].contiguous()),
                                             B[-1:], C[-1:])):
        x = [v.requires_grad_() for v in x]
        y = selective_scan(x[0], x[1], A, b, c, D, x[2], bias, delta_softplus=True, backend="triton")
        results.append([y[-1]] + [grad[-1] for grad in torch.autograd.grad(y, x, torch.ones_like(y))])
        out = scan.conv_silu(x[0], A[:, :4], D, backend="triton")               # (D, k = 4) weights
        results[-1] += [out[-1], torch.autograd.grad(out, x[0], torch.ones_like(out))[0][-1]]
        del x, y, out
    for name, a, b in zip(("y", "du", "ddelta", "dz", "conv", "conv dx"), *results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=name)


@pytest.mark.skipif(scan.triton is None, reason="Triton is not installed (it comes with CUDA builds of torch)")
def test_triton_memory_is_bounded_by_a_tile(monkeypatch):
    monkeypatch.setattr(scan, "TRITON_TILE_BYTES", 32)  # 8 fp32 steps
    monkeypatch.setattr(scan, "TRITON_BLOCK_D", 4)  # two blocks of the 8 channels
    batch, dim, length, state = 2, 8, 64, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = {k: v.float().to(device).requires_grad_() for k, v in make_inputs(batch, dim, length, state).items()}
    with LargestTensor() as tracker:
        y = selective_scan(**x, delta_softplus=True, backend="triton")
        torch.autograd.grad(y.sum(), list(x.values()))
    # checkpoints (B, D, L/T, N): nothing grows with L times N. (Bytes, as
    # the interpreter copies every tensor to and from the kernel as raw bytes.)
    assert tracker.largest_bytes == batch * dim * length * 4, f"a tensor of {tracker.largest_bytes} bytes"


@pytest.mark.skipif(scan.triton is None, reason="Triton is not installed (it comes with CUDA builds of torch)")
def test_triton_keeps_checkpoints_only_for_a_backward(monkeypatch):
    monkeypatch.setattr(scan, "TRITON_TILE_BYTES", 32)  # 8 fp32 steps
    batch, dim, length, state = 2, 16, 32, 16  # checkpoints (B, D, L/8, N): twice the bytes of u
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = {k: v.float().to(device).requires_grad_() for k, v in make_inputs(batch, dim, length, state).items()}
    u_bytes = batch * dim * length * 4
    with LargestTensor() as training:
        y = selective_scan(**x, delta_softplus=True, backend="triton")
    with torch.no_grad(), LargestTensor() as sampling:
        y_no_grad = selective_scan(**x, delta_softplus=True, backend="triton")
    assert training.largest_bytes == 2 * u_bytes and sampling.largest_bytes == u_bytes
    assert torch.equal(y, y_no_grad)


def test_triton_backend_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' needs Triton and CUDA tensors"):
        selective_scan(**make_inputs(1, 2, 3, 2, dtype=torch.float32), backend="triton")


#################################################################################
#                     The convolution before the scan                           #
#################################################################################

def conv_silu_definition(x, weight, bias, reverse):
    """silu(bias + sum_j weight_j x_{t-(k-1)+j}) written plainly: left-padded conv1d, on a flipped
    sequence for reverse (the backward branch as Vim writes it)."""
    k = weight.shape[1]
    x = x.flip(-1) if reverse else x
    out = F.silu(F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None], bias, groups=x.shape[1]))
    return out.flip(-1) if reverse else out


@pytest.mark.parametrize("backend", ["parallel", "triton"])
@pytest.mark.parametrize("reverse", [False, True])
def test_conv_silu_equals_definition(backend, reverse, monkeypatch):
    if backend == "triton" and scan.triton is None:
        pytest.skip("Triton is not installed (it comes with CUDA builds of torch)")
    monkeypatch.setattr(scan, "CONV_BLOCK_L", 16)  # 37 steps: three tiles, the last one partly outside
    device = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(1)
    for batch, dim, length, k in ((3, 5, 37, 4), (2, 3, 1, 4), (1, 4, 16, 3)):
        rows = torch.randn(2 * dim, batch * length, generator=g, dtype=torch.float64)  # as in_proj writes x and z
        x = rows[:dim].view(dim, batch, length).transpose(0, 1)            # (B, D, L), stored channel-major
        weight, bias = torch.randn(dim, k, generator=g, dtype=torch.float64), torch.randn(dim, generator=g,
                                                                                            dtype=torch.float64)
        dout = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
        ref = [v.clone().requires_grad_() for v in (x, weight, bias)]
        out_ref = conv_silu_definition(*ref, reverse)
        grads_ref = torch.autograd.grad(out_ref, ref, dout)
        on = [v.float().to(device).requires_grad_() for v in (x, weight, bias)]  # float() keeps the layout
        out = scan.conv_silu(*on, reverse=reverse, backend=backend)
        grads = torch.autograd.grad(out, on, dout.float().to(device))
        assert out.stride() == on[0].stride() and grads[0].stride() == on[0].stride()  # channel-major in, out
        torch.testing.assert_close(out.double().cpu(), out_ref, rtol=1e-5, atol=1e-5)
        for name, a, b in zip(("x", "weight", "bias"), grads, grads_ref):
            torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        scan.conv_silu(x, weight, bias, backend="fast")


@pytest.mark.skipif(scan.triton is None, reason="Triton is not installed (it comes with CUDA builds of torch)")
def test_conv_silu_kernels_take_bf16_and_keep_fp32_sums():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 40, generator=g).bfloat16().to(device).requires_grad_()
    weight = torch.randn(6, 4, generator=g).to(device).requires_grad_()
    bias = torch.randn(6, generator=g).to(device).requires_grad_()
    out = scan.conv_silu(x, weight, bias, backend="triton")
    dx, dweight, dbias = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out))
    assert out.dtype == dx.dtype == torch.bfloat16 and dweight.dtype == dbias.dtype == torch.float32
    ref = [v.detach().double().cpu().requires_grad_() for v in (x, weight, bias)]
    out_ref = conv_silu_definition(*ref, False)
    grads_ref = torch.autograd.grad(out_ref, ref, torch.ones_like(out_ref))
    torch.testing.assert_close(out.double().cpu(), out_ref, rtol=1e-2, atol=1e-2)  # bf16's rounding of out
    torch.testing.assert_close(dweight.double().cpu(), grads_ref[1], rtol=1e-5, atol=1e-4)  # fp32 from bf16 x
    torch.testing.assert_close(dbias.double().cpu(), grads_ref[2], rtol=1e-5, atol=1e-4)


#################################################################################
#          The scans as operators: what torch.compile needs of them             #
#################################################################################

@pytest.mark.parametrize("channel_major", [False, True])
def test_the_scan_operators_pass_torch_library_opcheck(channel_major):
    """torch.library's own check of a registered operator: its schema, its gradient's registration, and
    that its fake version gives the real outputs' shapes and strides (what compile plans with), also
    when traced by AOT autograd with dynamic shapes. Channel-major is the layout DiM's mixer passes."""
    x = {k: v.float() for k, v in make_inputs(2, 6, 37, 4).items()}

    def laid_out(name):
        v = x[name].transpose(0, 1).contiguous().transpose(0, 1) if channel_major and x[name].dim() == 3 else x[name]
        return v.clone().requires_grad_()

    u, delta, A, B, C, D, z, bias = (laid_out(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    torch.library.opcheck(scan.parallel_scan, (u, delta, A, B, C, True))
    if scan.triton is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        on = [v.detach().to(device).requires_grad_() for v in (u, delta, A, B, C, D, z, bias)]
        torch.library.opcheck(scan.triton_scan, (*on, True, False, True))
        torch.library.opcheck(scan.triton_scan, (*on[:5], None, None, None, False, True, True))
        x, weight, conv_bias = u.detach().to(device), A.detach().to(device), D.detach().to(device)
        for reverse in (False, True):
            torch.library.opcheck(scan.triton_conv_silu, (x.requires_grad_(), weight.requires_grad_(),
                                                          conv_bias.requires_grad_(), reverse))
