"""Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, ICLR 2017), for images.

A flow f maps an image x to a latent z = f(x) with a standard normal density, and is invertible with
a cheap Jacobian determinant, so the exact log-likelihood follows from the change of variables,
Eq. (3):

    log p_X(x) = log p_Z(f(x)) + log |det(∂f(x) / ∂x^T)|

Every layer below has forward(x) -> (y, log|det J|) with the log-determinant per sample, shape (B,),
and inverse(y) -> x. Equation numbers are the paper's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ALPHA = 0.05  # the logit transform squeezes pixels into [ALPHA, 1 - ALPHA] first (Sec. 4.1)


def preprocess(x, noise):
    """Integer pixels in {0..255} -> logit space, with the log-determinant of this map (Sec. 4.1).

    y = (x + u) / 256 (uniform dequantisation, u = noise in [0, 1)); p = ALPHA + (1 - 2 ALPHA) y;
    l = logit(p). Returns l and log|dl/dy| summed per sample, so that
    log p_Y(y) = log p_L(l) + that log-determinant.
    """
    y = (x.float() + noise) / 256  # (B, C, H, W) in (0, 1)
    p = ALPHA + (1 - 2 * ALPHA) * y
    logit = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * ALPHA) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)  # (B,)
    return logit, logdet


def postprocess(logit):
    """Logit space -> pixel intensities in [0, 1] (the inverse of preprocess, without the noise)."""
    return ((torch.sigmoid(logit) - ALPHA) / (1 - 2 * ALPHA)).clamp(0, 1)


def bits_per_dim(log_py, num_dims):
    """−log2 p(x) / D for discrete 8-bit pixels, from the density log p_Y of y = (x + u) / 256 in
    [0, 1]^D.

    p(x) ≥ E_u p_Y((x + u) / 256) / 256^D, so −log2 p(x) / D ≤ −log p_Y / (D ln 2) + log2(256).
    """
    return -log_py / (num_dims * math.log(2)) + 8


def standard_normal_log_prob(z):
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)  # (B,)


def log_likelihood(flow, x, noise):
    """log p_Y(y) of the dequantised image y = (x + noise) / 256: the change of variables, Eq. (3),
    for the flow on the logit-space image, plus the log-determinant of the preprocessing. (Calls
    flow(...), so a DDP-wrapped or compiled flow works too.)"""
    logit, logdet_pre = preprocess(x, noise)
    z, logdet = flow(logit)
    return standard_normal_log_prob(z) + logdet + logdet_pre  # Eq. (3)


def checkerboard_mask(height, width, parity):
    """b = 1 on the squares where (i + j) % 2 == parity (Fig. 3, left)."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((i + j) % 2 == parity).float().view(1, 1, height, width)


def channel_mask(channels, parity):
    """b = 1 on the first (parity 0) or second (parity 1) half of the channels (Fig. 3, right)."""
    b = torch.zeros(1, channels, 1, 1)
    b[:, parity * channels // 2 : (parity + 1) * channels // 2] = 1
    return b


def squeeze(x):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels (Fig. 3). Permutes."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x):
    B, C, H, W = x.shape
    x = x.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(B, C // 4, 2 * H, 2 * W)


class ActNorm(nn.Module):
    """Per-channel y = (x + loc) * exp(log_scale), initialised on the first batch to zero mean and
    unit variance (Glow's ActNorm, our stand-in for the paper's batch norm: the same map in train
    and eval mode).
    """

    def __init__(self, channels, ndim=4):
        super().__init__()
        shape = (1, channels) + (1,) * (ndim - 2)
        self.loc = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x):
        if self.training and not self.initialized:
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                self.loc.copy_(-x.mean(dims, keepdim=True))
                self.log_scale.copy_(-torch.log(x.std(dims, keepdim=True) + 1e-6))
                self.initialized.fill_(True)
        y = (x + self.loc) * torch.exp(self.log_scale)
        pixels = x[0, 0].numel()  # the same scale applies at every spatial position
        return y, (self.log_scale.sum() * pixels).expand(x.shape[0])

    def inverse(self, y):
        return y * torch.exp(-self.log_scale) - self.loc


class ResNet(nn.Module):
    """The s and t functions: a small convolutional ResNet, output zero-initialised so that each
    coupling starts as the identity."""

    def __init__(self, in_channels, hidden, out_channels, blocks):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1))
            for _ in range(blocks))
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.relu(h))


class MLP(nn.Module):
    """The s and t functions of the flat variant, output zero-initialised."""

    def __init__(self, features, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * features))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x)


