"""Benchmarks of DiM's selective scan on the GPU, against the hardware's floor.

    python bench.py scan                      # B=8, D=2304 (DiM-XL width x expand 2), L=1024, N=16
    python bench.py scan --length 256 4096 --dtype fp32 bf16

For each backend of scan.py: forward and forward + backward time (median of CUDA-event timings),
peak memory of one forward + backward, and the largest difference from the definition (checked
before timing). On a GPU it also measures, in the same run, the two ceilings that bound the scan:
the device copy bandwidth and the rate of `exp2` on the special-function units. The floor of one
forward is max(bytes / bandwidth, B*D*L*N / exp rate); forward + backward pays the exps twice. As a
yardstick it times `F.scaled_dot_product_attention` at the same B and L, width 1152, 16 heads, bf16.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import scan as scan_module
from scan import selective_scan, selective_scan_ref


def timed(fn, repeats=20, warmup=3):
    """Median milliseconds of fn(): CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_memory_gb(fn):
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


#################################################################################
#                          The two ceilings of the card                         #
#################################################################################

def copy_bandwidth():
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    x = torch.empty(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def exp_rate():
    """exp2 per second on the special-function units, from a Triton kernel that does only that."""
    import triton
    import triton.language as tl

    @triton.jit
    def many_exp2(x_ptr, n, REPEATS: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
        acc = tl.zeros_like(x)
        for _ in range(REPEATS):
            x = tl.math.exp2(x) - 1.0  # stays in (-1, 0]: a fixed point never overflows
            acc += x
        tl.store(x_ptr + offsets, acc, mask=offsets < n)

    n, repeats, block = 2**24, 512, 1024
    x = -torch.rand(n, device="cuda")
    ms = timed(lambda: many_exp2[(n // block,)](x, n, REPEATS=repeats, BLOCK=block))
    return n * repeats / (ms * 1e-3)


#################################################################################
#                                 The scan bench                                #
#################################################################################

def scan_inputs(batch, dim, length, state, dtype, device):
    """Inputs like the DiM mixer's: softplus'd delta around 0.001..0.1, S4D-real A, a gate z."""
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)
    A = -torch.arange(1, state + 1, device=device, dtype=torch.float32).repeat(dim, 1)  # (D, N)
    delta_bias = torch.empty(dim, device=device).uniform_(-6.9, -2.3)
    inputs = dict(u=randn(batch, dim, length), delta=randn(batch, dim, length), A=A,
                  B=randn(batch, state, length), C=randn(batch, state, length),
                  D=torch.ones(dim, device=device), z=randn(batch, dim, length),
                  delta_bias=delta_bias)
    return inputs


def bench_scan(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    on_gpu = device == "cuda"
    if on_gpu:
        bandwidth, exps = copy_bandwidth(), exp_rate()
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {__import__('triton').__version__}")
        print(f"# copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write), exp2 rate {exps / 1e12:.2f} T/s")
    rows = []
    for length in args.length:
        for dtype_name in args.dtype:
            dtype = dtypes[dtype_name]
            shape = (args.batch, args.dim, length, args.state)
            torch.manual_seed(0)
            x = scan_inputs(args.batch, args.dim, length, args.state, dtype, device)
            grads = [x[k].requires_grad_() for k in ("u", "delta", "B", "C", "z")]
            ref_y, ref_grads = None, None
            dy = torch.randn(args.batch, args.dim, length, device=device, dtype=dtype)
            options = dict(parallel=args.chunk, triton=args.triton_config)
            variants = [(b, c) for b in args.backend for c in options.get(b, [None])]
            for backend, chunk in variants:
                if backend == "parallel":
                    scan_module.CHUNK = chunk
                if backend == "triton":
                    scan_module.TRITON_BLOCK_D, scan_module.TRITON_TILE, scan_module.TRITON_WARPS = \
                        map(int, chunk.split("x"))

                def forward():
                    with torch.no_grad():
                        return selective_scan(**x, delta_softplus=True, backend=backend)

                def forward_backward():
                    y = selective_scan(**x, delta_softplus=True, backend=backend)
                    torch.autograd.grad(y, grads, torch.ones_like(y))

                y = forward().float()
                if ref_y is None:  # the definition, once per shape (slow: a loop over L)
                    with torch.no_grad():
                        ref_y = selective_scan_ref(**x, delta_softplus=True).float()
                error = ((y - ref_y).norm() / ref_y.norm()).item()
                grad_error = float("nan")
                if backend != "ref":  # gradients against the first fast backend (the tests prove it exact)
                    y = selective_scan(**x, delta_softplus=True, backend=backend)
                    these = [g.float() for g in torch.autograd.grad(y, grads, dy)]
                    ref_grads = ref_grads or these
                    grad_error = max(((g - r).norm() / r.norm()).item() for g, r in zip(these, ref_grads))
                    del y, these
                repeats = 3 if backend == "ref" else args.repeats
                fwd = timed(forward, repeats=repeats, warmup=1)
                fwd_bwd = timed(forward_backward, repeats=repeats, warmup=1)
                memory = peak_memory_gb(forward_backward)
                name = f"{backend}({chunk})" if chunk else backend
                row = dict(backend=name, dtype=dtype_name, shape=shape, fwd=fwd, fwd_bwd=fwd_bwd,
                           memory=memory, error=error, grad_error=grad_error)
                if on_gpu:
                    elem = torch.finfo(dtype).bits // 8
                    io_bytes = elem * (3 * args.batch * args.dim * length + 2 * args.batch * args.state * length)
                    t_exp = args.batch * args.dim * length * args.state / exps * 1e3
                    floor = max(io_bytes / bandwidth * 1e3, t_exp)
                    floor_fb = max(3 * io_bytes / bandwidth * 1e3, 2 * t_exp)
                    row.update(floor=floor, floor_fb=floor_fb)
                rows.append(row)
                print(format_row(row), flush=True)
            if on_gpu:
                print(format_row(attention_row(args.batch, length)), flush=True)


def attention_row(batch, length, width=1152, heads=16):
    q, k, v = (torch.randn(batch, heads, length, width // heads, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def forward_backward():
        out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    return dict(backend="sdpa(1152,16h)", dtype="bf16", shape=(batch, width, length, heads),
                fwd=timed(forward), fwd_bwd=timed(forward_backward),
                memory=peak_memory_gb(forward_backward), error=float("nan"), grad_error=float("nan"))


def format_row(r):
    text = (f"| {r['backend']:<14} | {r['dtype']} | {str(r['shape']):<22} | {r['fwd']:9.3f} | "
            f"{r['fwd_bwd']:9.3f} | {r['memory']:6.2f} | {r['error']:.1e} | {r['grad_error']:.1e}")
    if "floor" in r:
        text += f" | {r['fwd'] / r['floor']:6.1f}x | {r['fwd_bwd'] / r['floor_fb']:6.1f}x"
    return text + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    scan = sub.add_parser("scan", help="time the selective-scan backends against the definition")
    scan.add_argument("--batch", type=int, default=8)
    scan.add_argument("--dim", type=int, default=2304, help="channels (DiM-XL: 1152 x expand 2)")
    scan.add_argument("--length", type=int, nargs="+", default=[1024])
    scan.add_argument("--state", type=int, default=16)
    scan.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    scan.add_argument("--backend", nargs="+", default=["parallel"], help="scan.py backends to time")
    scan.add_argument("--repeats", type=int, default=20)
    scan.add_argument("--chunk", type=int, nargs="+", default=[scan_module.CHUNK],
                      help="chunk sizes of the parallel scan to try")
    scan.add_argument("--triton-config", nargs="+", default=[
        f"{scan_module.TRITON_BLOCK_D}x{scan_module.TRITON_TILE}x{scan_module.TRITON_WARPS}"],
        help="Triton kernel shapes to try, as DxTxW (channels per program x steps per tile x warps)")
    args = parser.parse_args(argv)
    print("| backend | dtype | (B, D, L, N) | fwd ms | fwd+bwd ms | peak GB | y error vs ref | grad error "
          "vs first | fwd / floor | f+b / floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    bench_scan(args)


if __name__ == "__main__":
    main()
