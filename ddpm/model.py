"""Denoising diffusion: DDPM (Ho et al. 2020), DDIM sampling (Song et al. 2021), classifier-free
guidance (Ho & Salimans 2022), with a U-Net (Ho et al. 2020, Sec. 4 / App. B) or a U-ViT (Bao et al.
2023) for eps_theta.

Time is 0-indexed in code: t = 0..T-1 here is t = 1..T in the papers, and alpha_bar_prev[0] = 1 is
the paper's alpha_bar_0. Equation numbers are the DDPM paper's unless another paper is named.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Noise schedules


def linear_beta_schedule(T, beta_1=1e-4, beta_T=0.02):
    """Sec. 4: beta_t rises linearly from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_beta_schedule(T, s=0.008):
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0),
    f(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


# --------------------------------------------------------------------------------------------------
# The diffusion process: forward q, the simple loss, and the reverse samplers (DDPM, DDIM, guidance)


class Diffusion(nn.Module):
    """Every quantity derived from beta_1..beta_T, as float32 buffers indexed by t (computed in
    float64)."""

    def __init__(self, T=1000, schedule="linear"):
        super().__init__()
        betas = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}[schedule](T)
        alphas = 1 - betas                              # alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alphas, 0)            # alpha_bar_t = prod_s alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.T = T
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            # Eq. 7: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),  # times x_0
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),  # x_t
            "posterior_variance": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),  # beta_tilde_t
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _at(values, t):
        return values[t].view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), broadcasts over images

    def q_sample(self, x0, t, eps):
        """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        alpha_bar = self._at(self.alpha_bar, t)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps

    def q_posterior(self, x0, x_t, t):
        """Eq. 6-7: mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._at(self.posterior_mean_coef1, t) * x0
                + self._at(self.posterior_mean_coef2, t) * x_t)
        return mean, self._at(self.posterior_variance, t)

    def loss(self, eps_theta, x0, y, p_uncond, null_class):
        """Algorithm 1 / Eq. 14, L_simple = ||eps - eps_theta(x_t, t, c)||^2; labels dropped to the
        null class with probability p_uncond so the same network also learns eps_theta(x_t, t, null)
        (CFG, Algorithm 1)."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        drop = torch.rand(y.shape, device=y.device) < p_uncond
        y = torch.where(drop, torch.full_like(y, null_class), y)
        return F.mse_loss(eps_theta(self.q_sample(x0, t, eps), t, y), eps)

    @staticmethod
    def guided_eps(eps_theta, x_t, t, y, w, null_class):
        """CFG Eq. 6: eps_tilde = (1 + w) eps_theta(x_t, c) - w eps_theta(x_t, null), in one batched
        call."""
        if w == 0:
            return eps_theta(x_t, t, y)
        null = torch.full_like(y, null_class)
        eps = eps_theta(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        eps_cond, eps_uncond = eps.chunk(2)
        return (1 + w) * eps_cond - w * eps_uncond

    def predict_x0(self, x_t, t, eps):
        """Eq. 4 solved for x_0 (DDIM Eq. 9), clipped to the data range [-1, 1] as in the authors'
        sampler; eps is then re-derived from the clipped x_0 so that
        x_t = sqrt(a) x_0 + sqrt(1-a) eps still holds."""
        alpha_bar = self._at(self.alpha_bar, t)
        x0 = ((x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)
        return x0, (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

    def ddpm_step(self, eps, x_t, t, noise):
        """Algorithm 2, one step: x_{t-1} ~ N(mu_tilde(x_t, x0_hat), beta_tilde_t I); no noise at
        the last step."""
        x0, _ = self.predict_x0(x_t, t, eps)
        mean, variance = self.q_posterior(x0, x_t, t)
        return mean + (t > 0).float().view(-1, 1, 1, 1) * variance.sqrt() * noise

    def ddim_sigma(self, t, t_prev, eta):
        """DDIM Eq. 16: sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev);
        t_prev = -1 means a_prev = 1."""
        a_t = self._at(self.alpha_bar, t)
        a_prev = self._at(self.alpha_bar_prev, t_prev + 1)  # [s + 1] = alpha_bar[s], [0] = 1
        return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt(), a_prev

    def ddim_step(self, eps, x_t, t, t_prev, eta, noise):
        """DDIM Eq. 12: x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z."""
        x0, eps = self.predict_x0(x_t, t, eps)
        sigma, a_prev = self.ddim_sigma(t, t_prev, eta)
        direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps  # points to x_t
        return a_prev.sqrt() * x0 + direction + sigma * noise

    def timesteps(self, steps):
        """The DDIM sub-sequence tau: `steps` times from T-1 down to 0, evenly spaced (steps = T
        gives all)."""
        return torch.linspace(self.T - 1, 0, steps).round().long()

    @torch.no_grad()
    def sample(self, eps_theta, y, shape, sampler="ddim", steps=50, eta=0.0, w=0.0, null_class=None,
               generator=None, frames=0):
        """Draw x_T ~ N(0, I) and run the reverse process. sampler="ddpm" walks all T steps
        (Algorithm 2); "ddim" walks a sub-sequence of `steps`. Returns x_0 and, if frames > 0, about
        that many x_t snapshots."""
        device = y.device
        x = torch.randn(shape, generator=generator, device=device)
        times = self.timesteps(self.T if sampler == "ddpm" else steps).tolist()
        stride = max(1, len(times) // frames) if frames else 0
        snapshots = [x] if frames else []
        for i, t in enumerate(times):
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            eps = self.guided_eps(eps_theta, x, t_batch, y, w, null_class)
            noise = torch.randn(shape, generator=generator, device=device)
            if sampler == "ddpm":
                x = self.ddpm_step(eps, x, t_batch, noise)
            else:
                t_prev = times[i + 1] if i + 1 < len(times) else -1
                x = self.ddim_step(eps, x, t_batch, torch.full_like(t_batch, t_prev), eta, noise)
            if frames and ((i + 1) % stride == 0 or i + 1 == len(times)):
                snapshots.append(x)
        return x, snapshots


# --------------------------------------------------------------------------------------------------
# The U-Net eps_theta(x_t, t, c) of DDPM Sec. 4: a PixelCNN++-style U-Net with GroupNorm, sinusoidal
# time embedding, self-attention at the low resolutions; plus a class embedding (index num_classes =
# the null class).


def timestep_embedding(t, dim, max_period=10000):
    """The Transformer's sinusoidal position embedding of t (Sec. 4): [sin(t w_i), cos(t w_i)],
    (B,) -> (B, dim)."""
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def group_norm(channels):
    return nn.GroupNorm(32 if channels % 32 == 0 else 8, channels)


class ResBlock(nn.Module):
    """Wide-ResNet block: GroupNorm, SiLU, conv, + projected (time + class) embedding, GroupNorm,
    SiLU, dropout, conv, residual (1x1 conv when the width changes)."""

    def __init__(self, in_channels, out_channels, emb_dim, dropout):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1): every position
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Self-attention over the H*W positions of a feature map (at the low resolutions), residual."""

    def __init__(self, channels, num_heads=1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))  # back to (B, C, H, W)


