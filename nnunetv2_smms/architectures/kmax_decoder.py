"""The kMaX decoder of DK-UXNet: learnable queries updated by k-means cross-attention, per-query mask logits,
semantic logits from the queries and the query-group distribution.

Re-implemented from the description (notes ``ssl-methods-facts.md`` B2; ``Rows21/DK-UXNet``
``networks/DKUNet/transformer_decoder.py`` and ``network_backbone.py:116,290-329,376-440``, after kMaX-DeepLab);
2D or 3D (``dim``). Shapes: B batch, N queries, D query channels, V voxels (spatial axes flattened), K classes.

:class:`KMaXPredictor` (pixel features (B, C, *s), query features (B, D, N) -> mask logits (B, N, *s)):
    pixel head: depthwise conv k5 + BN + GELU -> 1x1 conv to ``pixel_head_channels`` + BN + GELU -> 1x1 conv to
    ``embed_dim`` + BN, L2-normalised over the channels; mask kernel: 1x1 conv of the queries to ``embed_dim`` + BN;
    mask_logits[b, n, v] = BN_scalar(sum_c pixel[b, c, v] kernel[b, c, n]) (one mean / variance over all logits,
    affine weight initialised to 0.1). The source's class head (133 classes + void bias) feeds no loss: left out.

:class:`KMaXLayer` (pixel features, queries q (B, D, N) -> updated q):
    1. P = GELU(BN(conv1x1(GELU(pixel)))) (``bottleneck`` channels), Q = GELU(BN(conv1x1(q)));
    2. mask logits M = predictor(P, Q);
    3. hard k-means assignment A = onehot(argmax_n M) (B, N, V), under no_grad: A is exactly one-hot over the
       queries and carries no gradient (:func:`hard_assignment`); the layer's predictor therefore never receives a
       gradient (in the source neither: its outputs feed no loss), so its parameters are frozen (requires_grad
       False; DDP and the optimizer skip them, its BatchNorm statistics still update);
    4. k-means update q <- q + BN0(conv1x1(BN(sum_v A[b, n, v] Vp[b, :, v]))), Vp = BN(conv1x1(P)) (value
       channels), the sum in float32 (no autocast: it adds up to V voxels);
    5. query self-attention (heads ``num_heads``): q, k, v = split(BN(conv1x1(Q))), S = BN2d(q^T k) per head,
       softmax over keys (float32), retrieved = GELU(BN(S v)), q <- GELU(q + BN0(conv1x1(retrieved)));
    6. FFN: q <- GELU(q + BN0(conv1x1(GELU(BN(conv1x1(q)))))) (``ffn_dim`` hidden).
    BN0: BatchNorm with its weight initialised to 0 (each update starts at 0, as the source). BatchNorm
    everywhere (eps 1e-3, momentum 0.01, the source's): over B x N for queries, B x V for pixels; with nnU-Net's
    batch 2 the query BatchNorms see 2 N samples (fine); prediction uses the running statistics.

:class:`KMaXHead` (final queries, pixel features of the mask resolution -> outputs):
    mask embeddings = GELU(BN(conv1x1(q))); M = predictor(pixel, mask embeddings) (B, N, *s);
    response R = softmax_n(M);  query classes C = MLP(flatten(q)) -> (B, N, K) (MLP: N D -> ``semantic_hidden`` ->
    ReLU -> N K); semantic logits = sum_n C[b, n, k] R[b, n, v];  query-group distribution
    G[b, k, v] = sum_{n in group k} R[b, n, v] (groups: ``query_groups`` sizes per class; the source hard-codes
    16 / 4 / rest for its three classes).
"""
import contextlib
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_smms.architectures.uxnet import CONV

BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_1D = nn.Conv1d
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # the source's


def split_query_groups(num_queries: int, num_classes: int, groups: Optional[Sequence[int]] = None) -> List[int]:
    """The number of queries of each class: ``groups`` as given (checked), or the queries split as evenly as
    possible (the first classes get the remainder)."""
    if num_classes < 1:
        raise ValueError(f"the kMaX decoder needs at least one class, got {num_classes}")
    if groups is None:
        if num_queries < num_classes:
            raise ValueError(f"num_queries={num_queries} is smaller than the number of classes ({num_classes}): every "
                             f"class needs at least one query; raise num_queries")
        base, extra = divmod(num_queries, num_classes)
        return [base + (1 if k < extra else 0) for k in range(num_classes)]
    groups = [int(g) for g in groups]
    if len(groups) != num_classes or any(g < 1 for g in groups) or sum(groups) != num_queries:
        raise ValueError(f"query_groups={groups} must give one positive number of queries per class ({num_classes} "
                         f"classes, nnU-Net's labels incl. background) summing to num_queries={num_queries}; or set "
                         f"query_groups=None to split the queries evenly")
    return groups


