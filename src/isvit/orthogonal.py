"""The math of rotation (``rotate.py``): orthogonal matrices and the exact rewrites of a model's
weights by them, from which each family's ``rotate`` (``isvit/families/``) is built.

Conventions: a token is a row vector ``x``; a Linear computes ``x W^T + b``; ``Q`` is an orthogonal
d x d matrix (``Q Q^T = I``) and the rotated stream is ``x' = x Q``.

- Writers (``write``, ``write_linear``): whatever adds to the residual stream has its output
  rotated, ``W <- Q^T W`` (its output rows; biases, tokens and position embeddings ``t <- t Q``),
  centred first where the stream is made zero-mean, ``W <- (I - 1 1^T / d) W``.
- Readers (``read``): a LayerNorm reading the stream has its affine folded into the Linears it
  feeds, ``W (gamma * n + beta) + b = (W diag(gamma)) n + (W beta + b)``, which then read the
  rotated stream, ``W <- W Q``; the LayerNorm becomes an ``RMSNorm`` of weight 1 and bias 0 over a
  zero-mean stream (``RMSNorm(x Q) = RMSNorm(x) Q``: Q keeps every token's norm), or a
  ``RotatedLayerNorm`` (the mean direction rotated along) over a stream that is not.
- The output (``unrotate``): where no Linear reads the stream at the end (a feature tower,
  ``num_classes=0``), the final norm's output is turned back by a float ``Q^T`` (its affine with it).
- Attention heads (``rotate_heads``): for head h an orthogonal ``R_h`` (head_dim x head_dim) turns
  q and k into ``q R_h`` and ``k R_h`` (rows of qkv's weight and bias), and ``q R_h R_h^T k^T = q k^T``;
  another, ``S_h``, turns v into ``v S_h`` while ``proj`` reads head h's columns as ``W S_h``, so
  ``attn @ v`` reaches proj's output unchanged. q and k are left alone where the block normalises
  them (``q_norm``/``k_norm`` not Identity), v and proj where the attention output is normalised.

Each rotation is a randomized Hadamard matrix ``D H / sqrt(n)`` (D: random signs) where this file
knows a Hadamard matrix of order n (Sylvester's for 2^k; times Paley's of order p + 1, p a prime
= 3 mod 4, such as 12 and 20: ViT-Ti's 192 = 16 * 12, Swin-T's 96 ... 768 = 2^k * 12), else a
random orthogonal matrix (QR of a Gaussian). All are drawn from one seeded generator (no global RNG).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import IsvitError
from .modules import RMSNorm, RotatedLayerNorm, Unrotate

# ---------------------------------------------------------------------------------------------
# Orthogonal matrices
# ---------------------------------------------------------------------------------------------

def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(n ** 0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n = 2^k: [[H, H], [H, -H]] k times."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1, for a prime q = 3 (mod 4).

    With chi the quadratic character mod q (chi(0) = 0) and the Jacobsthal matrix
    J[i, j] = chi(j - i), S = [[0, 1^T], [-1, J]] is skew-symmetric with S S^T = q I, so
    H = I + S has H H^T = I + S + S^T + S S^T = (q + 1) I.
    """
    chi = -torch.ones(q, dtype=torch.float64)
    chi[0] = 0
    chi[torch.arange(1, q) ** 2 % q] = 1
    index = torch.arange(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = chi[(index.view(1, -1) - index.view(-1, 1)) % q]
    return torch.eye(q + 1, dtype=torch.float64) + s


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, ``H H^T = n I``, float64), or None where this file
    knows none: Sylvester's for n = 2^k, else Sylvester's of order 2^k (x) Paley's of order
    m = n / 2^k for the largest 2^k with m - 1 a prime = 3 (mod 4) (192 = 16 * 12, 96 = 8 * 12)."""
    if n >= 1 and n & (n - 1) == 0:
        return _sylvester(n)
    power = n & -n  # the largest power of 2 dividing n
    while power >= 1:
        m = n // power
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            return torch.kron(_sylvester(power), _paley(m - 1))
        power //= 2
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random n x n orthogonal matrix (float64, on the CPU): ``D H / sqrt(n)`` with ``H =
    hadamard(n)`` and D diagonal random signs where H exists, else the Q factor of a Gaussian
    matrix's QR, its columns' signs fixed so that it is uniformly (Haar) distributed."""
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return signs.view(-1, 1) * h / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).view(1, -1)


# ---------------------------------------------------------------------------------------------
# The three rewrites: writers, readers (with the LayerNorm swapped), attention heads
# ---------------------------------------------------------------------------------------------

def write(t: torch.Tensor, q: torch.Tensor, dim: int, center: bool) -> None:
    """A writer's output along ``dim`` (its stream channels), centred if asked, then rotated:
    ``t <- (t - mean(t)) Q`` along that dimension (for a weight: ``W <- Q^T (I - 1 1^T / d) W``)."""
    x = t.movedim(dim, -1)
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    t.copy_((x @ q).movedim(-1, dim))


