"""Base networks as stem -> L ordered blocks -> tail, so NeuroTrails can split any of them.

Paper map (arXiv 2505.17909):
  Sec. 3   F(x) = f_L(...f_1(x)) as a composition of L blocks      -> SplitNet
  App. C   Wide-ResNet-28-10 (CIFAR-100, Tiny-ImageNet)            -> wide_resnet()
           ResNet-50 (ImageNet)                                   -> resnet50()
           LLaMA-130M / 350M via HuggingFace LlamaForCausalLM     -> llama()
  App. H.1 LLaMA-250M, the parameter-matched dense baseline       -> LLAMA_CONFIGS["llama-250m"]
  Also: a CIFAR ResNet-18, a small ViT (vit-<depth>-<width>) and small LLaMA configs (9m/20m/60m)
  for quick runs and tests; any SplitNet a user builds splits the same way (neurotrails.build).

Block counts L: WRN-d-k has 3 * (d - 4) / 6 blocks (12 for WRN-28-10), ResNet-50 16 bottlenecks,
CIFAR ResNet-18 8 basic blocks, ViT one block per encoder layer, LLaMA one block per decoder layer
(12 for 130M, 24 for 350M).

Also the tokenizer of a language model (load_tokenizer: a tokenizer.json, a local folder, the HF
cache or the hub; never a repository's own code) and the hub checks it needs (offline_mode,
hub_reachable), so that every reader of a language checkpoint gets the same vocabulary.

Imports: torch at module scope; torchvision only inside the ResNet builders, transformers only inside
llama() and load_tokenizer() (so that a script starts, and answers --help, without them).

Deviation: ResNet-50 head pooling. Released code: pools a 4x4 window of the 7x7 map. Ours:
  torchvision's global average pooling, so a single dense model is exactly torchvision's resnet50.
"""
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitNet(nn.Module):
    """stem -> blocks[0] -> ... -> blocks[L-1] -> tail; every part maps one tensor to one tensor."""

    def __init__(self, stem, blocks, tail):
        super().__init__()
        self.stem, self.blocks, self.tail = stem, nn.ModuleList(blocks), tail

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.tail(x)


# ----------------------------------------------------------------------------------------------
# Wide-ResNet (Zagoruyko & Komodakis 2016), pre-activation basic blocks


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut (1x1 conv on the activated input if shapes differ)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


def wide_resnet(depth=28, width=10, num_classes=100, in_channels=3):
    """WRN-depth-width for small images: stem conv 16, 3 stages of (depth-4)/6 blocks,
    widths 16w / 32w / 64w, tail = BN-ReLU-global-avg-pool-fc."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
    if width < 1:
        raise ValueError(f"WRN width must be >= 1, got {width}")
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
    blocks = []
    for stage in range(3):  # 32x32 -> 16x16 -> 8x8: the first block of stages 2 and 3 halves the size
        for i in range(n):
            c_in = widths[stage] if i == 0 else widths[stage + 1]
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(WideBasic(c_in, widths[stage + 1], stride))
    tail = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(widths[3], num_classes))
    net = SplitNet(stem, blocks, tail)
    _init_resnet(net)
    return net


def _init_resnet(net):
    """He (fan-out) init of convs, BatchNorm at the identity, zero linear biases (torchvision's
    ResNet init)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# ResNets (He et al. 2016) from torchvision's blocks


def resnet50(num_classes=1000, in_channels=3):
    """ResNet-50 v1.5 in torchvision's layout (stride in the 3x3 conv), split into 16 bottlenecks."""
    import torchvision  # here, not at module scope: importing it costs ~1 s for every script's start
    tv = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        tv.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    stem = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool)
    blocks = [b for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4) for b in layer]
    return SplitNet(stem, blocks, nn.Sequential(tv.avgpool, nn.Flatten(), tv.fc))


def resnet18_cifar(num_classes=100, in_channels=3):
    """ResNet-18 for 32x32 inputs: 3x3 stem conv, no max-pool, 8 basic blocks (64..512)."""
    from torchvision.models.resnet import BasicBlock
    stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    blocks, c_in = [], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            s = stride if i == 0 else 1
            down = None
            if s != 1 or c_in != c_out:
                down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, s, bias=False), nn.BatchNorm2d(c_out))
            blocks.append(BasicBlock(c_in, c_out, s, down))
            c_in = c_out
    tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
    net = SplitNet(stem, blocks, tail)
    _init_resnet(net)
    return net


# ----------------------------------------------------------------------------------------------
# A small vision transformer (Dosovitskiy et al. 2021): patch-embedding stem, pre-norm encoder
# blocks, norm + token mean + linear tail. Not in the paper; it shows that the split is
# model-agnostic (Sec. 3: "any network that is a composition of blocks").


def sincos_2d(h, w, dim, device=None):
    """Fixed 2-D sine-cosine position embedding, (h * w, dim): a quarter of the channels each for
    sin / cos of the column and of the row, frequencies 1 / 10000^(i / (dim / 4))."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device) / (dim // 4))
    x, y = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, H/p * W/p, dim): a p x p stride-p conv, plus the position embedding."""

    def __init__(self, in_channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x):
        x = self.proj(x)
        _, dim, h, w = x.shape
        return x.flatten(2).transpose(1, 2) + sincos_2d(h, w, dim, x.device).to(x.dtype)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). q, k, v and the output
    projection are nn.Linear, so they are masked and counted like every other layer."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        # (B, N, 3D) -> three (B, heads, N, D / heads)
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d / heads)) v, per attention head
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