class AffineCoupling(nn.Module):
    """Masked affine coupling, Eq. (9): y = b ⊙ x + (1 − b) ⊙ (x ⊙ exp(s(b ⊙ x)) + t(b ⊙ x)).

    The Jacobian is triangular (y_b depends on x_b only through the diagonal factor exp(s)), so
    log|det J| = Σ (1 − b) ⊙ s(b ⊙ x), Eq. (6). s goes through tanh with a learned per-channel
    scale.
    """

    def __init__(self, mask, net, channels):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = net
        self.scale = nn.Parameter(torch.ones((1, channels) + (1,) * (mask.dim() - 2)))

    def s_and_t(self, x_masked):
        s, t = self.net(x_masked).chunk(2, dim=1)
        s = self.scale * torch.tanh(s) * (1 - self.mask)
        return s, t * (1 - self.mask)

    def forward(self, x):
        s, t = self.s_and_t(x * self.mask)
        y = x * torch.exp(s) + t  # Eq. (9): s = t = 0 where b = 1, so that half passes unchanged
        return y, s.flatten(1).sum(1)  # log|det J| = Σ (1 − b) ⊙ s, Eq. (6)

    def inverse(self, y):
        s, t = self.s_and_t(y * self.mask)  # b ⊙ y = b ⊙ x: it sees what the forward saw, Eq. (7)
        return (y - t) * torch.exp(-s)


class Flow(nn.Module):
    """A sequence of layers: forward (summing log-determinants) and inverse (in reverse order)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        logdet = torch.zeros(x.shape[0], device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


def coupling_block(mask, channels, hidden, blocks):
    net = ResNet(channels, hidden, 2 * channels, blocks)
    return [AffineCoupling(mask, net, channels), ActNorm(channels)]


class RealNVP(nn.Module):
    """The multi-scale architecture (Sec. 3.6). Each scale: 3 checkerboard couplings, squeeze, 3
    channel-wise couplings, then half the channels are factored out as latents (Eq. 15); the last
    scale is 4 checkerboard couplings. For MNIST: 1x28x28 -> 2x14x14 kept (2x14x14 out) -> 4x7x7
    kept (4x7x7 out) -> 4x7x7 out.
    """

    def __init__(self, channels=1, size=28, num_scales=2, hidden=32, blocks=1):
        super().__init__()
        if size % 2 ** (num_scales - 1):
            raise ValueError(f"image size {size} must be divisible by 2^(num_scales - 1) = "
                             f"{2 ** (num_scales - 1)}")
        self.image_shape = (channels, size, size)
        self.scales, self.latent_shapes = nn.ModuleList(), []
        c, s = channels, size
        for _ in range(num_scales - 1):
            layers = []
            for parity in (0, 1, 0):
                layers += coupling_block(checkerboard_mask(s, s, parity), c, hidden, blocks)
            self.scales.append(Flow(layers))
            layers = []
            for parity in (0, 1, 0):
                layers += coupling_block(channel_mask(4 * c, parity), 4 * c, hidden, blocks)
            self.scales.append(Flow(layers))
            c, s = 2 * c, s // 2  # after squeeze (4c) and factoring out half (2c)
            self.latent_shapes.append((c, s, s))
        layers = []
        for parity in (0, 1, 0, 1):
            layers += coupling_block(checkerboard_mask(s, s, parity), c, hidden, blocks)
        self.scales.append(Flow(layers))
        self.latent_shapes.append((c, s, s))

    def forward(self, x):
        """x (B, C, H, W) in logit space -> z (B, D), the factored-out latents concatenated, and
        log|det J| (B,)."""
        zs, logdet = [], torch.zeros(x.shape[0], device=x.device)
        h = x
        for i in range(0, len(self.scales) - 1, 2):
            h, ld_checker = self.scales[i](h)
            h, ld_channel = self.scales[i + 1](squeeze(h))
            z, h = h.chunk(2, dim=1)  # factor out half the channels, Eq. (15)
            zs.append(z.flatten(1))
            logdet = logdet + ld_checker + ld_channel
        h, ld = self.scales[-1](h)
        zs.append(h.flatten(1))
        return torch.cat(zs, dim=1), logdet + ld

    def inverse(self, z):
        sizes = [math.prod(shape) for shape in self.latent_shapes]
        pieces = [p.view(-1, *shape) for p, shape in zip(z.split(sizes, dim=1), self.latent_shapes)]
        h = self.scales[-1].inverse(pieces[-1])
        for k, i in enumerate(range(len(self.scales) - 3, -1, -2)):
            h = torch.cat([pieces[-2 - k], h], dim=1)
            h = self.scales[i].inverse(unsqueeze(self.scales[i + 1].inverse(h)))
        return h


class FlatRealNVP(nn.Module):
    """The simple variant: affine couplings over the flattened image, alternating masks, MLPs."""

    def __init__(self, channels=1, size=28, num_couplings=30, hidden=256):
        super().__init__()
        self.image_shape = (channels, size, size)
        features = channels * size * size
        layers = []
        for k in range(num_couplings):
            mask = (torch.arange(features) % 2 == k % 2).float().view(1, features)
            coupling = AffineCoupling(mask, MLP(features, hidden), features)
            layers += [coupling, ActNorm(features, ndim=2)]
        self.flow = Flow(layers)

    def forward(self, x):
        return self.flow(x.flatten(1))

    def inverse(self, z):
        return self.flow.inverse(z).view(-1, *self.image_shape)
