"""HiDe-Prompt (hierarchical decomposition of prompt-based continual
learning) as its authors' code runs it: the trainer's view of the method.

Per task t, in one run: the task-identity (TII) classifier trains on the
frozen features (`tii_train`), its class clusters are stored
(`tii_stats`) and, from task 1 on, it is re-aligned on Gaussian replay of
them (`tii_align`); then prompt slot t starts as a copy of slot t - 1
(`start`), trains with the true task id and a contrastive term against old
classes' centroids (`train`), is merged towards the earlier slots
(`merge`), the prompted features' clusters are stored (`stats`), the head
is re-aligned on them (`align`, from task 1 on) and every seen task is
evaluated through the TII classifier's task (`eval`). The reference runs
the two stages as two programs; stage 1's task-t work does not depend on
stage 2, so interleaving them computes the same thing. The phases are
`hide.phases`; the prompt module `hide.prompts`; the losses `hide.losses`.
"""

import jax
import jax.numpy as jnp

from smope_jax.hide import losses as hide_losses
from smope_jax.hide import phases as hide_phases
from smope_jax.hide import prompts as hide_prompts
from smope_jax.hide import schedules as hide_schedules
from smope_jax.hide import steps as hide_steps
from smope_jax.hide import statistics
from smope_jax.methods import base


class HiDePrompt(base.Method):
  """One prefix prompt per task, chosen at test time by the TII classifier.

  The method state holds both sets of class clusters, (C, K, D) means and
  variances with a (C, K) presence mask (`tii_*`: the frozen features;
  the others: the prompted ones, also the contrastive term's negatives),
  and the task-identity accuracy of each evaluation, (T, T), -1 where not
  evaluated.
  """

  def __init__(self, config, num_tasks: int, dims: dict):
    super().__init__(config, num_tasks, dims)
    self.num_classes = config.num_classes
    self.task_size = config.num_classes // num_tasks
    self.group_size = (None
                       if config.hide.one_group else hide_losses.DEVICE_BATCH)
    self.weight_decay = (hide_schedules.NAMED_WEIGHT_DECAY
                         if config.hide.named_weight_decay else 0.0)

  def prompts(self) -> hide_prompts.HiDePrompts:
    return hide_prompts.HiDePrompts(
        num_layers=self.num_layers, num_tasks=self.num_tasks,
        length=self.config.prompt_length, hidden_size=self.dims["hidden_size"],
        num_heads=self.dims["num_heads"], num_classes=self.num_classes,
        momentum=self.config.hide.momentum,
        intended_pairing=self.config.hide.intended_pairing)

  def optimizer(self):
    """Adam after PyTorch's clip of the global norm to 1, as both stages."""
    return hide_schedules.adam(self.weight_decay)

  def timed_steps(self) -> dict[str, base.TimedStep]:
    """Stage 1's forward and train step, and stage 2's train step."""
    groups = hide_steps.SUBGROUPS
    return {
        "stage1":
            base.TimedStep(
                "HiDe-Prompt stage 1 forward: the frozen ViT, then the TII "
                "classifier (the task choice of inference)", "forward",
                hide_steps.tii_logits),
        "tii_train":
            base.TimedStep(
                "HiDe-Prompt stage 1 train step: the frozen forward, the TII "
                "classifier's forward and backward, the clipped Adam update",
                "train", hide_steps.tii_step, groups),
        "train":
            base.TimedStep(
                "HiDe-Prompt stage 2 train step: the prompted forward and "
                "backward with the true task's prompt, the grouped CE and "
                "contrastive term, the clipped Adam update", "train",
                hide_steps.prompt_step, groups),
    }

  def preflight_calls(self, run_steps) -> dict:
    return hide_steps.preflight_calls(run_steps)

  def phases(self, task: int, classifier_alignment: bool) -> list[str]:
    """Stage 1's phases, then stage 2's; the alignments from task 1 on."""
    align = classifier_alignment and task > 0
    return (["start", "tii_train", "tii_stats"] + ["tii_align"] * align +
            ["train", "merge", "stats"] + ["align"] * align + ["eval"])

  def phase_handlers(self, run) -> dict:
    return hide_phases.Phases(run).handlers()

  def init_state(self, trainable: dict) -> dict:
    del trainable
    empty = statistics.empty(self.num_classes, self.dims["hidden_size"])
    state = {}
    for prefix in ("tii_", ""):
      state.update({
          f"{prefix}means": jnp.asarray(empty.means),
          f"{prefix}vars": jnp.asarray(empty.variances),
          f"{prefix}present": jnp.asarray(empty.present)
      })
    state["tii_accuracy"] = -jnp.ones(
        (self.num_tasks, self.num_tasks), jnp.float32)
    return state

  def start_task(self, trainable: dict, state: dict, task, key):
    """Slot t starts as a copy of slot t - 1; before task 0 the head is
    drawn again as the reference draws it (trunc-normal(0.02), zero
    bias)."""
    head = trainable["head"]
    drawn = {
        "kernel":
            hide_prompts.torch_trunc_normal(0.02)(key, head["kernel"].shape),
        "bias":
            jnp.zeros_like(head["bias"])
    }
    head = jax.tree_util.tree_map(
        lambda new, old: jnp.where(task == 0, new, old), drawn, head)
    prompt_params = dict(trainable["prompts"])
    prompt_params["e_prompt"] = hide_prompts.copy_previous_slot(
        prompt_params["e_prompt"], task)
    return {**trainable, "prompts": prompt_params, "head": head}, state

  def init_context(self):
    return self.context({}, jnp.int32(0))

  def context(self, state, task, *, evaluating=False, mask=None):
    """The task, the class-to-task map of equal tasks in label order, the
    classes seen by task `task` (the TII classifier's bound) and the
    batch mask (the key/value pairing's windows)."""
    del state, evaluating
    context = {
        "task": task,
        "class_to_task": jnp.arange(self.num_classes) // self.task_size,
        "seen_classes": (task + 1) * self.task_size
    }
    if mask is not None:
      context["mask"] = mask
    return context

  def loss_terms(self, out, trainable, state, task, mask, mode):
    """reg x the contrastive term against the stored clusters of the
    classes of earlier tasks (prompted training only)."""
    del trainable
    if mode != "train":
      return {}
    old = jnp.arange(self.num_classes) < task * self.task_size
    valid = (state["present"] & old[:, None]).reshape(-1)
    centroids = state["means"].reshape(-1, state["means"].shape[-1])
    value = hide_losses.contrastive_loss(out["pre_logits"], mask, centroids,
                                         valid, group_size=self.group_size)
    return {"contrastive": (value, self.config.hide.reg)}

  def report(self, state: dict) -> dict:
    """The task-identity accuracy (%) of each evaluation, per seen task."""
    rows = [[round(float(x), 4)
             for x in row[:t + 1]]
            for t, row in enumerate(state["tii_accuracy"])
            if row[0] >= 0]
    return {"task_identity_accuracy": rows}
