"""The selective scan of Mamba (Gu & Dao, 2023), the token mixer at the heart of DiM.

DiM (Mo & Tian, arXiv 2405.15881) replaces DiT's attention with a bidirectional Mamba mixer; this
file is the recurrence that mixer runs, once left to right and once right to left. The public
function `selective_scan` has the semantics of `mamba_ssm`'s `selective_scan_fn`, plus `reverse`:

    delta = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (per channel d and state n; h = 0 before t = 0)
    y_t   = <C_t, h_t> + D * u_t,   then  y = y * silu(z)  if z is given

With `reverse=True` time runs from L-1 down to 0 (h_t depends on h_{t+1}), which is the backward
branch of the bidirectional mixer; no flipped copy of the inputs is made.

Three implementations (backend="ref", "parallel", "triton"), which the tests prove equal:
  selective_scan_ref     the definition: a Python loop over t. Slow on purpose; read it first.
  parallel_scan          pure PyTorch: the recurrence h_t = a_t h_{t-1} + b_t is solved chunk by
                         chunk of L, each chunk cut into blocks of a few steps that are all scanned
                         at once, one step after another, with recursive doubling (log-depth)
                         across the blocks; its gradient (parallel_scan_backward) runs the same scan
                         backwards. Memory grows with one chunk, never with (B, D, L, N).
  triton_scan            one fused Triton kernel forward and one backward, the state in registers,
                         checkpoints at tile boundaries. The fast path on GPUs.
backend="auto" takes Triton for CUDA tensors when it is installed, else the parallel scan; asking
for a backend that cannot run here is an error, never a silent fallback.

The step before the scan in a Mamba branch, silu of a short depthwise causal convolution over time
(`conv_silu`), lives here too: PyTorch's conv2d on the other backends, one Triton kernel each way
on the Triton one (a convolution of 4 taps is too little work to pay for PyTorch's launches and
copies on a GPU).

Glossary (shapes as in mamba_ssm):
  B  batch        D  channels        L  sequence length        N  state size
  u, delta, z : (B, D, L)      A : (D, N), negative      B, C : (B, N, L)      D, delta_bias : (D,)
  a_t = exp(delta_t A) is the decay of the state (0 < a <= 1), b_t = delta_t B_t u_t its input.

Inputs may be float32, bfloat16 or float16 (float64 for tests): the state and every sum are kept in
float32 (float64 stays float64) and the output has the dtype of `u`.
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "ref", "parallel", "triton")
CHUNK = 256  # steps per chunk of the parallel scan (a power of two): (256, B, N, D) fp32 at DiM-XL width is 302 MB
BLOCK = 16   # steps per block inside a chunk (a power of two), scanned one after another


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, backend="auto"):
    """y = selective scan of u (see the module docstring). Returns (batch, D, L) in u's dtype."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    backend = _resolve(backend, u.device)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    if backend == "triton":
        wants_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (u, delta, A, B, C, D, z, delta_bias))
        return triton_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, wants_grad)[0]
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u32, delta = u.to(compute), _prepare_delta(delta.to(compute), delta_bias, delta_softplus)
    y, _ = parallel_scan(u32, delta, A.to(compute), B.to(compute), C.to(compute), reverse)
    return _skip_and_gate(y, u32, D, z).to(u.dtype)


def conv_silu(x, weight, bias, reverse=False, backend="auto"):
    """silu of the depthwise causal convolution over time that feeds the scan in a Mamba branch:

        out_t = silu(bias + sum_j weight_j x_{t-(k-1)+j})      (x = 0 outside [0, L))

    x (B, D, L), weight (D, k), bias (D,). reverse: the anti-causal mirror image, which looks k - 1
    steps ahead instead of back, out_t = silu(bias + sum_j weight_j x_{t+(k-1)-j}). Returns (B, D, L)
    in x's dtype; for the mixer's channel-major x, stored channel-major (D, B, L), so that x_proj reads
    it as one (D, B L) matrix (the Triton kernels lay it out like x, PyTorch's conv always so). On the
    Triton backend one kernel forward and one backward (no padded copy, no separate SiLU); otherwise
    PyTorch's convolution, which the tests hold the kernels to."""
    if _resolve(backend, x.device) == "triton":
        return triton_conv_silu(x, weight, bias, reverse)
    batch, dim, length = x.shape
    k = weight.shape[1]
    weight = weight.flip(1) if reverse else weight
    # a conv2d over (1, D, B, L), k - 1 zeros both sides: its first L outputs look k - 1 steps back,
    # its last L (with the kernel flipped) k - 1 ahead
    out = F.conv2d(x.transpose(0, 1)[None], weight[:, None, None], bias, padding=(0, k - 1), groups=dim)[0]
    return F.silu(out[..., k - 1:] if reverse else out[..., :length]).transpose(0, 1)  # (B, D, L), stored (D, B, L)


def _resolve(backend, device):
    """The backend that runs: "auto" is Triton for CUDA tensors when it is installed, else the parallel
    scan; one that cannot run here is an error, never a silent fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "parallel"
    if backend == "triton" and not triton_available(device):
        raise RuntimeError("backend='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 "
                           f"on the CPU); got {device} tensors, Triton "
                           f"{'installed' if triton is not None else 'not installed'}")
    return backend


def _prepare_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None].to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z):
    if D is not None:
        y = y + D[:, None].to(y.dtype) * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    def expect(name, tensor, shape):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")

    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (D, N) = ({dim}, N), got {tuple(A.shape)}")
    state = A.shape[1]
    expect("delta", delta, (batch, dim, length))
    expect("z", z, (batch, dim, length))
    expect("B (batch, N, L)", B, (batch, state, length))
    expect("C (batch, N, L)", C, (batch, state, length))
    expect("D", D, (dim,))
    expect("delta_bias", delta_bias, (dim,))


#################################################################################
#                       The definition: a loop over time                        #
#################################################################################

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       reverse=False):
    """The selective scan, one time step after another. The definition the fast paths must equal."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u32, A, B, C = u.to(compute), A.to(compute), B.to(compute), C.to(compute)
    delta = _prepare_delta(delta.to(compute), delta_bias, delta_softplus)  # (B, D, L)
    h = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])                  # (B, D, N)
    ys = [None] * u.shape[2]
    for t in (reversed(range(u.shape[2])) if reverse else range(u.shape[2])):
        a = torch.exp(delta[:, :, t, None] * A)                           # (B, D, N)
        b = (delta[:, :, t] * u32[:, :, t])[:, :, None] * B[:, None, :, t]  # (B, D, N)
        h = a * h + b
        ys[t] = (h * C[:, None, :, t]).sum(-1)                            # (B, D)
    y = torch.stack(ys, dim=-1)                                           # (B, D, L)
    return _skip_and_gate(y, u32, D, z).to(u.dtype)


