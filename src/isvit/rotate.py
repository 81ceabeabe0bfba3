"""Rotation of the residual stream and of every attention head (``QuantConfig(rotate=True)``).

An exact rewrite of a full-precision model, done offline before it is wrapped: the quantizers then
see rotated activations and weights, in which a few outlier channels are spread over all channels.
Nothing is added to the forward pass (no online Hadamard transform): every rotation is in the
weights, so inference costs what it did (hence fc2's input, behind a GELU, is not rotated). The
one exception is a LayerNorm whose output is the stream itself (below).

Conventions: a token is a row vector ``x``; a Linear computes ``x W^T + b``; ``Q`` is an orthogonal
d x d matrix (``Q Q^T = I``) and the rotated stream is ``x' = x Q``.

ViT / DeiT (``_rotate_vit``):

1. The stream is made zero-mean: every writer (patch embedding, cls/dist/reg tokens, position
   embedding, each block's attention ``proj`` and ``fc2``, LayerScale folded into them first) has
   its output centred, ``W <- (I - 1 1^T / d) W``. Each LayerNorm reading the stream subtracts the
   token's mean anyway, so nothing changes, and from then on ``LayerNorm(x) = gamma * RMSNorm(x) + beta``.
2. Each such LayerNorm's affine goes into the Linears it feeds,
   ``W (gamma * n + beta) + b = (W diag(gamma)) n + (W beta + b)``, and the LayerNorm becomes an
   ``RMSNorm`` of weight 1 and bias 0 (parameters still: the post-LayerNorm fold writes into them).
3. The stream is rotated: writers ``W <- Q^T W`` (their output rows; biases, tokens and position
   embeddings ``t <- t Q``), readers ``W <- W Q`` (their input columns). ``RMSNorm(x Q) = RMSNorm(x) Q``
   because Q keeps every token's norm, so ``x Q`` flows through the stream and each reader computes
   ``x Q Q^T W^T = x W^T``. Pooling the tokens by their average commutes with Q as well.

The readers after the last block are the head's: ``norm`` or ``fc_norm`` (after pooling) then
``head`` (and DeiT's ``head_dist``); or, with an attention-pool head (SigLIP, ``global_pool='map'``),
``norm`` then the pool's ``kv``, so the pool's latent query, ``q``, ``proj``, norm and MLP never see
the stream and stay as they are. Three variants differ:

- ``norm_pre`` (CLIP; or, without it, the patch embedding's norm) is a LayerNorm whose output is
  the stream. Its per-channel gamma sits on the stream and does not commute with Q, so its
  affine becomes a writer: a d x d Linear, ``(gamma * n + beta) Q`` centred, after the same
  normalisation without affine (``_norm_as_writer``; d^2 float multiply-adds a token, once). What
  comes before it (the patch embedding, tokens and position embedding it normalises) is left alone.
- Where a reader takes the stream without a LayerNorm first (``final_norm=False``; ``fc_norm``
  after an attention pool), the stream's mean reaches it, so the stream is not centred: its
  LayerNorms become ``RotatedLayerNorm``s, as in Swin, and that reader reads ``W Q``.
- q/k norms (``qk_norm``), the attention output's and the MLP's inner norms are inside the
  attention or MLP, not on the stream, and stay; ``rotate_heads`` skips what they normalise.

Refused (``IsvitError``, before any weight changes): max pooling (it does not commute with Q), the
parameter-free ``AttentionPoolPrr`` (attention over groups of channels), no classifier head
(``num_classes=0``: the features would come out rotated), norms other than LayerNorm (timm's
RmsNorm), blocks other than timm's ``Block`` with ``Attention`` and an MLP of ``fc1``/``fc2``.

Swin (``_rotate_swin``) differs in two ways.

- Stage 0's stream starts at the patch embedding's LayerNorm, whose per-channel weight does not
  commute with a rotation: that stream keeps its basis. Every later stage's stream, written by its
  patch merging's ``reduction``, gets a rotation of its own width.
- Patch merging normalises four neighbouring tokens concatenated (4C channels); the mean over 4C
  keeps the differences between the four tokens' means, which centring the stream would erase. So
  Swin's stream is not centred. Each LayerNorm becomes a ``RotatedLayerNorm``, which removes the
  component along the rotated mean direction ``u Q`` (``u = 1 / sqrt(d)``) where the LayerNorm
  removed the mean: the same LayerNorm, rotated. Patch merging's input is rotated by
  blockdiag(Q, Q, Q, Q) (its mean direction likewise); its ``reduction`` reads with that and writes
  the next stage's stream with the next Q. Zero padding (of windows; of odd grids before merging)
  keeps zeros zero. Where a block pads its windows, the padded tokens are zeros that never got the
  LayerNorm's bias, so ``qkv`` must not get it either: that bias stays in the norm, as ``(beta / gamma) Q``.

Attention heads (both architectures): for head h an orthogonal ``R_h`` (head_dim x head_dim) turns
q and k into ``q R_h`` and ``k R_h`` (rows of qkv's weight and bias), and ``q R_h R_h^T k^T = q k^T``;
another, ``S_h``, turns v into ``v S_h`` while ``proj`` reads head h's columns as ``W S_h``, so
``attn @ v`` reaches proj's output unchanged. q and k are left alone where the block normalises
them (``q_norm``/``k_norm`` not Identity), v and proj where the attention output is normalised.

Each rotation is a randomized Hadamard matrix ``D H / sqrt(n)`` (D: random signs) where this file
knows a Hadamard matrix of order n (Sylvester's for 2^k; times Paley's of order p + 1, p a prime
= 3 mod 4, such as 12 and 20: ViT-Ti's 192 = 16 * 12, Swin-T's 96 ... 768 = 2^k * 12), else a
random orthogonal matrix (QR of a Gaussian). All are drawn from one seeded generator (no global RNG).
The model is rewritten in float64 and cast back once at the end.
"""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from timm.models.swin_transformer import PatchMerging
from torch import nn

