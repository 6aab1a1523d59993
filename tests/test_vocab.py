"""The handwriting character set and the str/label conversions (reference §4.3)."""

from __future__ import annotations

import string

import pytest

from emgd import vocab
from emgd.vocab import (BACKSPACE, BLANK, ENTER, KEY_CHARS, KEY_NAMES, PAUSE, SHIFT, SPACE,
                        key_name, labels_of, labels_to_str, str_to_labels)


def test_layout_of_the_99_keys():
    assert len(KEY_NAMES) == len(KEY_CHARS) == vocab.NUM_KEYS == 99
    assert BLANK == 99 and vocab.NUM_CLASSES == 100
    assert KEY_NAMES[0] == "a" and KEY_NAMES[25] == "z"
    assert KEY_NAMES[26] == "A" and KEY_NAMES[51] == "Z"
    assert KEY_NAMES[52] == "0" and KEY_NAMES[61] == "9"
    assert "".join(KEY_NAMES[62:94]) == string.punctuation
    spot = {62: "!", 68: "'", 73: ",", 74: "-", 75: ".", 82: "?", 88: "_", 89: "`", 93: "~"}
    assert {i: KEY_NAMES[i] for i in spot} == spot
    assert KEY_NAMES[94:] == ("backspace", "enter", "space", "shift", "pause")
    assert KEY_CHARS[94:] == ("\u232b", "\u23ce", " ", "\u21e7", "\U0001f90f")
    assert (BACKSPACE, ENTER, SPACE, SHIFT, PAUSE) == (94, 95, 96, 97, 98)


def test_reference_example():
    assert str_to_labels("have→ a→ good→ day") == [
        7, 0, 21, 4, 88, 96, 0, 88, 96, 6, 14, 14, 3, 88, 96, 3, 0, 24]


def test_special_characters_and_substitutions():
    assert str_to_labels("←") == [BACKSPACE]
    assert str_to_labels("a\nb\rc⏎") == [0, ENTER, 1, ENTER, 2, ENTER]
    assert str_to_labels("⇧🤏 ") == [SHIFT, PAUSE, SPACE]
    assert str_to_labels("’“”—") == str_to_labels("'\"\"-")


def test_backspace_drawing_and_bs_character_are_dropped_on_input():
    # The reference maps \b to ⌫ and has no entry for ⌫, so both vanish; prompts use ←.
    assert str_to_labels("a⌫b\bc") == [0, 1, 2]


def test_fold_of_accented_letters_and_drop_of_the_rest():
    assert str_to_labels("café Ça") == str_to_labels("cafe Ca")
    assert str_to_labels("naïve–ø") == str_to_labels("naive-o")
    assert str_to_labels("a\u00a0b") == [0, SPACE, 1]      # no-break space is a space
    assert str_to_labels("a\u00a8b") == [0, 1]             # spacing diaeresis is not a space
    assert str_to_labels("жß…€") == []                     # nothing single to fold to


def test_labels_to_str_and_round_trip():
    assert labels_to_str([7, 8, 96, 94, 95]) == "hi \u232b\u23ce"
    text = "Hello, World! 42_~"
    assert labels_to_str(str_to_labels(text)) == text
    with pytest.raises(ValueError):
        labels_to_str([BLANK])


def test_key_names():
    assert key_name(0) == "a" and key_name(SPACE) == "space" and key_name(88) == "_"
    assert labels_of(["h", "i", "space", "backspace"]) == [7, 8, SPACE, BACKSPACE]
    for bad in (-1, BLANK, 100):
        with pytest.raises(ValueError):
            key_name(bad)
    with pytest.raises(ValueError):
        labels_of(["nope"])