def write_linear(layer: nn.Module, q: torch.Tensor, center: bool) -> None:
    """A Linear's or Conv2d's output channels (dim 0 of the weight) written into the rotated stream."""
    write(layer.weight, q, 0, center)
    if layer.bias is not None:
        write(layer.bias, q, 0, center)


def fold_layer_scale(ls: nn.Module, writer: nn.Linear) -> None:
    """``ls(W a + b)`` with timm's LayerScale module ``ls(y) = y * g`` (or Identity): ``fold_gamma``."""
    fold_gamma(None if isinstance(ls, nn.Identity) else ls.gamma, writer)


def fold_gamma(gamma: nn.Parameter | None, writer: nn.Linear) -> None:
    """``gamma * (W a + b)`` (LayerScale as a bare parameter, EVA's ``gamma_1``; None: none): the
    writer's output rows times gamma, gamma <- 1."""
    if gamma is None:
        return
    writer.weight.mul_(gamma.view(-1, 1))
    if writer.bias is not None:
        writer.bias.mul_(gamma)
    gamma.fill_(1.0)


def norm_as_writer(norm: nn.Module, q: torch.Tensor, center: bool) -> nn.Sequential:
    """A LayerNorm (or timm's RmsNorm, AIMv2's) whose output is the stream itself (``norm_pre``, or
    the patch embedding's norm), rewritten to write the rotated stream: its normalisation, without
    affine (an RMSNorm of weight 1 and bias 0 for an RmsNorm), then its affine as a d x d Linear
    written like any writer, ``(gamma * n + beta) Q`` (centred first if asked). A per-channel gamma
    does not commute with Q, so this is the one product rotation adds to the forward pass: d^2
    multiply-adds a token, once, before the first block (float, not quantized)."""
    d = q.shape[0]
    bias = getattr(norm, "bias", None)  # timm's RmsNorm has none
    linear = nn.Linear(d, d, device=q.device, dtype=q.dtype)
    linear.weight.copy_(torch.diag(norm.weight) if norm.weight is not None else torch.eye(d, dtype=q.dtype, device=q.device))
    linear.bias.copy_(bias if bias is not None else torch.zeros(d, dtype=q.dtype, device=q.device))
    write_linear(linear, q, center)
    if isinstance(norm, nn.LayerNorm):
        normalise = nn.LayerNorm(d, eps=norm.eps, elementwise_affine=False, device=q.device, dtype=q.dtype)
    else:
        normalise = RMSNorm(d, norm.eps, device=q.device, dtype=q.dtype)
    return nn.Sequential(normalise, linear)


def read(norm: nn.LayerNorm, readers: list[nn.Linear], q: torch.Tensor, *, centred: bool,
         keep_bias: bool = False) -> RMSNorm:
    """The norm that replaces the LayerNorm ``norm`` over a stream rotated by ``q``: an RMSNorm
    (``centred``: the stream is zero-mean; or ``norm`` is timm's RmsNorm, which keeps the mean, with
    no bias) or a RotatedLayerNorm (direction ``u Q``), weight 1.

    The LayerNorm's affine goes into each reader, ``W <- W diag(gamma)``, ``b <- b + W beta``, and
    the reader's input columns are rotated, ``W <- W Q``. With ``keep_bias`` (padded windows) beta
    stays in the norm instead, as ``(beta / gamma) Q``: then ``W diag(gamma) Q`` applied to it gives
    ``W beta`` on real tokens and zero padding still gives ``b``.
    """
    d = q.shape[0]
    gamma = norm.weight if norm.weight is not None else torch.ones(d, dtype=q.dtype, device=q.device)
    beta = getattr(norm, "bias", None)  # timm's RmsNorm has none
    beta = beta if beta is not None else torch.zeros_like(gamma)
    for linear in readers:
        if linear.bias is None:
            linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features))
        if not keep_bias:
            linear.bias.add_(linear.weight @ beta)
        linear.weight.copy_((linear.weight * gamma) @ q)
    new = (RMSNorm if centred else RotatedLayerNorm)(d, norm.eps, device=q.device, dtype=q.dtype)
    if not centred:
        new.direction.copy_(new.direction @ q)  # u Q
    if keep_bias:
        new.bias.copy_((beta / gamma) @ q)
    return new