from .errors import IsvitError
from .modules import RMSNorm, RotatedLayerNorm
from .quantizers import Quantizer
from .wrap import _pads_windows, _swin_blocks, _vit_blocks, architecture, check_swin_block, check_vit_block

__all__ = ["RMSNorm", "RotatedLayerNorm", "hadamard", "is_rotated", "random_orthogonal", "rotate_heads", "rotate_model"]


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

def _write(t: torch.Tensor, q: torch.Tensor, dim: int, center: bool) -> None:
    """A writer's output along ``dim`` (its stream channels), centred if asked, then rotated:
    ``t <- (t - mean(t)) Q`` along that dimension (for a weight: ``W <- Q^T (I - 1 1^T / d) W``)."""
    x = t.movedim(dim, -1)
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    t.copy_((x @ q).movedim(-1, dim))


def _write_linear(layer: nn.Module, q: torch.Tensor, center: bool) -> None:
    """A Linear's or Conv2d's output channels (dim 0 of the weight) written into the rotated stream."""
    _write(layer.weight, q, 0, center)
    if layer.bias is not None:
        _write(layer.bias, q, 0, center)


def _fold_layer_scale(ls: nn.Module, writer: nn.Linear) -> None:
    """``ls(W a + b)`` with LayerScale ``ls(y) = y * g``: the writer's output rows times g, g <- 1."""
    if isinstance(ls, nn.Identity):
        return
    writer.weight.mul_(ls.gamma.view(-1, 1))
    if writer.bias is not None:
        writer.bias.mul_(ls.gamma)
    ls.gamma.fill_(1.0)


def _norm_as_writer(norm: nn.LayerNorm, q: torch.Tensor, center: bool) -> nn.Sequential:
    """A LayerNorm whose output is the stream itself (``norm_pre``, or the patch embedding's norm),
    rewritten to write the rotated stream: its normalisation, without affine, then its affine as a
    d x d Linear written like any writer, ``(gamma * n + beta) Q`` (centred first if asked). A
    per-channel gamma does not commute with Q, so this is the one product rotation adds to the
    forward pass: d^2 multiply-adds a token, once, before the first block (float, not quantized)."""
    d = q.shape[0]
    linear = nn.Linear(d, d, device=q.device, dtype=q.dtype)
    linear.weight.copy_(torch.diag(norm.weight) if norm.weight is not None else torch.eye(d, dtype=q.dtype, device=q.device))
    linear.bias.copy_(norm.bias if norm.bias is not None else torch.zeros(d, dtype=q.dtype, device=q.device))
    _write_linear(linear, q, center)
    return nn.Sequential(nn.LayerNorm(d, eps=norm.eps, elementwise_affine=False, device=q.device, dtype=q.dtype), linear)