#################################################################################
#              The parallel scan: blocks of steps, log-depth across them        #
#################################################################################

def exclusive_scan(a, b, h0, reverse=False, out=None):
    """The state *before* each step of h_t = a_t h_{t-1} + b_t (h_{t+1} if reverse), starting from h0.

    a, b: (M, ...), M a power of two, with time in bit-reversed order: the first half holds the even
    time steps and the second half the odd ones, each half again in bit-reversed order. Recursive
    doubling then only ever touches contiguous halves: merge each pair of steps into one,
    (a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2); the state before each pair comes from the
    half-length problem, and the state between the two steps of a pair is a1 s + b1. Log-depth,
    O(M) work, and only decays (<= 1) are multiplied: nothing is divided, nothing overflows.
    """
    out = torch.empty_like(b) if out is None else out
    if b.shape[0] == 1:
        out[0] = h0
        return out
    half = b.shape[0] // 2
    even, odd = slice(0, half), slice(half, None)
    first, second = (odd, even) if reverse else (even, odd)  # which step of each pair the scan meets first
    a1, b1, a2, b2 = a[first], b[first], a[second], b[second]
    exclusive_scan(a2 * a1, torch.addcmul(b2, a2, b1), h0, reverse, out=out[first])
    torch.addcmul(b1, a1, out[first], out=out[second])
    return out


def blocked_scan(a, decay, states, h0=None, reverse=False):
    """Every state of h_t = a_t h_{t-1} + b_t over a chunk of q * P steps (h_{t+1} if reverse), in place.

    The chunk is P blocks of q consecutive steps: a[j, p] is step j of block p, with the blocks in
    bit-reversed order (see exclusive_scan); decay[p] is the product of block p's a. `states` is
    (q + 1, P, ...) with b_t in the slots of the states after each step, states[1:] (states[:q] if
    reverse); on return states[:q] holds the state before each step and states[1:] the state after
    (the other way round if reverse). Three passes, the way a GPU splits a scan between threads:
      1. each block alone, from a zero state, one step after another: what its b add up to;
      2. the state entering each block, by recursive doubling over those P sums from h0: log-depth;
      3. each block again, from its entry state: every state, written over b.
    Each of the 2q steps is one tensor operation on all P blocks at once, and the doubling only sees
    P = chunk / q entries, so the chunk's large tensors are read about twice in all; doubling over
    every step would read them about five times. The depth is 2q + log2(P) operations (q = 1 is
    plain recursive doubling over every step). With h0=None the entry states are already in their
    slot (the backward saved them) and only the third pass runs.
    """
    q = a.shape[0]
    order = range(q - 1, -1, -1) if reverse else range(q)
    after = 0 if reverse else 1  # states[j + after] is the state after step j
    if h0 is not None:
        total = states[order[0] + after]
        for j in order[1:]:
            total = torch.addcmul(states[j + after], a[j], total)
        exclusive_scan(decay, total, h0, reverse, out=states[q if reverse else 0])
    for j in order:
        states[j + after].addcmul_(a[j], states[j + 1 - after])
    return states


def bit_reversed(length, device):
    """The permutation that puts time steps 0..length-1 (a power of two) in bit-reversed order."""
    bits = max(length.bit_length() - 1, 0)
    steps = torch.arange(length, device=device)
    return sum(((steps >> i) & 1) << (bits - 1 - i) for i in range(bits)) if bits else steps


def _time_major(x, length):
    """(B, D or N, L) -> (length, B, D or N), contiguous, zero-padded in time: a step with delta = 0
    and u = 0 is the identity (a = 1, b = 0), so padding changes nothing before it or after it."""
    if length > x.shape[-1]:
        x = F.pad(x, (0, length - x.shape[-1]))
    return x.permute(2, 0, 1).contiguous()


