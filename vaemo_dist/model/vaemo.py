"""VAEmo stage-1 model: one shared transformer encoder over video tubelet tokens and audio log-mel
patch tokens, MAE masking, a light joint decoder for reconstruction, and contrastive heads.

Two reconstruction decoders (`model.decoder`): "full" runs self-attention blocks over the joint
sequence of every token (visible tokens and mask tokens, both modalities); "cross" (CrossMAE-style,
Fu et al. 2024) predicts only a sampled `model.decode_fraction` of each modality's masked patches, from
query tokens (mask token + position + modality) that cross-attend to the visible tokens of both
modalities and do not attend to each other."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch
from vaemo_dist.config import InputConfig, ModelConfig
from vaemo_dist.model.attention import attention
from vaemo_dist.model.embed import TokenEmbed, patchify_audio, patchify_video, sincos_pos_embed

# The parts of VAEmoModel, declared once: every submodule, parameter and buffer of the model (the first
# component of its state-dict names) under the part it belongs to. What an export leaves out without the
# decoder, what `strip_decoder` removes, what fine-tuning freezes and how it numbers layers all read this
# table; tests/model/test_vaemo.py checks it against the model, so a layer added or renamed in
# `VAEmoModel.__init__` without an entry here fails there, not silently in export or fine-tuning.
TOKEN_EMBEDS = ("video_embed", "audio_embed")  # patch/tubelet -> token (+ positions): encoder layer 0
ENCODER_BLOCKS = "blocks"  # the shared transformer stack (nn.ModuleList of Block)
PARTS: dict[str, tuple[str, ...]] = {
    "encoder": (*TOKEN_EMBEDS, ENCODER_BLOCKS, "norm"),
    "heads": ("video_head", "audio_head", "joint_head", "log_logit_scale"),  # contrastive projections
    "decoder": ("decoder_embed", "mask_token", "dec_video_modality", "dec_audio_modality", "dec_video_pos",
                "dec_audio_pos", "decoder_blocks", "decoder_norm", "video_pred", "audio_pred"),
}


def in_part(name: str, part: str) -> bool:
    """Whether the VAEmoModel state-dict (or parameter, module) name `name` belongs to `part` of PARTS."""
    return name.split(".", 1)[0] in PARTS[part]


def is_decoder_key(name: str) -> bool:
    """Whether `name` (a VAEmoModel state-dict name) is of the MAE reconstruction decoder."""
    return in_part(name, "decoder")


@dataclass
class ModelOutput:
    video_pred: torch.Tensor  # [B, Nv, Pv] decoder prediction for every video patch
    video_target: torch.Tensor  # [B, Nv, Pv] patchified video (per-patch normalised: model.norm_pix_video)
    video_mask: torch.Tensor  # [B, Nv] bool, True = masked (to reconstruct)
    audio_pred: torch.Tensor  # [B, Na, Pa]
    audio_target: torch.Tensor  # [B, Na, Pa] (per-patch normalised: model.norm_pix_audio)
    audio_mask: torch.Tensor  # [B, Na] bool
    video_emb: torch.Tensor  # [B, E] L2-normalised, from video tokens only under "separate"
    audio_emb: torch.Tensor  # [B, E] L2-normalised
    joint_emb: torch.Tensor  # [B, E] L2-normalised, from all visible tokens (used by stage 2)
    logit_scale: torch.Tensor  # scalar, exp(log_logit_scale) clamped at max_logit_scale
    video_keep: torch.Tensor  # [B, Kv] long, indices of the visible video tokens (sorted)
    audio_keep: torch.Tensor  # [B, Ka] long
    # Which patch each row of video_pred / audio_pred predicts: [B, Dv] long (sorted). The "full"
    # decoder predicts every patch (an expanded arange); "cross" a sampled subset of the masked ones,
    # and then video_pred is [B, Dv, Pv]. None (hand-built outputs): every patch, in order.
    video_decoded: torch.Tensor | None = None
    audio_decoded: torch.Tensor | None = None


@dataclass
class EncoderOutput:
    """What `VAEmoModel.encode` returns: every token visible, no decoder. A missing modality is None."""

    video_tokens: torch.Tensor | None  # [B, Nv, D] encoded tokens (after the final norm)
    audio_tokens: torch.Tensor | None  # [B, Na, D]
    video_pooled: torch.Tensor | None  # [B, D] mean of the video tokens (the input of video_head)
    audio_pooled: torch.Tensor | None  # [B, D]
    joint_pooled: torch.Tensor  # [B, D] mean of all tokens present (the input of joint_head)
    video_emb: torch.Tensor | None  # [B, E] L2-normalised projections, as in ModelOutput
    audio_emb: torch.Tensor | None
    joint_emb: torch.Tensor


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads  # heads on this rank: tensor parallelism (parallelize.py) divides it
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)  # output laid out as (q|k|v, head, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segments: Sequence[int] | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], segments)  # [B, heads, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, segments: Sequence[int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments)
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, Lq, dim] to a memory [B, Lk, dim] (through `attention`, so
    flash-attn or SDPA as for self-attention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # output laid out as (k|v, head, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = memory.shape[1]
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(memory).reshape(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, kv[0], kv[1])  # [B, heads, Lq, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class CrossBlock(nn.Module):
    """Pre-LN decoder block of the "cross" decoder: cross-attention of the queries to the (normalised)
    memory, then an MLP. The queries do not self-attend (as in CrossMAE), so each patch's prediction
    depends on the visible tokens only, never on which other patches were sampled. Not tensor-parallel
    (replicated on every rank, see parallelize.py); its layer names (`cross_attn`, `ffn`) differ from
    Block's so that TP_PLAN's paths never match them."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm_memory = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x), self.norm_memory(memory))
        return x + self.ffn(self.norm2(x))


