"""shared.visible: which characters are shown as ‹U+XXXX› wherever a person
reads an alert, and which are kept because they are how visible text is
written (emoji sequences, Persian and Indic words)."""

from __future__ import annotations

import pytest
import regex

from functions.escalation.channels import slack
from functions.escalation.channels.text import ELLIPSIS, utf16_len
from shared.visible import DEFAULT_IGNORABLE, EXTENDED_PICTOGRAPHIC, HIDDEN, visible


def tags(text: str) -> str:
    """``text`` in Unicode tag characters: drawn as nothing."""
    return "".join(chr(0xE0000 + ord(c)) for c in text)


def code_points(ranges) -> set[int]:
    return {cp for a, b in ranges for cp in range(a, b + 1)}


EVERY_CHARACTER = "".join(map(chr, range(0x110000)))


def having(pattern: str) -> set[int]:
    return {ord(c) for c in regex.findall(pattern, EVERY_CHARACTER)}


def test_the_default_ignorable_table_is_unicodes():
    # DerivedCoreProperties.txt, as the regex package (the tests' pin) has it.
    assert code_points(DEFAULT_IGNORABLE) == having(r"\p{Default_Ignorable_Code_Point}")


def test_the_extended_pictographic_table_is_unicodes():
    assert code_points(EXTENDED_PICTOGRAPHIC) == having(r"\p{Extended_Pictographic}")


def test_every_default_ignorable_bidi_control_and_annotation_control_is_hidden():
    wanted = (code_points(DEFAULT_IGNORABLE) | having(r"\p{Bidi_Control}") | {0xFFF9, 0xFFFA, 0xFFFB}
              | set(range(0x20)) | set(range(0x7F, 0xA0)) | {0x2028, 0x2029})
    assert {ord(c) for c in HIDDEN.findall(EVERY_CHARACTER)} == wanted


@pytest.mark.parametrize("text, shown", [
    # Tag characters spell a word no one sees.
    ("DiskFull" + tags("prod"), "DiskFull‹U+E0070›‹U+E0072›‹U+E006F›‹U+E0064›"),
    ("Disk\ufe00Full", "Disk‹U+FE00›Full"),  # variation selector 1
    ("DiskFull\U000E0100", "DiskFull‹U+E0100›"),  # variation selector 17
    ("Disk\u00adFull", "Disk‹U+00AD›Full"),  # soft hyphen
    ("Disk\u034fFull", "Disk‹U+034F›Full"),  # combining grapheme joiner
    ("Disk\u180bFull\u180e", "Disk‹U+180B›Full‹U+180E›"),  # Mongolian selector, vowel separator
    ("Disk\u206aFull\u206f", "Disk‹U+206A›Full‹U+206F›"),  # deprecated format controls
    ("Disk\u115f\u1160\u3164\uffa0Full", "Disk‹U+115F›‹U+1160›‹U+3164›‹U+FFA0›Full"),  # Hangul fillers
    ("Disk\ufff0\ufff9Full\ufffaprod\ufffb", "Disk‹U+FFF0›‹U+FFF9›Full‹U+FFFA›prod‹U+FFFB›"),  # interlinear annotation
    ("Disk\U0001D173Full\U0001BCA0", "Disk‹U+1D173›Full‹U+1BCA0›"),  # musical, shorthand format controls
    ("Disk\u17b4Full", "Disk‹U+17B4›Full"),
], ids=["tags", "vs1", "vs17", "soft-hyphen", "cgj", "mongolian", "deprecated", "hangul-fillers", "annotation",
        "musical-shorthand", "khmer"])
def test_a_character_drawn_as_nothing_is_shown(text, shown):
    assert visible(text) == shown


@pytest.mark.parametrize("text, shown", [
    # The presentation selector and tag characters are no emoji: a joiner
    # between them hid inside a name.
    ("Disk\ufe0f\u200d\ufe0fFull", "Disk‹U+FE0F›‹U+200D›‹U+FE0F›Full"),
    ("Disk" + tags("A") + "\u200d" + tags("B") + "Full", "Disk‹U+E0041›‹U+200D›‹U+E0042›Full"),
    ("Disk\u2192\u200d\u2192Full", "Disk→‹U+200D›→Full"),  # arrows are no emoji
    ("Disk\u2194\u200d\u2194\ufe0f", "Disk↔‹U+200D›↔️"),  # not even before an arrow in emoji presentation
    ("Disk\u2200\u200d\u2211", "Disk∀‹U+200D›∑"),  # nor mathematical operators
    ("Disk\u200dFull", "Disk‹U+200D›Full"),
    ("👩\u200d\u200d🚒", "👩‹U+200D›‹U+200D›🚒"),  # one joiner, not two
    ("👩\u200d\u202e🚒", "👩‹U+200D›‹U+202E›🚒"),
    ("👩\ufe0f\ufe0f\u200d🚒", "👩️‹U+FE0F›‹U+200D›🚒"),  # a single selector
    ("👩\u200d" + tags("x"), "👩‹U+200D›‹U+E0078›"),
    ("Disk\u200d", "Disk‹U+200D›"),
    ("1\ufe0f", "1‹U+FE0F›"),  # a keycap's selector only before the keycap
], ids=["vs16-joined", "tags-joined", "arrows", "arrow-to-emoji-arrow", "math", "letters", "two-joiners", "joiner-then-override", "two-selectors",
        "joiner-then-tag", "trailing", "vs16-no-keycap"])
