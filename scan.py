"""The selective scan of Mamba (Gu & Dao, 2023), the token mixer at the heart of DiM.

DiM (Mo & Tian, arXiv 2405.15881) replaces DiT's attention with a bidirectional Mamba mixer; this
file is the recurrence that mixer runs, once left to right and once right to left. The public
function `selective_scan` has the semantics of `mamba_ssm`'s `selective_scan_fn`, plus `reverse`:

    delta = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (per channel d and state n; h = 0 before t = 0)
    y_t   = <C_t, h_t> + D * u_t,   then  y = y * silu(z)  if z is given

With `reverse=True` time runs from L-1 down to 0 (h_t depends on h_{t+1}), which is the backward
branch of the bidirectional mixer; no flipped copy of the inputs is made.

Two implementations, which the tests prove equal:
  selective_scan_ref     the definition: a Python loop over t. Slow on purpose; read it first.
  the parallel scan      pure PyTorch, log-depth: the recurrence h_t = a_t h_{t-1} + b_t is solved
                         by recursive doubling inside chunks of L, the state is carried from chunk
                         to chunk, and a custom autograd.Function runs the same scan backwards for
                         the gradient. Memory grows with one chunk, never with (B, D, L, N).

Glossary (shapes as in mamba_ssm):
  B  batch        D  channels        L  sequence length        N  state size
  u, delta, z : (B, D, L)      A : (D, N), negative      B, C : (B, N, L)      D, delta_bias : (D,)
  a_t = exp(delta_t A) is the decay of the state (0 < a <= 1), b_t = delta_t B_t u_t its input.

Inputs may be float32, bfloat16 or float16 (float64 for tests): the state and every sum are kept in
float32 (float64 stays float64) and the output has the dtype of `u`.
"""

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "ref", "parallel")
CHUNK = 128  # positions per chunk of the parallel scan: (B, D, 128, N) fp32 at DiM-XL width is 150 MB


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, backend="auto"):
    """y = selective scan of u (see the module docstring). Returns (batch, D, L) in u's dtype."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    # "auto" and "parallel": the pure-PyTorch parallel scan runs on every device.
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u32, delta = u.to(compute), _prepare_delta(delta.to(compute), delta_bias, delta_softplus)
    y = ParallelScan.apply(u32, delta, A.to(compute), B.to(compute), C.to(compute), reverse)
    return _skip_and_gate(y, u32, D, z).to(u.dtype)


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
#                 The parallel scan: recursive doubling in chunks               #
#################################################################################

def linear_scan(a, b, reverse=False):
    """h_t = a_t * h_{t-1} + b_t along dim 0 with h = 0 before the start; h_{t+1} if reverse.

    a, b: (Q, ...). Log-depth and O(Q) work by recursive doubling: merge neighbouring steps in
    pairs, (a1, b1) then (a2, b2) is the single step (a2 a1, a2 b1 + b2); solve the half-length
    problem for the second step of every pair; the first step of each pair then follows from the
    previous pair's state. Only decays (<= 1) are multiplied: nothing is divided, nothing overflows.
    Time is the leading dimension so that every slice below is a set of contiguous blocks.
    """
    length = b.shape[0]
    if length == 1:
        return b.clone()  # a new tensor, like every other case
    if length % 2:  # pad with the identity step (a = 1, b = 0) at the end; the scan's start is unchanged
        a, b = torch.cat([a, torch.ones_like(a[:1])]), torch.cat([b, torch.zeros_like(b[:1])])
        return linear_scan(a, b, reverse)[:length]
    first, second = (1, 0) if reverse else (0, 1)  # which step of each pair the scan meets first
    a1, b1, a2, b2 = a[first::2], b[first::2], a[second::2], b[second::2]  # (Q/2, ...)
    h = torch.empty_like(b)
    h[second::2] = linear_scan(a2 * a1, torch.addcmul(b2, a2, b1), reverse)
    h[first::2] = b1
    h1, h2 = h[first::2], h[second::2]
    if reverse:  # the first step of pair i follows the second step of pair i + 1
        h1[:-1].addcmul_(a1[:-1], h2[1:])
    else:        # ... of pair i - 1
        h1[1:].addcmul_(a1[1:], h2[:-1])
    return h


def _scan_from(a, b, h0, reverse):
    """linear_scan started from the state h0 instead of zero: fold a * h0 into the first input."""
    start = -1 if reverse else 0
    b_start = b[start].clone()
    b[start].addcmul_(a[start], h0)
    h = linear_scan(a, b, reverse)
    b[start] = b_start  # leave b as it was given
    return h


def _chunks(length, reverse):
    """(start, end) of each chunk of [0, length), in the order the scan visits them."""
    bounds = [(s, min(s + CHUNK, length)) for s in range(0, length, CHUNK)]
    return bounds[::-1] if reverse else bounds


def _decay(delta, A, lo, hi):
    """a_t = exp(delta_t A) for t in [lo, hi), with a = 1 (delta = 0) outside [0, L). (hi-lo, B, D, N)."""
    length = delta.shape[0]
    window = delta[max(lo, 0):min(hi, length)]
    if lo < 0 or hi > length:
        window = F.pad(window, (0, 0, 0, 0, max(-lo, 0), max(hi - length, 0)))
    return torch.exp(window[..., None] * A)


def _inputs(delta_u, B, s, e):
    """b_t = delta_t u_t B_t for t in [s, e). (e-s, B, D, N)."""
    return delta_u[s:e, :, :, None] * B[s:e, :, None, :]


def _time_major(x):
    """(B, D or N, L) -> (L, B, D or N), contiguous: inside a chunk each time step is one block."""
    return x.permute(2, 0, 1).contiguous()


class ParallelScan(torch.autograd.Function):
    """y_t = <C_t, h_t> for h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, chunk by chunk.

    Forward keeps, besides its inputs, only the state entering each chunk: (chunks, B, D, N).
    Backward walks the chunks against the scan's direction. It recomputes a chunk's states from
    its saved entry state, then solves the adjoint recurrence, which is the same scan reversed:
        g_t = C_t dy_t + a_{t+1} g_{t+1}     (g = dLoss/dh_t; a_{t-1} and g_{t-1} if reverse)
    and reads every gradient off g and h without dividing by a decay:
        db_t = g_t,   d(delta_t A) = g_t a_t h_{t-1} = g_t (h_t - b_t).
    Inside, tensors are time-major: (L, B, D) and (Q, B, D, N) for a chunk of Q steps.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, reverse):
        u, delta, B, C = (_time_major(x) for x in (u, delta, B, C))       # (L, B, D), (L, B, N)
        delta_u = delta * u                                                # (L, B, D)
        y = torch.empty_like(u)                                            # (L, B, D)
        h0 = u.new_zeros(*u.shape[1:], A.shape[1])                         # (B, D, N)
        entry_states = []
        for s, e in _chunks(u.shape[0], reverse):
            entry_states.append(h0)
            h = _scan_from(_decay(delta, A, s, e), _inputs(delta_u, B, s, e), h0, reverse)  # (Q, B, D, N)
            y[s:e] = torch.einsum("qbdn,qbn->qbd", h, C[s:e])
            h0 = h[0 if reverse else -1].clone()  # a copy, so that h itself is freed
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(entry_states))
        ctx.reverse = reverse
        return y.permute(1, 2, 0)                                          # (B, D, L)

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, entry_states = ctx.saved_tensors
        reverse, dy = ctx.reverse, _time_major(dy)                         # (L, B, D)
        delta_u = delta * u
        du, ddelta, dB, dC = (torch.empty_like(x) for x in (u, delta, B, C))
        dA = torch.zeros_like(A)
        g_next = torch.zeros_like(entry_states[0])  # g at the first step of the chunk after this one
        chunks = _chunks(u.shape[0], reverse)
        for i in reversed(range(len(chunks))):
            s, e = chunks[i]
            a_around = _decay(delta, A, s - 1, e + 1)           # a_t for t in [s-1, e+1): (Q+2, B, D, N)
            a = a_around[1:-1]                                  # (Q, B, D, N)
            b = _inputs(delta_u, B, s, e)                       # (Q, B, D, N)
            h = _scan_from(a, b, entry_states[i], reverse)      # (Q, B, D, N)
            # Adjoint: runs the other way, with the decay of the step that follows in the scan.
            a_following = a_around[:-2] if reverse else a_around[2:]
            g_in = dy[s:e, :, :, None] * C[s:e, :, None, :]     # C_t dy_t: (Q, B, D, N)
            g = _scan_from(a_following, g_in, g_next, not reverse)
            g_next = g[-1 if reverse else 0]

            dC[s:e] = torch.einsum("qbdn,qbd->qbn", h, dy[s:e])
            g_B = torch.einsum("qbdn,qbn->qbd", g, B[s:e])     # sum_n g B: (Q, B, D)
            du[s:e] = g_B * delta[s:e]
            dB[s:e] = torch.einsum("qbdn,qbd->qbn", g, delta_u[s:e])
            g_log_a = h.sub_(b).mul_(g)                         # g (h - b), in h's memory: (Q, B, D, N)
            ddelta[s:e] = g_B * u[s:e] + torch.einsum("qbdn,dn->qbd", g_log_a, A)
            dA += torch.einsum("qbdn,qbd->dn", g_log_a, delta[s:e])
        du, ddelta, dB, dC = (x.permute(1, 2, 0) for x in (du, ddelta, dB, dC))
        return du, ddelta, dA, dB, dC, None