def _chunks(padded, chunk, reverse, device):
    """The time steps of each chunk in the order the scan meets them, as (q, P) indices laid out for
    blocked_scan. With reverse the chunks simply take time from the end, so inside a chunk the scan
    always runs forward."""
    block = min(BLOCK, chunk)
    order = bit_reversed(chunk // block, device) * block + torch.arange(block, device=device)[:, None]  # (q, P)
    return [padded - 1 - start - order if reverse else start + order for start in range(0, padded, chunk)]


def _decay_base(At):
    """exp(A / s) (N, D) and s (D,), with s >= 1 just large enough that exp(A / s) >= e^-64 stays far
    from underflow. Then a = exp(delta A) = exp(A / s) ** (delta s): one pass over (q, P, B, N, D),
    where exp(delta * A) takes two (the product, then its exp)."""
    scale = (-At.amin(0) / 64).clamp(min=1)                                 # (D,)
    return torch.exp(At / scale), scale


def _decays(delta, base, scale):
    """a_t for every step, (q, P, B, N, D), and each block's product of them, exp(A * sum of its
    delta), (P, B, N, D): powers of numbers in (0, 1], both."""
    delta = delta * scale                                                    # (q, P, B, D)
    return torch.pow(base, delta[..., None, :]), torch.pow(base, delta.sum(0)[..., None, :])


def _states_holding_b(a, delta_u, B):
    """blocked_scan's (q + 1, P, B, N, D) states, with b_t = delta_t u_t B_t in the slots after each step."""
    h = a.new_empty(a.shape[0] + 1, *a.shape[1:])
    torch.mul(delta_u[..., None, :], B[..., None], out=h[1:])
    return h


def _forward_chunk(delta, u, B, C, base, scale, h0):
    """One chunk, inputs (q, P, B, D or N): y (q, P, B, D), the state after its last step, and the
    state entering each block (P, B, N, D), which the backward restarts from.
    State tensors are (q, P, B, N, D): channels innermost, so every broadcast runs along a long row."""
    a, decay = _decays(delta, base, scale)
    h = _states_holding_b(a, delta * u, B)
    blocked_scan(a, decay, h, h0)                                           # h[1:] = h_t
    y = torch.matmul(C[..., None, :], h[1:])[..., 0, :]                    # <C_t, h_t>: (q, P, B, D)
    return y, h[-1, -1].clone(), h[0].clone()  # after the last block's last step; entering each block


def _backward_chunk(delta, u, B, C, dy, At, base, scale, entries, k_next):
    """The gradients of one chunk from the states entering its blocks and k flowing back into it
    from the chunk after it: du, ddelta (q, P, B, D), dB, dC (q, P, B, N), dA^T (N, D), and k for
    the chunk before."""
    delta_u = delta * u                                                      # (q, P, B, D)
    a, decay = _decays(delta, base, scale)                                  # (q, P, B, N, D)
    h = _states_holding_b(a, delta_u, B)
    h[0] = entries
    blocked_scan(a, decay, h)                                               # h[:-1] = h_{t-1}, h[1:] = h_t
    dC = torch.matmul(h[1:], dy[..., None])[..., 0]                         # <h_t, dy_t>: (q, P, B, N)
    k = torch.empty_like(h)
    torch.mul(a, C[..., None], out=k[:-1]).mul_(dy[..., None, :])          # a_t e_t, e_t = C_t dy_t
    blocked_scan(a, decay, k, k_next, reverse=True)                         # k[:-1] = k_t, k[1:] = k_{t+1}
    del a
    # g_t = e_t + k_{t+1} is never formed: each contraction of it splits in two, and e's part is small
    g_B = torch.matmul(B[..., None, :], k[1:])[..., 0, :] \
        + dy * (B * C).sum(-1, keepdim=True)                                 # sum_n g B: (q, P, B, D)
    dB = torch.matmul(k[1:], delta_u[..., None])[..., 0] \
        + C * (dy * delta_u).sum(-1, keepdim=True)                           # sum_d g delta u: (q, P, B, N)
    k_prev = k[0, 0].clone()                                                # k of the chunk's first step
    g_log_a = h[:-1].mul_(k[:-1])                                           # g_t a_t h_{t-1} = k_t h_{t-1}
    del k
    ddelta = g_B * u + (g_log_a * At).sum(-2)
    dAt = g_log_a.mul_(delta[..., None, :]).sum((0, 1, 2))                  # (N, D)
    return g_B * delta, ddelta, dB, dC, dAt, k_prev


# Both fast scans are registered with torch.library as operators, a forward and a backward each,
# the backward attached as the forward's gradient (register_autograd). Eager code calls them like
# any function; torch.compile sees each as one opaque node, instead of unrolling the loops over
# chunks or failing to trace a Triton launch, so a compiled DiM has no graph break at its scans.
# An operator's fake version (what compile runs on tensors without data, to learn the shapes and
# strides of the outputs) is the function itself where that is plain PyTorch, and the function with
# its kernel launch skipped for Triton: one piece of code decides the layouts, never two.

def _operator(name, function, fake=None):
    """`function` registered as the operator dim::name, with `fake` (or itself) as its fake version."""
    op = torch.library.custom_op(f"dim::{name}", function, mutates_args=())
    op.register_fake(fake or function)
    return op


def _chunking(length):
    """The parallel scan's chunk (a power of two, no longer than needed) and the padded length."""
    chunk = 1 << (min(CHUNK, length) - 1).bit_length()
    return chunk, -(-length // chunk) * chunk


def _parallel_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """y_t = <C_t, h_t> for h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, chunk by chunk.

    Time is cut into chunks of CHUNK steps, each chunk into blocks of BLOCK steps (powers of two),
    and every state inside a chunk comes from blocked_scan. Returns y (B, D, L) and, for the
    backward, the state entering each block, (chunks, P, B, N, D): a BLOCK-th of all the states.
    The backward walks the chunks against the scan's direction, recomputes a chunk's states from
    those, and solves the adjoint recurrence with the same scan in the other direction: for
    k_t = a_t g_t, the part of g = dLoss/dh that flows back through step t,
        k_t = a_t k_{t+1} + a_t e_t   with  e_t = C_t dy_t,   and   g_t = e_t + k_{t+1}.
    Every gradient is read off e, k and the states without dividing by a decay: db_t = g_t and
    d(delta_t A) = g_t a_t h_{t-1} = k_t h_{t-1}.
    Autocast is off inside: under bf16 autocast the matmuls would round the fp32 sums to bf16.
    """
    with torch.autocast(u.device.type, enabled=False):
        length, layout = u.shape[-1], u
        chunk, padded = _chunking(length)
        u, delta, B, C = (_time_major(x, padded) for x in (u, delta, B, C))  # (L', B, D) and (L', B, N)
        y = torch.empty_like(u)                                              # (L', B, D)
        At = A.t().contiguous()                                              # (N, D)
        base, scale = _decay_base(At)
        h = u.new_zeros(u.shape[1], *At.shape)                               # (B, N, D)
        entries = []
        for steps in _chunks(padded, chunk, reverse, u.device):             # steps: (q, P)
            y[steps], h, entry = _forward_chunk(delta[steps], u[steps], B[steps], C[steps], base, scale, h)
            entries.append(entry)
        # y laid out like u, and the gradients below like their inputs: elementwise work that mixes
        # them then runs along rows, and torch.compile's idea of the strides of its results is the
        # one the real kernels give (it differs for mixed layouts)
        y = _in_layout(y[:length].permute(1, 2, 0), layout)                 # (B, D, L)
        return y, torch.stack(entries)                                       # (chunks, P, B, N, D)


def _parallel_scan_backward(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, entries: Tensor,
                            reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """du, ddelta (B, D, L), dA (D, N), dB, dC (B, N, L) of parallel_scan, from its inputs and entries."""
    with torch.autocast(u.device.type, enabled=False):
        length, inputs = u.shape[-1], (u, delta, B, C)
        chunk, padded = _chunking(length)
        u, delta, B, C, dy = (_time_major(x, padded) for x in (u, delta, B, C, dy))  # (L', B, D or N)
        At = A.t().contiguous()                                              # (N, D)
        base, scale = _decay_base(At)
        du, ddelta, dB, dC = (torch.empty_like(x) for x in (u, delta, B, C))
        dAt = torch.zeros_like(At)
        k = torch.zeros_like(entries[0, 0])  # a g flowing back from the chunk after this one
        chunks = _chunks(padded, chunk, reverse, u.device)
        for i in reversed(range(len(chunks))):
            steps = chunks[i]
            du[steps], ddelta[steps], dB[steps], dC[steps], dAt_chunk, k = _backward_chunk(
                delta[steps], u[steps], B[steps], C[steps], dy[steps], At, base, scale, entries[i], k)
            dAt += dAt_chunk
        du, ddelta, dB, dC = (_in_layout(x[:length].permute(1, 2, 0), like)  # (B, D or N, L)
                              for x, like in zip((du, ddelta, dB, dC), inputs))
        return du, ddelta, dAt.t(), dB, dC


parallel_scan = _operator("parallel_scan", _parallel_scan)
parallel_scan_backward = _operator("parallel_scan_backward", _parallel_scan_backward)


def _only_y_has_a_gradient(ctx, output):
    """What the forward keeps for the backward is no output to differentiate. Without this, autograd
    would hand the backward a gradient of zeros for each, filled at every step (states: u's size in
    fp32); with it, the gradient of an unused output is None."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _parallel_setup(ctx, inputs, output):
    u, delta, A, B, C, ctx.reverse = inputs
    ctx.save_for_backward(u, delta, A, B, C, output[1])
    _only_y_has_a_gradient(ctx, output)


def _parallel_gradient(ctx, dy, _):
    if dy is None:  # y not used: nothing flows back
        return (None,) * 6
    return *parallel_scan_backward(dy, *ctx.saved_tensors, ctx.reverse), None


parallel_scan.register_autograd(_parallel_gradient, setup_context=_parallel_setup)


#################################################################################
#                    The fused Triton kernel: forward and backward              #
#################################################################################
#
# One program per (batch, block of BLOCK_D channels). The state (BLOCK_D, N) stays in registers in
# fp32 while the program walks L in tiles of T steps; each tile's u, delta, z (BLOCK_D, T) and B, C
# (N, T) are loaded at once, a tile ahead. The forward then steps through the tile one time step after
# another (the recurrence as written) and stores y and the state entering each tile (the checkpoints),
# and, for a backward, y before the gate. The backward walks the tiles the other way: it recomputes a
# tile's states from its checkpoint, one step at a time, keeps the T of them in registers, and walks
# the tile backwards through the adjoint recurrence. `reverse` only changes the order of tiles and
# steps: nothing is flipped in memory.

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton
    triton = None

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): the hardware computes exp2

    @triton.jit
    def _softplus(x):
        e = tl.exp(x)  # log(1 + e) loses digits for small e: use its series there
        return tl.where(x > 20.0, x, tl.where(x < -5.0, e * (1.0 - 0.5 * e), tl.log(1.0 + e)))

    @triton.jit
    def _tile_offsets(rows, d, t, dim, length):
        """Where a (BLOCK_D, T) tile of a (B, D, L) tensor lies (rows: where each channel's row starts),
        and which of its entries exist."""
        valid = (d[:, None] < dim) & (t[None, :] >= 0) & (t[None, :] < length)
        return rows[:, None] + t[None, :], valid

    @triton.jit
    def _load_rows(x_ptr, rows, d, t, dim, length, PRESENT: tl.constexpr):
        """A (BLOCK_D, T) tile of a (B, D, L) tensor as stored, zero outside [0, L); 0.0 if the tensor
        is absent. The kernels ask for the next tile's inputs before they work on this one, so the
        memory latency hides behind a tile of arithmetic instead of stalling every tile."""
        offsets, valid = _tile_offsets(rows, d, t, dim, length)
        return tl.load(x_ptr + offsets, mask=valid, other=0.0) if PRESENT else 0.0

    @triton.jit
    def _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, rows, state_rows, d, t, dim, length):
        """A tile's u, delta (BLOCK_D, T) and B, C (N, T) as stored, zero outside [0, L)."""
        state_offsets = state_rows[:, None] + t[None, :]
        state_valid = (t[None, :] >= 0) & (t[None, :] < length)
        return (_load_rows(u_ptr, rows, d, t, dim, length, True),
                _load_rows(delta_ptr, rows, d, t, dim, length, True),
                tl.load(B_ptr + state_offsets, mask=state_valid, other=0.0),
                tl.load(C_ptr + state_offsets, mask=state_valid, other=0.0))

    @triton.jit
    def _checkpoint_offsets(batch, d, tile, dim, num_tiles, N: tl.constexpr):
        """Where the state entering `tile` lies in the checkpoints (B, D, num_tiles, N): (BLOCK_D, N)."""
        n = tl.arange(0, N)
        return ((batch * dim + d[:, None]) * num_tiles + tile) * N + n[None, :]

    @triton.jit
    def _load_checkpoint(states_ptr, batch, d, tile, dim, num_tiles, N: tl.constexpr):
        """The state entering `tile` (BLOCK_D, N), zero for a tile outside [0, num_tiles)."""
        inside = (d[:, None] < dim) & (tile >= 0) & (tile < num_tiles)
        return tl.load(states_ptr + _checkpoint_offsets(batch, d, tile, dim, num_tiles, N), mask=inside, other=0.0)

    @triton.jit
    def _load_gradient_inputs(dout_ptr, z_ptr, ungated_ptr, states_ptr, batch, rows, d, t, tile, dim, length,
                              num_tiles, HAS_Z: tl.constexpr, N: tl.constexpr):
        """What the backward reads besides _load_tile's: dy, z and y before the gate (BLOCK_D, T), and
        the checkpoint entering the tile (BLOCK_D, N)."""
        return (_load_rows(dout_ptr, rows, d, t, dim, length, True),
                _load_rows(z_ptr, rows, d, t, dim, length, HAS_Z),
                _load_rows(ungated_ptr, rows, d, t, dim, length, HAS_Z),
                _load_checkpoint(states_ptr, batch, d, tile, dim, num_tiles, N))

    @triton.jit
    def _prepare(u, delta_raw, B, C, bias, valid, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """In fp32: u, delta before and after bias + softplus, B and C. delta is zero past the end:
        a = 1, b = 0 there, the identity step."""
        delta_raw = delta_raw.to(tl.float32)
        if HAS_BIAS:
            delta_raw += bias[:, None]
        delta = _softplus(delta_raw) if SOFTPLUS else delta_raw
        delta = tl.where(valid, delta, 0.0)
        return u.to(tl.float32), delta_raw, delta, B.to(tl.float32), C.to(tl.float32)

    @triton.jit
    def _column(tile, here):
        """Column `here` (a one-hot mask over T) of a (rows, T) tile, as (rows,): a select, not a load."""
        return tl.sum(tl.where(here[None, :], tile, 0.0), axis=1)

    @triton.jit
    def _set_column(tile, here, value):
        """The (rows, T) tile with column `here` replaced by value (rows,)."""
        return tl.where(here[None, :], value[:, None], tile)

    @triton.jit
    def _advance(h, delta, delta_u, B, here, A_log2):
        """The state after the step in column `here`: exp(delta A) h + delta u B, (BLOCK_D, N)."""
        return tl.exp2(_column(delta, here)[:, None] * A_log2) * h \
            + _column(delta_u, here)[:, None] * _column(B, here)[None, :]

    @triton.jit
    def _index(x, WIDE: tl.constexpr):
        """x for offsets: int64 when a tensor holds 2**31 elements or more (int32 would wrap), else as is."""
        return x.to(tl.int64) if WIDE else x

    @triton.jit
    def _scan_forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                             y_ptr, ungated_ptr, states_ptr, dim, length, num_tiles,
                             stride_batch, stride_dim, state_stride_batch, state_stride_n,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                             SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, KEEP_STATES: tl.constexpr,
                             N: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, WIDE: tl.constexpr):
        # The recurrence as written, one step after another, with the state (BLOCK_D, N) in registers:
        # a step costs one exp2 and two multiply-adds per (channel, state). The inputs of T steps are
        # loaded at once, coalesced, a tile ahead, and each step picks its column out of the registers,
        # so memory latency hides behind a tile of work. For a backward, the state entering each tile
        # (the checkpoints) and y before the gate are stored too.
        batch = _index(tl.program_id(0), WIDE)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)                  # (BLOCK_D,)
        n = tl.arange(0, N)
        steps = tl.arange(0, T)
        rows = batch * stride_batch + _index(d, WIDE) * stride_dim              # where each row starts
        state_rows = batch * state_stride_batch + n * state_stride_n           # (N,), in B and C
        A_log2 = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=d[:, None] < dim, other=0.0) * LOG2E
        bias = tl.load(bias_ptr + d, mask=d < dim, other=0.0) if HAS_BIAS else 0.0
        skip = tl.load(D_ptr + d, mask=d < dim, other=0.0) if HAS_D else 0.0
        h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        ahead = (num_tiles - 1 if REVERSE else 0) * T + steps                  # the first tile's steps
        u_next, delta_next, B_next, C_next = _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, rows, state_rows, d, ahead,
                                                        dim, length)
        z_next = _load_rows(z_ptr, rows, d, ahead, dim, length, HAS_Z)
        for i in range(num_tiles):
            tile = num_tiles - 1 - i if REVERSE else i
            t = tile * T + steps
            u, delta_raw, B, C, z = u_next, delta_next, B_next, C_next, z_next
            ahead = t - T if REVERSE else t + T                                 # the next tile's, early
            u_next, delta_next, B_next, C_next = _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, rows, state_rows, d,
                                                            ahead, dim, length)
            z_next = _load_rows(z_ptr, rows, d, ahead, dim, length, HAS_Z)
            offsets, valid = _tile_offsets(rows, d, t, dim, length)
            u, delta_raw, delta, B, C = _prepare(u, delta_raw, B, C, bias, valid, HAS_BIAS, SOFTPLUS)
            if KEEP_STATES:  # the checkpoint, for the backward (not when no gradient is wanted)
                tl.store(states_ptr + _checkpoint_offsets(batch, d, tile, dim, num_tiles, N), h, mask=d[:, None] < dim)
            delta_u = delta * u
            y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
            for s in tl.static_range(T):
                here = steps == (T - 1 - s if REVERSE else s)                   # this step's column
                h = _advance(h, delta, delta_u, B, here, A_log2)                # (BLOCK_D, N)
                y = _set_column(y, here, tl.sum(h * _column(C, here)[None, :], axis=1))
            if HAS_D:
                y += skip[:, None] * u
            if HAS_Z:
                if KEEP_STATES:  # y before the gate, in u's dtype: the backward's dz needs it
                    tl.store(ungated_ptr + offsets, y, mask=valid)
                z = z.to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(y_ptr + offsets, y, mask=valid)

    @triton.jit
    def _scan_backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                              ungated_ptr, states_ptr, dout_ptr,
                              du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr, dim, length, num_tiles,
                              stride_batch, stride_dim, state_stride_batch, state_stride_n,
                              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                              SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
                              N: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, WIDE: tl.constexpr):
        # The tiles against the scan's order. Each tile runs twice, one step at a time like the forward:
        # first forward from its checkpoint, keeping every state it passes through (a tuple of T + 1
        # register tiles (BLOCK_D, N): the unrolled loop names each one), then backward through the adjoint
        #     g_t = C_t dy_t + m,   m <- a_t g_t   (m: what flows back into the step before)
        # with every gradient read off g and the states: dB and dC as sums over the channels a step,
        # du and ddelta from two sums over the states a step, put together once a tile.
        batch, block = _index(tl.program_id(0), WIDE), tl.program_id(1)
        d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, N)
        steps = tl.arange(0, T)
        rows = batch * stride_batch + _index(d, WIDE) * stride_dim
        state_rows = batch * state_stride_batch + n * state_stride_n
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=d[:, None] < dim, other=0.0)
        A_log2 = A * LOG2E
        bias = tl.load(bias_ptr + d, mask=d < dim, other=0.0) if HAS_BIAS else 0.0
        skip = tl.load(D_ptr + d, mask=d < dim, other=0.0) if HAS_D else 0.0
        message = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        dA = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
        following = 0 if REVERSE else num_tiles - 1                              # the first tile
        ahead = following * T + steps
        u_next, delta_next, B_next, C_next = _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, rows, state_rows, d, ahead,
                                                        dim, length)
        dy_next, z_next, y_next, h_next = _load_gradient_inputs(
            dout_ptr, z_ptr, ungated_ptr, states_ptr, batch, rows, d, ahead, following, dim, length, num_tiles,
            HAS_Z, N)
        for i in range(num_tiles):
            tile = i if REVERSE else num_tiles - 1 - i
            t = tile * T + steps
            u, delta_raw, B, C, dy, z, y, h = u_next, delta_next, B_next, C_next, dy_next, z_next, y_next, h_next
            following = tile + 1 if REVERSE else tile - 1                        # the next tile's, early
            ahead = t + T if REVERSE else t - T
            u_next, delta_next, B_next, C_next = _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, rows, state_rows, d,
                                                            ahead, dim, length)
            dy_next, z_next, y_next, h_next = _load_gradient_inputs(
                dout_ptr, z_ptr, ungated_ptr, states_ptr, batch, rows, d, ahead, following, dim, length, num_tiles,
                HAS_Z, N)
            offsets, valid = _tile_offsets(rows, d, t, dim, length)
            u, delta_raw, delta, B, C = _prepare(u, delta_raw, B, C, bias, valid, HAS_BIAS, SOFTPLUS)
            delta_u = delta * u
            dy = dy.to(tl.float32)
            path = (h,)                                                         # path[s]: the state before loop step s
            for s in tl.static_range(T):  # forward: the states
                k = T - 1 - s if REVERSE else s                                 # the step within the tile
                h = _advance(h, delta, delta_u, B, steps == k, A_log2)
                path = path + (h,)
            if HAS_Z:  # y_out = y * silu(z), with y (before the gate) as the forward stored it
                z = z.to(tl.float32)
                sig = tl.sigmoid(z)
                tl.store(dz_ptr + offsets, dy * y.to(tl.float32) * sig * (1.0 + z * (1.0 - sig)), mask=valid)
                dy = dy * z * sig
            g_B = tl.zeros((BLOCK_D, T), dtype=tl.float32)                     # sum_n g B, each step
            g_A = tl.zeros((BLOCK_D, T), dtype=tl.float32)                     # sum_n g a h_{t-1} A
            dB = tl.zeros((N, T), dtype=tl.float32)
            dC = tl.zeros((N, T), dtype=tl.float32)
            for s in tl.static_range(T):  # backward: the adjoint, one step at a time
                k = s if REVERSE else T - 1 - s
                here = steps == k
                h_prev, h = path[T - 1 - s], path[T - s]                        # before and after step k
                delta_s, delta_u_s, dy_s = _column(delta, here), _column(delta_u, here), _column(dy, here)
                B_s, C_s = _column(B, here), _column(C, here)
                a = tl.exp2(delta_s[:, None] * A_log2)                              # (BLOCK_D, N)
                g = message + dy_s[:, None] * C_s[None, :]                          # dLoss/dh_t
                dC = _set_column(dC, here, tl.sum(h * dy_s[:, None], axis=0))
                dB = _set_column(dB, here, tl.sum(g * delta_u_s[:, None], axis=0))
                g_B = _set_column(g_B, here, tl.sum(g * B_s[None, :], axis=1))
                g_log_a = g * a * h_prev                                            # g a h_{t-1}
                g_A = _set_column(g_A, here, tl.sum(g_log_a * A, axis=1))
                dA += g_log_a * delta_s[:, None]
                message = a * g
            du, ddelta = g_B * delta, g_B * u + g_A
            if SOFTPLUS:
                ddelta = ddelta * tl.sigmoid(delta_raw)
            if HAS_D:
                du += skip[:, None] * dy
                dD += tl.sum(dy * u, axis=1)
            tl.store(du_ptr + offsets, du, mask=valid)
            tl.store(ddelta_ptr + offsets, ddelta, mask=valid)
            # dB and dC sum over all channels: each program adds its block's share, (N, T), with fp32
            # atomics (as mamba_ssm does): no per-block partial sums in memory, but the order of the
            # additions, and so the last bits of dB and dC, vary from run to run. Relaxed: only the sum
            # matters, so no memory barrier around them (with one, the backward took 20% longer).
            state_offsets = state_rows[:, None] + t[None, :]                    # dB, dC are laid out like B
            tl.atomic_add(dC_ptr + state_offsets, dC, mask=t[None, :] < length, sem="relaxed")
            tl.atomic_add(dB_ptr + state_offsets, dB, mask=t[None, :] < length, sem="relaxed")
        tl.store(dA_ptr + (batch * dim + d[:, None]) * N + n[None, :], dA, mask=d[:, None] < dim)
        if HAS_D:
            tl.store(dD_ptr + batch * dim + d, dD, mask=d < dim)


