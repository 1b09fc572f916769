"""Standard ViT sizes (patch 16). Free of Flax so that loaders can use it."""

VIT_VARIANTS = {
    "Ti/16":
        dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768,
             patch_size=16),
    "S/16":
        dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536,
             patch_size=16),
    "B/16":
        dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
             patch_size=16),
    "L/16":
        dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096,
             patch_size=16),
}
