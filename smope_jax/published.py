"""Where the published final average accuracies come from.

The numbers (FAA, %, mean +- std over 5 seeds) live in each method's spec,
keyed by (TFDS dataset, number of tasks). Backbones: supervised
ImageNet-21k -> 1k ViT-B/16 for ImageNet-R and CIFAR-100, supervised
ImageNet-21k ViT-B/16 for CUB-200. The SMoPE paper's "L2P" row is Deep
L2P++. Sources:
  S  the SMoPE paper (Le et al., ICLR 2026, arXiv 2509.24483);
  C  CODA-Prompt (Smith et al., CVPR 2023), as reproduced in VQ-Prompt or
     quoted by OS-Prompt (Kim et al.), a secondary source;
  V  VQ-Prompt (Jiao et al., NeurIPS 2024), Tables 1-2.
"""

from smope_jax.methods import registry

SOURCES = {
    "S": "SMoPE paper (arXiv 2509.24483)",
    "C": "CODA-Prompt paper, via VQ-Prompt / OS-Prompt",
    "V": "VQ-Prompt paper (NeurIPS 2024)",
}


def faa(dataset: str, num_tasks: int, method: str) -> list[tuple]:
  """The published (mean, std, source) values of a cell, maybe none; each
  method's spec holds its own (`registry.MethodSpec.published`)."""
  if method not in registry.names():
    return []
  return list(registry.get(method).published.get((dataset, num_tasks), ()))
