"""The task registry: where each task's examples come from and how a prompt is built.

A `Task` names its source (a hub dataset, or a local file given to the loader), the fields that
hold the query and the reference, the prompt template (paper Table 10 for the T5 tasks, chat
templates for decoder-only targets) and the quality metric. Field names may be dotted paths
into nested records ("translation.en", "answer.value") and may index lists ("turns.0").

Spec-Bench (Xia et al. 2024) comes as one local question.jsonl (fields question_id, category,
turns, sometimes reference). We register one task per Spec-Bench category group, each filtering
rows by `category`, so that per-domain speedups (the paper's Table 5 columns) are separate runs:
spec-bench-mt_bench, -translation, -summarization, -qa, -math_reasoning, -rag, and spec-bench
(all 480 questions). Its MT-bench questions keep MT-bench's own category names (writing,
roleplay, ...), which the mt_bench task lists. Only the first turn is used.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

METRICS = ("bleu", "rouge_l", "exact_match", "exact_text")  # see eval/metrics.py

# Templates of the paper's Table 10 (Raffel et al. 2020; Chung et al. 2022).
T5_TRANSLATE_EN_DE = "translate English to German: {input}"
T5_SUMMARIZE = "summarize: {input}"
T5_QUESTION = "Q: {input}"
# Vicuna v1.1 (FastChat), the template of Spec-Bench's Vicuna targets.
VICUNA_CHAT = (
    "A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {input} ASSISTANT:"
)
# LLaMA-2-chat without a system prompt (the paper's self-drafting target, Table 6).
LLAMA2_CHAT = "[INST] {input} [/INST]"

_GSM8K_ANSWER = re.compile(r"####\s*(.+)")


def gsm8k_final_answer(solution: str) -> str:
  """The reference answer of a GSM8K solution: the text after '####', commas removed."""
  match = _GSM8K_ANSWER.search(solution)
  answer = match.group(1) if match else solution
  return answer.strip().replace(",", "")


def get_field(record: Mapping[str, Any], field: str) -> Any:
  """Reads a possibly dotted field ("translation.en", "turns.0") from a record.

  A literal key wins over the dotted path (a CSV column may be named "translation.en").
  Raises KeyError naming the part that is missing.
  """
  if field in record:
    return record[field]
  value: Any = record
  for part in field.split("."):
    if isinstance(value, Mapping) and part in value:
      value = value[part]
    elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
      value = value[int(part)]
    else:
      raise KeyError(f"field {field!r}: no {part!r} in {type(value).__name__}")
  return value


@dataclasses.dataclass(frozen=True)
class HubSource:
  """A dataset on the Hugging Face hub, as `datasets.load_dataset(path, name, split=...)`."""

  path: str
  name: str | None = None
  splits: tuple[str, ...] = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: data source, prompt template, fields and quality metric.

  Attributes:
    name: registry key.
    template: prompt template with one "{input}" slot.
    source_field: field (or fields, joined by a blank line) holding the query.
    target_field: field holding the reference output, or None (no reference: speed only).
    metric: "bleu" | "rouge_l" | "exact_match" | "exact_text", or None for reference-free
      tasks (Spec-Bench: speed only).
    hub: hub source, or None for tasks that come only from a local file.
    id_field: field with a stable example id, or None (ids become "<task>/<split>/<index>").
    categories: keep only rows whose "category" is one of these (Spec-Bench), or None.
    reference_parser: maps the raw target field to the reference (GSM8K: the final number).
  """

  name: str
  template: str
  source_field: str | tuple[str, ...]
  target_field: str | None
  metric: str | None
  hub: HubSource | None = None
  id_field: str | None = None
  categories: tuple[str, ...] | None = None
  reference_parser: Callable[[str], str] | None = None

  def __post_init__(self):
    if "{input}" not in self.template:
      raise ValueError(
          f"task {self.name!r}: template must contain '{{input}}', got " f"{self.template!r}"
      )
    if self.metric is not None and self.metric not in METRICS:
      raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not one of {METRICS}")

  @property
  def source_fields(self) -> tuple[str, ...]:
    return (self.source_field,) if isinstance(self.source_field, str) else self.source_field

  def query_text(self, example: Mapping[str, Any]) -> str:
    """The raw query of a record: its source fields, non-empty ones joined by a blank line."""
    parts = [str(get_field(example, field)) for field in self.source_fields]
    return "\n\n".join(part for part in parts if part.strip())

  def reference_text(self, example: Mapping[str, Any]) -> str:
    """The reference output of a record ("" for tasks without a target field)."""
    if self.target_field is None:
      return ""
    reference = str(get_field(example, self.target_field))
    return self.reference_parser(reference) if self.reference_parser else reference

  def format_prompt(self, example_or_text: Mapping[str, Any] | str) -> str:
    """The prompt: the template applied to a raw query string or to a record's query.

    Args:
      example_or_text: a query string, or a record with this task's source field(s).

    Returns:
      The prompt text.
    """
    text = example_or_text if isinstance(example_or_text, str) else self.query_text(example_or_text)
    # str.replace, not str.format: queries and templates may contain other braces.
    return self.template.replace("{input}", text)