TRITON_BLOCK_D, TRITON_WARPS = 4, 1                  # backward: channels per program, warps
TRITON_FORWARD_BLOCK_D, TRITON_FORWARD_WARPS = 16, 1    # forward: channels per program, warps
TRITON_TILE_BYTES = 32  # a tile of both kernels is 32 bytes of a row: 16 steps of bf16 inputs, 8 of fp32
WIDE_ELEMENTS = 2**31   # from this many elements in a tensor on, the kernels compute offsets in 64 bits


def _wide(*tensors):
    """Whether a kernel must address in 64 bits: int32 offsets wrap at 2**31 elements (a sampling batch
    of 2,000 at DiM-S/2 on 64 px passes it). Below, the kernels run as they were timed, in 32 bits."""
    return max(t.numel() for t in tensors) >= WIDE_ELEMENTS


def triton_available(device):
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _triton_inputs(u, delta, A, B, C, D, z, delta_bias):
    """The inputs as the kernels take them, and an empty tensor like u in their layout (the forward's y,
    the backward's du). The kernels take any layout whose steps are contiguous, one for u, delta, z, y
    (and their gradients), one for B and C: (B, D, L) as mamba_ssm stores them, or channel-major as
    DiM's mixer does, with no copy. Anything else is copied into such a layout."""
    out = _kernel_layout(u)
    u, delta, z = (_in_layout(x, out) for x in (u, delta, z))
    B = _in_layout(B, _kernel_layout(B))
    C = _in_layout(C, B)
    A, D, delta_bias = A.float().contiguous(), _float_or_none(D), _float_or_none(delta_bias)
    tile = TRITON_TILE_BYTES // u.element_size()  # steps; at 16 fp32 steps Triton lays the tiles out worse
    return u, delta, A, B, C, D, z, delta_bias, out, tile, -(-u.shape[-1] // tile)


def _triton_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, wants_grad, launch):
    """y (B, D, L), the checkpoints (B, D, L/T, N) fp32 and y before the gate (B, D, L) in u's dtype, the
    last two only for a backward (else empty). launch=False only makes the outputs (compile's fake run)."""
    u, delta, A, B, C, D, z, delta_bias, y, tile, num_tiles = _triton_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    state = A.shape[1]
    # the checkpoints, the state entering each tile in fp32 (u's size in fp32 at T = N = 16)
    states = u.new_empty((batch, dim, num_tiles, state) if wants_grad else (0,), dtype=torch.float32)
    # y before the gate, for dz (recomputing it costs the backward a sum over N each step), in u's dtype
    # as mamba_ssm keeps it: dz is rounded to that dtype anyway, and in bf16 this saves 2 bytes a value
    ungated = torch.empty_like(u) if wants_grad and z is not None else u.new_empty(0)
    if launch:
        grid = (batch, triton.cdiv(dim, TRITON_FORWARD_BLOCK_D))
        _scan_forward_kernel[grid](u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A), y, ungated,
                                   states, dim, length, num_tiles, *y.stride()[:2], *B.stride()[:2],
                                   D is not None, z is not None,
                                   delta_bias is not None, delta_softplus, reverse, wants_grad, state,
                                   TRITON_FORWARD_BLOCK_D, tile, _wide(u, states), num_warps=TRITON_FORWARD_WARPS)
    return y, states, ungated


