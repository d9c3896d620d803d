"""DiM: a DiT whose attention is replaced by a bidirectional Mamba mixer (Mo & Tian, arXiv 2405.15881).

The skeleton is DiT's (Peebles & Xie, 2023): patchify, add a fixed sin-cos position embedding, run
a stack of adaLN-Zero blocks conditioned on the timestep and class, then an adaLN final layer and
unpatchify. The token mixer inside each block is the bidirectional selective scan of scan.py in
Vision Mamba's "v2" layout (Zhu et al., 2024): one shared input projection gives x and the gate z,
a forward and a backward branch each have their own causal convolution, x_proj, dt_proj, A and D,
the backward branch scans from the last token to the first, and the two gated outputs are averaged
before one shared output projection. The paper leaves these details open; we follow Vim and Mamba.

With mixer="attention" the same skeleton is DiT, so the two can be compared like for like.
Videos (N, T, C, H, W) are patchified frame by frame and scanned as one sequence in frame-major
order (t, h, w), with a 1D sin-cos temporal embedding added to the 2D spatial one.

Glossary: N batch, T frames, C channels, H, W height and width, p patch size, L tokens,
W model width, E = expand * W mixer width, R = ceil(W / 16) rank of delta, S state size (Mamba's N).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scan import conv_silu, selective_scan


@dataclass
class DiMConfig:
    input_size: int = 32          # side of the (latent) image the model sees
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152       # W
    depth: int = 28
    num_heads: int = 16           # attention mixer only
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    num_frames: int = 1           # 1: images (N, C, H, W); more: videos (N, T, C, H, W)
    mixer: str = "mamba"          # "mamba" (DiM) or "attention" (DiT)
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    scan_backend: str = "auto"
    grad_ckpt: bool = False

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"image size {self.input_size} is not divisible by the patch size "
                             f"{self.patch_size}: pick an image size that is a multiple of it")
        if self.mixer not in ("mamba", "attention"):
            raise ValueError(f"mixer must be 'mamba' or 'attention', got {self.mixer!r}")

    @property
    def out_channels(self):
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def tokens_per_frame(self):
        return (self.input_size // self.patch_size) ** 2


#################################################################################
#                     The bidirectional Mamba mixer (Vim v2)                     #
#################################################################################

def batch_major(h, batch):
    """(rows, N L) -> (N, rows, L), a view: the shape the scan takes, in the layout the mixer keeps."""
    return h.view(h.shape[0], batch, -1).transpose(0, 1)


def channel_major(x):
    """(N, rows, L) -> (rows, N L): a view when x is stored channel-major, as the mixer keeps it."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


