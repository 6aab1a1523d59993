"""The handwriting model's character set: 99 keys plus the CTC blank (label 99).

The label of a key is its position in :data:`KEYS` (reference §4.3):

======  =====================================================================
0–25    ``a`` … ``z``
26–51   ``A`` … ``Z``
52–61   ``0`` … ``9``
62–93   :data:`string.punctuation` in order (88 is ``_``, 89 the backtick)
94      backspace (drawn ``⌫``)
95      enter (``⏎``)
96      space (``' '``)
97      shift (``⇧``)
98      pause (``🤏``)
99      the CTC blank (not a key)
======  =====================================================================

Two spellings of a key exist. :data:`KEY_NAMES` is what emgd publishes in
``handwriting/<device>`` events (a printable character as itself, otherwise ``backspace``,
``enter``, ``space``, ``shift`` or ``pause``). :data:`KEY_CHARS` is the reference's one-character
drawing (``⌫ ⏎ ' ' ⇧ 🤏`` for the five special keys), used by :func:`labels_to_str` so that
strings compare the way the reference's character error rate compares them.

:func:`str_to_labels` turns prompt text into labels the way the reference does, with one
difference: the reference transliterates unknown characters with the ``unidecode`` package,
which emgd does not depend on. emgd uses Unicode compatibility decomposition (NFKD) with the
combining marks removed, plus a short table (:data:`_EXTRA_FOLDS`) of common punctuation and
letters that NFKD leaves alone. Both agree on accented Latin letters (``é`` → ``e``,
``Ç`` → ``C``), full-width forms and superscript digits. emgd drops what it cannot fold to a
single supported character, so it drops some characters unidecode would have kept as one
letter: Greek and Cyrillic letters (``а`` → ``a`` in unidecode) and other scripts.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable, Sequence

#: Number of keys; also the label of the CTC blank.
NUM_KEYS = 99
#: The CTC blank (null class) label.
BLANK = 99
#: Width of the handwriting network's output (99 keys + blank).
NUM_CLASSES = 100

BACKSPACE, ENTER, SPACE, SHIFT, PAUSE = 94, 95, 96, 97, 98
#: The label of ``_``, which the reference's prompts write as ``→`` ("explicit space").
UNDERSCORE = 88

_PRINTABLE = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
_SPECIAL_NAMES = ("backspace", "enter", "space", "shift", "pause")
_SPECIAL_CHARS = ("\u232b", "\u23ce", " ", "\u21e7", "\U0001f90f")

#: Event key name of each label 0–98.
KEY_NAMES: tuple[str, ...] = tuple(_PRINTABLE) + _SPECIAL_NAMES
#: The reference's one-character drawing of each label 0–98.
KEY_CHARS: tuple[str, ...] = tuple(_PRINTABLE) + _SPECIAL_CHARS

#: Characters that stand for themselves (labels 0–93).
_SELF = {c: i for i, c in enumerate(_PRINTABLE)}

#: Step 1 of the reference's ``str_to_labels``: character substitutions.
CHAR_SUBSTITUTIONS = {
    "\n": "\u23ce", "\r": "\u23ce", "\b": "\u232b",
    "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-",
}

#: Characters that are not printable keys but map to a label (reference ``UNICHAR_TO_KEY``,
#: restricted to the keys that exist in the set). ``⌫`` itself is deliberately absent: the
#: reference drops it on input, prompts write backspace as ``←``.
UNICHAR_TO_LABEL = {
    " ": SPACE,
    "\u2192": UNDERSCORE,  # → "explicit space"
    "\u2190": BACKSPACE,   # ←
    "\u23ce": ENTER,       # ⏎ (``\n`` and ``\r`` become ⏎ in step 1)
    "\u21e7": SHIFT,       # ⇧
    "\U0001f90f": PAUSE,   # 🤏
}

#: Folds NFKD leaves alone but unidecode maps to one supported character.
_EXTRA_FOLDS = {
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2212": "-",  # hyphens, –, −
    "\u2018": "'", "\u201a": ",", "\u201e": '"', "\u00b4": "'",
    "\u00f8": "o", "\u00d8": "O", "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0110": "D",
    "\u0131": "i",
}


def key_name(label: int) -> str:
    """The event key name of ``label`` (0–98); ``ValueError`` for the blank or out of range."""
    return KEY_NAMES[key_index(label)]


def labels_to_str(labels: Iterable[int]) -> str:
    """Concatenate the reference drawings of ``labels`` (backspace → ``⌫``, space → ``' '``)."""
    return "".join(KEY_CHARS[key_index(label)] for label in labels)


def key_index(label: int) -> int:
    """``label`` as an int, checked to be a key (not the blank)."""
    value = int(label)
    if not 0 <= value < NUM_KEYS:
        raise ValueError(f"label {value} is not a key (keys are 0..{NUM_KEYS - 1})")
    return value


def _fold(char: str) -> str:
    """One supported character for an unsupported ``char``, or ``char`` unchanged."""
    if char in _EXTRA_FOLDS:
        return _EXTRA_FOLDS[char]
    base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    if base == " " and unicodedata.category(char) != "Zs":
        return char  # a spacing accent such as ¨ decomposes to space + mark: not a space
    if len(base) == 1 and (base in _SELF or base in UNICHAR_TO_LABEL):
        return base
    return char


def str_to_labels(text: str) -> list[int]:
    """Labels of ``text`` following the reference's four steps (§4.3).

    1. :data:`CHAR_SUBSTITUTIONS`; 2. fold characters that are neither keys nor in
    :data:`UNICHAR_TO_LABEL` (NFKD instead of unidecode, see the module docstring);
    3. map printable keys to themselves and the rest through :data:`UNICHAR_TO_LABEL`
    (``' '`` → space, ``→`` → ``_``, ``←`` → backspace, ``⏎`` → enter); 4. drop the rest.
    """
    out: list[int] = []
    for char in text:
        char = CHAR_SUBSTITUTIONS.get(char, char)
        if char not in _SELF and char not in UNICHAR_TO_LABEL:
            char = _fold(char)
        if char in _SELF:
            out.append(_SELF[char])
        elif char in UNICHAR_TO_LABEL:
            out.append(UNICHAR_TO_LABEL[char])
    return out


def labels_of(names: Sequence[str]) -> list[int]:
    """Labels of event key names (the inverse of :data:`KEY_NAMES`), for tests and tools."""
    index = {name: i for i, name in enumerate(KEY_NAMES)}
    try:
        return [index[name] for name in names]
    except KeyError as exc:
        raise ValueError(f"unknown key name {exc.args[0]!r}") from exc


__all__ = ["NUM_KEYS", "BLANK", "NUM_CLASSES", "BACKSPACE", "ENTER", "SPACE", "SHIFT", "PAUSE",
           "UNDERSCORE", "KEY_NAMES", "KEY_CHARS", "CHAR_SUBSTITUTIONS", "UNICHAR_TO_LABEL",
           "key_name", "key_index", "labels_to_str", "str_to_labels", "labels_of"]
