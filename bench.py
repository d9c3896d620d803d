"""Benchmarks of DiM's selective scan on the GPU, against the hardware's floor.

    python bench.py scan                      # B=8, D=2304 (DiM-XL width x expand 2), L=1024, N=16
    python bench.py scan --length 256 4096 --dtype fp32 bf16

For each backend of scan.py: forward and forward + backward time (median of CUDA-event timings of
the GPU's work alone: the host's launch overhead is left out, see `timed`),
peak memory of one forward + backward, and the largest difference from the definition (checked
before timing). On a GPU it also measures, in the same run, the two ceilings that bound the scan:
the device copy bandwidth and the rate of `exp2` on the special-function units. The floor of one
forward is max(bytes / bandwidth, B*D*L*N / exp rate); forward + backward pays the exps twice. As a
yardstick it times `F.scaled_dot_product_attention` at the same B and L, width 1152, 16 heads, bf16.
"""

import argparse
import functools
import gc
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import scan as scan_module
from scan import selective_scan, selective_scan_ref


def timed(fn, repeats=20, warmup=3, gpu_only=False):
    """Median milliseconds of fn(): CUDA events on a GPU, the wall clock on the CPU.

    gpu_only: the GPU's work alone. Between two events an idle GPU also waits for the host to launch
    the work (Python, checks, kernel launches: about 0.1 ms for one scan forward, 0.8 ms forward +
    backward on the H200's host), which a training loop hides by running ahead. So the GPU is kept
    busy (torch.cuda._sleep) while the host queues fn, and the events see the kernels back to back."""
    for _ in range(warmup):
        fn()
    hold = _cycles_outlasting_launch(fn) if gpu_only and torch.cuda.is_available() else 0
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if hold:
                torch.cuda._sleep(hold)
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


