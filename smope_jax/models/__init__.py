"""Models: the ViT backbone with SMoPE prompt-expert attention."""
