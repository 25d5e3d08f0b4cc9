"""A small seeded world of task domains in one shared word-level vocabulary.

The paper's setting needs a target that is good at several domains and drafters that are each
aligned with it on only one. Real data sets and models are out of reach offline on a CPU, so this
module generates three domains shaped like the paper's (Table 10 prompt templates), with outputs as
long as the paper's data (IWSLT sentences and XSum summaries of ~20-30 tokens, GSM8K worked
answers), and a fourth that mixes two of them:

  translate   "translate English to German: big dog sees cat but man likes old fox ..." (4-5
              clauses) -> "gross Hund sieht Katze aber Mann mag alt Fuchs ..." (~16-32 tokens)
              A word-for-word language pair through a one-to-one lexicon, every source word at
              most once per sentence (no articles, distinct connectives), which a target of the
              zoo's size learns within the CPU budget.
  summarize   "summarize: officials said the storm near the harbor ..." (8-11 topics)
              -> "storm nature harbor transport ..." (~17-23 tokens): each mentioned topic word
              with its category, in the fixed order of the topic list (a rule a T5 of the zoo's
              size learns within the CPU budget, unlike "order of first appearance").
  arithmetic  "Q: 3 7 5 + 4 8" -> "5 + 8 = 1 3 ; 7 + 4 + 1 = 1 2 ; 3 + 0 + 1 = 4 ; answer 4 2 3"
              (~18-36 tokens): column by column with carries, GSM8K-like worked steps. Only the
              big target is meant to learn it (the paper's GSM8K case).
  mixed       "translate English to German: dog sees cat ... summarize: people said the storm ..."
              -> "der Hund sieht die Katze ... storm nature ..." (~20-38 tokens): a shorter
              translation (2-3 clauses) and then the summary of a shorter text (4-6 topics) in
              one answer, so the aligned drafter changes midway. No drafter is trained on it;
              per-query selection can pick only one of the two aligned drafters. The summary's
              filler avoids words of the translate lexicon ("the", "old", "and", ...), so the two
              halves stay apart by content (T5's cross-attention has no positions).

The lexicon, the rules and the tokenizer are data/world_language.py's. Examples are dicts
{id, domain, prompt, reference}; splits never share a prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from jax_specsel.data.world_language import (
    ADJECTIVES,
    ADVERBS,
    ARITHMETIC,
    CONJUNCTIONS,
    DOMAINS,
    FILLER,
    MIXED,
    MIXED_FILLER,
    NOUNS,
    PROMPT_PREFIX,
    SPLITS,
    SUMMARIZE,
    TOPICS,
    TRANSLATE,
    VERBS,
    build_tokenizer,
    spell_number,
    summarize_text,
    translate_sentence,
    vocabulary,
    worked_addition,
)

# Bump when generation changes so caches keyed on `World.fingerprint()` are invalidated.
WORLD_VERSION = 8


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Everything that determines the generated examples (and so the zoo trained on them)."""

  seed: int = 0
  domains: tuple[str, ...] = DOMAINS  # which domains to generate, in report order
  # A domain with few distinct questions (arithmetic with 1-digit operands) has its train split
  # capped at half of them minus validation and test.
  train_per_domain: int = 5000
  validation_per_domain: int = 200
  test_per_domain: int = 200
  clauses: tuple[int, int] = (3, 4)  # translate: clauses, joined by distinct connectives
  adjective_prob: float = 0.5  # translate: chance a noun phrase carries an adjective
  adverb_prob: float = 0.3  # translate: chance a clause ends with an adverb
  # summarize: distinct topics, filler words around them, and extra mentions of already-seen
  # topics. Inclusive ranges.
  summary_topics: tuple[int, int] = (8, 11)
  summary_filler_words: tuple[int, int] = (6, 12)
  summary_max_repeats: int = 1
  arithmetic_digits: tuple[int, int] = (2, 4)  # arithmetic: digits per operand (inclusive)
  # mixed: the translation's clauses, then the summary's topics and filler words (inclusive).
  mixed_clauses: tuple[int, int] = (2, 3)
  mixed_topics: tuple[int, int] = (4, 6)
  mixed_filler_words: tuple[int, int] = (3, 6)

  def __post_init__(self):
    unknown = set(self.domains) - set(DOMAINS)
    if unknown or not self.domains:
      raise ValueError(
          f"WorldConfig.domains={self.domains!r}: choose a non-empty subset of " f"{DOMAINS}."
      )
    if min(self.train_per_domain, self.validation_per_domain, self.test_per_domain) < 0:
      raise ValueError("WorldConfig: split sizes must be >= 0.")
    # Source words never repeat in a sentence.
    most = min(len(NOUNS) // 2, len(VERBS), len(ADVERBS), len(CONJUNCTIONS) + 1)
    for name in ("clauses", "mixed_clauses"):
      low, high = getattr(self, name)
      if not 1 <= low <= high <= most:
        raise ValueError(
            f"WorldConfig.{name}={(low, high)!r} must be (low, high) with "
            f"1 <= low <= high <= {most}."
        )
    for name in ("summary_topics", "mixed_topics"):
      low, high = getattr(self, name)
      if not 1 <= low <= high <= len(TOPICS):
        raise ValueError(f"WorldConfig.{name}={(low, high)!r} must lie in [1, {len(TOPICS)}].")
    for name in ("summary_filler_words", "mixed_filler_words"):
      low, high = getattr(self, name)
      if not 0 <= low <= high:
        raise ValueError(
            f"WorldConfig.{name}={(low, high)!r} must be (low, high), " "0 <= low <= high."
        )
    if not 1 <= self.arithmetic_digits[0] <= self.arithmetic_digits[1] <= 6:
      raise ValueError(
          f"WorldConfig.arithmetic_digits={self.arithmetic_digits!r} must lie in " "[1, 6]."
      )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "WorldConfig":
    values = dict(values)
    for key in (
        "domains",
        "clauses",
        "summary_topics",
        "summary_filler_words",
        "arithmetic_digits",
        "mixed_clauses",
        "mixed_topics",
        "mixed_filler_words",
    ):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)


