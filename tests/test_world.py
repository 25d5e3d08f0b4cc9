"""The synthetic world: determinism, disjoint splits, the domain rules, the tokenizer."""

from __future__ import annotations

import os

import pytest

from jax_specsel.data import world_language as language
from jax_specsel.data.world import World, WorldConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = WorldConfig(train_per_domain=300, validation_per_domain=50, test_per_domain=50)


@pytest.fixture(scope="module")
def world():
  return World(SMALL)


@pytest.fixture(scope="module")
def tokenizer(world):
  return world.tokenizer()


def test_same_seed_same_examples_other_seed_differs(world):
  again = World(SMALL)
  assert again.split("train") == world.split("train")
  assert again.split("test") == world.split("test")
  other = World(SMALL, seed=1)
  assert other.split("train") != world.split("train")
  assert other.fingerprint() != world.fingerprint()
  assert again.fingerprint() == world.fingerprint()


def test_splits_are_disjoint_and_sized(world):
  prompts = {name: [e["prompt"] for e in world.split(name)] for name in language.SPLITS}
  for name, size in (("train", 300), ("validation", 50), ("test", 50)):
    assert len(prompts[name]) == size * len(world.domains)
    assert len(set(prompts[name])) == len(prompts[name]), f"duplicate prompts inside {name}"
  assert not set(prompts["train"]) & set(prompts["test"])
  assert not set(prompts["train"]) & set(prompts["validation"])
  assert not set(prompts["validation"]) & set(prompts["test"])
  ids = [e["id"] for name in language.SPLITS for e in world.split(name)]
  assert len(set(ids)) == len(ids)


def test_every_domain_present_with_its_prefix(world):
  assert world.domains == ("translate", "summarize", "arithmetic", "mixed")
  for name in language.SPLITS:
    for domain in world.domains:
      examples = world.split(name, domain)
      assert examples, (name, domain)
      for example in examples:
        assert set(example) == {"id", "domain", "prompt", "reference"}
        assert example["domain"] == domain
        assert example["prompt"].startswith(language.PROMPT_PREFIX[domain] + " ")
        assert example["reference"]


def test_translation_rules_hold(world):
  german_to_english = {v: k for k, v in language.LEXICON.items()}
  assert len(german_to_english) == len(language.LEXICON), "lexicon must be one-to-one"
  for example in world.split("train", "translate")[:200]:
    english = example["prompt"].removeprefix(language.PROMPT_PREFIX["translate"] + " ").split()
    german = example["reference"].split()
    articles = set(language.ARTICLES.values())
    # word for word, in order, once the articles are dropped
    assert [german_to_english[w] for w in german if w not in articles] == english
    for i, word in enumerate(german):  # an article opens each noun phrase, of its noun's gender
      if word in articles:
        noun = german[i + 1] if german[i + 1] in language.ARTICLES else german[i + 2]
        assert language.ARTICLES[noun] == word
    assert sum(w in articles for w in german) == sum(w in language.NOUNS for w in english)
    assert 3 <= sum(w in language.CONJUNCTIONS for w in english) + 1 <= 4
    assert len(english) == len(set(english)), "every source word at most once per sentence"


def test_translation_rule_on_a_known_sentence():
  got = language.translate_sentence("big dog sees cat today but man likes old fox")
  assert got == "der gross Hund sieht die Katze heute aber der Mann mag der alt Fuchs"


def test_summaries_are_the_mentioned_topics_with_their_category_in_topic_list_order(world):
  for example in world.split("train", "summarize")[:200]:
    text = example["prompt"].removeprefix("summarize: ").split()
    summary = example["reference"].split()
    topics, categories = summary[::2], summary[1::2]
    assert 8 <= len(topics) <= 11 and len(categories) == len(topics)
    assert set(topics) == {w for w in text if w in language.TOPICS}
    assert topics == sorted(topics, key=language.TOPICS.index)
    assert all(
        topic in language.CATEGORIES[category] for topic, category in zip(topics, categories)
    )


def test_mixed_answers_are_a_translation_then_a_summary(world):
  lexicon = set(language.LEXICON)
  for example in world.split("train", "mixed")[:200]:
    source = example["prompt"].removeprefix(language.PROMPT_PREFIX["mixed"] + " ")
    english, text = source.split(" summarize: ")
    assert example["reference"] == (
        language.translate_sentence(english) + " " + language.summarize_text(text)
    )
    assert 2 <= sum(w in language.CONJUNCTIONS for w in english.split()) + 1 <= 3
    assert 4 <= len(language.summarize_text(text).split()) // 2 <= 6
    assert not set(text.split()) & lexicon, "the summary's text shares no word with a translation"