def unrotate(norm: nn.Module, q: torch.Tensor, *, centred: bool) -> nn.Module:
    """What replaces the final norm ``norm`` (a LayerNorm, or Identity where there is none) of a
    model whose rotated stream no Linear reads at the output (a feature tower, ``num_classes=0``):
    the norm as ``read`` swaps it (its affine taken out), then ``Unrotate``, which turns the rotated,
    normalised tokens back into the LayerNorm's output, ``(n Q) (diag(gamma) Q)^T + beta = gamma * n + beta``;
    just ``Unrotate`` with ``W = Q`` where there is no norm. Undone right after the norm, before any
    pooling, so that every token after it (``forward_features``, the pool, ``fc_norm``) is the
    unrotated model's. The one product rotation adds at the output: d^2 float multiply-adds a token."""
    d = q.shape[0]
    output = Unrotate(d, device=q.device, dtype=q.dtype)
    if isinstance(norm, nn.Identity):
        output.weight.copy_(q)
        return output
    gamma = norm.weight if norm.weight is not None else torch.ones(d, dtype=q.dtype, device=q.device)
    output.weight.copy_(gamma.view(-1, 1) * q)
    if getattr(norm, "bias", None) is not None:  # timm's RmsNorm has none
        output.bias.copy_(norm.bias)
    return nn.Sequential(read(norm, [], q, centred=centred), output)


@torch.no_grad()
def rotate_heads(attn: nn.Module, generator: torch.Generator) -> None:
    """Rotate each head's q and k by one random orthogonal ``R_h`` and its v by another, ``S_h``,
    with proj reading head h through ``S_h`` (see the module docstring), in place; an attention
    module with a fused ``qkv``, ``num_heads`` and ``proj`` (timm's ``Attention``, Swin's
    ``WindowAttention``). q and k are skipped where ``q_norm``/``k_norm`` is not Identity (a norm
    of q would not commute with R_h), v and proj where ``norm`` is not."""
    heads = attn.num_heads
    head_dim = attn.qkv.out_features // 3 // heads
    device = attn.qkv.weight.device
    # qkv's output rows as (q/k/v, head, channel of the head): q_h = x W[0, h]^T + b[0, h]
    weight = attn.qkv.weight.view(3, heads, head_dim, -1)
    bias = attn.qkv.bias.view(3, heads, head_dim) if attn.qkv.bias is not None else None

    def rotations() -> torch.Tensor:
        return torch.stack([random_orthogonal(head_dim, generator) for _ in range(heads)]).to(device, weight.dtype)

    def rotate_rows(which: int, r: torch.Tensor) -> None:
        # q_h R_h = x (R_h^T W_h)^T + b_h R_h: rows W_h <- R_h^T W_h, bias b_h <- b_h R_h
        weight[which].copy_(torch.einsum("hji,hjc->hic", r, weight[which]))
        if bias is not None:
            bias[which].copy_(torch.einsum("hji,hj->hi", r, bias[which]))

    if all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm")):
        r = rotations()
        rotate_rows(0, r)
        rotate_rows(1, r)
    if isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        v_rows = slice(2 * heads * head_dim, None)
        v_bias = attn.qkv.bias[v_rows] if attn.qkv.bias is not None else None
        rotate_values(attn.qkv.weight[v_rows], v_bias, attn.proj, heads, generator)


def rotate_values(weight: torch.Tensor, bias: torch.Tensor | None, proj: nn.Linear, kv_heads: int,
                  generator: torch.Generator) -> None:
    """Each of ``kv_heads`` heads' v turned by a random orthogonal ``S_h``, in place: the rows of v's
    ``weight`` (kv_heads * head_dim, d) and ``bias`` (views into the Linear that computes v), and the
    columns of ``proj`` that read it. With grouped-query attention (fewer k/v heads than proj reads)
    head h of proj reads v head ``h // group`` and so the same ``S``."""
    head_dim = weight.shape[0] // kv_heads
    heads = proj.in_features // head_dim
    s = torch.stack([random_orthogonal(head_dim, generator) for _ in range(kv_heads)]).to(weight.device, weight.dtype)
    # v_h S_h = x (S_h^T W_h)^T + b_h S_h: rows W_h <- S_h^T W_h, bias b_h <- b_h S_h
    weight.copy_(torch.einsum("hji,hjc->hic", s, weight.view(kv_heads, head_dim, -1)).reshape(weight.shape))
    if bias is not None:
        bias.copy_(torch.einsum("hji,hj->hi", s, bias.view(kv_heads, head_dim)).reshape(bias.shape))
    # proj reads (attn @ v_h S_h) through its columns of head h: W[:, h] <- W[:, h] S_h
    columns = proj.weight.view(proj.out_features, heads, head_dim)
    columns.copy_(torch.einsum("ohj,hji->ohi", columns, s.repeat_interleave(heads // kv_heads, dim=0)))


def orthogonal_like(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``random_orthogonal(n)`` on ``like``'s device."""
    return random_orthogonal(n, generator).to(like.device)


def require_layernorm(norm: nn.Module, where: str) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise IsvitError(f"{where} is a {type(norm).__name__}; rotation needs a LayerNorm there")