# ----- generators: one example's (input, reference) from a numpy Generator -----
def _noun_phrase(rng: np.random.Generator, config: WorldConfig, pools: dict) -> list[str]:
  words = []
  if rng.random() < config.adjective_prob:
    words.append(next(pools["adjectives"]))
  words.append(next(pools["nouns"]))
  return words


def _translate_input(rng: np.random.Generator, config: WorldConfig) -> tuple[str, str]:
  # Every source word is drawn without replacement within a sentence (no articles, a different
  # connective between each pair of clauses): the word just translated then tells, by content
  # alone, where in the source the translation stands (T5's cross-attention has no positions).
  pools = {
      name: iter([words[i] for i in rng.permutation(len(words))])
      for name, words in (
          ("nouns", tuple(NOUNS)),
          ("verbs", tuple(VERBS)),
          ("adjectives", tuple(ADJECTIVES)),
          ("adverbs", tuple(ADVERBS)),
          ("conjunctions", tuple(CONJUNCTIONS)),
      )
  }
  words = []
  for index in range(int(rng.integers(config.clauses[0], config.clauses[1] + 1))):
    if index:
      words.append(next(pools["conjunctions"]))
    words += _noun_phrase(rng, config, pools) + [next(pools["verbs"])]
    words += _noun_phrase(rng, config, pools)
    if rng.random() < config.adverb_prob:
      words.append(next(pools["adverbs"]))
  english = " ".join(words)
  return english, translate_sentence(english)


def _summarize_input(
    rng: np.random.Generator, config: WorldConfig, filler_words: tuple[str, ...] = FILLER
) -> tuple[str, str]:
  num_topics = int(rng.integers(config.summary_topics[0], config.summary_topics[1] + 1))
  topics = [TOPICS[i] for i in rng.choice(len(TOPICS), size=num_topics, replace=False)]
  mentions = list(topics)
  for _ in range(int(rng.integers(0, config.summary_max_repeats + 1))):
    repeated = topics[int(rng.integers(num_topics))]
    mentions.insert(int(rng.integers(mentions.index(repeated) + 1, len(mentions) + 1)), repeated)
  filler = int(rng.integers(config.summary_filler_words[0], config.summary_filler_words[1] + 1))
  # Filler words go into the gaps before, between and after the mentions.
  gaps = np.bincount(rng.integers(0, len(mentions) + 1, size=filler), minlength=len(mentions) + 1)
  words = []
  for index, topic in enumerate(mentions):
    words.extend(_choice(rng, filler_words) for _ in range(int(gaps[index])))
    words.append(topic)
  words.extend(_choice(rng, filler_words) for _ in range(int(gaps[-1])))
  text = " ".join(words)
  return text, summarize_text(text)


def _arithmetic_input(rng: np.random.Generator, config: WorldConfig) -> tuple[str, str]:
  low, high = config.arithmetic_digits
  a, b = (
      int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d))
      for d in rng.integers(low, high + 1, size=2)
  )
  return f"{spell_number(a)} + {spell_number(b)}", worked_addition(a, b)


def _mixed_input(rng: np.random.Generator, config: WorldConfig) -> tuple[str, str]:
  english, translation = _translate_input(
      rng, dataclasses.replace(config, clauses=config.mixed_clauses)
  )
  text, summary = _summarize_input(
      rng,
      dataclasses.replace(
          config, summary_topics=config.mixed_topics, summary_filler_words=config.mixed_filler_words
      ),
      MIXED_FILLER,
  )
  return f"{english} {PROMPT_PREFIX[SUMMARIZE]} {text}", f"{translation} {summary}"