TASKS: dict[str, Task] = {}


def register_task(task: Task, overwrite: bool = False) -> Task:
  """Adds a task to the registry (the synthetic world registers its domains this way).

  Args:
    task: the task; its name is the key.
    overwrite: replace an existing task of that name instead of raising ValueError.

  Returns:
    The task.
  """
  if task.name in TASKS and not overwrite and TASKS[task.name] != task:
    raise ValueError(
        f"a different task named {task.name!r} is already registered; pass "
        "overwrite=True to replace it"
    )
  TASKS[task.name] = task
  return task


def get_task(name: str) -> Task:
  """The registered task called `name` (KeyError listing the known names otherwise)."""
  if name not in TASKS:
    raise KeyError(
        f"unknown task {name!r}; known tasks: {sorted(TASKS)} (add one with " "register_task)"
    )
  return TASKS[name]


_MT_BENCH_CATEGORIES = (
    "mt_bench",
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)
SPEC_BENCH_GROUPS: dict[str, tuple[str, ...]] = {
    "mt_bench": _MT_BENCH_CATEGORIES,
    "translation": ("translation",),
    "summarization": ("summarization",),
    "qa": ("qa",),
    "math_reasoning": ("math_reasoning",),
    "rag": ("rag",),
}


def _register_hub_tasks() -> None:
  """The tasks read from hub datasets: the paper's T5 tasks and the decoder-only targets' ones."""
  register_task(
      Task(
          "iwslt2017-en-de",
          T5_TRANSLATE_EN_DE,
          "translation.en",
          "translation.de",
          "bleu",
          HubSource("iwslt2017", "iwslt2017-en-de"),
      )
  )
  register_task(
      Task(
          "xsum",
          T5_SUMMARIZE,
          "document",
          "summary",
          "rouge_l",
          HubSource("EdinburghNLP/xsum"),
          id_field="id",
      )
  )
  register_task(
      Task(
          "gsm8k",
          T5_QUESTION,
          "question",
          "answer",
          "exact_match",
          HubSource("openai/gsm8k", "main", ("train", "test")),
          reference_parser=gsm8k_final_answer,
      )
  )
  register_task(
      Task(
          "alpaca",
          LLAMA2_CHAT,
          ("instruction", "input"),
          "output",
          "rouge_l",
          HubSource("tatsu-lab/alpaca", splits=("train",)),
      )
  )
  # Answers are short free text, not numbers: ROUGE-L, not the GSM8K-style exact match.
  register_task(
      Task(
          "triviaqa",
          LLAMA2_CHAT,
          "question",
          "answer.value",
          "rouge_l",
          HubSource("mandarjoshi/trivia_qa", "rc.nocontext"),
          id_field="question_id",
      )
  )


def _register_spec_bench_tasks() -> None:
  """Spec-Bench from its local question.jsonl: all questions, then one task per category group."""
  register_task(
      Task("spec-bench", VICUNA_CHAT, "turns.0", None, None, None, id_field="question_id")
  )
  for group, categories in SPEC_BENCH_GROUPS.items():
    register_task(
        Task(
            f"spec-bench-{group}",
            VICUNA_CHAT,
            "turns.0",
            None,
            None,
            None,
            id_field="question_id",
            categories=categories,
        )
    )


_register_hub_tasks()
_register_spec_bench_tasks()
