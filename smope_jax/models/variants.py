"""Standard ViT sizes (patch 16). Free of Flax so that loaders can use it."""


def _patch16(hidden_size, num_layers, num_heads, mlp_dim) -> dict:
  return dict(hidden_size=hidden_size, num_layers=num_layers,
              num_heads=num_heads, mlp_dim=mlp_dim, patch_size=16)


VIT_VARIANTS = {
    "Ti/16": _patch16(192, 12, 3, 768),
    "S/16": _patch16(384, 12, 6, 1536),
    "B/16": _patch16(768, 12, 12, 3072),
    "L/16": _patch16(1024, 24, 16, 4096),
}