def _triton_backward(dout, u, delta, A, B, C, D, z, delta_bias, ungated, states, delta_softplus, reverse, launch):
    """[du, ddelta, dA, dB, dC, dD, dz, ddelta_bias], each like its input (empty where the input is None)."""
    delta_dtype, B_dtype, C_dtype = delta.dtype, B.dtype, C.dtype
    u, delta, A, B, C, D, z, delta_bias, du, tile, num_tiles = _triton_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    state = A.shape[1]
    dout = _in_layout(dout, u)
    ddelta = torch.empty_like(delta, dtype=torch.float32)                   # laid out like u
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA = u.new_empty(batch, dim, state, dtype=torch.float32)
    dD = u.new_empty(batch, dim, dtype=torch.float32)
    dB, dC = (torch.zeros_like(B, dtype=torch.float32) for _ in range(2))  # atomic sums, laid out like B
    if launch:
        _scan_backward_kernel[(batch, triton.cdiv(dim, TRITON_BLOCK_D))](
            u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A), ungated, states, dout,
            du, ddelta, dz, dA, dD, dB, dC, dim, length, num_tiles, *u.stride()[:2], *B.stride()[:2],
            D is not None, z is not None, delta_bias is not None, delta_softplus, reverse,
            state, TRITON_BLOCK_D, tile, _wide(u, states), num_warps=TRITON_WARPS)
    dD = dD.sum(0) if D is not None else u.new_empty(0)
    dbias = ddelta.sum(dim=(0, 2)) if delta_bias is not None else u.new_empty(0)
    return [du, ddelta.to(delta_dtype), dA.sum(0), dB.to(B_dtype), dC.to(C_dtype), dD, dz, dbias]