def test_adding_the_mixed_domain_leaves_the_others_examples_unchanged():
  without = World(SMALL, domains=("translate", "summarize", "arithmetic"))
  assert without.split("test") == World(SMALL).split(
      "test", ("translate", "summarize", "arithmetic")
  )


def test_every_topic_has_one_category():
  assert sorted(language.TOPIC_CATEGORY) == sorted(language.TOPICS)


def test_summary_rule_on_a_known_text():
  text = "officials said the storm near the harbor and the storm again market"
  assert language.summarize_text(text) == "storm nature market economy harbor transport"


def test_arithmetic_is_worked_column_by_column_and_correct(world):
  for example in world.split("test", "arithmetic"):
    left, right = example["prompt"].removeprefix("Q: ").split(" + ")
    value = int(left.replace(" ", "")) + int(right.replace(" ", ""))
    *steps, answer = example["reference"].split(" ; ")
    assert answer == "answer " + " ".join(str(value))
    assert len(steps) == max(len(left.split()), len(right.split()))
    carry = 0
    for step in steps:  # "a + b [+ 1] = s": the terms add up to s, the carry is s // 10
      terms, total = step.split(" = ")
      numbers = [int(t) for t in terms.split(" + ")]
      assert (len(numbers) == 3) == bool(carry) and sum(numbers) == int(total.replace(" ", ""))
      carry = int(total.replace(" ", "")) // 10


def test_worked_addition_on_known_sums():
  assert (
      language.worked_addition(375, 48)
      == "5 + 8 = 1 3 ; 7 + 4 + 1 = 1 2 ; 3 + 0 + 1 = 4 ; answer 4 2 3"
  )
  assert language.worked_addition(99, 1) == "9 + 1 = 1 0 ; 9 + 0 + 1 = 1 0 ; answer 1 0 0"


def test_outputs_have_the_papers_lengths(world, tokenizer):
  """Translate ~20-35 tokens, summaries ~15-30, worked arithmetic ~20-60 (EOS included)."""
  for domain, (low, high) in {
      "translate": (20, 35),
      "summarize": (15, 30),
      "arithmetic": (20, 60),
      "mixed": (20, 40),
  }.items():
    lengths = [len(tokenizer(e["reference"])["input_ids"]) for e in world.split("train", domain)]
    assert low <= sum(lengths) / len(lengths) <= high, (domain, sum(lengths) / len(lengths))


def test_tokenizer_round_trip_every_domain(world, tokenizer):
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
  assert len(tokenizer) == len(world.vocabulary)
  for domain in world.domains:
    for example in world.split("test", domain):
      for text in (example["prompt"], example["reference"]):
        ids = tokenizer(text)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
        assert len(ids) == len(text.split()) + 1  # one id per word
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_pads_batches_and_survives_save_pretrained(world, tokenizer, tmp_path):
  from transformers import AutoTokenizer

  prompts = [e["prompt"] for e in world.split("test")[::40]]
  batch = tokenizer(prompts, padding=True, return_tensors="np")
  assert batch["input_ids"].shape[0] == len(prompts)
  assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
  tokenizer.save_pretrained(tmp_path)
  loaded = AutoTokenizer.from_pretrained(tmp_path)
  for text in prompts:
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


def test_vocabulary_does_not_depend_on_seed():
  assert World(SMALL, seed=3).vocabulary == World(SMALL).vocabulary


def test_bad_configs_are_rejected():
  with pytest.raises(ValueError, match="domains"):
    WorldConfig(domains=("poetry",))
  with pytest.raises(ValueError, match="inputs exist"):
    World(WorldConfig(domains=("arithmetic",), arithmetic_digits=(1, 1)))
  with pytest.raises(ValueError, match="clauses"):
    WorldConfig(clauses=(3, 2))
  with pytest.raises(ValueError, match="mixed_topics"):
    WorldConfig(mixed_topics=(0, 4))
  with pytest.raises(ValueError, match="unknown split"):
    World(SMALL).split("dev")


def test_config_round_trips_through_dict():
  config = WorldConfig(seed=5, domains=("translate", "arithmetic"))
  assert WorldConfig.from_dict(config.to_dict()) == config


def test_arithmetic_train_split_is_capped_by_the_distinct_questions():
  config = WorldConfig(
      domains=("arithmetic",),
      train_per_domain=10000,
      validation_per_domain=10,
      test_per_domain=10,
      arithmetic_digits=(1, 2),
  )
  world = World(config)
  # 100 * 100 distinct questions, half of them at most, minus the 20 held out.
  assert len(world.split("train")) == 4980
  assert len({e["prompt"] for e in world.split("train")}) == 4980