class ScanBranch(nn.Module):
    """One direction of the mixer: conv -> SiLU -> x_proj -> (delta, B, C) -> selective scan -> gate."""

    def __init__(self, inner, d_state, d_conv, dt_rank):
        super().__init__()
        self.dt_rank, self.d_state = dt_rank, d_state
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner)  # depthwise; run by scan.conv_silu
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # as in Mamba
        self.initialize_weights()

    def forward(self, x, z, reverse, backend):
        """x, z: (N, E, L), best stored channel-major as (E, N, L), the way BiMamba makes them: then every
        step is one pass or one matrix product over all N L tokens, with no transposing copy (as in
        mamba_ssm). reverse: scan and convolve from the last token to the first."""
        batch = x.shape[0]
        # the depthwise conv over time of each sequence, then SiLU; reverse: anti-causal, k - 1 tokens ahead
        x = channel_major(conv_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias, reverse, backend))  # (E, N L)
        dt, B, C = (self.x_proj.weight @ x).split([self.dt_rank, self.d_state, self.d_state])  # (R | S | S, N L)
        delta = self.dt_proj.weight @ dt                                     # (E, N L)
        A = -torch.exp(self.A_log.float())                                   # (E, S)
        x, delta, B, C = (batch_major(h, batch) for h in (x, delta, B, C))   # (N, rows, L) views
        return selective_scan(x, delta, A, B, C, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True, reverse=reverse, backend=backend)  # (N, E, L), stored (E, N, L)

    @torch.no_grad()
    def initialize_weights(self, dt_min=0.001, dt_max=0.1, dt_floor=1e-4):
        # Mamba's initialisation: S4D-real A = -(1..S), skip D = 1, and dt_proj's bias the inverse
        # softplus of a step size drawn log-uniformly in [dt_min, dt_max].
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1).float()).repeat(self.D.numel(), 1))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.D.numel()) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer: shared in_proj and out_proj, a forward and a backward branch."""

    def __init__(self, width, d_state=16, expand=2, d_conv=4, backend="auto"):
        super().__init__()
        inner, dt_rank = expand * width, math.ceil(width / 16)
        self.backend = backend
        self.in_proj = nn.Linear(width, 2 * inner)
        self.forward_branch = ScanBranch(inner, d_state, d_conv, dt_rank)
        self.backward_branch = ScanBranch(inner, d_state, d_conv, dt_rank)
        self.out_proj = nn.Linear(inner, width)

    def forward(self, x, backward_branch=True):
        """x: (N, L, W) -> (N, L, W). backward_branch=False runs the forward direction only (tests).
        Inside, tensors are channel-major, (E, N L): in_proj writes that layout itself (W x^T), and
        out_proj reads it as a transposed matrix, so the two layouts meet without a copy either way."""
        batch, length, width = x.shape
        tokens = x.reshape(batch * length, width)                            # (N L, W)
        xz = torch.addmm(self.in_proj.bias[:, None], self.in_proj.weight, tokens.T)  # (2E, N L)
        x, z = (batch_major(h, batch) for h in xz.chunk(2))                  # (N, E, L) views
        y = self.forward_branch(x, z, reverse=False, backend=self.backend)
        if backward_branch:
            y = (y + self.backward_branch(x, z, reverse=True, backend=self.backend)) / 2
        return F.linear(channel_major(y).T, self.out_proj.weight, self.out_proj.bias).view(batch, length, width)

    def macs(self, tokens):
        """Multiply-adds for one sequence, the scan counted explicitly: 3 per state update (the
        decay times the state, delta u times B, C times the state), for each of the two branches."""
        inner, width = self.out_proj.in_features, self.out_proj.out_features
        branch = self.forward_branch
        per_branch = tokens * inner * (branch.conv1d.kernel_size[0] + branch.x_proj.out_features
                                       + branch.dt_rank + 3 * branch.d_state + 1)
        return tokens * width * 2 * inner + 2 * per_branch + tokens * inner * width


class Attention(nn.Module):
    """Multi-head self-attention (DiT's mixer) through F.scaled_dot_product_attention."""

    def __init__(self, width, num_heads):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, length, width = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                # (N, heads, L, W/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, length, width))

    def macs(self, tokens):
        width = self.proj.in_features
        return tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width


#################################################################################
#                  Embeddings for timesteps, classes and positions              #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> sinusoidal features (256) -> MLP -> (N, W)."""

    def __init__(self, width, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]                              # (N, 128)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, W); label num_classes is the null class of classifier-free guidance."""

    def __init__(self, num_classes, width, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:  # drop labels so the model also learns p(x)
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


def sincos_1d(width, positions):
    """Fixed sin-cos embedding of positions (M,) -> (M, width), as in DiT and MAE."""
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2))
    out = np.outer(positions.reshape(-1), omega)                             # (M, W/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(width, grid_size):
    """(grid_size**2, width): half the channels encode the row, half the column."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    return np.concatenate([sincos_1d(width // 2, cols), sincos_1d(width // 2, rows)], axis=1)


#################################################################################
#                                The DiM model                                  #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiMBlock(nn.Module):
    """DiT's adaLN-Zero block with the token mixer swapped: Mamba (DiM) or attention (DiT)."""

    def __init__(self, cfg):
        super().__init__()
        width = cfg.hidden_size
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        if cfg.mixer == "mamba":
            self.mixer = BiMamba(width, cfg.d_state, cfg.expand, cfg.d_conv, cfg.scan_backend)
        else:
            self.mixer = Attention(width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.mixer(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiM(nn.Module):
    def __init__(self, cfg: DiMConfig):
        super().__init__()
        self.cfg = cfg
        width, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, width, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(cfg.num_classes, width, cfg.class_dropout_prob)
        grid = cfg.input_size // p
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(width, grid)).float()[None],
                             persistent=False)                               # (1, h*w, W)
        frames = torch.from_numpy(sincos_1d(width, np.arange(cfg.num_frames, dtype=np.float64))).float()
        self.register_buffer("temporal_embed", frames[None, :, None], persistent=False)  # (1, T, 1, W)
        self.blocks = nn.ModuleList(DiMBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(width, p, cfg.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        # DiT: Xavier-uniform linear layers with zero bias, the patch embedding like a linear layer.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output layer starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # Mamba's own initialisation of the scan's parameters (after the Xavier pass above).
        for module in self.modules():
            if isinstance(module, ScanBranch):
                module.initialize_weights()

    def check_input(self, x, y):
        cfg = self.cfg
        video = cfg.num_frames > 1
        expected = "(N, T, C, H, W)" if video else "(N, C, H, W)"
        if x.dim() != (5 if video else 4):
            raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")
        if video and x.shape[1] != cfg.num_frames:
            raise ValueError(f"the model was built for {cfg.num_frames} frames, got {x.shape[1]}")
        if x.shape[-3] != cfg.in_channels or x.shape[-2:] != (cfg.input_size, cfg.input_size):
            raise ValueError(f"the model was built for {cfg.in_channels} x {cfg.input_size} x "
                             f"{cfg.input_size} inputs, got {tuple(x.shape[-3:])}")
        # Labels are checked where they live on the host. Reading GPU labels back would make the host wait
        # for the GPU at every forward; train.py and sample.py make theirs valid on the host.
        if (y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling()
                and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes)):
            raise ValueError(f"class labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} "
                             f"is the null class), got values in [{int(y.min())}, {int(y.max())}]")

    def forward(self, x, t, y):
        """x: (N, C, H, W) or (N, T, C, H, W); t: (N,) timesteps; y: (N,) labels -> same shape as x,
        with 2C channels if learn_sigma (noise, then the variance interpolation)."""
        self.check_input(x, y)
        cfg, n = self.cfg, x.shape[0]
        frames = x.shape[1] if x.dim() == 5 else 1
        x = self.x_embedder(x.reshape(n * frames, *x.shape[-3:]))           # (N*T, W, h, w)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed                    # (N*T, h*w, W)
        if frames > 1:
            x = x.view(n, frames, -1, x.shape[-1]) + self.temporal_embed     # (N, T, h*w, W)
        x = x.reshape(n, -1, x.shape[-1])                                    # (N, L, W), frame-major
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, W)
        for block in self.blocks:
            if cfg.grad_ckpt and self.training:
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)                                           # (N, L, p*p*C_out)
        return self.unpatchify(x, frames)

    def unpatchify(self, x, frames):
        """(N, T*h*w, p*p*C) -> (N, C, H, W), or (N, T, C, H, W) for videos."""
        p, c, side = self.cfg.patch_size, self.cfg.out_channels, self.cfg.input_size // self.cfg.patch_size
        n = x.shape[0]
        x = x.reshape(n * frames, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N*T, C, h, p, w, p)
        x = x.reshape(n * frames, c, side * p, side * p)
        return x.view(n, frames, c, side * p, side * p) if self.cfg.num_frames > 1 else x

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def gmacs(self, num_frames=None):
        """GMACs (multiply-adds) of one forward for one sample, the selective scan counted explicitly.
        Off-the-shelf counters skip the scan; DiT's tables count multiply-adds the same way."""
        cfg = self.cfg
        frames = num_frames or cfg.num_frames
        width, p, tokens = cfg.hidden_size, cfg.patch_size, frames * cfg.tokens_per_frame
        hidden = int(width * cfg.mlp_ratio)
        macs = tokens * cfg.in_channels * p * p * width                      # patch embedding
        macs += self.t_embedder.frequency_size * width + width * width       # timestep MLP
        block = self.blocks[0]
        macs += cfg.depth * (width * 6 * width + block.mixer.macs(tokens) + 2 * tokens * width * hidden)
        macs += width * 2 * width + tokens * width * p * p * cfg.out_channels  # final layer
        return macs / 1e9

    def optimizer_groups(self, weight_decay):
        """AdamW parameter groups: no weight decay on A_log, D, biases and embeddings' tables."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            skip = getattr(param, "_no_weight_decay", False) or param.dim() < 2
            (no_decay if skip else decay).append(param)
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


#################################################################################
#                                   Presets                                     #
#################################################################################

SIZES = {  # DiT's depths, widths and heads; "Ti" is ours, small enough to train on a laptop CPU:
    # 3 blocks, the mixer as wide as the model (expand 1) and Mamba state N = 4. On 16 x 16 shapes
    # DiM-Ti/2 of this size learns more in ten CPU minutes than a six-block, expand-2 DiM-Ti/4.
    "Ti": dict(depth=3, hidden_size=128, num_heads=4, d_state=4, expand=1),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PRESETS = {f"DiM-{size}/{p}": dict(patch_size=p, **dims) for size, dims in SIZES.items() for p in (2, 4, 8)}


def build_model(name, **overrides):
    """A DiM from a preset name like "DiM-XL/2", with any DiMConfig field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return DiM(DiMConfig(**{**PRESETS[name], **overrides}))