def _triton_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                 delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool,
                 wants_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The whole selective_scan (bias, softplus, D, z, reverse) in one kernel; see _triton_forward."""
    return _triton_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, wants_grad, launch=True)


def _triton_scan_backward(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], ungated: Tensor,
                          states: Tensor, delta_softplus: bool, reverse: bool) -> list[Tensor]:
    """The gradients of triton_scan in one kernel (and a few sums); see _triton_backward."""
    return _triton_backward(dout, u, delta, A, B, C, D, z, delta_bias, ungated, states, delta_softplus, reverse,
                            launch=True)


triton_scan = _operator("triton_scan", _triton_scan,
                        lambda *args: _triton_forward(*args, launch=False))
triton_scan_backward = _operator("triton_scan_backward", _triton_scan_backward,
                                 lambda *args: _triton_backward(*args, launch=False))


def _triton_setup(ctx, inputs, output):
    *tensors, ctx.delta_softplus, ctx.reverse, _ = inputs                   # u, delta, A, B, C, D, z, delta_bias
    ctx.save_for_backward(*tensors, output[2], output[1])                   # ..., ungated, states
    _only_y_has_a_gradient(ctx, output)
    ctx.given = [x is not None for x in tensors]


def _triton_gradient(ctx, dout, _, __):
    if dout is None:  # y not used: nothing flows back
        return (None,) * 11
    grads = triton_scan_backward(dout, *ctx.saved_tensors, ctx.delta_softplus, ctx.reverse)
    return *(grad if given else None for grad, given in zip(grads, ctx.given)), None, None, None


triton_scan.register_autograd(_triton_gradient, setup_context=_triton_setup)


#################################################################################
#            The convolution before the scan: one Triton kernel each way        #
#################################################################################
#
# One program per (sequence of one channel, tile of CONV_BLOCK_L steps). The forward loads the tile k
# times, shifted by one step each time (the shifted loads hit the cache), and stores silu of the sum.
# The backward needs the gradient before the SiLU at the k steps each x_t feeds: it recomputes the
# convolution there (k^2 cached loads a step) rather than store it, so it reads x and dout once and
# writes dx once; each program adds its tile's share of dweight and dbias to partial sums, added up
# afterwards in a fixed order (the same bits every run).

if triton is not None:
    @triton.jit
    def _conv_shift(j, K: tl.constexpr, REVERSE: tl.constexpr):
        """Where weight j reads, relative to the output step: j - (k-1) causal, (k-1) - j reversed."""
        return K - 1 - j if REVERSE else j - (K - 1)

    @triton.jit
    def _conv_pre(x_row, w_row, bias, t, length, K: tl.constexpr, REVERSE: tl.constexpr):
        """The convolution before its SiLU at steps t (BLOCK_L,), in fp32."""
        pre = tl.zeros(t.shape, tl.float32) + bias
        for j in tl.static_range(K):
            source = t + _conv_shift(j, K, REVERSE)
            x = tl.load(x_row + source, mask=(source >= 0) & (source < length), other=0.0)
            pre += tl.load(w_row + j) * x.to(tl.float32)
        return pre

    @triton.jit
    def _conv_forward_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, batch, length, stride_batch, stride_dim,
                             K: tl.constexpr, REVERSE: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr):
        row = _index(tl.program_id(0), WIDE)                                    # d * batch + b
        d, b = row // batch, row % batch
        t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        start = b * stride_batch + d * stride_dim                               # where the row starts in x, out
        pre = _conv_pre(x_ptr + start, w_ptr + d * K, tl.load(bias_ptr + d), t, length, K, REVERSE)
        tl.store(out_ptr + start + t, pre * tl.sigmoid(pre), mask=t < length)

    @triton.jit
    def _conv_backward_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, partial_ptr, batch, length, stride_batch,
                              stride_dim, K: tl.constexpr, REVERSE: tl.constexpr, BLOCK_L: tl.constexpr,
                              WIDE: tl.constexpr):
        row, tile = _index(tl.program_id(0), WIDE), tl.program_id(1)
        d, b = row // batch, row % batch
        t = tile * BLOCK_L + tl.arange(0, BLOCK_L)
        start = b * stride_batch + d * stride_dim                               # in x, dout and dx
        x_row, w_row, bias = x_ptr + start, w_ptr + d * K, tl.load(bias_ptr + d)
        dx = tl.zeros((BLOCK_L,), tl.float32)
        g = tl.zeros((BLOCK_L,), tl.float32)
        for j in tl.static_range(K):  # x_t reaches the output at s = t - shift_j through weight j
            s = t - _conv_shift(j, K, REVERSE)
            pre = _conv_pre(x_row, w_row, bias, s, length, K, REVERSE)
            sig = tl.sigmoid(pre)
            dout = tl.load(dout_ptr + start + s, mask=(s >= 0) & (s < length), other=0.0).to(tl.float32)
            g_s = dout * sig * (1.0 + pre * (1.0 - sig))                       # dLoss/dpre at s
            dx += tl.load(w_row + j) * g_s
            if j == K - 1:                                                     # shift 0, s = t: for dweight
                g = g_s
        tl.store(dx_ptr + start + t, dx, mask=t < length)                      # dx laid out like x
        partial = partial_ptr + (row * tl.num_programs(1) + tile) * (K + 1)    # (D, B, tiles, k + 1)
        for j in tl.static_range(K):
            source = t + _conv_shift(j, K, REVERSE)
            x = tl.load(x_row + source, mask=(source >= 0) & (source < length), other=0.0).to(tl.float32)
            tl.store(partial + j, tl.sum(g * x))
        tl.store(partial + K, tl.sum(g))


# steps per program (at most), warps: 4 steps a thread was the fastest backward of 256-1024 x 1-8 warps
# on an H200 (0.154 ms at B=32, D=2304, L=256 in bf16; the forward 0.048 ms for any of them)
CONV_BLOCK_L, CONV_WARPS = 256, 2


def _conv_inputs(x, weight, bias):
    """x in a layout the kernels take, an empty tensor in that layout (the forward's out, the backward's
    dx: x, out, dout and dx share one layout), fp32 weight and bias, and the steps a program takes."""
    like = _kernel_layout(x)
    block = min(CONV_BLOCK_L, max(16, 1 << (x.shape[-1] - 1).bit_length()))
    return _in_layout(x, like), like, weight.float().contiguous(), bias.float().contiguous(), block


def _conv_forward(x, weight, bias, reverse, launch):
    """out (B, D, L), laid out like x (channel-major (D, B, L) in the mixer)."""
    x, out, weight, bias, block = _conv_inputs(x, weight, bias)
    batch, dim, length = x.shape
    if launch:
        _conv_forward_kernel[(dim * batch, -(-length // block))](
            x, weight, bias, out, batch, length, *x.stride()[:2], weight.shape[1], reverse, block, _wide(x),
            num_warps=CONV_WARPS)
    return out


def _conv_backward(dout, x, weight, bias, reverse, launch):
    """dx (like x), dweight (D, k) and dbias (D,) in fp32."""
    x, dx, weight, bias, block = _conv_inputs(x, weight, bias)
    batch, dim, length = x.shape
    dout = _in_layout(dout, x)
    tiles = -(-length // block)
    partial = x.new_empty(dim, batch, tiles, weight.shape[1] + 1, dtype=torch.float32)
    if launch:
        _conv_backward_kernel[(dim * batch, tiles)](
            x, weight, bias, dout, dx, partial, batch, length, *x.stride()[:2], weight.shape[1], reverse, block,
            _wide(x), num_warps=CONV_WARPS)
    return dx, partial[..., :-1].sum((1, 2)), partial[..., -1].sum((1, 2))   # (D, k), (D,)


def _triton_conv_silu(x: Tensor, weight: Tensor, bias: Tensor, reverse: bool) -> Tensor:
    """conv_silu in one Triton kernel; see _conv_forward."""
    return _conv_forward(x, weight, bias, reverse, launch=True)


def _triton_conv_silu_backward(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                               reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of triton_conv_silu in one kernel (and a sum); see _conv_backward."""
    return _conv_backward(dout, x, weight, bias, reverse, launch=True)