def _read(norm: nn.LayerNorm, readers: list[nn.Linear], q: torch.Tensor, *, centred: bool,
          keep_bias: bool = False) -> RMSNorm:
    """The norm that replaces the LayerNorm ``norm`` over a stream rotated by ``q``: an RMSNorm
    (``centred``: the stream is zero-mean) or a RotatedLayerNorm (direction ``u Q``), weight 1.

    The LayerNorm's affine goes into each reader, ``W <- W diag(gamma)``, ``b <- b + W beta``, and
    the reader's input columns are rotated, ``W <- W Q``. With ``keep_bias`` (padded windows) beta
    stays in the norm instead, as ``(beta / gamma) Q``: then ``W diag(gamma) Q`` applied to it gives
    ``W beta`` on real tokens and zero padding still gives ``b``.
    """
    d = q.shape[0]
    gamma = norm.weight if norm.weight is not None else torch.ones(d, dtype=q.dtype, device=q.device)
    beta = norm.bias if norm.bias is not None else torch.zeros_like(gamma)
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


@torch.no_grad()
def rotate_heads(attn: nn.Module, generator: torch.Generator) -> None:
    """Rotate each head's q and k by one random orthogonal ``R_h`` and its v by another, ``S_h``,
    with proj reading head h through ``S_h`` (see the module docstring), in place; timm's
    ``Attention`` or Swin's ``WindowAttention``. q and k are skipped where ``q_norm``/``k_norm`` is
    not Identity (a norm of q would not commute with R_h), v and proj where ``norm`` is not."""
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
        s = rotations()
        rotate_rows(2, s)
        # proj reads (attn @ v_h S_h) through its columns of head h: W[:, h] <- W[:, h] S_h
        proj = attn.proj.weight.view(attn.proj.out_features, heads, head_dim)
        proj.copy_(torch.einsum("ohj,hji->ohi", proj, s))


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------

def is_rotated(model: nn.Module) -> bool:
    """Whether ``rotate_model`` rotated ``model``: its LayerNorms are RMSNorms (or RotatedLayerNorms).
    What a saved or exported model records, rather than what its config asked for: the fast
    preset's rotation is skipped, with a warning, for a model that cannot be rotated."""
    return any(isinstance(m, RMSNorm) for m in model.modules())


