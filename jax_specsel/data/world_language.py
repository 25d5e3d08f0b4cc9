"""The embedded world's language: its domains, lexicon and rules, and the one vocabulary they share.

Every domain draws from a fixed lexicon, so the vocabulary (and the tokenizer) does not depend on
the seed. The rules map a prompt's text to its reference (a word-for-word translation, a summary
of the mentioned topics, a worked addition); data/world.py draws the prompts from them, and tests
and reports check outputs against them.
"""

from __future__ import annotations

import functools

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
    "Hund": "der",
    "Katze": "die",
    "Vogel": "der",
    "Pferd": "das",
    "Mann": "der",
    "Frau": "die",
    "Kind": "das",
    "Lehrer": "der",
    "Bauer": "der",
    "Koenig": "der",
    "Arzt": "der",
    "Freund": "der",
    "Fisch": "der",
    "Maus": "die",
    "Kuh": "die",
    "Baer": "der",
    "Fuchs": "der",
    "Baecker": "der",
    "Schueler": "der",
    "Maedchen": "das",
    "Junge": "der",
    "Koenigin": "die",
    "Soldat": "der",
    "Matrose": "der",
}
NOUNS = {
    "dog": "Hund",
    "cat": "Katze",
    "bird": "Vogel",
    "horse": "Pferd",
    "man": "Mann",
    "woman": "Frau",
    "child": "Kind",
    "teacher": "Lehrer",
    "farmer": "Bauer",
    "king": "Koenig",
    "doctor": "Arzt",
    "friend": "Freund",
    "fish": "Fisch",
    "mouse": "Maus",
    "cow": "Kuh",
    "bear": "Baer",
    "fox": "Fuchs",
    "baker": "Baecker",
    "pupil": "Schueler",
    "girl": "Maedchen",
    "boy": "Junge",
    "queen": "Koenigin",
    "soldier": "Soldat",
    "sailor": "Matrose",
}
VERBS = {
    "sees": "sieht",
    "likes": "mag",
    "follows": "folgt",
    "finds": "findet",
    "helps": "hilft",
    "calls": "ruft",
    "hears": "hoert",
    "knows": "kennt",
    "asks": "fragt",
    "feeds": "fuettert",
    "paints": "malt",
    "visits": "besucht",
    "meets": "trifft",
    "teaches": "lehrt",
    "watches": "beobachtet",
    "loves": "liebt",
}
ADJECTIVES = {
    "big": "gross",
    "small": "klein",
    "red": "rot",
    "old": "alt",
    "young": "jung",
    "happy": "froh",
    "sad": "traurig",
    "fast": "schnell",
    "slow": "langsam",
    "tired": "muede",
    "clever": "klug",
    "brave": "mutig",
    "quiet": "leise",
    "loud": "laut",
    "hungry": "hungrig",
    "friendly": "freundlich",
}
ADVERBS = {
    "today": "heute",
    "often": "oft",
    "again": "wieder",
    "never": "nie",
    "soon": "bald",
    "here": "hier",
    "there": "dort",
    "now": "jetzt",
}
CONJUNCTIONS = {"and": "und", "but": "aber", "while": "waehrend", "so": "also"}
LEXICON = {**DETERMINERS, **NOUNS, **VERBS, **ADJECTIVES, **ADVERBS, **CONJUNCTIONS}

# ----- summarize: topic words scattered in filler text -----
TOPICS = (
    "storm",
    "market",
    "election",
    "river",
    "harvest",
    "museum",
    "festival",
    "bridge",
    "railway",
    "hospital",
    "school",
    "factory",
    "concert",
    "forest",
    "harbor",
    "airport",
    "library",
    "stadium",
    "village",
    "mountain",
    "island",
    "desert",
    "castle",
    "garden",
    "theater",
    "bakery",
    "bank",
    "court",
    "prison",
    "parliament",
    "tunnel",
    "lake",
    "volcano",
    "glacier",
    "mine",
    "farm",
    "zoo",
    "church",
    "highway",
    "canal",
)
# Each topic's category, written after it in the summary.
CATEGORIES = {
    "nature": (
        "storm",
        "river",
        "forest",
        "mountain",
        "island",
        "desert",
        "lake",
        "volcano",
        "glacier",
    ),
    "economy": ("market", "harvest", "factory", "bakery", "bank", "mine", "farm"),
    "culture": (
        "museum",
        "festival",
        "concert",
        "library",
        "castle",
        "garden",
        "theater",
        "zoo",
        "church",
    ),
    "transport": ("bridge", "railway", "harbor", "airport", "tunnel", "highway", "canal"),
    "civic": (
        "election",
        "hospital",
        "school",
        "stadium",
        "village",
        "court",
        "prison",
        "parliament",
    ),
}
TOPIC_CATEGORY = {topic: category for category, topics in CATEGORIES.items() for topic in topics}
FILLER = (
    "in",
    "on",
    "at",
    "near",
    "after",
    "before",
    "during",
    "the",
    "a",
    "new",
    "old",
    "report",
    "reports",
    "officials",
    "people",
    "residents",
    "said",
    "say",
    "that",
    "was",
    "were",
    "is",
    "about",
    "many",
    "some",
    "today",
    "yesterday",
    "week",
    "city",
    "local",
    "news",
    "also",
    "more",
    "than",
    "with",
    "and",
    "of",
    "from",
    "while",
    "visitors",
)
# The mixed domain's filler: no word the translate half could also contain.
MIXED_FILLER = tuple(word for word in FILLER if word not in LEXICON)

# ----- arithmetic -----
DIGITS = tuple(str(d) for d in range(10))
OPERATORS = ("+",)
WORKING = ("=", ";", "answer")  # the worked steps' punctuation


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
    opens_phrase = word in ADJECTIVES or (
        word in NOUNS and (index == 0 or words[index - 1] not in ADJECTIVES)
    )
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


# ----- the vocabulary and the tokenizer, the same for every seed -----
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


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  vocab = {word: index for index, word in enumerate(vocabulary())}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  # Split on whitespace only: "German:" and "Q:" stay one word, so decode(encode(x)) == x.
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # T5 appends EOS to every encoded sequence (inputs and labels alike).
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
  )
  return tokenizer.to_str()


def build_tokenizer():
  """The world's tokenizer: word level, whitespace split, pad 0 / eos 1 / unk 2, EOS appended.

  Returns:
    A fresh `transformers.PreTrainedTokenizerFast` (save it with `save_pretrained(dir)`).
  """
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
      pad_token=PAD,
      eos_token=EOS,
      unk_token=UNK,
      padding_side="right",
      clean_up_tokenization_spaces=False,
      model_max_length=512,
  )