_GENERATORS = {
    TRANSLATE: _translate_input,
    SUMMARIZE: _summarize_input,
    ARITHMETIC: _arithmetic_input,
    MIXED: _mixed_input,
}


def _choice(rng: np.random.Generator, options) -> str:
  return options[int(rng.integers(len(options)))]


def _distinct_inputs_available(domain: str, config: WorldConfig) -> float:
  """An upper bound on distinct inputs (arithmetic is the only domain small enough to run out)."""
  if domain == ARITHMETIC:
    low, high = config.arithmetic_digits
    operands = 10**high - (10 ** (low - 1) if low > 1 else 0)
    return float(operands**2)
  return float("inf")


class World:
  """The generated examples of every domain and split, plus the shared tokenizer.

  Example:
    world = World(seed=0)
    world.split("train", TRANSLATE)[0]
    # {'id': 'translate-train-00000', 'domain': 'translate',
    #  'prompt': 'translate English to German: ...', 'reference': '...'}
  """

  def __init__(self, config: WorldConfig | None = None, **overrides):
    """Args: config: a `WorldConfig` (default: the defaults); overrides: its fields, e.g. seed=1."""
    base = config or WorldConfig()
    self.config = dataclasses.replace(base, **overrides) if overrides else base
    self._examples = {domain: self._generate(domain) for domain in self.config.domains}

  @property
  def domains(self) -> tuple[str, ...]:
    return self.config.domains

  def split(self, name: str, domains: str | tuple[str, ...] | None = None) -> list[dict]:
    """Examples of one split.

    Args:
      name: "train", "validation" or "test".
      domains: one domain name, a tuple of them, or None for every domain (in config order).

    Returns:
      A new list of example dicts {id, domain, prompt, reference}, grouped by domain.
    """
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}.")
    if domains is None:
      chosen = self.domains
    else:
      chosen = (domains,) if isinstance(domains, str) else tuple(domains)
    missing = [d for d in chosen if d not in self._examples]
    if missing:
      raise ValueError(f"domains {missing} are not in this world (it has {self.domains}).")
    return [dict(example) for domain in chosen for example in self._examples[domain][name]]

  @property
  def train(self) -> list[dict]:
    return self.split("train")

  @property
  def validation(self) -> list[dict]:
    return self.split("validation")

  @property
  def test(self) -> list[dict]:
    return self.split("test")

  @property
  def vocabulary(self) -> tuple[str, ...]:
    return vocabulary()

  def tokenizer(self):
    """The shared word-level tokenizer (a `PreTrainedTokenizerFast`, T5 conventions)."""
    return build_tokenizer()

  def fingerprint(self) -> str:
    """A short stable hash of everything that determines the examples (for cache keys)."""
    payload = json.dumps(
        {"version": WORLD_VERSION, "config": self.config.to_dict(), "vocabulary": vocabulary()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

  def _generate(self, domain: str) -> dict[str, list[dict]]:
    """Distinct prompts for one domain, cut into splits (so no prompt is in two splits)."""
    config = self.config
    held_out = config.validation_per_domain + config.test_per_domain
    # Half of the distinct inputs at most, so rejection sampling of duplicates stays fast.
    room = 0.5 * _distinct_inputs_available(domain, config) - held_out
    if room < min(config.train_per_domain, 1):
      raise ValueError(
          f"{domain}: {held_out} held-out examples requested but only "
          f"{_distinct_inputs_available(domain, config):.0f} inputs exist; lower the "
          "split sizes or allow more arithmetic_digits."
      )
    sizes = {
        "train": int(min(config.train_per_domain, room)),
        "validation": config.validation_per_domain,
        "test": config.test_per_domain,
    }
    total = sum(sizes.values())
    # A per-domain stream: adding or removing a domain leaves the others' examples unchanged.
    rng = np.random.default_rng([config.seed, DOMAINS.index(domain)])
    seen, pairs = set(), []
    while len(pairs) < total:
      source, reference = _GENERATORS[domain](rng, config)
      if source not in seen:
        seen.add(source)
        pairs.append((source, reference))
    out, begin = {}, 0
    for name in SPLITS:
      out[name] = [
          {
              "id": f"{domain}-{name}-{i:05d}",
              "domain": domain,
              "prompt": f"{PROMPT_PREFIX[domain]} {source}",
              "reference": reference,
          }
          for i, (source, reference) in enumerate(pairs[begin : begin + sizes[name]])
      ]
      begin += sizes[name]
    return out
