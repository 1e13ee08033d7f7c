"""LFM's DiT velocity network and its sampling call in PyTorch: the reference that lfm is timed against.

Written for lfm from the DiT paper (Peebles & Xie, 2023) and the architecture LFM's `models/DiT.py` uses (see
`shared/LFM-REFERENCE.md` §3.2): patch embedding, 2-D sin-cos positional table, sinusoidal time embedding of the raw
t in [0, 1], label table with a null row, adaLN-Zero blocks (LayerNorm without affine, eps 1e-6), fused-qkv attention
with the default 1/sqrt(head_dim) scale, GELU(tanh) MLP, and the final adaLN layer. Parameter names are LFM's, so
its checkpoints and lfm's exported weights load with `load_state_dict(strict=True)`. `check_fixtures.py` proves
the network, classifier-free guidance and the dopri5 call equal to LFM's on the golden fixtures.

Only PyTorch and torchdiffeq are needed (no timm): the GPU machines have both.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# DiT sizes as LFM names them: (depth, hidden size, heads); the patch size is the number after the slash.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def modulate(x, shift, scale):
    """adaLN modulation x·(1 + scale) + shift, per sample over the token axis."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_table(dim, positions):
    """[sin(p·ω), cos(p·ω)] with ω_i = 10000^(−i/(dim/2)), for a 1-D array of positions."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def pos_embed_2d(dim, grid):
    """MAE's 2-D table [T, dim]: the first half encodes the column index, the second the row index."""
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([sincos_table(dim // 2, cols), sincos_table(dim // 2, rows)], axis=1)


class TimestepEmbedder(nn.Module):
    """The raw time through a 256-wide [cos, sin] sinusoid, then Linear, SiLU, Linear."""

    def __init__(self, hidden, frequencies=256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A table of num_classes rows, plus the null row when labels can be dropped; y = None takes the last row."""

    def __init__(self, num_classes, hidden, label_dropout):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (label_dropout > 0), hidden)
        self.label_dropout = label_dropout
        self.num_classes = num_classes

    def forward(self, y, batch, device):
        if y is None:
            y = torch.full((batch,), self.embedding_table.num_embeddings - 1, dtype=torch.long, device=device)
        elif self.training and self.label_dropout > 0:
            drop = torch.rand(y.shape[0], device=device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention from one fused projection laid out [q | k | v] × heads × head_dim."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        n, tokens, width = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, tokens, width))


class Mlp(nn.Module):
    """fc1, GELU with the tanh approximation, fc2."""

    def __init__(self, hidden, ratio):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """x += gate·attn(modulate(norm(x))); x += gate·mlp(modulate(norm(x))), the six vectors from adaLN(c)."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm, adaLN modulation (shift, scale), then a Linear to p·p·C values per token."""

    def __init__(self, hidden, patch, channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """A p×p convolution of stride p, tokens in row-major order."""

    def __init__(self, channels, hidden, patch):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    """LFM's DiT with its (t, x, y) signature: v = DiT(t, x, y), learn_sigma False (as many outputs as inputs)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1, label_dropout=0.0):
        super().__init__()
        self.in_channels, self.patch = in_channels, patch_size
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, label_dropout)
        grid = input_size // patch_size
        table = torch.from_numpy(pos_embed_2d(hidden_size, grid)).float().unsqueeze(0)
        # Frozen, but part of the state_dict as in LFM's checkpoints.
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)

    @classmethod
    def named(cls, name, input_size=32, in_channels=4, num_classes=1, label_dropout=0.0):
        """A size by LFM's name, e.g. 'DiT-B/2'."""
        size, patch = name.removeprefix("DiT-").split("/")
        depth, hidden, heads = SIZES[size]
        return cls(input_size, int(patch), in_channels, hidden, depth, heads, 4.0, num_classes, label_dropout)

    def unpatchify(self, tokens):
        """(N, T, p·p·C) in (p, p, C) order → (N, C, H, W)."""
        n, count, _ = tokens.shape
        grid, p, c = int(count**0.5), self.patch, self.in_channels
        x = tokens.reshape(n, grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, grid * p, grid * p)

    def forward(self, t, x, y=None):
        n = x.shape[0]
        # odeint passes a 0-dim time: one value for the whole batch.
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, n, x.device)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, t, x, y, cfg_scale):
        """LFM's guidance on a doubled batch [x; x] with y = [y; null]: v_u + s·(v_c − v_u), duplicated."""
        half = x[: len(x) // 2]
        out = self.forward(t, torch.cat([half, half], dim=0), y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


def sample(model, x1, method="dopri5", rtol=1e-5, atol=1e-5, step_size=0.01, y=None):
    """LFM's sample_from_model: odeint of dx/dt = v(t, x) from t = 1 (noise) to t = 0 (data), options dtype float64
    for adaptive methods, step_size for fixed ones; returns (x0, number of velocity evaluations)."""
    from torchdiffeq import odeint

    calls = [0]

    def velocity(t, x):
        calls[0] += 1
        return model(t, x, y)

    options = {"dtype": torch.float64} if method == "dopri5" else {"step_size": step_size, "perturb": False}
    times = torch.tensor([1.0, 0.0], device=x1.device)
    with torch.no_grad():
        x0 = odeint(velocity, x1, times, method=method, rtol=rtol, atol=atol, options=options)[-1]
    return x0, calls[0]


def fm_loss(model, z0, z1, t, y=None, sigma_min=1e-5):
    """LFM's flow-matching loss: x_t = (1 − t)·z0 + (σ + (1 − σ)·t)·z1, u = (1 − σ)·z1 − z0, mean squared error."""
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * z0 + (sigma_min + (1 - sigma_min) * tt) * z1
    u = (1 - sigma_min) * z1 - z0
    return F.mse_loss(model(t, x_t, y), u)