def test_a_joiner_or_selector_next_to_anything_but_an_emoji_is_shown(text, shown):
    assert visible(text) == shown


@pytest.mark.parametrize("text", [
    "👩\u200d🚒",  # firefighter
    "👨\u200d👩\u200d👧\u200d👦",  # family
    "🧑🏽\u200d🚒",  # a skin tone before the joiner
    "❤️\u200d🔥",  # a selector before it
    "👁️\u200d🗨️",
    "🏳️\u200d🌈",
    "🐈\u200d⬛",
    "🏃\u200d➡️",
    "🙂\u200d↔\ufe0f", "🙂\u200d↕\ufe0f",  # head shaking (Emoji 15.1): an arrow in emoji presentation
    "⚠️ disk full", "ℹ️", "✅", "1️⃣", "#️⃣",
    "🇫🇷",  # a flag is two regional indicators, nothing hidden
])
def test_emoji_sequences_are_left_as_they_are_written(text):
    assert visible(text) == text


def test_a_subdivision_flag_is_shown_as_its_black_flag_and_its_tags():
    # The tag sequence grammar is not worth telling from a spoof: shown,
    # the flag of England cannot hide anything.
    england = "🏴" + tags("gbeng") + "\U000E007F"
    assert visible(england) == "🏴‹U+E0067›‹U+E0062›‹U+E0065›‹U+E006E›‹U+E0067›‹U+E007F›"


@pytest.mark.parametrize("text", [
    "می\u200cخواهم",  # Persian: "I want", a non-joiner inside the word
    "क्\u200dष",  # Devanagari: a joiner after the virama (a half form)
    "ক্\u200cষ",  # Bengali: a non-joiner breaks the conjunct
])
def test_a_joiner_between_letters_of_a_script_that_writes_words_with_it_is_kept(text):
    assert visible(text) == text


@pytest.mark.parametrize("text, shown", [
    ("Disk\u200cFull", "Disk‹U+200C›Full"),  # Latin has no use for it
    ("می\u200cFull", "می‹U+200C›Full"),  # between two scripts
    ("ی\u200c", "ی‹U+200C›"),
    ("שלום!\u200f", "שלום!‹U+200F›"),  # bidi marks are shown, even where they are used
])
def test_a_joiner_elsewhere_and_the_bidi_marks_are_shown(text, shown):
    assert visible(text) == shown


@pytest.mark.parametrize("text, shown", [
    ("Disk\x1b[31mFull\x1b[0m", "Disk‹U+001B›[31mFull‹U+001B›[0m"),  # an ANSI colour
    ("bell\x07 back\x08\x08 soh\x01 nul\x00", "bell‹U+0007› back‹U+0008›‹U+0008› soh‹U+0001› nul‹U+0000›"),
    ("line\u2028para\u2029", "line‹U+2028›para‹U+2029›"),
    ("cr\ronly", "cr‹U+000D›only"),
    ("next\x85line", "next‹U+0085›line"),  # NEL, a line break to splitlines()
    ("Disk\x9b31mFull\x7f", "Disk‹U+009B›31mFull‹U+007F›"),  # the 8-bit CSI, DEL
])
def test_control_characters_and_the_unicode_separators_are_shown(text, shown):
    assert visible(text) == shown
    assert visible(text, lines=False) == shown


def test_tabs_and_line_breaks_are_text_where_a_field_holds_lines_and_shown_in_one_line():
    assert visible("one\ttwo\nthree\r\nfour") == "one\ttwo\nthree\r\nfour"
    assert visible("one\ttwo\nthree\r\nfour", lines=False) == "one‹U+0009›two‹U+000A›three‹U+000D›‹U+000A›four"


def test_a_persian_word_reaches_slack_as_written_and_a_hidden_word_does_not():
    assert slack.fit(["می\u200cخواهم"], 100) == "می\u200cخواهم"
    assert slack.fit(["DiskFull" + tags("prod")], 100) == "DiskFull‹U+E0070›‹U+E0072›‹U+E006F›‹U+E0064›"


@pytest.mark.parametrize("limit", range(12, 30))
def test_a_shown_tag_is_never_cut_in_half(limit):
    text = slack.fit(["DiskFull" + tags("prod")], limit)
    assert utf16_len(text) <= limit and text.endswith(ELLIPSIS)
    assert text[:-1] in ["DiskFull"[:limit - 1]] + ["DiskFull" + "".join(f"‹U+{0xE0000 + ord(c):04X}›" for c in "prod"[:n]) for n in range(5)]
