"""The Pixio pre-training model: encoder on visible patch groups + deep decoder + pixel loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pixio.models.encoder import LayerNorm, PixioEncoder, make_blocks, resize_pos_embed
from pixio.models.init import init_parameters
from pixio.models.masking import check_mask_ratio, group_masking
from pixio.models.patchify import patchify

DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass
class MAEOutput:
    """loss: scalar; loss_per_sample: (B,); pred: (B, L, p*p*3); mask: (B, L), 1 = masked;
    ids_restore: (B, L)."""

    loss: torch.Tensor
    loss_per_sample: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def pixel_targets(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """Patchified targets (B, L, p*p*3), each patch normalised by its own mean/unbiased var if asked."""
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean squared error averaged over masked patches: (scalar, per-sample (B,)).

    With no masked patch (mask_ratio 0) there is nothing to reconstruct and the loss is 0.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    per_sample = (per_patch * mask).sum(1) / mask.sum(1).clamp_min(1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1), per_sample


class PixioMAE(PixioEncoder):
    """Encoder + decoder in one module, so the state dict has the reference's flat key names."""

    def __init__(
        self,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 32,
        decoder_num_heads: int = 16,
        mask_grid: int = 4,
        norm_pix_loss: bool = True,
        **encoder_kwargs,
    ) -> None:
        super().__init__(**encoder_kwargs)
        self.mask_grid = mask_grid
        self.norm_pix_loss = norm_pix_loss
        n_pos = self.pos_embed.shape[1]
        in_chans = self.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_pos, decoder_embed_dim))
        self.decoder_blocks = make_blocks(
            decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio=4.0, drop_path=0.0
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans)
        # The encoder's parameters were initialised by PixioEncoder.__init__ (same base seed).
        init_parameters(self, self.init_seed, select=lambda n: n.startswith(DECODER_PREFIXES))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder part of the state dict (what a released encoder checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_PREFIXES)}

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encode the visible groups: latent (B, n_cls + n_vis, D) after `norm`, mask, ids_restore."""
        tokens, grid = self.embed_patches(imgs)  # position added before masking
        m = group_masking(tokens.shape[0], grid, self.mask_grid, mask_ratio, noise, tokens.device)
        index = m.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        x = self.prepend_cls(torch.gather(tokens, 1, index))
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x), m.mask, m.ids_restore, grid

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """latent (B, n_cls + n_vis, D) -> pixel predictions (B, h*w, p*p*3) for every patch."""
        n = self.n_cls_tokens
        x = self.decoder_embed(latent)  # (B, n_cls + n_vis, Dd)
        b, length = ids_restore.shape
        masked = self.mask_token.expand(b, length - (x.shape[1] - n), -1)
        patches = torch.cat([x[:, n:], masked], dim=1)  # shuffled order: visible, then masked
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        patches = torch.gather(patches, 1, index)  # back to row-major order
        pos = resize_pos_embed(self.decoder_pos_embed, self.grid_size, grid, n)
        x = torch.cat([x[:, :n], patches], dim=1) + pos
        for blk in self.decoder_blocks:
            x = self.run_block(blk, x)
        return self.decoder_pred(self.decoder_norm(x))[:, n:]

    def forward(  # type: ignore[override]
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """Mask, encode, decode and compute the masked pixel loss. imgs: (B, 3, H, W) normalised."""
        check_mask_ratio(mask_ratio)
        latent, mask, ids_restore, grid = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, grid)
        target = pixel_targets(imgs, self.patch_size, self.norm_pix_loss)
        loss, per_sample = masked_mse(pred, target, mask)
        return MAEOutput(loss, per_sample, pred, mask, ids_restore)