class UNet(nn.Module):
    """eps_theta: levels of `num_res_blocks` ResBlocks (+ attention at `attn_levels`), stride-2 conv
    down, nearest-neighbour up + conv, every level's activations concatenated on the way up, as in
    the DDPM U-Net."""

    def __init__(self, in_channels=1, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 attn_levels=(2,), dropout=0.1, num_classes=10):
        super().__init__()
        emb_dim = 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim)  # the last index: null class
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down, skip_channels, ch = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout)]))
                ch = channels * mult
                if level in attn_levels:
                    self.down[-1].append(SelfAttention2d(ch))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), SelfAttention2d(ch),
                                  ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                block = ResBlock(ch + skip_channels.pop(), channels * mult, emb_dim, dropout)
                self.up.append(nn.ModuleList([block]))
                ch = channels * mult
                if level in attn_levels:
                    self.up[-1].append(SelfAttention2d(ch))
            if level != 0:  # nearest-neighbour up (in forward, to the skip's size: 7 -> 14), conv
                self.up.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, padding=1)]))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(),
                                 nn.Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t, y):
        emb = self.time_mlp(timestep_embedding(t, self.channels)) + self.class_embed(y)  # (B, E)
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            else:
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
            h = self._run(layers, h, emb)
        return self.out(h)


# --------------------------------------------------------------------------------------------------
# U-ViT (Bao et al. 2023): time, class and image patches are all tokens of one ViT; long skip
# connections join block i of the first half to block (depth - 1 - i) of the second half (concat,
# then Linear).


class TransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4, skip=False):
        super().__init__()
        self.num_heads = num_heads
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # long skip: (B, L, 2D) -> (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, D/heads)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, in_channels=1, image_size=28, patch_size=4, dim=128, depth=7, num_heads=4,
                 num_classes=10):
        super().__init__()
        self.patch_size, self.in_channels, self.dim = patch_size, in_channels, dim
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.time_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.class_embed = nn.Embedding(num_classes + 1, dim)  # the last index is the null class
        self.pos_embed = nn.Parameter(torch.randn(1, 2 + num_patches, dim) * 0.02)
        half = depth // 2
        self.in_blocks = nn.ModuleList([TransformerBlock(dim, num_heads) for _ in range(half)])
        self.mid_block = TransformerBlock(dim, num_heads)
        self.out_blocks = nn.ModuleList([TransformerBlock(dim, num_heads, skip=True)
                                         for _ in range(half)])
        self.norm = nn.LayerNorm(dim)
        self.to_patch = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.conv_out = nn.Conv2d(in_channels, in_channels, 3, padding=1)  # the paper's last 3x3

    def forward(self, x, t, y):
        B, C, H, W = x.shape
        p = self.patch_size
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)              # (B, HW/p^2, D)
        time_token = self.time_mlp(timestep_embedding(t, self.dim))[:, None]  # (B, 1, D)
        class_token = self.class_embed(y)[:, None]                            # (B, 1, D)
        h = torch.cat([time_token, class_token, patches], dim=1)              # (B, 2 + HW/p^2, D)
        h = h + self.pos_embed
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())
        h = self.to_patch(self.norm(h)[:, 2:])                                # (B, HW/p^2, p*p*C)
        h = h.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return self.conv_out(h)


def build_model(config, in_channels, image_size, num_classes):
    """Rebuild eps_theta from a plain config dict (train.py's flags; also what a checkpoint
    stores)."""
    if config["backbone"] == "unet":
        return UNet(in_channels, config["channels"], tuple(config["channel_mult"]),
                    config["num_res_blocks"], tuple(config["attn_levels"]), config["dropout"],
                    num_classes)
    return UViT(in_channels, image_size, config["patch_size"], config["vit_dim"],
                config["vit_depth"], config["vit_heads"], num_classes)


# --------------------------------------------------------------------------------------------------
# EMA of the weights (DDPM App. B: decay 0.9999), sampled from instead of the raw weights


def ema_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta for every parameter; buffers copied."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


# --------------------------------------------------------------------------------------------------
# The small classifier that scores samples (sample.py --evaluate): its penultimate features stand in
# for Inception's in the "classifier FID", and its predictions check that class c was generated when
# asked for.


class Classifier(nn.Module):
    """A LeNet-sized CNN, cheap enough to train on a CPU in a minute or two."""

    def __init__(self, in_channels=1, num_classes=10, feature_dim=64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        return self.body(x)  # (B, feature_dim): the penultimate layer

    def forward(self, x):
        return self.head(self.features(x))