triton_conv_silu = _operator("triton_conv_silu", _triton_conv_silu,
                             lambda *args: _conv_forward(*args, launch=False))
triton_conv_silu_backward = _operator("triton_conv_silu_backward", _triton_conv_silu_backward,
                                      lambda *args: _conv_backward(*args, launch=False))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, ctx.reverse = inputs
    ctx.save_for_backward(x, weight, bias)


def _conv_gradient(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = triton_conv_silu_backward(dout, x, weight, bias, ctx.reverse)
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype), None


triton_conv_silu.register_autograd(_conv_gradient, setup_context=_conv_setup)


def _kernel_layout(x):
    """An empty tensor like x in a layout the kernels take: x's own where its steps (the last axis) are
    contiguous and it has no gaps (empty_like keeps such strides), else contiguous."""
    out = torch.empty_like(x)
    return out if out.stride(-1) == 1 else torch.empty_like(x, memory_format=torch.contiguous_format)


def _in_layout(x, layout):
    """x with the strides of `layout` (a copy only where they differ; axes of size 1 have no stride)."""
    if x is None or all(a == b for a, b, n in zip(x.stride(), layout.stride(), x.shape) if n > 1):
        return x
    return torch.empty_like(layout, dtype=x.dtype).copy_(x)


def _float_or_none(x):
    return x.float().contiguous() if x is not None else None


def _or(x, placeholder):
    """Triton needs a pointer even where a flag turns the input off."""
    return x if x is not None else placeholder