def decoded_count(n: int, keep: int, fraction: float) -> int:
    """How many of the n - keep masked patches the cross decoder predicts: round(fraction * masked),
    at least 1 while any patch is masked, the same for every sample so tensors stay dense."""
    masked = n - keep
    return 0 if masked <= 0 else min(masked, max(1, round(fraction * masked)))


def sample_decoded(
    keep: torch.Tensor, n: int, fraction: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices [B, D] (sorted) of the masked patches to reconstruct: D = decoded_count of them, drawn
    uniformly per sample from the patches not in `keep` [B, K]."""
    d = decoded_count(n, keep.shape[1], fraction)
    noise = torch.rand(keep.shape[0], n, device=keep.device, generator=generator)
    noise = noise.scatter(1, keep, 2.0)  # visible patches sort after every masked one (noise < 1)
    return noise.argsort(dim=1)[:, :d].sort(dim=1).values


def random_keep(
    batch: int, n: int, ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MAE masking: indices [B, K] (sorted) of the kept tokens, K = round((1 - ratio) * n) for every
    sample so tensors stay dense."""
    k = max(1, round((1.0 - ratio) * n))
    noise = torch.rand(batch, n, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :k].sort(dim=1).values


def keep_to_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """[B, K] kept indices -> [B, n] bool, True where masked."""
    mask = torch.ones(keep.shape[0], n, dtype=torch.bool, device=keep.device)
    return mask.scatter(1, keep, False)


def patch_targets(patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Reconstruction targets: with `norm_pix` each patch minus its mean, over its std (MAE's
    norm_pix_loss); without, the patches as given (the globally normalised model input)."""
    if not norm_pix:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + 1e-6).sqrt()


class VAEmoModel(nn.Module):
    def __init__(
        self,
        model: ModelConfig,
        inputs: InputConfig,
        *,
        max_logit_scale: float = 100.0,
        init_temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.cfg, self.inputs = model, inputs
        self.max_logit_scale = max_logit_scale
        v, a = inputs.video, inputs.audio
        video_patch_dim = 3 * v.tubelet * v.patch * v.patch
        audio_patch_dim = a.patch * a.patch
        vgrid, agrid = inputs.video_grid, inputs.audio_grid
        self.num_video, self.num_audio = math.prod(vgrid), math.prod(agrid)

        # Encoder: per-modality token embedding, ONE shared stack of blocks.
        self.video_embed = TokenEmbed(video_patch_dim, model.dim, vgrid)
        self.audio_embed = TokenEmbed(audio_patch_dim, model.dim, agrid)
        self.blocks = nn.ModuleList(
            [Block(model.dim, model.heads, model.mlp_ratio) for _ in range(model.depth)]
        )
        self.norm = nn.LayerNorm(model.dim, eps=1e-6)

        # Contrastive / joint projection heads and the CLIP-style learnable temperature.
        self.video_head = nn.Linear(model.dim, model.embed_dim)
        self.audio_head = nn.Linear(model.dim, model.embed_dim)
        self.joint_head = nn.Linear(model.dim, model.embed_dim)
        # Shape [1], not 0-d: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

        # Light decoder over the full joint sequence (cross-modal reconstruction).
        dd = model.decoder_dim
        self.decoder_embed = nn.Linear(model.dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(dd))
        self.dec_video_modality = nn.Parameter(torch.zeros(dd))
        self.dec_audio_modality = nn.Parameter(torch.zeros(dd))
        self.register_buffer("dec_video_pos", sincos_pos_embed(vgrid, dd), persistent=False)
        self.register_buffer("dec_audio_pos", sincos_pos_embed(agrid, dd), persistent=False)
        dec_block = CrossBlock if model.decoder == "cross" else Block
        self.decoder_blocks = nn.ModuleList(
            [dec_block(dd, model.decoder_heads, model.mlp_ratio) for _ in range(model.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.video_pred = nn.Linear(dd, video_patch_dim)
        self.audio_pred = nn.Linear(dd, audio_patch_dim)

        self.apply(self._init_linear)
        for p in (self.mask_token, self.dec_video_modality, self.dec_audio_modality,
                  self.video_embed.modality, self.audio_embed.modality):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _encode(self, x: torch.Tensor, segments: Sequence[int] | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, segments)
        return self.norm(x)

    @staticmethod
    def pool(
        v_enc: torch.Tensor | None, a_enc: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Mean-pooled features (video, audio, joint) of encoded tokens; training and `encode` share it.
        The joint pool is the mean over every token present, so it also exists with one modality."""
        present = [t for t in (v_enc, a_enc) if t is not None]
        joint = torch.cat(present, dim=1).mean(dim=1)
        return (None if v_enc is None else v_enc.mean(dim=1),
                None if a_enc is None else a_enc.mean(dim=1), joint)

    def project(
        self, video: torch.Tensor | None, audio: torch.Tensor | None, joint: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Pooled features -> L2-normalised embeddings through the contrastive / joint heads."""
        video_emb = None if video is None else F.normalize(self.video_head(video), dim=-1)
        audio_emb = None if audio is None else F.normalize(self.audio_head(audio), dim=-1)
        return video_emb, audio_emb, F.normalize(self.joint_head(joint), dim=-1)

    def encode(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> EncoderOutput:
        """Encode without masking (every token visible) and without the decoder: the path for
        embeddings, probes and fine-tuning. Either modality may be left out. Token embedding,
        positions, the shared encoder (with the same fusion rule), pooling and heads are the ones
        `forward` uses, so with mask ratios 0 `forward` gives the same embeddings."""
        if video is None and audio is None:
            raise ValueError("encode needs video, audio or both")
        v, a = self.inputs.video, self.inputs.audio
        parts: list[torch.Tensor] = []
        if video is not None:
            tokens = self.video_embed(patchify_video(video, v.tubelet, v.patch))
            keep = torch.arange(self.num_video, device=video.device).expand(video.shape[0], -1)
            parts.append(dispatch.masked_gather(tokens, self.video_embed.pos, keep))
        if audio is not None:
            tokens = self.audio_embed(patchify_audio(audio, a.patch))
            keep = torch.arange(self.num_audio, device=audio.device).expand(audio.shape[0], -1)
            parts.append(dispatch.masked_gather(tokens, self.audio_embed.pos, keep))
        lengths = [p.shape[1] for p in parts]
        segments = lengths if self.cfg.fusion == "separate" and len(parts) > 1 else None
        encoded = list(self._encode(torch.cat(parts, dim=1), segments).split(lengths, dim=1))
        v_enc = encoded.pop(0) if video is not None else None
        a_enc = encoded.pop(0) if audio is not None else None
        pooled = self.pool(v_enc, a_enc)
        video_emb, audio_emb, joint_emb = self.project(*pooled)
        return EncoderOutput(video_tokens=v_enc, audio_tokens=a_enc, video_pooled=pooled[0],
                             audio_pooled=pooled[1], joint_pooled=pooled[2], video_emb=video_emb,
                             audio_emb=audio_emb, joint_emb=joint_emb)

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, generator: torch.Generator | None = None
    ) -> ModelOutput:
        cfg, v, a = self.cfg, self.inputs.video, self.inputs.audio
        b, nv, na = video.shape[0], self.num_video, self.num_audio
        v_patches = patchify_video(video, v.tubelet, v.patch)
        a_patches = patchify_audio(audio, a.patch)

        # MAE masking; the visible tokens get their positional embedding on the way out.
        v_keep = random_keep(b, nv, cfg.mask_ratio_video, video.device, generator)
        a_keep = random_keep(b, na, cfg.mask_ratio_audio, audio.device, generator)
        v_vis = dispatch.masked_gather(self.video_embed(v_patches), self.video_embed.pos, v_keep)
        a_vis = dispatch.masked_gather(self.audio_embed(a_patches), self.audio_embed.pos, a_keep)

        # One pass of the shared encoder over both modalities. "separate": attention stays within each
        # modality (block-diagonal), so neither pooled embedding sees the other modality.
        lengths = [v_vis.shape[1], a_vis.shape[1]]
        segments = lengths if cfg.fusion == "separate" else None
        v_enc, a_enc = self._encode(torch.cat([v_vis, a_vis], dim=1), segments).split(lengths, dim=1)

        video_emb, audio_emb, joint_emb = self.project(*self.pool(v_enc, a_enc))
        logit_scale = self.log_logit_scale.exp().clamp(max=self.max_logit_scale).squeeze(0)

        if cfg.decoder == "cross":
            v_dec, a_dec, x = self._decode_cross(v_enc, a_enc, v_keep, a_keep, generator)
            split = v_dec.shape[1]
        else:
            v_dec = torch.arange(nv, device=video.device).expand(b, -1)
            a_dec = torch.arange(na, device=audio.device).expand(b, -1)
            x, split = self._decode_full(v_enc, a_enc, v_keep, a_keep), nv

        return ModelOutput(
            video_pred=self.video_pred(x[:, :split]),
            video_target=patch_targets(v_patches, cfg.norm_pix_video).detach(),
            video_mask=keep_to_mask(v_keep, nv),
            audio_pred=self.audio_pred(x[:, split:]),
            audio_target=patch_targets(a_patches, cfg.norm_pix_audio).detach(),
            audio_mask=keep_to_mask(a_keep, na),
            video_emb=video_emb,
            audio_emb=audio_emb,
            joint_emb=joint_emb,
            logit_scale=logit_scale,
            video_keep=v_keep,
            audio_keep=a_keep,
            video_decoded=v_dec,
            audio_decoded=a_dec,
        )

    def _decode_full(self, v_enc: torch.Tensor, a_enc: torch.Tensor, v_keep: torch.Tensor,
                     a_keep: torch.Tensor) -> torch.Tensor:
        """"full" decoder: back to full sequences with mask tokens, then one joint sequence.
        Returns the normalised decoder output [B, Nv + Na, dd]."""
        nv, na = self.num_video, self.num_audio
        v_full = dispatch.masked_scatter(self.decoder_embed(v_enc), v_keep, self.mask_token,
                                         self.dec_video_pos, nv) + self.dec_video_modality
        a_full = dispatch.masked_scatter(self.decoder_embed(a_enc), a_keep, self.mask_token,
                                         self.dec_audio_pos, na) + self.dec_audio_modality
        x = torch.cat([v_full, a_full], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)

    def _decode_cross(
        self, v_enc: torch.Tensor, a_enc: torch.Tensor, v_keep: torch.Tensor, a_keep: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """"cross" decoder: (video decoded indices [B, Dv], audio [B, Da], normalised output
        [B, Dv + Da, dd]). The memory is the visible tokens of both modalities through decoder_embed
        plus their decoder position and modality embeddings (what the full decoder gives them); a query
        is the mask token plus the position and modality embeddings of a sampled masked patch."""
        frac = self.cfg.decode_fraction
        v_dec = sample_decoded(v_keep, self.num_video, frac, generator)
        a_dec = sample_decoded(a_keep, self.num_audio, frac, generator)
        v_mem, a_mem = self.decoder_embed(v_enc), self.decoder_embed(a_enc)
        v_pos, a_pos = self.dec_video_pos.to(v_mem.dtype), self.dec_audio_pos.to(a_mem.dtype)
        memory = torch.cat([v_mem + v_pos[v_keep] + self.dec_video_modality,
                            a_mem + a_pos[a_keep] + self.dec_audio_modality], dim=1)
        x = torch.cat([self.mask_token + v_pos[v_dec] + self.dec_video_modality,
                       self.mask_token + a_pos[a_dec] + self.dec_audio_modality], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x, memory)
        return v_dec, a_dec, self.decoder_norm(x)


def strip_decoder(model: VAEmoModel) -> VAEmoModel:
    """Remove the reconstruction decoder (modules, parameters, buffers: PARTS["decoder"]): `encode` never
    uses it, and a decoder left with random weights would be a trap."""
    for name in PARTS["decoder"]:
        if hasattr(model, name):
            delattr(model, name)
    return model
