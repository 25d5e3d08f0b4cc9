"""A small seeded world of task domains in one shared word-level vocabulary.

The paper's setting needs a target that is good at several domains and drafters that are each
aligned with it on only one. Real data sets and models are out of reach offline on a CPU, so this
module generates three domains shaped like the paper's (Table 10 prompt templates), with outputs as
long as the paper's data (IWSLT sentences and XSum summaries of ~20-30 tokens, GSM8K worked answers):

  translate   "translate English to German: big dog sees cat but man likes old fox ..." (4-5
              clauses) -> "gross Hund sieht Katze aber Mann mag alt Fuchs ..." (~16-32 tokens)
              A word-for-word language pair through a one-to-one lexicon, every source word at
              most once per sentence (no articles, distinct connectives). Harder versions cost too
              much training here: with the verb moved to the end of its clause and the adjective
              after its noun, a 2000-step target reached 77% token accuracy and no exact sentence;
              with articles and "and" repeated, 1-layer distilled drafters reached 65% token
              accuracy (after an article, nothing says which source article it was).
  summarize   "summarize: officials said the storm near the harbor ..." (8-11 topics)
              -> "storm nature harbor transport ..." (~17-23 tokens): each mentioned topic word
              with its category, in the fixed order of the topic list (a T5 of the zoo's size
              does not learn "order of first appearance" within the CPU budget: it memorized
              instead, 97% exact on train and 23% on test; copying a status word that follows
              each topic left it at 0% exact summaries).
  arithmetic  "Q: 3 7 5 + 4 8" -> "5 + 8 = 1 3 ; 7 + 4 + 1 = 1 2 ; 3 + 0 + 1 = 4 ; answer 4 2 3"
              (~18-36 tokens): column by column with carries, GSM8K-like worked steps. Only the
              big target is meant to learn it (the paper's GSM8K case).
  mixed       "translate English to German: dog sees cat ... summarize: people said the storm ..."
              -> "der Hund sieht die Katze ... storm nature ..." (~20-38 tokens): a shorter
              translation (2-3 clauses) and then the summary of a shorter text (4-6 topics) in
              one answer, so the aligned drafter changes midway (issue 15). No drafter is trained
              on it; per-query selection can pick only one of the two aligned drafters. The
              summary's filler avoids words of the translate lexicon ("the", "old", "and", ...),
              so the two halves stay apart by content (T5's cross-attention has no positions).

Every domain draws from a fixed lexicon, so the vocabulary (and the tokenizer) does not depend on
the seed. Examples are dicts {id, domain, prompt, reference}; splits never share a prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import numpy as np

# Bump when generation changes so caches keyed on `World.fingerprint()` are invalidated.
WORLD_VERSION = 8

TRANSLATE = "translate"
SUMMARIZE = "summarize"
ARITHMETIC = "arithmetic"
MIXED = "mixed"
DOMAINS = (TRANSLATE, SUMMARIZE, ARITHMETIC, MIXED)
SPLITS = ("train", "validation", "test")

# Paper Table 10 templates.
PROMPT_PREFIX = {
    TRANSLATE: "translate English to German:",
    SUMMARIZE: "summarize:",
    ARITHMETIC: "Q:",
    MIXED: "translate English to German:",  # then the text to summarize after "summarize:"
}

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2: T5 conventions (pad doubles as decoder start)

# ----- translate: an English-like source and a German-like target, word for word -----
DETERMINERS = {"the": "die", "a": "eine"}
# The German article of each noun: a noun phrase is translated as article [adjective] noun.
ARTICLES = {
    "Hund": "der", "Katze": "die", "Vogel": "der", "Pferd": "das", "Mann": "der", "Frau": "die",
    "Kind": "das", "Lehrer": "der", "Bauer": "der", "Koenig": "der", "Arzt": "der",
    "Freund": "der", "Fisch": "der", "Maus": "die", "Kuh": "die", "Baer": "der", "Fuchs": "der",
    "Baecker": "der", "Schueler": "der", "Maedchen": "das", "Junge": "der", "Koenigin": "die",
    "Soldat": "der", "Matrose": "der",
}
NOUNS = {
    "dog": "Hund", "cat": "Katze", "bird": "Vogel", "horse": "Pferd", "man": "Mann",
    "woman": "Frau", "child": "Kind", "teacher": "Lehrer", "farmer": "Bauer", "king": "Koenig",
    "doctor": "Arzt", "friend": "Freund", "fish": "Fisch", "mouse": "Maus", "cow": "Kuh",
    "bear": "Baer", "fox": "Fuchs", "baker": "Baecker", "pupil": "Schueler", "girl": "Maedchen",
    "boy": "Junge", "queen": "Koenigin", "soldier": "Soldat", "sailor": "Matrose",
}
VERBS = {
    "sees": "sieht", "likes": "mag", "follows": "folgt", "finds": "findet", "helps": "hilft",
    "calls": "ruft", "hears": "hoert", "knows": "kennt", "asks": "fragt", "feeds": "fuettert",
    "paints": "malt", "visits": "besucht", "meets": "trifft", "teaches": "lehrt",
    "watches": "beobachtet", "loves": "liebt",
}
ADJECTIVES = {
    "big": "gross", "small": "klein", "red": "rot", "old": "alt", "young": "jung",
    "happy": "froh", "sad": "traurig", "fast": "schnell", "slow": "langsam", "tired": "muede",
    "clever": "klug", "brave": "mutig", "quiet": "leise", "loud": "laut", "hungry": "hungrig",
    "friendly": "freundlich",
}
ADVERBS = {"today": "heute", "often": "oft", "again": "wieder", "never": "nie", "soon": "bald",
           "here": "hier", "there": "dort", "now": "jetzt"}
CONJUNCTIONS = {"and": "und", "but": "aber", "while": "waehrend", "so": "also"}
LEXICON = {**DETERMINERS, **NOUNS, **VERBS, **ADJECTIVES, **ADVERBS, **CONJUNCTIONS}

# ----- summarize: topic words scattered in filler text -----
TOPICS = (
    "storm", "market", "election", "river", "harvest", "museum", "festival", "bridge", "railway",
    "hospital", "school", "factory", "concert", "forest", "harbor", "airport", "library",
    "stadium", "village", "mountain", "island", "desert", "castle", "garden", "theater", "bakery",
    "bank", "court", "prison", "parliament", "tunnel", "lake", "volcano", "glacier", "mine",
    "farm", "zoo", "church", "highway", "canal",
)
# Each topic's category, written after it in the summary.
CATEGORIES = {
    "nature": ("storm", "river", "forest", "mountain", "island", "desert", "lake", "volcano",
               "glacier"),
    "economy": ("market", "harvest", "factory", "bakery", "bank", "mine", "farm"),
    "culture": ("museum", "festival", "concert", "library", "castle", "garden", "theater", "zoo",
                "church"),
    "transport": ("bridge", "railway", "harbor", "airport", "tunnel", "highway", "canal"),
    "civic": ("election", "hospital", "school", "stadium", "village", "court", "prison",
              "parliament"),
}
TOPIC_CATEGORY = {topic: category for category, topics in CATEGORIES.items() for topic in topics}
FILLER = (
    "in", "on", "at", "near", "after", "before", "during", "the", "a", "new", "old", "report",
    "reports", "officials", "people", "residents", "said", "say", "that", "was", "were", "is",
    "about", "many", "some", "today", "yesterday", "week", "city", "local", "news", "also", "more",
    "than", "with", "and", "of", "from", "while", "visitors",
)

# ----- arithmetic -----
DIGITS = tuple(str(d) for d in range(10))
OPERATORS = ("+",)
WORKING = ("=", ";", "answer")  # the worked steps' punctuation


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
      raise ValueError(f"WorldConfig.domains={self.domains!r}: choose a non-empty subset of "
                       f"{DOMAINS}.")
    if min(self.train_per_domain, self.validation_per_domain, self.test_per_domain) < 0:
      raise ValueError("WorldConfig: split sizes must be >= 0.")
    # Source words never repeat in a sentence.
    most = min(len(NOUNS) // 2, len(VERBS), len(ADVERBS), len(CONJUNCTIONS) + 1)
    for name in ("clauses", "mixed_clauses"):
      low, high = getattr(self, name)
      if not 1 <= low <= high <= most:
        raise ValueError(f"WorldConfig.{name}={(low, high)!r} must be (low, high) with "
                         f"1 <= low <= high <= {most}.")
    for name in ("summary_topics", "mixed_topics"):
      low, high = getattr(self, name)
      if not 1 <= low <= high <= len(TOPICS):
        raise ValueError(f"WorldConfig.{name}={(low, high)!r} must lie in [1, {len(TOPICS)}].")
    for name in ("summary_filler_words", "mixed_filler_words"):
      low, high = getattr(self, name)
      if not 0 <= low <= high:
        raise ValueError(f"WorldConfig.{name}={(low, high)!r} must be (low, high), "
                         "0 <= low <= high.")
    if not 1 <= self.arithmetic_digits[0] <= self.arithmetic_digits[1] <= 6:
      raise ValueError(f"WorldConfig.arithmetic_digits={self.arithmetic_digits!r} must lie in [1, 6].")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "WorldConfig":
    values = dict(values)
    for key in ("domains", "clauses", "summary_topics", "summary_filler_words",
                "arithmetic_digits", "mixed_clauses", "mixed_topics", "mixed_filler_words"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)


# ----- the rules, exposed so tests and reports can check outputs against them -----
def translate_sentence(english: str) -> str:
  """German-like translation of an English-like sentence of this world: word for word through
  `LEXICON`, in the same order, each noun phrase opened by its noun's article (`ARTICLES`).

  Args:
    english: space-separated words of the translate lexicon (no articles).

  Returns:
    The translation, space-separated.
  """
  words, out = english.split(), []
  for index, word in enumerate(words):
    opens_phrase = (word in ADJECTIVES or
                    (word in NOUNS and (index == 0 or words[index - 1] not in ADJECTIVES)))
    if opens_phrase:
      noun = word if word in NOUNS else words[index + 1]
      out.append(ARTICLES[NOUNS[noun]])
    out.append(LEXICON[word])
  return " ".join(out)


def summarize_text(text: str) -> str:
  """The summary rule: each mentioned topic followed by its category, in the order of `TOPICS`."""
  mentioned = set(text.split())
  return " ".join(f"{topic} {TOPIC_CATEGORY[topic]}" for topic in TOPICS if topic in mentioned)


def spell_number(value: int) -> str:
  """Digits as separate words: 85 -> "8 5"."""
  return " ".join(str(value))


def worked_addition(left: int, right: int) -> str:
  """Column-by-column addition, GSM8K-like: "5 + 8 = 1 3 ; 7 + 4 + 1 = 1 2 ; answer 1 2 3".

  One step per column from the units up: the two digits (a shorter operand gives 0), "+ 1" when
  the previous column carried, and the column's sum spelled digit by digit; then the answer.
  """
  left_digits, right_digits = str(left)[::-1], str(right)[::-1]
  steps, carry = [], 0
  for column in range(max(len(left_digits), len(right_digits))):
    a = int(left_digits[column]) if column < len(left_digits) else 0
    b = int(right_digits[column]) if column < len(right_digits) else 0
    terms = f"{a} + {b}" + (" + 1" if carry else "")
    total = a + b + carry
    steps.append(f"{terms} = {spell_number(total)}")
    carry = total // 10
  return " ; ".join(steps) + f" ; answer {spell_number(left + right)}"


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
  pools = {name: iter([words[i] for i in rng.permutation(len(words))]) for name, words in
           (("nouns", tuple(NOUNS)), ("verbs", tuple(VERBS)), ("adjectives", tuple(ADJECTIVES)),
            ("adverbs", tuple(ADVERBS)), ("conjunctions", tuple(CONJUNCTIONS)))}
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


def _summarize_input(rng: np.random.Generator, config: WorldConfig,
                     filler_words: tuple[str, ...] = FILLER) -> tuple[str, str]:
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
  a, b = (int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10 ** d))
          for d in rng.integers(low, high + 1, size=2))
  return f"{spell_number(a)} + {spell_number(b)}", worked_addition(a, b)


# The mixed domain's filler: no word the translate half could also contain.
MIXED_FILLER = tuple(word for word in FILLER if word not in LEXICON)


def _mixed_input(rng: np.random.Generator, config: WorldConfig) -> tuple[str, str]:
  english, translation = _translate_input(rng, dataclasses.replace(config,
                                                                   clauses=config.mixed_clauses))
  text, summary = _summarize_input(
      rng, dataclasses.replace(config, summary_topics=config.mixed_topics,
                               summary_filler_words=config.mixed_filler_words), MIXED_FILLER)
  return f"{english} {PROMPT_PREFIX[SUMMARIZE]} {text}", f"{translation} {summary}"


_GENERATORS = {TRANSLATE: _translate_input, SUMMARIZE: _summarize_input,
               ARITHMETIC: _arithmetic_input, MIXED: _mixed_input}


def _choice(rng: np.random.Generator, options) -> str:
  return options[int(rng.integers(len(options)))]


def _distinct_inputs_available(domain: str, config: WorldConfig) -> float:
  """An upper bound on distinct inputs (arithmetic is the only domain small enough to run out)."""
  if domain == ARITHMETIC:
    low, high = config.arithmetic_digits
    operands = 10 ** high - (10 ** (low - 1) if low > 1 else 0)
    return float(operands ** 2)
  return float("inf")


def vocabulary() -> tuple[str, ...]:
  """Every word any domain can produce, specials first (ids 0, 1, 2), in a fixed order."""
  words = list(SPECIAL_TOKENS)
  for prefix in PROMPT_PREFIX.values():
    words.extend(prefix.split())
  words.extend(LEXICON)
  words.extend(LEXICON.values())
  words.extend(ARTICLES.values())
  words.extend(TOPICS)
  words.extend(CATEGORIES)
  words.extend(FILLER)
  words.extend(DIGITS)
  words.extend(OPERATORS)
  words.extend(WORKING)
  return tuple(dict.fromkeys(words))  # drop duplicates ("the", "old", "and", ...), keep order


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
    payload = json.dumps({"version": WORLD_VERSION, "config": self.config.to_dict(),
                          "vocabulary": vocabulary()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

  def _generate(self, domain: str) -> dict[str, list[dict]]:
    """Distinct prompts for one domain, cut into splits (so no prompt is in two splits)."""
    config = self.config
    held_out = config.validation_per_domain + config.test_per_domain
    # Half of the distinct inputs at most, so rejection sampling of duplicates stays fast.
    room = 0.5 * _distinct_inputs_available(domain, config) - held_out
    if room < min(config.train_per_domain, 1):
      raise ValueError(f"{domain}: {held_out} held-out examples requested but only "
                       f"{_distinct_inputs_available(domain, config):.0f} inputs exist; lower the "
                       "split sizes or allow more arithmetic_digits.")
    sizes = {"train": int(min(config.train_per_domain, room)),
             "validation": config.validation_per_domain, "test": config.test_per_domain}
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
      out[name] = [{"id": f"{domain}-{name}-{i:05d}", "domain": domain,
                    "prompt": f"{PROMPT_PREFIX[domain]} {source}", "reference": reference}
                   for i, (source, reference) in enumerate(pairs[begin:begin + sizes[name]])]
      begin += sizes[name]
    return out


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  vocab = {word: index for index, word in enumerate(vocabulary())}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  # Split on whitespace only: "German:" and "Q:" stay one word, so decode(encode(x)) == x.
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # T5 appends EOS to every encoded sequence (inputs and labels alike).
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
  return tokenizer.to_str()


def build_tokenizer():
  """The world's tokenizer: word level, whitespace split, pad 0 / eos 1 / unk 2, EOS appended.

  Returns:
    A fresh `transformers.PreTrainedTokenizerFast` (save it with `save_pretrained(dir)`).
  """
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token=PAD, eos_token=EOS,
      unk_token=UNK, padding_side="right", clean_up_tokenization_spaces=False,
      model_max_length=512)
