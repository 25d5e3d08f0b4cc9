"""The task registry and the example loaders (local files; the offline error for hub data)."""

from __future__ import annotations

import json

import datasets
import pytest

from jax_specsel.data import loaders, tasks
from jax_specsel.data.loaders import DatasetUnavailableError, load_examples
from jax_specsel.data.tasks import Task, get_task, register_task

VICUNA_PREFIX = (
    "A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: "
)


def write_jsonl(path, rows):
  path.write_text(
      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
  )
  return str(path)


def test_paper_table_10_templates():
  assert get_task("iwslt2017-en-de").format_prompt("Hello.") == (
      "translate English to German: Hello."
  )
  assert get_task("xsum").format_prompt("A long article.") == "summarize: A long article."
  assert get_task("gsm8k").format_prompt("What is 2+2?") == "Q: What is 2+2?"
  assert get_task("spec-bench-qa").format_prompt("Why {braces}?") == (
      VICUNA_PREFIX + "Why {braces}? ASSISTANT:"
  )


def test_registry_lists_known_names_and_registers_new_tasks():
  for name in (
      "iwslt2017-en-de",
      "xsum",
      "gsm8k",
      "alpaca",
      "triviaqa",
      "spec-bench",
      "spec-bench-mt_bench",
      "spec-bench-rag",
  ):
    assert name in tasks.TASKS
  with pytest.raises(KeyError, match=r"unknown task 'wmt'.*'xsum'"):
    get_task("wmt")
  task = register_task(
      Task("world-translate", "translate English to German: {input}", "src", "tgt", "bleu")
  )
  assert get_task("world-translate") is task
  register_task(task)  # registering the same task again is fine
  with pytest.raises(ValueError, match="already registered"):
    register_task(Task("world-translate", "{input}", "src", "tgt", "rouge_l"))
  register_task(Task("world-translate", "{input}", "src", "tgt", "rouge_l"), overwrite=True)
  assert get_task("world-translate").metric == "rouge_l"


def test_task_validation():
  with pytest.raises(ValueError, match="must contain '{input}'"):
    Task("bad", "no slot", "src", "tgt", "bleu")
  with pytest.raises(ValueError, match="metric 'meteor'"):
    Task("bad", "{input}", "src", "tgt", "meteor")


def test_gsm8k_reference_is_the_final_number():
  assert tasks.gsm8k_final_answer("She sells 16 - 3 = 13 eggs.\n#### 1,018") == "1018"
  task = get_task("gsm8k")
  assert task.reference_text({"question": "q", "answer": "5 + 7 = 12\n#### 12"}) == "12"


def test_load_jsonl_with_dotted_fields(tmp_path):
  rows = [
      {"translation": {"en": f"Sentence {i}.", "de": f"Satz {i} wurde gelöscht."}} for i in range(5)
  ]
  examples = load_examples(
      "iwslt2017-en-de", split="validation", data_file=write_jsonl(tmp_path / "ende.jsonl", rows)
  )
  assert examples.column_names == list(loaders.COLUMNS)
  assert examples[2] == {
      "id": "iwslt2017-en-de/validation/2",
      "task": "iwslt2017-en-de",
      "prompt": "translate English to German: Sentence 2.",
      "reference": "Satz 2 wurde gelöscht.",
  }


def test_load_csv_and_parquet(tmp_path):
  table = {
      "id": ["a", "b", "c"],
      "document": ["Doc one.", "Doc two.", "Doc three."],
      "summary": ["One.", "Two.", "Three."],
  }
  datasets.Dataset.from_dict(table).to_csv(str(tmp_path / "xsum.csv"), index=False)
  datasets.Dataset.from_dict(table).to_parquet(str(tmp_path / "xsum.parquet"))
  for name in ("xsum.csv", "xsum.parquet"):
    examples = load_examples("xsum", data_file=str(tmp_path / name))
    assert examples["id"] == ["a", "b", "c"]
    assert examples["prompt"] == [
        "summarize: Doc one.",
        "summarize: Doc two.",
        "summarize: Doc three.",
    ]
    assert examples["reference"] == ["One.", "Two.", "Three."]


