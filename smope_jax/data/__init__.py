"""Continual-learning data: class orders, task splits and input pipelines."""

from smope_jax.data.pipeline import build_continual_data
from smope_jax.data.pipeline import ContinualData
from smope_jax.data.splits import class_order
from smope_jax.data.splits import imagenet_r_split
from smope_jax.data.splits import per_class_split
from smope_jax.data.splits import task_classes