@torch.no_grad()
def hard_assignment(mask_logits: torch.Tensor) -> torch.Tensor:
    """k-means assignment: (B, N, *s) mask logits -> (B, N, V) one-hot over the N queries (argmax), no gradient."""
    logits = mask_logits.detach().flatten(2)
    return torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)


def no_autocast(device: torch.device):
    """A context without autocast on ``device`` (float32 sums); nothing to switch off elsewhere (meta)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class ConvNorm(nn.Module):
    """1x1 (or k) convolution + BatchNorm (+ GELU). ``dim`` 1: on queries (B, D, N); 2/3: on pixels."""

    def __init__(self, dim: int, in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1,
                 bias: bool = False, act: bool = False, norm: bool = True, norm_init: float = 1.0,
                 init: str = "he"):
        super().__init__()
        conv = CONV_1D if dim == 1 else CONV[dim]
        self.conv = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        self.norm = BATCH_NORM[dim](out_channels, eps=BN_EPS, momentum=BN_MOMENTUM) if norm else nn.Identity()
        self.act = nn.GELU() if act else nn.Identity()
        if init == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
        else:  # truncated normal (2 std); "he": std sqrt(2 / input channels), the source's "he_normal"
            std = math.sqrt(2.0 / in_channels) if init == "he" else float(init)
            nn.init.trunc_normal_(self.conv.weight, std=std, a=-2 * std, b=2 * std)
        if bias:
            nn.init.zeros_(self.conv.bias)
        if norm:
            nn.init.constant_(self.norm.weight, norm_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class KMaXPredictor(nn.Module):
    def __init__(self, pixel_channels: int, query_channels: int, dim: int = 3, pixel_head_channels: int = 256,
                 embed_dim: int = 128):
        super().__init__()
        self.pixel_head = nn.Sequential(
            ConvNorm(dim, pixel_channels, pixel_channels, 5, groups=pixel_channels, act=True, init="xavier"),
            ConvNorm(dim, pixel_channels, pixel_head_channels, act=True),
            ConvNorm(dim, pixel_head_channels, embed_dim, bias=True, init=0.01))
        self.mask_kernel = ConvNorm(1, query_channels, embed_dim)
        self.mask_norm = nn.BatchNorm1d(1, eps=BN_EPS, momentum=BN_MOMENTUM)
        nn.init.constant_(self.mask_norm.weight, 0.1)

    def forward(self, pixel: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        b, n = queries.shape[0], queries.shape[2]
        embedding = F.normalize(self.pixel_head(pixel).flatten(2), p=2, dim=1)        # B, E, V
        logits = torch.einsum("bev,ben->bnv", embedding, self.mask_kernel(queries))     # B, N, V
        logits = self.mask_norm(logits.reshape(b, 1, -1)).reshape(b, n, *pixel.shape[2:])
        return logits


class AttentionOperation(nn.Module):
    """Multi-head attention of the queries among themselves, with BatchNorm on the similarities and on the
    retrieved values."""

    def __init__(self, value_channels: int, num_heads: int):
        super().__init__()
        self.similarity_norm = nn.BatchNorm2d(num_heads, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.value_norm = nn.BatchNorm1d(value_channels, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, _, n = q.shape                                                           # B, H, d, N
        similarity = self.similarity_norm(torch.einsum("bhdl,bhdm->bhlm", q, k))
        weights = torch.softmax(similarity.float(), dim=-1).to(v.dtype)
        retrieved = torch.einsum("bhlm,bhdm->bhdl", weights, v).reshape(b, -1, n)
        return F.gelu(self.value_norm(retrieved))


class KMaXLayer(nn.Module):
    def __init__(self, pixel_channels: int, query_dim: int = 256, dim: int = 3, num_heads: int = 8,
                 base_filters: int = 128, bottleneck_expansion: int = 2, key_expansion: int = 1,
                 value_expansion: int = 2, ffn_dim: int = 2048, pixel_head_channels: int = 256, embed_dim: int = 128):
        super().__init__()
        self.bottleneck = int(round(base_filters * bottleneck_expansion))
        self.key_depth = int(round(base_filters * key_expansion))
        self.value_depth = int(round(base_filters * value_expansion))
        self.num_heads = num_heads
        if self.key_depth % num_heads or self.value_depth % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the key ({self.key_depth}) and value "
                             f"({self.value_depth}) channels (base_filters={base_filters})")
        std = self.bottleneck ** -0.5
        self.pixel_in = ConvNorm(dim, pixel_channels, self.bottleneck, act=True)
        self.query_in = ConvNorm(1, query_dim, self.bottleneck, act=True)
        self.pixel_value = ConvNorm(dim, self.bottleneck, self.value_depth, init=std)
        self.predictor = KMaXPredictor(self.bottleneck, self.bottleneck, dim, pixel_head_channels, embed_dim)
        self.predictor.requires_grad_(False)  # only the no-grad hard assignment reads it (module docstring)
        self.kmeans_norm = nn.BatchNorm1d(self.value_depth, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.kmeans_out = ConvNorm(1, self.value_depth, query_dim, norm_init=0.0)
        self.qkv = ConvNorm(1, self.bottleneck, 2 * self.key_depth + self.value_depth, init=std)
        self.attention = AttentionOperation(self.value_depth, num_heads)
        self.attention_out = ConvNorm(1, self.value_depth, query_dim, norm_init=0.0)
        self.ffn = nn.Sequential(ConvNorm(1, query_dim, ffn_dim, act=True),
                                 ConvNorm(1, ffn_dim, query_dim, norm_init=0.0))

    def kmeans_update(self, assignment: torch.Tensor, pixel_value: torch.Tensor) -> torch.Tensor:
        """(B, N, V) assignment, (B, Cv, V) values -> (B, D, N) query update (sum in float32)."""
        with no_autocast(pixel_value.device):
            summed = torch.einsum("bnv,bcv->bcn", assignment.float(), pixel_value.float())
        return self.kmeans_out(self.kmeans_norm(summed))

    def forward(self, pixel: torch.Tensor, queries: torch.Tensor, assignment: Optional[torch.Tensor] = None):
        """-> (updated queries (B, D, N), the layer's mask logits (no gradient), the assignment used).
        ``assignment``: a (B, N, V) assignment to use instead of the hard k-means one (tests)."""
        b, _, n = queries.shape
        pixel_space = self.pixel_in(F.gelu(pixel))
        query_space = self.query_in(queries)
        pixel_value = self.pixel_value(pixel_space).flatten(2)
        with torch.no_grad():
            mask_logits = self.predictor(pixel_space, query_space)
        if assignment is None:
            assignment = hard_assignment(mask_logits)
        queries = queries + self.kmeans_update(assignment, pixel_value)

        q, k, v = torch.split(self.qkv(query_space), [self.key_depth, self.key_depth, self.value_depth], dim=1)
        heads = self.num_heads
        retrieved = self.attention(q.reshape(b, heads, -1, n), k.reshape(b, heads, -1, n), v.reshape(b, heads, -1, n))
        queries = F.gelu(queries + self.attention_out(retrieved))
        queries = F.gelu(queries + self.ffn(queries))
        return queries, mask_logits, assignment


class KMaXDecoder(nn.Module):
    """Learnable cluster centres (D, N), truncated normal std 1, refined by ``layers_per_level`` KMaXLayers on each
    pixel feature level in turn (``pixel_channels``: channels of each level, in the order they are visited)."""

    def __init__(self, pixel_channels: Sequence[int], num_queries: int = 128, query_dim: int = 256, dim: int = 3,
                 layers_per_level: int = 2, **layer_kwargs):
        super().__init__()
        self.cluster_centers = nn.Parameter(torch.empty(query_dim, num_queries))
        nn.init.trunc_normal_(self.cluster_centers, std=1.0, a=-2.0, b=2.0)
        self.layers_per_level = layers_per_level
        self.layers = nn.ModuleList(KMaXLayer(c, query_dim, dim, **layer_kwargs)
                                    for c in pixel_channels for _ in range(layers_per_level))

    def forward(self, pixel_features: Sequence[torch.Tensor]) -> torch.Tensor:
        queries = self.cluster_centers[None].expand(pixel_features[0].shape[0], -1, -1)
        for i, layer in enumerate(self.layers):
            queries, _, _ = layer(pixel_features[i // self.layers_per_level], queries)
        return queries


class KMaXHead(nn.Module):
    def __init__(self, pixel_channels: int, num_classes: int, num_queries: int, query_groups: Sequence[int],
                 query_dim: int = 256, dim: int = 3, pixel_head_channels: int = 256, embed_dim: int = 128,
                 semantic_hidden: int = 64):
        super().__init__()
        self.num_classes, self.num_queries = num_classes, num_queries
        self.query_groups = split_query_groups(num_queries, num_classes, query_groups)
        self.mask_embedding = ConvNorm(1, query_dim, query_dim, act=True)
        self.predictor = KMaXPredictor(pixel_channels, query_dim, dim, pixel_head_channels, embed_dim)
        self.semantic_mlp = nn.Sequential(nn.Linear(num_queries * query_dim, semantic_hidden), nn.ReLU(),
                                          nn.Linear(semantic_hidden, num_queries * num_classes))

    def forward(self, queries: torch.Tensor, pixel: torch.Tensor) -> Dict[str, torch.Tensor]:
        b = queries.shape[0]
        mask_logits = self.predictor(pixel, self.mask_embedding(queries))               # B, N, *s
        response = torch.softmax(mask_logits.float(), dim=1)
        classes = self.semantic_mlp(queries.flatten(1)).reshape(b, self.num_queries, self.num_classes)
        semantic = torch.einsum("bnk,bn...->bk...", classes.to(response.dtype), response)
        distribution = torch.cat([g.sum(1, keepdim=True) for g in torch.split(response, self.query_groups, dim=1)], 1)
        return {"semantic": semantic, "distribution": distribution, "mask_logits": mask_logits}