def test_literal_dotted_csv_column(tmp_path):
  (tmp_path / "ende.csv").write_text("translation.en,translation.de\nHi,Hallo\n")
  examples = load_examples("iwslt2017-en-de", data_file=str(tmp_path / "ende.csv"))
  assert examples[0]["reference"] == "Hallo"


def test_limit_is_a_seeded_subset_with_stable_ids(tmp_path):
  rows = [
      {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
      for i in range(40)
  ]
  data_file = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
  first = load_examples("gsm8k", data_file=data_file, limit=7, seed=3)
  again = load_examples("gsm8k", data_file=data_file, limit=7, seed=3)
  other = load_examples("gsm8k", data_file=data_file, limit=7, seed=4)
  assert len(first) == 7 and first["id"] == again["id"] and first["id"] != other["id"]
  for example in first:  # the id names the row, so prompt and reference match it
    row = int(example["id"].rsplit("/", 1)[1])
    assert example["prompt"] == f"Q: What is {row} + 1?"
    assert example["reference"] == str(row + 1)
  assert len(load_examples("gsm8k", data_file=data_file, limit=100)) == 40


def test_spec_bench_category_tasks(tmp_path):
  rows = [
      {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
      {"question_id": 161, "category": "translation", "turns": ["Translate: Hallo"]},
      {"question_id": 162, "category": "translation", "turns": ["Translate: Tschüss"]},
      {"question_id": 401, "category": "rag", "turns": ["Use the text: ..."]},
  ]
  data_file = write_jsonl(tmp_path / "question.jsonl", rows)
  translation = load_examples("spec-bench-translation", data_file=data_file)
  assert translation["id"] == ["161", "162"]
  assert translation[1]["prompt"] == VICUNA_PREFIX + "Translate: Tschüss ASSISTANT:"
  assert translation[1]["reference"] == ""
  mt_bench = load_examples("spec-bench-mt_bench", data_file=data_file)
  assert mt_bench["prompt"] == [VICUNA_PREFIX + "Write a poem. ASSISTANT:"]  # first turn only
  assert len(load_examples("spec-bench", data_file=data_file)) == 4
  with pytest.raises(DatasetUnavailableError, match="no hub source.*data_file="):
    load_examples("spec-bench-qa")


def test_alpaca_joins_instruction_and_input(tmp_path):
  rows = [
      {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
      {"instruction": "Name a colour.", "input": "", "output": "Blue"},
  ]
  examples = load_examples("alpaca", data_file=write_jsonl(tmp_path / "alpaca.json", rows))
  assert examples["prompt"] == [
      "[INST] Translate to French.\n\nGood morning [/INST]",
      "[INST] Name a colour. [/INST]",
  ]


def test_missing_field_lists_the_file_columns(tmp_path):
  rows = [{"translation": {"en": "Hi", "fr": "Salut"}, "meta": 1}]
  data_file = write_jsonl(tmp_path / "enfr.jsonl", rows)
  with pytest.raises(
      KeyError,
      match=r"lacks field 'translation.de'.*" r"\['translation.en', 'translation.fr', 'meta'\]",
  ):
    load_examples("iwslt2017-en-de", data_file=data_file)


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_examples("xsum", data_file=str(tmp_path / "absent.jsonl"))
  (tmp_path / "data.txt").write_text("x")
  with pytest.raises(ValueError, match="unsupported extension '.txt'"):
    load_examples("xsum", data_file=str(tmp_path / "data.txt"))


def test_offline_uncached_hub_dataset_says_how_to_use_a_local_file(tmp_path, monkeypatch):
  empty_cache = tmp_path / "hf"
  monkeypatch.setenv("HF_HOME", str(empty_cache))
  monkeypatch.setenv("HF_DATASETS_CACHE", str(empty_cache / "datasets"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # datasets reads these at import time: point its live config at the empty cache too.
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", empty_cache / "datasets")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  with pytest.raises(DatasetUnavailableError) as error:
    load_examples("xsum", split="validation")
  message = str(error.value)
  assert "not in the local cache" in message and "EdinburghNLP/xsum" in message
  assert "data_file=" in message and "--config.data_dir=" in message
  with pytest.raises(ValueError, match="splits"):
    load_examples("alpaca", split="test")
