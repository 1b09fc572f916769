"""The published final average accuracies the comparison shows.

Final average accuracies (FAA, %, mean +- std over 5 seeds), keyed by
(TFDS dataset, number of tasks) and method. Backbones: supervised
ImageNet-21k -> 1k ViT-B/16 for ImageNet-R and CIFAR-100, supervised
ImageNet-21k ViT-B/16 for CUB-200. The SMoPE paper's "L2P" row is Deep
L2P++. Sources:
  S  the SMoPE paper (Le et al., ICLR 2026, arXiv 2509.24483);
  C  CODA-Prompt (Smith et al., CVPR 2023), as reproduced in VQ-Prompt or
     quoted by OS-Prompt (Kim et al.), a secondary source;
  V  VQ-Prompt (Jiao et al., NeurIPS 2024), Tables 1-2.
What is known of a method's published numbers beyond their source is in
NOTES, which the comparison prints under a table holding the method.
"""

SOURCES = {
    "S": "SMoPE paper (arXiv 2509.24483)",
    "C": "CODA-Prompt paper, via VQ-Prompt / OS-Prompt",
    "V": "VQ-Prompt paper (NeurIPS 2024)",
}

NOTES = {
    "hideprompt":
        "HiDe-Prompt's published FAA (SMoPE paper) has no recorded "
        "provenance: its authors' scripts use the original ViT paper's "
        "ImageNet-21k backbone, 3 seeds (CUB-200: 1) and a random "
        "ImageNet-R split of their own, and the SMoPE repository has no "
        "HiDe-Prompt code or command; which backbone, seeds and split "
        "stand behind these numbers is unknown. VQ-Prompt's paper reports "
        "other numbers for it on ImageNet-R (ImageNet-1k weights).",
}

# (dataset, tasks) -> method -> ((mean, std, source), ...)
FAA = {
    ("imagenet_r", 5): {
        "l2p": ((70.83, 0.58, "V"),),
        "deep_l2p": ((73.93, 0.37, "V"),),
        "dualprompt": ((73.05, 0.50, "V"),),
        "codaprompt": ((76.51, 0.38, "V"),),
    },
    ("imagenet_r", 10): {
        "smope": ((79.32, 0.42, "S"),),
        "l2p": ((69.29, 0.73, "V"),),
        "deep_l2p": ((71.66, 0.64, "S"), (71.66, 0.64, "V")),
        "dualprompt": ((71.32, 0.62, "S"), (71.32, 0.62, "V")),
        "codaprompt": ((75.45, 0.56, "S"), (75.45, 0.56, "V")),
        "vqprompt": ((78.71, 0.22, "S"),),
        "hideprompt": ((74.25, 0.19, "S"),),
    },
    ("imagenet_r", 20): {
        "l2p": ((65.89, 1.30, "V"),),
        "deep_l2p": ((68.42, 1.20, "V"),),
        "dualprompt": ((67.87, 1.39, "V"),),
        "codaprompt": ((72.37, 1.19, "V"),),
    },
    ("cifar100", 10): {
        "smope": ((89.23, 0.12, "S"),),
        "l2p": ((82.50, 1.10, "V"),),
        "deep_l2p": ((84.30, 1.03, "S"), (84.30, 1.03, "V")),
        "dualprompt": ((82.37, 0.29, "S"), (83.05, 1.16, "C")),
        "codaprompt": ((87.02, 0.10, "S"), (86.25, 0.74, "C")),
        "vqprompt": ((88.73, 0.27, "S"),),
        "hideprompt": ((88.27, 0.59, "S"),),
    },
    ("caltech_birds2011", 10): {
        "smope": ((87.43, 0.39, "S"),),
        "deep_l2p": ((78.64, 0.60, "S"),),
        "dualprompt": ((77.27, 0.31, "S"),),
        "codaprompt": ((76.65, 0.70, "S"),),
        "vqprompt": ((86.72, 0.94, "S"),),
        "hideprompt": ((85.60, 0.05, "S"),),
    },
}


def faa(dataset: str, num_tasks: int, method: str) -> list[tuple]:
  """The published (mean, std, source) values of a cell, maybe none."""
  return list(FAA.get((dataset, num_tasks), {}).get(method, ()))
