"""The DINO projection head the student and teacher share the shape of (DINOv2's ``DINOHead``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """DINOv2's projection head: a 3-layer MLP to a bottleneck, L2 normalisation, then a weight-normed prototype layer.

    ``Linear(in_dim, hidden_dim) -> GELU -> Linear(hidden_dim, hidden_dim) -> GELU -> Linear(hidden_dim,
    bottleneck_dim) -> L2-normalise -> weight-normed Linear(bottleneck_dim, out_dim, no bias)``.

    Initialisation as in DINOv2 and the reference: the MLP's weights are trunc-normal with std 0.02 and its biases
    zero; the prototype layer keeps ``nn.Linear``'s default init for its direction ``v`` (only the direction
    matters under weight norm) and its magnitude ``g`` is set to 1.

    .. note::
        State-dict keys (``torch.nn.utils.parametrizations.weight_norm``)::

            mlp.0.weight [hidden_dim, in_dim]           mlp.0.bias [hidden_dim]
            mlp.2.weight [hidden_dim, hidden_dim]       mlp.2.bias [hidden_dim]
            mlp.4.weight [bottleneck_dim, hidden_dim]   mlp.4.bias [bottleneck_dim]
            last_layer.parametrizations.weight.original0 [out_dim, 1]               magnitude g
            last_layer.parametrizations.weight.original1 [out_dim, bottleneck_dim]  direction v

        DINOv2 and the reference use the older ``torch.nn.utils.weight_norm``, whose keys for the last two are
        ``last_layer.weight_g`` and ``last_layer.weight_v`` (same shapes, same meaning).

    Args:
        in_dim: token channels C of the backbone (384 for ViT-S/14, 768 for ViT-B/14).
        out_dim: number of prototypes K.
        hidden_dim: width of the two hidden layers.
        bottleneck_dim: width of the normalised bottleneck.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    def forward(self, tokens: Tensor) -> Tensor:
        """Prototype logits of each token.

        Args:
            tokens: [..., in_dim].

        Returns:
            [..., out_dim] logits (unnormalised; temperature 1).
        """
        return self.last_layer(self.bottleneck(tokens))

    def bottleneck(self, tokens: Tensor) -> Tensor:
        """The L2-normalised bottleneck of each token, [..., bottleneck_dim]: what the prototype layer multiplies."""
        bottleneck = self.mlp(tokens)
        # DINOv2's eps: 1e-12 underflows in float16.
        eps = 1e-6 if bottleneck.dtype == torch.float16 else 1e-12
        return F.normalize(bottleneck, dim=-1, p=2, eps=eps)

    def prototypes(self) -> Tensor:
        """The prototype layer's weight [out_dim, bottleneck_dim] (``g * v / |v|``, with gradients to g and v)."""
        return self.last_layer.weight