@functools.cache
def _sleep_cycles_per_ms():
    """How many cycles of torch.cuda._sleep make a millisecond on this GPU (measured once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    torch.cuda.synchronize()
    return 10**7 / start.elapsed_time(end)


def _cycles_outlasting_launch(fn):
    """GPU clock cycles of torch.cuda._sleep that outlast the host's launching of fn, twice over."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()  # queued, not waited for
    launch_ms = 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    return int(_sleep_cycles_per_ms() * (2 * launch_ms + 1))


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
    ms = timed(lambda: y.copy_(x), gpu_only=True)
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
    ms = timed(lambda: many_exp2[(n // block,)](x, n, REPEATS=repeats, BLOCK=block), gpu_only=True)
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
        print("# times: the GPU's work alone, the host's launch overhead left out (bench.py's timed)")
    print("| backend | dtype | (B, D, L, N) | fwd ms | fwd+bwd ms | peak GB | y error vs ref | grad error "
          "vs first | fwd / floor | f+b / floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    block_d, tile_bytes, warps = scan_module.TRITON_BLOCK_D, scan_module.TRITON_TILE_BYTES, scan_module.TRITON_WARPS
    for length in args.length:
        for dtype_name in args.dtype:
            dtype = dtypes[dtype_name]
            shape = (args.batch, args.dim, length, args.state)
            torch.manual_seed(0)
            x = scan_inputs(args.batch, args.dim, length, args.state, dtype, device)
            grads = [x[k].requires_grad_() for k in ("u", "delta", "B", "C", "z")]
            ref_y, ref_grads = None, None
            dy = torch.randn(args.batch, args.dim, length, device=device, dtype=dtype)
            backward_configs = args.triton_config or [f"{block_d}x{tile_bytes // dtype.itemsize}x{warps}"]
            options = dict(parallel=[f"{c}/{b}" for c in args.chunk for b in args.block],
                           triton=[f"{b}/{f}" for b in backward_configs for f in args.triton_forward_config])
            variants = [(b, o) for b in args.backend for o in options.get(b, [None])]
            for backend, option in variants:  # option: chunk and block sizes, or the Triton kernel shapes
                if backend == "parallel":
                    scan_module.CHUNK, scan_module.BLOCK = map(int, option.split("/"))
                if backend == "triton":
                    backward_config, forward_config = option.split("/")
                    scan_module.TRITON_BLOCK_D, tile, scan_module.TRITON_WARPS = map(int, backward_config.split("x"))
                    scan_module.TRITON_TILE_BYTES = tile * dtype.itemsize  # both kernels take T steps a tile
                    scan_module.TRITON_FORWARD_BLOCK_D, scan_module.TRITON_FORWARD_WARPS = \
                        map(int, forward_config.split("x"))

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
                fwd = timed(forward, repeats=repeats, warmup=1, gpu_only=True)
                fwd_bwd = timed(forward_backward, repeats=repeats, warmup=1, gpu_only=True)
                memory = peak_memory_gb(forward_backward)
                name = f"{backend}({option})" if option else backend
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
                fwd=timed(forward, gpu_only=True), fwd_bwd=timed(forward_backward, gpu_only=True),
                memory=peak_memory_gb(forward_backward), error=float("nan"), grad_error=float("nan"))


def format_row(r):
    text = (f"| {r['backend']:<14} | {r['dtype']} | {str(r['shape']):<22} | {r['fwd']:9.3f} | "
            f"{r['fwd_bwd']:9.3f} | {r['memory']:6.2f} | {r['error']:.1e} | {r['grad_error']:.1e}")
    if "floor" in r:
        text += f" | {r['fwd'] / r['floor']:6.1f}x | {r['fwd_bwd'] / r['floor_fb']:6.1f}x"
    return text + " |"



#################################################################################
#                      The model bench: DiM against DiT                         #
#################################################################################

# (image side, frames, batch): 256 to 16,384 tokens at patch 2 on 8x-downsampled latents
SIZES = [(256, 1, 32), (512, 1, 8), (1024, 1, 2), (2048, 1, 1), (256, 16, 2)]
BLOCK_TOKENS = [(256, 32), (1024, 8), (4096, 2), (16384, 1), (65536, 1)]


def time_training(name, mixer, latent, frames, batch, scan, repeats, compile_too=False):
    """ms per training step (forward, backward, AdamW) and per sampling forward, each as train.py and
    sample.py run it, eager, with --cuda-graphs (the model recorded once, then replayed) and, with
    compile_too, with --compile (torch.compile; its compilation is in the warm-up, not the time); and
    the eager step's peak GB; bf16 autocast. Out of memory: retried with gradient checkpointing
    (training graphs do not take it), then reported as such."""
    from diffusion import Diffusion
    from dim import build_model
    from sample import compiled, recorded
    from train import graphed

    for grad_ckpt in (False, True):
        gc.collect()  # the last configuration's graphs and their memory, held in reference cycles
        torch.cuda.empty_cache()
        try:
            torch.manual_seed(0)
            model = build_model(name, input_size=latent, in_channels=4, num_classes=1000, num_frames=frames,
                                mixer=mixer, scan_backend=scan, grad_ckpt=grad_ckpt).cuda()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            diffusion = Diffusion().to("cuda")
            shape = (batch,) + ((frames,) if frames > 1 else ()) + (4, latent, latent)
            x, y = torch.randn(shape, device="cuda"), torch.randint(0, 1000, (batch,), device="cuda")
            t = torch.randint(0, 1000, (batch,), device="cuda")
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # as train.py's

            def train_step(net=model):
                with autocast:
                    loss = diffusion.training_losses(lambda a, b: net(a, b, y).float(), x, t)["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def sample_forward(a, b):
                return model(a, b, y)

            def sample_step(net=sample_forward):
                with torch.no_grad(), autocast:
                    net(x, t)

            r = dict(train_ms=timed(train_step, repeats=repeats, warmup=2), memory=peak_memory_gb(train_step),
                     grad_ckpt=grad_ckpt, train_graphed_ms=None, train_compiled_ms=None, sample_compiled_ms=None)
            if compile_too:
                torch._dynamo.reset()
                net = compiled(model, "cuda")
                r["train_compiled_ms"] = timed(lambda: train_step(net), repeats=repeats, warmup=3)
                r["compiled_memory"] = peak_memory_gb(lambda: train_step(net))
            model.eval()
            r["sample_ms"] = timed(sample_step, repeats=repeats, warmup=1)
            if compile_too:
                r["sample_compiled_ms"] = timed(lambda: sample_step(lambda a, b: net(a, b, y)), repeats=repeats,
                                                warmup=3)
                net = None
            with torch.no_grad(), autocast:
                replay = recorded(sample_forward, x, t)
            r["sample_graphed_ms"] = timed(lambda: sample_step(replay), repeats=repeats, warmup=1)
            replay = None
            model.train()
            if not grad_ckpt:
                try:
                    net = graphed(model, batch, autocast)
                    r["train_graphed_ms"] = timed(lambda: train_step(net), repeats=repeats, warmup=2)
                except torch.cuda.OutOfMemoryError:
                    pass  # the eager step fits, the graph's own memory does not: "-" in the table
            return r
        except torch.cuda.OutOfMemoryError:
            continue
        finally:
            model = opt = replay = net = None  # free the GPU memory before the next try
    return dict(train_ms=None, memory=None, sample_ms=None, grad_ckpt=True)


def time_block(mixer, tokens, batch, scan, repeats, width=1152):
    """ms for forward + backward of one block at DiM-XL's width, bf16 autocast."""
    from dim import DiMBlock, DiMConfig

    torch.manual_seed(0)
    block = DiMBlock(DiMConfig(hidden_size=width, mixer=mixer, scan_backend=scan)).cuda()
    x = torch.randn(batch, tokens, width, device="cuda", requires_grad=True)
    c = torch.randn(batch, width, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, c)
        out.float().sum().backward()

    try:
        return timed(step, repeats=repeats, warmup=2)
    except torch.cuda.OutOfMemoryError:
        return None


def bench_model(args):
    import json

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, blocks=[], models=[])
    print("| scan | tokens (batch) | attention block ms | DiM block ms | DiM / attention |")
    print("| --- | --- | --- | --- | --- |")
    for scan in args.scan:
        for tokens, batch in BLOCK_TOKENS:
            attention = time_block("attention", tokens, batch, scan, args.repeats)
            mamba = time_block("mamba", tokens, batch, scan, args.repeats)
            results["blocks"].append(dict(scan=scan, tokens=tokens, batch=batch, attention=attention, mamba=mamba))
            ratio = f"{mamba / attention:.2f}" if attention and mamba else "-"
            attention_ms, mamba_ms = (f"{ms:.2f}" if ms else "OOM" for ms in (attention, mamba))
            print(f"| {scan} | {tokens:,} ({batch}) | {attention_ms} | {mamba_ms} | {ratio} |", flush=True)
    print("\n| model | input | tokens x batch | mixer | train step ms | graphed | compiled | peak GB | sampling fwd ms "
          "| graphed | compiled | images/s (250 steps, graphed) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    sizes = [s for s in SIZES if not args.sizes or f"{s[0]}" + (f"x{s[1]}" if s[1] > 1 else "") in args.sizes]
    for name in args.models:
        for side, frames, batch in sizes:
            latent = side // 8
            tokens = frames * (latent // int(name.split("/")[1])) ** 2
            for mixer in ("attention", "mamba"):
                r = time_training(name, mixer, latent, frames, batch, args.model_scan, args.repeats, args.compile)
                r.update(model=name, side=side, frames=frames, batch=batch, tokens=tokens, mixer=mixer)
                results["models"].append(r)
                label = f"{side}px" + (f" x {frames} frames" if frames > 1 else "")
                if r["train_ms"] is None:
                    print(f"| {name} | {label} | {tokens:,} x {batch} | {mixer} | OOM |" + " - |" * 7, flush=True)
                    continue
                graphed_train, compiled_train, compiled_sample = (f"{r[k]:.1f}" if r[k] else "-" for k in (
                    "train_graphed_ms", "train_compiled_ms", "sample_compiled_ms"))
                rate = batch / (250 * r["sample_graphed_ms"] / 1e3)
                print(f"| {name} | {label} | {tokens:,} x {batch} | {mixer} | {r['train_ms']:.1f}"
                      f"{' (grad ckpt)' if r['grad_ckpt'] else ''} | {graphed_train} | {compiled_train} | "
                      f"{r['memory']:.1f} | {r['sample_ms']:.1f} | {r['sample_graphed_ms']:.1f} | {compiled_sample} | "
                      f"{rate:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def size_table():
    """Parameters and GMACs of every preset at 256 and 512 (latents 32 and 64), both mixers; no GPU."""
    from dim import PRESETS, build_model

    print("| model | params DiM (M) | params DiT (M) | GMACs DiM 256 | GMACs DiT 256 | GMACs DiM 512 | GMACs DiT 512 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in PRESETS:
        cells = []
        for side in (256, 512):
            for mixer in ("mamba", "attention"):
                with torch.device("meta"):
                    model = build_model(name, input_size=side // 8, mixer=mixer)
                cells.append((model.num_params() / 1e6, model.gmacs()))
        (p_dim, g_dim_256), (p_dit, g_dit_256), (_, g_dim_512), (_, g_dit_512) = cells
        print(f"| {name} | {p_dim:.1f} | {p_dit:.1f} | {g_dim_256:.2f} | {g_dit_256:.2f} | {g_dim_512:.2f} | {g_dit_512:.2f} |")


def plot(args):
    import json

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("bench.py plot needs matplotlib: pip install matplotlib")
    with open(args.json) as f:
        results = json.load(f)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for scan, style in (("triton", "-"), ("parallel", ":")):
        rows = [r for r in results["blocks"] if r["scan"] == scan and r["mamba"]]
        if rows:
            left.plot([r["tokens"] for r in rows], [r["mamba"] / r["batch"] for r in rows], "o" + style,
                      label=f"DiM block ({scan} scan)")
    rows = [r for r in results["blocks"] if r["scan"] == results["blocks"][0]["scan"] and r["attention"]]
    left.plot([r["tokens"] for r in rows], [r["attention"] / r["batch"] for r in rows], "s-", label="attention block")
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per sequence (fwd + bwd)",
             title="one block at width 1152, bf16")
    left.legend()
    for mixer, marker in (("mamba", "o"), ("attention", "s")):
        rows = [r for r in results["models"] if r["mixer"] == mixer and r["model"] == "DiM-XL/2" and r["train_ms"]]
        images, videos = [r for r in rows if r["frames"] == 1], [r for r in rows if r["frames"] > 1]
        name = "DiM-XL/2" if mixer == "mamba" else "DiT-XL/2 (attention)"
        step = lambda r: (r.get("train_graphed_ms") or r["train_ms"]) / r["batch"]  # graphed where it fits
        right.plot([r["tokens"] for r in images], [step(r) for r in images], marker + "-", label=name)
        right.plot([r["tokens"] for r in videos], [step(r) for r in videos], marker,
                   markerfacecolor="none", markersize=10, label=name + ", 16-frame video")
    right.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per sample (training step, graphed)",
              title="whole model, bf16")
    right.legend()
    figure.suptitle(f"{results['device']}, torch {results['torch']}")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


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
    scan.add_argument("--block", type=int, nargs="+", default=[scan_module.BLOCK],
                      help="block sizes (steps scanned one after another) of the parallel scan to try")
    scan.add_argument("--triton-config", nargs="+", default=None,
                      help="Triton backward kernel shapes to try, as DxTxW (channels per program x steps per tile "
                      "x warps; the forward takes the same steps per tile); default: scan.py's for each dtype")
    scan.add_argument("--triton-forward-config", nargs="+", default=[
        f"{scan_module.TRITON_FORWARD_BLOCK_D}x{scan_module.TRITON_FORWARD_WARPS}"],
        help="Triton forward kernel shapes to try, as DxW (channels per program x warps)")
    model = sub.add_parser("model", help="time DiM against attention, block and whole model (GPU)")
    model.add_argument("--models", nargs="+", default=["DiM-S/2", "DiM-XL/2"])
    model.add_argument("--scan", nargs="*", default=["triton", "parallel"], help="scans for the block sweep "
                       "(none: no block sweep)")
    model.add_argument("--sizes", nargs="+", default=None, help="whole-model inputs to time, as 256, 1024 or "
                       "256x16 (frames); default: all of " + ", ".join(
                           f"{side}" + (f"x{frames}" if frames > 1 else "") for side, frames, _ in SIZES))
    model.add_argument("--compile", action="store_true", help="also time torch.compile's training step and "
                       "sampling forward (compiling takes minutes)")
    model.add_argument("--model-scan", default="triton", help="scan for the whole-model timings")
    model.add_argument("--repeats", type=int, default=5)
    model.add_argument("--json", default=None, help="write all numbers to this file")
    sub.add_parser("sizes", help="parameters and GMACs of every preset (CPU)")
    plotter = sub.add_parser("plot", help="PNG plot from the JSON of `bench.py model` (needs matplotlib)")
    plotter.add_argument("--json", required=True)
    plotter.add_argument("--out", default="benchmarks.png")
    args = parser.parse_args(argv)
    if args.what == "model":
        if not torch.cuda.is_available():
            sys.exit("bench.py model times DiM against attention on a GPU, and torch sees none here "
                     "(bench.py scan and bench.py sizes run on the CPU)")
        return bench_model(args)
    if args.what == "sizes":
        return size_table()
    if args.what == "plot":
        return plot(args)
    bench_scan(args)


if __name__ == "__main__":
    main()