def vit(depth=6, dim=64, num_classes=10, in_channels=1, patch=4, heads=4):
    """ViT-depth-dim for small images (28 x 28 or 32 x 32 with 4 x 4 patches): stem = patch
    embedding, blocks = `depth` encoder blocks, tail = LayerNorm + token mean + linear."""
    if dim % 4 or dim % heads:
        raise ValueError(f"ViT width must be a multiple of 4 and of {heads} heads, got {dim}")
    net = SplitNet(PatchEmbed(in_channels, dim, patch), [EncoderBlock(dim, heads) for _ in range(depth)],
                   nn.Sequential(nn.LayerNorm(dim), TokenMean(), nn.Linear(dim, num_classes)))
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


# ----------------------------------------------------------------------------------------------
# LLaMA (Touvron et al. 2023) through HuggingFace transformers

# (layers, hidden, ffn, attention heads). 130M/350M: paper App. C; 9m-60m and 250m are the
# configurations of the GaLore code base (Zhao et al. 2024) the paper's LM code builds on.
LLAMA_CONFIGS = {
    "llama-9m": (4, 128, 352, 4),
    "llama-20m": (4, 256, 688, 4),
    "llama-60m": (8, 512, 1376, 8),
    "llama-130m": (12, 768, 2048, 12),
    "llama-250m": (24, 768, 2560, 16),
    "llama-350m": (24, 1024, 2736, 16),
}


class LlamaBlock(nn.Module):
    """One HF LlamaDecoderLayer as a plain hidden -> hidden block: causal attention over positions
    0..T-1 (SDPA with no mask is causal), rotary embeddings recomputed from the input length."""

    def __init__(self, layer, rotary):
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, h):
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        return self.layer(h, position_embeddings=self.rotary(h, positions))


def llama_config(name="llama-130m", vocab_size=32000, max_seq_len=1024):
    """The transformers LlamaConfig of a named size (also what an exported head is saved with)."""
    from transformers import LlamaConfig
    layers, hidden, ffn, heads = LLAMA_CONFIGS[name]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, max_position_embeddings=max_seq_len, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def llama(name="llama-130m", vocab_size=32000, max_seq_len=1024):
    """LLaMA as SplitNet: stem = token embedding, blocks = decoder layers,
    tail = final RMSNorm + untied lm_head. Weights initialised by LlamaForCausalLM."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM(llama_config(name, vocab_size, max_seq_len))
    blocks = [LlamaBlock(layer, hf.model.rotary_emb) for layer in hf.model.layers]
    return SplitNet(hf.model.embed_tokens, blocks, nn.Sequential(hf.model.norm, hf.lm_head))


# ----------------------------------------------------------------------------------------------
# Names

# The paper's blocks_in_head per model (App. E.2, Tables 9-10); elsewhere about 2/3 of L.
DEFAULT_BLOCKS_IN_HEAD = {"wrn28-10": 8, "resnet50": 10, "llama-130m": 8, "llama-350m": 16}


def is_language_model(name):
    return name in LLAMA_CONFIGS


def model_names():
    return ["wrn<depth>-<width> (e.g. wrn28-10, wrn16-4)", "resnet18", "resnet50", "vit-<depth>-<width> (e.g. vit-6-64)",
            *LLAMA_CONFIGS]


def build(name, num_classes=100, in_channels=3, vocab_size=32000):
    """Build a base network by name: wrn<depth>-<width>, resnet18 (CIFAR), resnet50, llama-*."""
    wrn = re.fullmatch(r"wrn(\d+)-(\d+)", name)
    if wrn:
        return wide_resnet(int(wrn[1]), int(wrn[2]), num_classes, in_channels)
    vit_size = re.fullmatch(r"vit-(\d+)-(\d+)", name)
    if vit_size:
        return vit(int(vit_size[1]), int(vit_size[2]), num_classes, in_channels)
    if name == "resnet18":
        return resnet18_cifar(num_classes, in_channels)
    if name == "resnet50":
        return resnet50(num_classes, in_channels)
    if name in LLAMA_CONFIGS:
        return llama(name, vocab_size)
    raise ValueError(f"--model: unknown model {name!r}; choose one of: {', '.join(model_names())}")


# ----------------------------------------------------------------------------------------------
# Tokenizers of the language models, and the hub


def offline_mode():
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: only local files and caches may be used."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in flags)


def hub_reachable():
    """False at once when offline mode is set or the hub's host does not resolve/connect, so that a
    missing dataset or tokenizer fails in seconds instead of after minutes of retries."""
    if offline_mode():
        return False
    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def load_tokenizer(name=None, tokenizer_json=None):
    """A transformers tokenizer: from a tokenizer.json string (a --train-tokenizer run), a local
    file or folder, the local HF cache, or the hub, in that order."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if tokenizer_json is not None or (name and Path(name).is_file()):
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_str(Path(name).read_text() if tokenizer_json is None else tokenizer_json)
        except Exception:  # also UnicodeDecodeError: a binary file
            raise ValueError(f"--tokenizer {name}: not a tokenizer file (a tokenizer.json) or folder") from None
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    try:  # trust_remote_code=False: a folder's auto_map code is never run (nor asked about)
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        if Path(name).exists():
            reason = " ".join(str(e).split())[:120]
            raise ValueError(f"--tokenizer {name}: not a tokenizer file or folder ({reason})") from None
    if not hub_reachable():
        raise ValueError(f"--tokenizer {name}: not in the local cache and the HuggingFace hub cannot be reached; "
                         "give a local path, or --train-tokenizer N to train one on the training text")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)  # never run a repo's code
    except Exception as e:
        raise ValueError(f"--tokenizer {name}: could not be loaded ({type(e).__name__}: {str(e)[:120]})") from None