def rotate_model(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rotate a full-precision timm ViT/DeiT or Swin in place, before it is wrapped: same function
    (up to float rounding), rotated residual stream and attention heads (module docstring).

    Returns the stream's rotations (float64), by where they start: ``{"stream": Q}`` for a ViT,
    ``{"layers.i": Q_i}`` for each Swin stage from the second on. ``seed`` seeds every rotation.
    """
    arch = architecture(model)
    if arch not in ("vit", "swin"):
        raise IsvitError(f"rotation supports ViT/DeiT and Swin models, not {type(model).__name__}")
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise IsvitError("the model is already quantized: rotate it before quantizing it")
    if is_rotated(model):
        raise IsvitError("the model is already rotated")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        raise IsvitError(f"rotation needs one dtype for all parameters, the model has {sorted(map(str, dtypes))}")
    (_check_vit if arch == "vit" else _check_swin)(model)
    generator = torch.Generator().manual_seed(seed)
    dtype = dtypes.pop()
    model.to(torch.float64)
    try:
        with torch.no_grad():
            return (_rotate_vit if arch == "vit" else _rotate_swin)(model, generator)
    finally:
        model.to(dtype)


def _orthogonal(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return random_orthogonal(n, generator).to(like.device)


def _require_layernorm(norm: nn.Module, where: str) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise IsvitError(f"{where} is a {type(norm).__name__}; rotation needs a LayerNorm there")


# ---------------------------------------------------------------------------------------------
# ViT / DeiT
# ---------------------------------------------------------------------------------------------

def _vit_stream_start(model) -> str | None:
    """The LayerNorm whose output is the residual stream itself, if there is one: ``norm_pre``
    (CLIP: it normalises the embeddings' sum), else the patch embedding's norm (before the
    class token and position embedding are added); None where the embeddings write the stream."""
    if isinstance(model.norm_pre, nn.LayerNorm):
        return "norm_pre"
    if isinstance(getattr(model.patch_embed, "norm", None), nn.LayerNorm):
        return "patch_embed.norm"
    return None


def _vit_head(model) -> tuple[str | None, list[nn.Linear]]:
    """What reads the stream after the last block: (the attribute of the LayerNorm it goes through
    first, or None where there is none; the Linears that read that norm's output, or the stream).

    With an attention-pool head (``global_pool='map'``) that is ``norm`` then the pool's ``kv``
    (its latent query, ``q``, ``proj``, norm and MLP never see the stream); with the class token or
    average pooling, ``norm`` (every token) or ``fc_norm`` (after pooling) then ``head`` and
    ``head_dist``. Raises ``IsvitError`` for a head rotation cannot carry (it must not change the
    model's output, so one Linear at least must read the rotated stream)."""
    pool = getattr(model, "attn_pool", None)
    norms = ("norm",) if pool is not None else ("norm", "fc_norm")  # fc_norm after a pool reads the pool's output
    for name in norms:
        norm = getattr(model, name, None)
        if norm is not None and not isinstance(norm, (nn.Identity, nn.LayerNorm)):
            raise IsvitError(f"{name} is a {type(norm).__name__}; rotation needs a LayerNorm (or none) there")
    found = [n for n in norms if isinstance(getattr(model, n, None), nn.LayerNorm)]
    if len(found) > 1:
        raise IsvitError("rotation needs one LayerNorm at most (norm or fc_norm) between the last block and the head")
    if pool is not None:
        if not isinstance(pool, AttentionPoolLatent):
            raise IsvitError(f"the model pools with {type(pool).__name__} (global_pool={model.global_pool!r}), "
                             "whose attention over groups of channels does not commute with a rotation")
        if pool.pos_embed is not None:
            raise IsvitError("the attention pool adds a position embedding after the final norm, which rotation cannot carry")
        return (found[0] if found else None), [pool.kv]
    if model.global_pool not in ("token", "avg", ""):
        raise IsvitError(f"rotation needs the class token, average or attention pooling before the head, not {model.global_pool!r}")
    heads = [h for h in (model.head, getattr(model, "head_dist", None)) if isinstance(h, nn.Linear)]
    if not heads:
        raise IsvitError("the model has no classifier head (num_classes=0): its output features would come out rotated")
    return (found[0] if found else None), heads


def _check_vit(model) -> None:
    for name, block in _vit_blocks(model):
        check_vit_block(name, block)
        _require_layernorm(block.norm1, f"{name}.norm1")
        _require_layernorm(block.norm2, f"{name}.norm2")
        if not all(isinstance(getattr(block.mlp, n, None), nn.Linear) for n in ("fc1", "fc2")):
            raise IsvitError(f"{name}.mlp is a {type(block.mlp).__name__}; rotation needs an MLP that reads the stream "
                             "with fc1 and writes it with fc2")
        for ls in (block.ls1, block.ls2):
            if not isinstance(ls, nn.Identity) and not isinstance(getattr(ls, "gamma", None), nn.Parameter):
                raise IsvitError(f"{name} has a {type(ls).__name__}; rotation folds LayerScale (a gamma per channel) only")
    if not isinstance(model.norm_pre, (nn.Identity, nn.LayerNorm)):
        raise IsvitError(f"norm_pre is a {type(model.norm_pre).__name__}; rotation needs a LayerNorm (or none) there")
    embed_norm = getattr(model.patch_embed, "norm", None)  # before the stream where norm_pre is a LayerNorm
    if isinstance(model.norm_pre, nn.Identity) and not isinstance(embed_norm, (type(None), nn.Identity, nn.LayerNorm)):
        raise IsvitError(f"patch_embed.norm is a {type(embed_norm).__name__}; rotation needs a LayerNorm (or none) there")
    _vit_head(model)


def _rotate_vit(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
    blocks = [block for _, block in _vit_blocks(model)]
    q = _orthogonal(model.embed_dim, generator, model.patch_embed.proj.weight)
    head_norm, head_readers = _vit_head(model)
    # Centred (RMSNorm) where every reader reads the stream through a LayerNorm; where one reads it
    # raw (no final norm: final_norm=False, or fc_norm after an attention pool), the stream's mean
    # matters and every LayerNorm becomes a RotatedLayerNorm instead, as in Swin.
    centre = head_norm is not None
    for block in blocks:
        _fold_layer_scale(block.ls1, block.attn.proj)
        _fold_layer_scale(block.ls2, block.mlp.fc2)
    # 1 + 3: the writers, centred and rotated
    start = _vit_stream_start(model)
    if start is not None:  # a LayerNorm's output is the stream: its affine becomes a writer
        owner, _, attribute = start.rpartition(".")
        owner = model.get_submodule(owner)
        setattr(owner, attribute, _norm_as_writer(getattr(owner, attribute), q, centre))
    if start != "norm_pre":  # else the embeddings are normalised by norm_pre, outside the stream
        for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
            if isinstance(getattr(model, name, None), nn.Parameter):
                _write(getattr(model, name), q, -1, center=centre)
    if start is None:
        _write_linear(model.patch_embed.proj, q, center=centre)
    for block in blocks:
        _write_linear(block.attn.proj, q, center=centre)
        _write_linear(block.mlp.fc2, q, center=centre)
    # 2 + 3: the readers, each LayerNorm swapped for an RMSNorm (a RotatedLayerNorm if not centred)
    for block in blocks:
        block.norm1 = _read(block.norm1, [block.attn.qkv], q, centred=centre)
        block.norm2 = _read(block.norm2, [block.mlp.fc1], q, centred=centre)
    if head_norm is not None:
        setattr(model, head_norm, _read(getattr(model, head_norm), head_readers, q, centred=True))
    else:  # the head (or the attention pool's kv) reads the stream itself
        for linear in head_readers:
            linear.weight.copy_(linear.weight @ q)
    for block in blocks:
        rotate_heads(block.attn, generator)
    return {"stream": q}


# ---------------------------------------------------------------------------------------------
# Swin
# ---------------------------------------------------------------------------------------------

def _check_swin(model) -> None:
    for name, block in _swin_blocks(model):
        check_swin_block(name, block)
        _require_layernorm(block.norm1, f"{name}.norm1")
        _require_layernorm(block.norm2, f"{name}.norm2")
        if _pads_windows(block) and bool((block.norm1.weight == 0).any()):
            raise IsvitError(f"{name}.norm1 has a zero weight in a block that pads its windows, which rotation cannot carry")
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
            raise IsvitError(f"layers.{i}.downsample is a {type(stage.downsample).__name__}; rotation needs PatchMerging")
        if isinstance(stage.downsample, PatchMerging):
            _require_layernorm(stage.downsample.norm, f"layers.{i}.downsample.norm")
    _require_layernorm(model.norm, "norm")
    if getattr(model.head.global_pool, "pool_type", None) not in ("avg", ""):
        raise IsvitError("rotation needs average pooling before the head of a Swin")


def _rotate_swin(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
    rotations = {}
    q = None  # stage 0's stream keeps its basis (module docstring)
    for i, stage in enumerate(model.layers):
        merge = stage.downsample
        if isinstance(merge, PatchMerging):
            if q is not None:  # it reads four tokens of a rotated stream: blockdiag(Q, Q, Q, Q)
                merge.norm = _read(merge.norm, [merge.reduction], torch.block_diag(*[q] * 4), centred=False)
            q = _orthogonal(merge.reduction.out_features, generator, merge.reduction.weight)
            rotations[f"layers.{i}"] = q
            _write_linear(merge.reduction, q, center=False)
        for block in stage.blocks:
            if q is not None:
                _write_linear(block.attn.proj, q, center=False)
                _write_linear(block.mlp.fc2, q, center=False)
                block.norm1 = _read(block.norm1, [block.attn.qkv], q, centred=False, keep_bias=_pads_windows(block))
                block.norm2 = _read(block.norm2, [block.mlp.fc1], q, centred=False)
            rotate_heads(block.attn, generator)
    if q is not None:
        heads = [model.head.fc] if isinstance(model.head.fc, nn.Linear) else []
        model.norm = _read(model.norm, heads, q, centred=False)
    return rotations
