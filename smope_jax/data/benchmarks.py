"""The built-in benchmarks: one entry each, read by the config checks and
the data sources. Plain Python (no TensorFlow), so that a config is checked
before anything heavy starts."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A built-in benchmark and the rules for reading it.

  Attributes:
    name: the value of `config.dataset`; the TFDS name of a TFDS benchmark.
    num_classes: its classes (a config may leave 0 or must name these).
    source: "tfds" (a prepared TFDS dataset) or "digits" (scikit-learn's
      bundled digits, the offline demo).
    key: a unique string feature of the TFDS records that fixes the
      canonical example order.
    train_split, test_split: the TFDS splits of the two roles.
    reference_lists: class names, labels and roles come from the
      reference's file lists (`data/imagenet_r`), not from TFDS's one split;
      `config.imagenet_r_split="random"` draws a seeded 80/20 split instead.
  """
  name: str
  num_classes: int
  source: str = "tfds"
  key: str = ""
  train_split: str = "train"
  test_split: str = "test"
  reference_lists: bool = False


BENCHMARKS = {
    b.name: b for b in (
        Benchmark("cifar100", 100, key="id"),
        # TFDS ships ImageNet-R as one split; the roles come from the lists.
        Benchmark("imagenet_r", 200, key="file_name", train_split="test",
                  test_split="", reference_lists=True),
        Benchmark("caltech_birds2011", 200, key="image/filename"),
        Benchmark("digits", 10, source="digits"),
    )
}
