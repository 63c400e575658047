"""A small labelled multilingual toy task that xkd writes itself (English, Spanish, Hindi).

It lets the test suite, and users trying xkd offline, run zero-shot cross-lingual
evaluation end to end the way the papers do: fine-tune on English task data, test on the
other languages. It lives beside the tests, not in the package: no xkd command needs it.
`write_toy_task(out)` (or, in a clone, `python tests/toytask.py OUT`) writes, for each
language L in en, es, hi and each split S in train, test:

  classify.L.S.tsv   text<TAB>label          topic of one sentence: food, music, sports, weather
  pairs.L.S.tsv      text_a<TAB>text_b<TAB>label   same / different: are both about one topic?
  ner.L.S.conll      token<TAB>tag           BIO over PER and LOC (B-PER I-PER, B-LOC I-LOC, O)
  pos.L.S.conll      token<TAB>tag           a small UD-like tag set (DET, NOUN, VERB, ADP, ...)

and parallel.L.txt, one plain sentence a line, aligned line by line across languages
(parallel text for distillation, e.g. parallel:parallel.en.txt@en,parallel.hi.txt@hi).

Design
------
Every sentence starts as one abstract example: a template (TEMPLATES) and its slot
fillers (a person, a city, a time expression, one or two topic nouns of ONE topic, an
adjective). The same example is then rendered in each language with that language's own
template (its word order, articles, postpositions, gender agreement), so line i of a
classify/pairs file is the translation of line i in every other language, with the same
label, and sentence i of ner/pos is the same sentence in every language (tags follow each
language's tokens; Spanish "de el" contracts to "del"; Hindi puts nouns before
postpositions in the oblique case).

- The topic of a sentence is decided by its topic words only (TOPIC_NOUNS, and the topic
  adjectives): the rest (names, cities, time, template) is drawn independently of the
  topic. So a bag of words learns it from the English train split alone, while it
  transfers to Spanish and Hindi only through what is really shared: names, cities and a
  few loanwords (piano, jazz, hockey, chef...) in Spanish, nothing but subword pieces in
  Hindi (Devanagari). That gap is what distillation has to close.
- pairs needs both segments: each text alone is a balanced topic, the label is whether
  the two topics agree (50/50).
- Classes are balanced exactly (labels dealt round-robin, then shuffled).
- The words are real (hand-written lexicon below), so real tokenizers, e.g. multilingual
  BERT's WordPiece, split them as they split real text.
- Deterministic: every file comes from numpy.random.default_rng([seed, kind, split]), and
  abstract examples never depend on which languages are written, so the same arguments
  give byte-identical files and `langs=("en",)` writes the same English files as the default.

File format: UTF-8 without BOM, every line ends with "\\n" only, no tab or line break
(\\r, U+0085, U+2028, ...) inside a field, text NFC-normalised. CoNLL files follow the
CoNLL-U convention: every sentence, the last one included, is its token lines followed by
ONE blank line, so a file ends with "<token>\\t<tag>\\n\\n" (one blank line, nothing else).
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path

import numpy as np

from xkd.durable import atomic_write_bytes

# --------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------

LANGS = ("en", "es", "hi")
SPLITS = ("train", "test")
TOPICS = ("sports", "food", "weather", "music")

# Per topic, ~20 nouns: (English, Spanish with its article, Hindi, Hindi gender[, Hindi
# oblique form, used before a postposition, for the masculine nouns in -ा that change]).
# Every noun is one token in every language, and no word belongs to two topics.
TOPIC_NOUNS: dict[str, list[tuple[str, ...]]] = {
    "sports": [
        ("match", "el partido", "मैच", "m"),
        ("football", "el fútbol", "फुटबॉल", "m"),
        ("team", "el equipo", "टीम", "f"),
        ("goal", "el gol", "गोल", "m"),
        ("player", "el jugador", "खिलाड़ी", "m"),
        ("coach", "el entrenador", "कोच", "m"),
        ("tennis", "el tenis", "टेनिस", "m"),
        ("cricket", "el críquet", "क्रिकेट", "m"),
        ("stadium", "el estadio", "स्टेडियम", "m"),
        ("tournament", "el torneo", "टूर्नामेंट", "m"),
        ("referee", "el árbitro", "रेफ़री", "m"),
        ("ball", "la pelota", "गेंद", "f"),
        ("race", "la carrera", "दौड़", "f"),
        ("trophy", "el trofeo", "ट्रॉफी", "f"),
        ("medal", "la medalla", "पदक", "m"),
        ("basketball", "el baloncesto", "बास्केटबॉल", "m"),
        ("hockey", "el hockey", "हॉकी", "f"),
        ("final", "la final", "फ़ाइनल", "m"),
        ("championship", "el campeonato", "चैंपियनशिप", "f"),
        ("athlete", "el atleta", "एथलीट", "m"),
    ],
    "food": [
        ("rice", "el arroz", "चावल", "m"),
        ("bread", "el pan", "रोटी", "f"),
        ("soup", "la sopa", "सूप", "m"),
        ("cheese", "el queso", "पनीर", "m"),
        ("mango", "el mango", "आम", "m"),
        ("apple", "la manzana", "सेब", "m"),
        ("tea", "el té", "चाय", "f"),
        ("coffee", "el café", "कॉफ़ी", "f"),
        ("breakfast", "el desayuno", "नाश्ता", "m", "नाश्ते"),
        ("chicken", "el pollo", "चिकन", "m"),
        ("fish", "el pescado", "मछली", "f"),
        ("salad", "la ensalada", "सलाद", "m"),
        ("cake", "el pastel", "केक", "m"),
        ("restaurant", "el restaurante", "रेस्टोरेंट", "m"),
        ("sugar", "el azúcar", "चीनी", "f"),
        ("milk", "la leche", "दूध", "m"),
        ("egg", "el huevo", "अंडा", "m", "अंडे"),
        ("chef", "el chef", "शेफ", "m"),
        ("banana", "el plátano", "केला", "m", "केले"),
        ("butter", "la mantequilla", "मक्खन", "m"),
    ],
    "weather": [
        ("rain", "la lluvia", "बारिश", "f"),
        ("storm", "la tormenta", "तूफ़ान", "m"),
        ("wind", "el viento", "हवा", "f"),
        ("snow", "la nieve", "बर्फ़", "f"),
        ("sunshine", "el sol", "धूप", "f"),
        ("cloud", "la nube", "बादल", "m"),
        ("heat", "el calor", "गर्मी", "f"),
        ("cold", "el frío", "ठंड", "f"),
        ("fog", "la niebla", "कोहरा", "m", "कोहरे"),
        ("temperature", "la temperatura", "तापमान", "m"),
        ("forecast", "el pronóstico", "पूर्वानुमान", "m"),
        ("monsoon", "el monzón", "मानसून", "m"),
        ("lightning", "el relámpago", "बिजली", "f"),
        ("humidity", "la humedad", "नमी", "f"),
        ("flood", "la inundación", "बाढ़", "f"),
        ("drought", "la sequía", "सूखा", "m", "सूखे"),
        ("climate", "el clima", "जलवायु", "f"),
        ("rainbow", "el arcoíris", "इंद्रधनुष", "m"),
        ("cyclone", "el ciclón", "चक्रवात", "m"),
        ("winter", "el invierno", "सर्दी", "f"),
    ],
    "music": [
        ("song", "la canción", "गाना", "m", "गाने"),
        ("guitar", "la guitarra", "गिटार", "m"),
        ("piano", "el piano", "पियानो", "m"),
        ("concert", "el concierto", "कॉन्सर्ट", "m"),
        ("singer", "el cantante", "गायक", "m"),
        ("band", "la banda", "बैंड", "m"),
        ("drum", "el tambor", "ढोल", "m"),
        ("violin", "el violín", "वायलिन", "m"),
        ("album", "el álbum", "एल्बम", "m"),
        ("melody", "la melodía", "धुन", "f"),
        ("rhythm", "el ritmo", "लय", "f"),
        ("flute", "la flauta", "बांसुरी", "f"),
        ("voice", "la voz", "आवाज़", "f"),
        ("music", "la música", "संगीत", "m"),
        ("dance", "el baile", "नृत्य", "m"),
        ("record", "el disco", "रिकॉर्ड", "m"),
        ("sitar", "el sitar", "सितार", "m"),
        ("opera", "la ópera", "ओपेरा", "m"),
        ("jazz", "el jazz", "जैज़", "m"),
        ("composer", "el compositor", "संगीतकार", "m"),
    ],
}

# Adjectives: (English, Spanish masc., Spanish fem., Hindi masc., Hindi fem.). Topic
# adjectives add topic signal; general ones are topic-neutral filler.
TOPIC_ADJECTIVES: dict[str, list[tuple[str, str, str, str, str]]] = {
    "sports": [("exciting", "emocionante", "emocionante", "रोमांचक", "रोमांचक"),
               ("tough", "duro", "dura", "कड़ा", "कड़ी")],
    "food": [("delicious", "delicioso", "deliciosa", "स्वादिष्ट", "स्वादिष्ट"),
             ("spicy", "picante", "picante", "तीखा", "तीखी")],
    "weather": [("strong", "fuerte", "fuerte", "तेज़", "तेज़"),
                ("heavy", "intenso", "intensa", "भारी", "भारी")],
    "music": [("melodious", "melodioso", "melodiosa", "सुरीला", "सुरीली"),
              ("catchy", "pegadizo", "pegadiza", "मधुर", "मधुर")],
}
GENERAL_ADJECTIVES: list[tuple[str, str, str, str, str]] = [
    ("excellent", "excelente", "excelente", "शानदार", "शानदार"),
    ("terrible", "terrible", "terrible", "भयानक", "भयानक"),
    ("interesting", "interesante", "interesante", "दिलचस्प", "दिलचस्प"),
    ("good", "bueno", "buena", "अच्छा", "अच्छी"),
    ("bad", "malo", "mala", "बुरा", "बुरी"),
]

# Person names: (English and Spanish, Hindi transliteration). Several are two words.
PERSONS: list[tuple[str, str]] = [
    ("Ana", "अना"), ("Ana Maria", "अना मारिया"), ("Carlos", "कार्लोस"), ("Priya", "प्रिया"),
    ("Rahul Sharma", "राहुल शर्मा"), ("Maria", "मारिया"), ("John", "जॉन"), ("Luis", "लुइस"),
    ("Sofia", "सोफ़िया"), ("Arjun", "अर्जुन"), ("David", "डेविड"), ("Elena", "एलेना"),
    ("Amit Kumar", "अमित कुमार"), ("Lucia", "लूसिया"), ("Ravi", "रवि"), ("Juan Carlos", "हुआन कार्लोस"),
    ("Sara", "सारा"), ("Pedro", "पेड्रो"), ("Neha", "नेहा"), ("Anjali Singh", "अंजलि सिंह"),
    ("Miguel Torres", "मिगेल टोरेस"), ("Emma", "एम्मा"),
]

# Cities: (English, Spanish, Hindi). Most stay the same in English and Spanish; the
# number of words may differ across languages ("New York" / "न्यूयॉर्क").
CITIES: list[tuple[str, str, str]] = [
    ("Delhi", "Delhi", "दिल्ली"), ("New Delhi", "Nueva Delhi", "नई दिल्ली"), ("Mumbai", "Mumbai", "मुंबई"),
    ("Madrid", "Madrid", "मैड्रिड"), ("Barcelona", "Barcelona", "बार्सिलोना"), ("London", "Londres", "लंदन"),
    ("Mexico City", "Ciudad de México", "मेक्सिको सिटी"), ("New York", "Nueva York", "न्यूयॉर्क"),
    ("Buenos Aires", "Buenos Aires", "ब्यूनस आयर्स"), ("Kolkata", "Calcuta", "कोलकाता"), ("Lima", "Lima", "लीमा"),
    ("Jaipur", "Jaipur", "जयपुर"), ("Chennai", "Chennai", "चेन्नई"), ("Bogota", "Bogotá", "बोगोटा"),
    ("Paris", "París", "पेरिस"), ("San Francisco", "San Francisco", "सैन फ़्रांसिस्को"),
    ("Bangalore", "Bangalore", "बेंगलुरु"), ("Seville", "Sevilla", "सेविल"),
]

# Time expressions, as word/TAG tokens: (English, Spanish, Hindi).
TIMES: list[tuple[str, str, str]] = [
    ("yesterday/ADV", "ayer/ADV", "कल/ADV"),
    ("today/ADV", "hoy/ADV", "आज/ADV"),
    ("last/ADJ night/NOUN", "anoche/ADV", "कल/ADV रात/NOUN"),
    ("on/ADP Sunday/PROPN", "el/DET domingo/NOUN", "रविवार/PROPN को/ADP"),
    ("this/DET morning/NOUN", "esta/DET mañana/NOUN", "आज/ADV सुबह/NOUN"),
]

# Templates, one per language, as space-separated tokens: word/TAG for a fixed word, or a
# slot: {PER} {PER2} {LOC} {TIME}; {N1} {N2} the bare topic nouns; {DN1} {DN2} (Spanish)
# article + noun; {ON1} {ON2} (Hindi) the oblique form; {ADJ1} an adjective agreeing with
# N1; {G1:masc:fem:TAG} (Hindi) a word agreeing in gender with N1.
TEMPLATES: list[dict[str, str]] = [
    {"en": "{PER} talked/VERB about/ADP the/DET {N1} and/CCONJ the/DET {N2} in/ADP {LOC} {TIME} ./PUNCT",
     "es": "{PER} habló/VERB de/ADP {DN1} y/CCONJ de/ADP {DN2} en/ADP {LOC} {TIME} ./PUNCT",
     "hi": "{PER} ने/ADP {TIME} {LOC} में/ADP {ON1} और/CCONJ {ON2} के/ADP बारे/NOUN में/ADP बात/NOUN की/VERB ।/PUNCT"},
    {"en": "{TIME} the/DET {N1} in/ADP {LOC} was/AUX {ADJ1} ./PUNCT",
     "es": "{TIME} {DN1} en/ADP {LOC} fue/AUX {ADJ1} ./PUNCT",
     "hi": "{TIME} {LOC} में/ADP {N1} {ADJ1} {G1:था:थी:AUX} ।/PUNCT"},
    {"en": "{PER} asked/VERB {PER2} about/ADP the/DET {N1} {TIME} ./PUNCT",
     "es": "{PER} le/PRON preguntó/VERB a/ADP {PER2} por/ADP {DN1} {TIME} ./PUNCT",
     "hi": "{PER} ने/ADP {TIME} {PER2} से/ADP {ON1} के/ADP बारे/NOUN में/ADP पूछा/VERB ।/PUNCT"},
    {"en": "Is/VERB there/PRON any/DET news/NOUN about/ADP the/DET {N1} in/ADP {LOC} ?/PUNCT",
     "es": "¿/PUNCT Hay/VERB noticias/NOUN sobre/ADP {DN1} en/ADP {LOC} ?/PUNCT",
     "hi": "क्या/PART {LOC} में/ADP {ON1} के/ADP बारे/NOUN में/ADP कोई/DET ख़बर/NOUN है/AUX ?/PUNCT"},
    {"en": "{PER} wrote/VERB an/DET article/NOUN about/ADP the/DET {N1} and/CCONJ the/DET {N2} ./PUNCT",
     "es": "{PER} escribió/VERB un/DET artículo/NOUN sobre/ADP {DN1} y/CCONJ {DN2} ./PUNCT",
     "hi": "{PER} ने/ADP {ON1} और/CCONJ {ON2} के/ADP बारे/NOUN में/ADP एक/NUM लेख/NOUN लिखा/VERB ।/PUNCT"},
    {"en": "In/ADP {LOC} ,/PUNCT everyone/PRON is/AUX talking/VERB about/ADP the/DET {N1} ./PUNCT",
     "es": "En/ADP {LOC} ,/PUNCT todos/PRON hablan/VERB de/ADP {DN1} ./PUNCT",
     "hi": "{LOC} में/ADP सब/DET लोग/NOUN {ON1} के/ADP बारे/NOUN में/ADP बात/NOUN कर/VERB रहे/AUX हैं/AUX ।/PUNCT"},
    {"en": "{PER} really/ADV likes/VERB the/DET {N1} in/ADP {LOC} ./PUNCT",
     "es": "A/ADP {PER} le/PRON gusta/VERB mucho/ADV {DN1} de/ADP {LOC} ./PUNCT",
     "hi": "{PER} को/ADP {LOC} {G1:का:की:ADP} {N1} बहुत/ADV पसंद/ADJ है/AUX ।/PUNCT"},
    {"en": "{PER} said/VERB that/SCONJ the/DET {N1} was/AUX {ADJ1} ./PUNCT",
     "es": "{PER} dijo/VERB que/SCONJ {DN1} fue/AUX {ADJ1} ./PUNCT",
     "hi": "{PER} ने/ADP कहा/VERB कि/SCONJ {N1} {ADJ1} {G1:था:थी:AUX} ।/PUNCT"},
]

POS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
            "SCONJ", "VERB")
NER_TAGS = ("B-LOC", "B-PER", "I-LOC", "I-PER", "O")
PAIR_LABELS = ("different", "same")

# Tokens written without a space before them (and "¿" without one after it).
_NO_SPACE_BEFORE = {".", ",", "?", "!", "।"}
_NO_SPACE_AFTER = {"¿"}
# Spanish contractions of preposition + masculine article.
_ES_CONTRACTIONS = {("de", "el"): "del", ("a", "el"): "al"}
# Independent random streams per file kind and split: adding a kind never shifts another.
_STREAM = {"classify": 1, "pairs": 2, "tagged": 3, "parallel": 4}
_SPLIT = {"train": 0, "test": 1, "parallel": 2}
DEFAULT_PARALLEL = 300

Token = tuple[str, str, str]  # (word, POS, NER)


# --------------------------------------------------------------------------------------
# Abstract examples and rendering
# --------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(n))


def _example(rng: np.random.Generator, topic: str) -> dict:
    """One abstract sentence about `topic`: a template and every slot filler, language-free."""
    nouns = TOPIC_NOUNS[topic]
    n1 = _pick(rng, len(nouns))
    n2 = (n1 + 1 + _pick(rng, len(nouns) - 1)) % len(nouns)  # a second, different noun
    per = _pick(rng, len(PERSONS))
    per2 = (per + 1 + _pick(rng, len(PERSONS) - 1)) % len(PERSONS)
    if rng.random() < 0.5:
        adj = TOPIC_ADJECTIVES[topic][_pick(rng, len(TOPIC_ADJECTIVES[topic]))]
    else:
        adj = GENERAL_ADJECTIVES[_pick(rng, len(GENERAL_ADJECTIVES))]
    return {"template": _pick(rng, len(TEMPLATES)), "topic": topic, "n1": nouns[n1], "n2": nouns[n2],
            "per": PERSONS[per], "per2": PERSONS[per2], "loc": CITIES[_pick(rng, len(CITIES))],
            "time": TIMES[_pick(rng, len(TIMES))], "adj": adj}


def _tagged(spec: str) -> list[Token]:
    """'word/TAG word/TAG' -> tokens tagged O for NER."""
    out = []
    for item in spec.split():
        word, _, tag = item.rpartition("/")
        out.append((word, tag, "O"))
    return out


def _entity(name: str, kind: str) -> list[Token]:
    words = name.split()
    return [(w, "ADP" if w == "de" else "PROPN", ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]


def _noun_forms(noun: tuple[str, ...], lang: str) -> dict:
    if lang == "en":
        return {"bare": noun[0]}
    if lang == "es":
        article, word = noun[1].split()
        return {"bare": word, "article": article, "gender": "m" if article == "el" else "f"}
    return {"bare": noun[2], "gender": noun[3], "oblique": noun[4] if len(noun) > 4 else noun[2]}


def _slot(name: str, ex: dict, lang: str) -> list[Token]:
    li = {"en": 0, "es": 1, "hi": 2}[lang]
    n1, n2 = _noun_forms(ex["n1"], lang), _noun_forms(ex["n2"], lang)
    if name in ("PER", "PER2"):
        person = ex["per" if name == "PER" else "per2"]
        return _entity(person[1] if lang == "hi" else person[0], "PER")
    if name == "LOC":
        return _entity(ex["loc"][li], "LOC")
    if name == "TIME":
        return _tagged(ex["time"][li])
    if name in ("N1", "N2"):
        return [((n1 if name == "N1" else n2)["bare"], "NOUN", "O")]
    if name in ("DN1", "DN2"):
        n = n1 if name == "DN1" else n2
        return [(n["article"], "DET", "O"), (n["bare"], "NOUN", "O")]
    if name in ("ON1", "ON2"):
        return [((n1 if name == "ON1" else n2)["oblique"], "NOUN", "O")]
    if name == "ADJ1":
        adj = ex["adj"]
        word = adj[0] if lang == "en" else adj[(1 if lang == "es" else 3) + (n1["gender"] == "f")]
        return [(word, "ADJ", "O")]
    if name.startswith("G1:"):
        _, masc, fem, tag = name.split(":")
        return [(fem if n1["gender"] == "f" else masc, tag, "O")]
    raise ValueError(f"unknown template slot {{{name}}}")


def render(ex: dict, lang: str) -> list[Token]:
    """The abstract example `ex` as (word, POS, NER) tokens in `lang`."""
    tokens: list[Token] = []
    for item in TEMPLATES[ex["template"]][lang].split():
        tokens += _slot(item[1:-1], ex, lang) if item.startswith("{") else _tagged(item)
    if lang == "es":
        merged: list[Token] = []
        for tok in tokens:
            prev = merged[-1] if merged else None
            if prev and prev[2] == tok[2] == "O" and (prev[0].lower(), tok[0]) in _ES_CONTRACTIONS:
                merged[-1] = (prev[0][0] + _ES_CONTRACTIONS[prev[0].lower(), tok[0]][1:], "ADP", "O")
            else:
                merged.append(tok)
        tokens = merged
    if lang in ("en", "es"):  # sentence case
        for i, (word, pos, ner) in enumerate(tokens):
            if word[0].isalpha():
                tokens[i] = (word[0].upper() + word[1:], pos, ner)
                break
    return [(unicodedata.normalize("NFC", w), p, n) for w, p, n in tokens]


def detokenize(words: list[str]) -> str:
    """Words joined by spaces, punctuation attached as in ordinary writing."""
    out = ""
    for i, word in enumerate(words):
        if i and word not in _NO_SPACE_BEFORE and words[i - 1] not in _NO_SPACE_AFTER:
            out += " "
        out += word
    return out


def _text(ex: dict, lang: str) -> str:
    return detokenize([w for w, _, _ in render(ex, lang)])


def _check_field(field: str, where: str) -> str:
    if not field or "\t" in field or len(field.splitlines()) != 1 or field != field.strip() or "\ufeff" in field:
        raise RuntimeError(f"toy task generator produced a bad field in {where}: {field!r}")
    return field


def _balanced(rng: np.random.Generator, labels, n: int) -> list:
    """n labels, dealt round-robin (counts differ by at most one), in random order."""
    dealt = [labels[i % len(labels)] for i in range(n)]
    return [dealt[i] for i in rng.permutation(n)]


def _rng(seed: int, kind: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[kind], _SPLIT[split]])


# --------------------------------------------------------------------------------------
# One function per file kind: each returns {lang: file bytes}
# --------------------------------------------------------------------------------------

def classify_files(n: int, seed: int, split: str, langs) -> dict[str, bytes]:
    """classify.L.S.tsv: text<TAB>topic, classes balanced."""
    rng = _rng(seed, "classify", split)
    examples = [_example(rng, topic) for topic in _balanced(rng, TOPICS, n)]
    return {lang: "".join(f"{_check_field(_text(ex, lang), f'classify {lang}')}\t{ex['topic']}\n"
                          for ex in examples).encode() for lang in langs}


def pairs_files(n: int, seed: int, split: str, langs) -> dict[str, bytes]:
    """pairs.L.S.tsv: text_a<TAB>text_b<TAB>same|different (same topic or not), 50/50."""
    rng = _rng(seed, "pairs", split)
    rows = []
    for label in _balanced(rng, ("same", "different"), n):
        a = _pick(rng, len(TOPICS))
        b = a if label == "same" else (a + 1 + _pick(rng, len(TOPICS) - 1)) % len(TOPICS)
        rows.append((_example(rng, TOPICS[a]), _example(rng, TOPICS[b]), label))
    return {lang: "".join(f"{_check_field(_text(ea, lang), f'pairs {lang}')}\t"
                          f"{_check_field(_text(eb, lang), f'pairs {lang}')}\t{label}\n"
                          for ea, eb, label in rows).encode() for lang in langs}


def tagged_files(n: int, seed: int, split: str, langs) -> dict[str, tuple[bytes, bytes]]:
    """ner.L.S.conll and pos.L.S.conll, the same sentences: {lang: (ner bytes, pos bytes)}.

    Every sentence is its token<TAB>tag lines and then one blank line (the last one too).
    """
    rng = _rng(seed, "tagged", split)
    examples = [_example(rng, TOPICS[_pick(rng, len(TOPICS))]) for _ in range(n)]
    out = {}
    for lang in langs:
        ner, pos = [], []
        for ex in examples:
            for word, p, e in render(ex, lang):
                _check_field(word, f"conll {lang}")
                if " " in word:
                    raise RuntimeError(f"toy task token with a space: {word!r}")
                ner.append(f"{word}\t{e}\n")
                pos.append(f"{word}\t{p}\n")
            ner.append("\n")
            pos.append("\n")
        out[lang] = ("".join(ner).encode(), "".join(pos).encode())
    return out


def parallel_files(n: int, seed: int, langs) -> dict[str, bytes]:
    """parallel.L.txt: n unlabelled sentences a line, line i the same sentence in every language."""
    rng = _rng(seed, "parallel", "parallel")
    examples = [_example(rng, TOPICS[_pick(rng, len(TOPICS))]) for _ in range(n)]
    return {lang: "".join(f"{_check_field(_text(ex, lang), f'parallel {lang}')}\n" for ex in examples).encode()
            for lang in langs}


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def write_toy_task(out: str | Path, *, train: int = 400, test: int = 100, seed: int = 0,
                   langs: tuple[str, ...] = LANGS, parallel: int = DEFAULT_PARALLEL) -> dict:
    """Write the toy task under `out` (created if needed) and describe it.

    Returns {"dir", "langs", "labels": {"classify", "pairs", "ner", "pos"}, "files": {name: path}}.
    `train`/`test` are the examples (lines, or sentences for .conll) per split and file kind;
    `parallel` the lines of each parallel.L.txt.
    """
    langs = tuple(langs)
    if not langs or len(set(langs)) != len(langs) or any(lang not in LANGS for lang in langs):
        raise ValueError(f"langs must be distinct languages among {', '.join(LANGS)}, got {langs!r}")
    for name, value in (("train", train), ("test", test), ("parallel", parallel), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if min(train, test) < 1:
        raise ValueError("train and test must be at least 1")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    contents: dict[str, bytes] = {}
    for split, n in (("train", train), ("test", test)):
        for lang, data in classify_files(n, seed, split, langs).items():
            contents[f"classify.{lang}.{split}.tsv"] = data
    for split, n in (("train", train), ("test", test)):
        for lang, data in pairs_files(n, seed, split, langs).items():
            contents[f"pairs.{lang}.{split}.tsv"] = data
    for split, n in (("train", train), ("test", test)):
        for lang, (ner, pos) in tagged_files(n, seed, split, langs).items():
            contents[f"ner.{lang}.{split}.conll"] = ner
            contents[f"pos.{lang}.{split}.conll"] = pos
    if parallel:
        for lang, data in parallel_files(parallel, seed, langs).items():
            contents[f"parallel.{lang}.txt"] = data
    files = {}
    for name, data in contents.items():
        atomic_write_bytes(root / name, data)
        files[name] = str(root / name)
    return {"dir": str(root), "langs": list(langs),
            "labels": {"classify": sorted(TOPICS), "pairs": list(PAIR_LABELS), "ner": list(NER_TAGS),
                       "pos": list(POS_TAGS)},
            "files": files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/toytask.py",
                                     description="Write xkd's multilingual toy task (classify, pairs, NER, POS, parallel).")
    parser.add_argument("out", help="directory to write into (created if needed)")
    parser.add_argument("--train", type=int, default=400, help="examples per train file (default 400)")
    parser.add_argument("--test", type=int, default=100, help="examples per test file (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                        help=f"lines per parallel.L.txt (default {DEFAULT_PARALLEL}; 0: none)")
    parser.add_argument("--langs", default=",".join(LANGS), help="comma-separated languages (default en,es,hi)")
    args = parser.parse_args(argv)
    try:
        info = write_toy_task(args.out, train=args.train, test=args.test, seed=args.seed,
                              langs=tuple(x.strip() for x in args.langs.split(",") if x.strip()),
                              parallel=args.parallel)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in info["files"].values():
        lines = Path(path).read_bytes().count(b"\n")
        print(f"{lines:>7}  {path}")
    print(f"wrote {len(info['files'])} files to {info['dir']} (langs {','.join(info['langs'])}; "
          f"train {args.train}, test {args.test}, seed {args.seed}; "
          f"classify labels {','.join(info['labels']['classify'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
