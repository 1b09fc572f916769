"""Multi-centroid class statistics: k-means clusters of each class's features.

HiDe-Prompt summarises each class by NUM_CENTROIDS clusters of its features
(the frozen backbone's CLS for task-identity inference, the prompted CLS for
the head), each kept as a mean and a per-dimension population variance.
They feed the Gaussian replay of `hide.alignment` and, for the prompted
features, the old-class negatives of the contrastive loss.

k-means follows the reference's scikit-learn call (k-means++ seeding,
n_init=10 restarts, max_iter 300, tol 1e-4) on the float32 features, with
Lloyd's iterations (the reference's scikit-learn picked Elkan's, an exact
shortcut to the same iterations). The reference leaves the seeding to
NumPy's global generator; here every class gets its own seed, derived from
(seed, stream, class), so a class's centroids depend neither on the other
classes nor on the order in which they are computed (a resumed run
recomputes the same ones). Cluster means and variances are computed in
float64 and stored as float32.

Cases the reference does not handle (it stops with an error, or stores
NaN for an empty cluster):
  - a class with fewer distinct feature rows than centroids is clustered
    into as many clusters as it has distinct rows;
  - slots left without a cluster (that case, an empty cluster, a class
    without samples) are zero and marked absent.
Clusters of one repeated point are present with zero variance: the replay
skips them (as the reference does) while the contrastive loss keeps them.
"""

import typing

import numpy as np
from absl import logging
from sklearn import cluster

NUM_CENTROIDS = 10
N_INIT = 10
MAX_ITER = 300
TOL = 1e-4


class CentroidStatistics(typing.NamedTuple):
  """Clusters of every class, in label order.

  Attributes:
    means: float32 (C, K, D) cluster means.
    variances: float32 (C, K, D) population variances (divided by the
      cluster size, NumPy's `var`).
    present: bool (C, K), False for slots without a cluster (unseen
      classes included).
  """
  means: np.ndarray
  variances: np.ndarray
  present: np.ndarray


def empty(num_classes: int, dim: int,
          num_centroids: int = NUM_CENTROIDS) -> CentroidStatistics:
  """Statistics with no cluster yet (the state before the first task)."""
  zeros = np.zeros((num_classes, num_centroids, dim), np.float32)
  return CentroidStatistics(zeros, zeros.copy(),
                            np.zeros((num_classes, num_centroids), bool))


def class_seed(seed: int, stream: int, label: int) -> int:
  """The k-means seed of one class; `stream` tells the statistics sets apart
  (e.g. 0 for the uninstructed, 1 for the instructed features)."""
  words = np.random.SeedSequence([seed, stream, label]).generate_state(1)
  return int(words[0])


def class_centroids(features: np.ndarray, num_centroids: int,
                    random_state: int):
  """Clusters one class's (n, D) features.

  Returns float64 (K, D) means and variances and a bool (K,) presence mask.
  """
  dim = features.shape[1]
  means = np.zeros((num_centroids, dim))
  variances = np.zeros((num_centroids, dim))
  present = np.zeros(num_centroids, bool)
  features = np.asarray(features, np.float32)
  distinct = len(np.unique(features, axis=0)) if len(features) else 0
  k = min(num_centroids, distinct)
  if k == 0:
    return means, variances, present
  kmeans = cluster.KMeans(n_clusters=k, init="k-means++", n_init=N_INIT,
                          max_iter=MAX_ITER, tol=TOL, random_state=random_state)
  assignment = kmeans.fit_predict(features)
  wide = features.astype(np.float64)
  for j in range(k):
    rows = wide[assignment == j]
    if len(rows):
      means[j], variances[j], present[j] = rows.mean(0), rows.var(0), True
  return means, variances, present


def centroid_statistics(features: np.ndarray, labels: np.ndarray, classes, *,
                        seed: int, stream: int = 0,
                        num_centroids: int = NUM_CENTROIDS):
  """Clusters of each class in `classes`, from its rows of `features`.

  Args:
    features: (n, D) features of the task's training images.
    labels: (n,) their labels.
    classes: the labels to summarise (the task's classes).
    seed: the run's seed.
    stream: which statistics set (see `class_seed`).
    num_centroids: clusters per class.

  Returns:
    A `CentroidStatistics` with len(classes) rows.
  """
  labels = np.asarray(labels)
  rows = [
      class_centroids(features[labels == c], num_centroids,
                      class_seed(seed, stream, int(c))) for c in classes
  ]
  missing = [int(c) for c, r in zip(classes, rows) if not r[2].any()]
  if missing:
    logging.warning("classes %s have no features; they get no centroids",
                    missing)
  short = [
      int(c) for c, r in zip(classes, rows) if 0 < r[2].sum() < num_centroids
  ]
  if short:
    logging.warning(
        "classes %s have fewer than %d clusters (too few "
        "distinct features); their other slots are absent", short,
        num_centroids)
  means, variances, present = (np.stack(x) for x in zip(*rows))
  return CentroidStatistics(means.astype(np.float32),
                            variances.astype(np.float32), present)


def scatter(stats: CentroidStatistics, classes,
            new: CentroidStatistics) -> CentroidStatistics:
  """`stats` with the rows of `classes` replaced by `new` (a copy)."""
  classes = np.asarray(classes)
  out = CentroidStatistics(*(np.array(x) for x in stats))
  for old, rows in zip(out, new):
    old[classes] = rows
  return out
