"""Characters that reorder or hide text, made visible wherever a person
reads what an alert said.

Unicode names the characters a renderer draws as nothing
(Default_Ignorable_Code_Point: zero-width spaces and joiners, the soft
hyphen, variation selectors, tag characters, Hangul fillers, the
combining grapheme joiner, the musical and shorthand format controls, the
deprecated U+206A–U+206F…); with the bidirectional controls (U+202A–U+202E
embeddings and overrides, U+2066–U+2069 isolates, the marks U+200E, U+200F,
U+061C), which reorder the text around them, and the interlinear annotation
controls U+FFF9–U+FFFB, which hide what they enclose, they spoof an alert
name ("trojan source": a ``DiskFull`` that reads as something else, a
``DiskFull`` followed by tag characters spelling "prod" that no one sees).
The control characters are shown too: the C0 controls U+0000–U+001F (an
ANSI escape ``\x1b[31m`` that recolours a terminal or a log viewer, a
bell, a backspace that overwrites what came before), DEL and the C1
controls U+007F–U+009F (NEL, a line break; CSI, an escape) and the line and
paragraph separators U+2028/U+2029 (a line break a one-line field was
never meant to hold). A tab, a line feed and a carriage return before a
line feed are text where a field holds lines (a description, an error);
a field of one line (a header, a summary line, PagerDuty's summary,
source, class and group) shows them too (``lines=False``).

The stored record keeps them all as they came (the JSON API returns them
as stored); every rendering for a person (the board and its report draft,
Slack, PagerDuty, Teams) shows each as ``‹U+202E›`` through :func:`visible`.

Kept, because they are how visible text is written and change how it is
drawn, never what it says:

- an emoji's presentation selector (U+FE0F) directly after an
  Extended_Pictographic character (``⚠️``), or after a keycap's base before
  U+20E3 (``1️⃣``);
- a zero-width joiner between two emoji (a family, ``👩‍🚒``, ``❤️‍🔥``):
  an Extended_Pictographic character from U+2600 up on each side, the one
  before it allowed a single U+FE0F or skin-tone modifier (U+1F3FB–U+1F3FF)
  after it. A joiner next to anything else (a letter, an arrow, a tag,
  another invisible) is shown;
- a zero-width non-joiner or joiner between two letters (or marks) of a
  script that writes words with them: Arabic script (Persian "می‌خواهم"),
  Syriac, and the Indic scripts (Devanagari to Sinhala: a half form, a
  conjunct broken). There it changes how the letters join, visibly.

Shown although they are not spoofing there: the marks U+200E/U+200F (a
Hebrew or Arabic sentence ending in punctuation carries one) and a tag
sequence (the flags of England, Scotland and Wales, "🏴" followed by tag
characters, are shown as the black flag and their tags): telling them from
a spoof would take the whole bidi algorithm or the tag sequence grammar,
and being shown, they cannot hide anything.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from typing import Iterator

# Default_Ignorable_Code_Point, as DerivedCoreProperties.txt of the Unicode
# Character Database lists it (unchanged since Unicode 9.0; the reserved
# code points in it included, so characters assigned there later are too).
# Python's unicodedata has no such property: tests/test_visible.py checks
# this table against the regex package's \p{Default_Ignorable_Code_Point}.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
# Bidi_Control (PropList.txt): all default ignorable too, named for what
# they do; and the interlinear annotation controls, which are not.
BIDI_CONTROLS = ((0x061C, 0x061C), (0x200E, 0x200F), (0x202A, 0x202E), (0x2066, 0x2069))
ANNOTATION_CONTROLS = ((0xFFF9, 0xFFFB),)
# The C0 controls, DEL and the C1 controls (U+0085 NEL ends a line, U+009B
# is the 8-bit CSI of a terminal escape), and the line and paragraph
# separators (Zl, Zp).
CONTROLS = ((0x0000, 0x001F), (0x007F, 0x009F), (0x2028, 0x2029))
# Text where a field holds lines.
_LINE_CONTROLS = frozenset("\t\n")


def _class(ranges) -> str:
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


HIDDEN = re.compile(f"[{_class(DEFAULT_IGNORABLE + BIDI_CONTROLS + ANNOTATION_CONTROLS + CONTROLS)}]")

# Extended_Pictographic, as emoji-data.txt lists it (reserved blocks
# included); checked against the regex package's property by the tests.
EXTENDED_PICTOGRAPHIC = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139),
    (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328), (0x23CF, 0x23CF), (0x23E9, 0x23F3),
    (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB), (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE),
    (0x2600, 0x2604), (0x260E, 0x260E), (0x2611, 0x2611), (0x2614, 0x2615), (0x2618, 0x2618), (0x261D, 0x261D),
    (0x2620, 0x2620), (0x2622, 0x2623), (0x2626, 0x2626), (0x262A, 0x262A), (0x262E, 0x262F), (0x2638, 0x263A),
    (0x2640, 0x2640), (0x2642, 0x2642), (0x2648, 0x2653), (0x265F, 0x2660), (0x2663, 0x2663), (0x2665, 0x2666),
    (0x2668, 0x2668), (0x267B, 0x267B), (0x267E, 0x267F), (0x2692, 0x2697), (0x2699, 0x2699), (0x269B, 0x269C),
    (0x26A0, 0x26A1), (0x26A7, 0x26A7), (0x26AA, 0x26AB), (0x26B0, 0x26B1), (0x26BD, 0x26BE), (0x26C4, 0x26C5),
    (0x26C8, 0x26C8), (0x26CE, 0x26CF), (0x26D1, 0x26D1), (0x26D3, 0x26D4), (0x26E9, 0x26EA), (0x26F0, 0x26F5),
    (0x26F7, 0x26FA), (0x26FD, 0x26FD), (0x2702, 0x2702), (0x2705, 0x2705), (0x2708, 0x270D), (0x270F, 0x270F),
    (0x2712, 0x2712), (0x2714, 0x2714), (0x2716, 0x2716), (0x271D, 0x271D), (0x2721, 0x2721), (0x2728, 0x2728),
    (0x2733, 0x2734), (0x2744, 0x2744), (0x2747, 0x2747), (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755),
    (0x2757, 0x2757), (0x2763, 0x2764), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0), (0x27BF, 0x27BF),
    (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55), (0x3030, 0x3030),
    (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299), (0x1F004, 0x1F004), (0x1F02C, 0x1F02F), (0x1F094, 0x1F09F),
    (0x1F0AF, 0x1F0B0), (0x1F0C0, 0x1F0C0), (0x1F0CF, 0x1F0D0), (0x1F0F6, 0x1F0FF), (0x1F170, 0x1F171),
    (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E), (0x1F191, 0x1F19A), (0x1F1AF, 0x1F1E5), (0x1F201, 0x1F20F),
    (0x1F21A, 0x1F21A), (0x1F22F, 0x1F22F), (0x1F232, 0x1F23A), (0x1F23C, 0x1F23F), (0x1F249, 0x1F25F),
    (0x1F266, 0x1F321), (0x1F324, 0x1F393), (0x1F396, 0x1F397), (0x1F399, 0x1F39B), (0x1F39E, 0x1F3F0),
    (0x1F3F3, 0x1F3F5), (0x1F3F7, 0x1F3FA), (0x1F400, 0x1F4FD), (0x1F4FF, 0x1F53D), (0x1F549, 0x1F54E),
    (0x1F550, 0x1F567), (0x1F56F, 0x1F570), (0x1F573, 0x1F57A), (0x1F587, 0x1F587), (0x1F58A, 0x1F58D),
    (0x1F590, 0x1F590), (0x1F595, 0x1F596), (0x1F5A4, 0x1F5A5), (0x1F5A8, 0x1F5A8), (0x1F5B1, 0x1F5B2),
    (0x1F5BC, 0x1F5BC), (0x1F5C2, 0x1F5C4), (0x1F5D1, 0x1F5D3), (0x1F5DC, 0x1F5DE), (0x1F5E1, 0x1F5E1),
    (0x1F5E3, 0x1F5E3), (0x1F5E8, 0x1F5E8), (0x1F5EF, 0x1F5EF), (0x1F5F3, 0x1F5F3), (0x1F5FA, 0x1F64F),
    (0x1F680, 0x1F6C5), (0x1F6CB, 0x1F6D2), (0x1F6D5, 0x1F6E5), (0x1F6E9, 0x1F6E9), (0x1F6EB, 0x1F6F0),
    (0x1F6F3, 0x1F6FF), (0x1F7DC, 0x1F7F0), (0x1F80C, 0x1F80F), (0x1F848, 0x1F84F), (0x1F85A, 0x1F85F),
    (0x1F888, 0x1F88F), (0x1F8AE, 0x1F8AF), (0x1F8BC, 0x1F8BF), (0x1F8C2, 0x1F8CF), (0x1F8D9, 0x1F8FF),
    (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945), (0x1F947, 0x1F9FF), (0x1FA58, 0x1FA5F), (0x1FA6E, 0x1FAFF),
    (0x1FC00, 0x1FFFD),
)
_EP_STARTS = [a for a, _ in EXTENDED_PICTOGRAPHIC]

_ZWNJ, _ZWJ, _VS16, _KEYCAP = "\u200c", "\u200d", "\ufe0f", "\u20e3"
_KEYCAP_BASES = frozenset("0123456789#*")
# Scripts that write words with ZWNJ/ZWJ between their letters: Arabic
# (with its supplement, extended blocks and presentation forms), Syriac,
# the Indic blocks from Devanagari to Sinhala.
_JOINING_SCRIPTS = ((0x0600, 0x074F), (0x0750, 0x077F), (0x0860, 0x08FF), (0x0900, 0x0DFF), (0xFB50, 0xFDFF),
                    (0xFE70, 0xFEFF))


def _pictographic(ch: str) -> bool:
    cp = ord(ch)
    at = bisect.bisect_right(_EP_STARTS, cp) - 1
    return at >= 0 and cp <= EXTENDED_PICTOGRAPHIC[at][1]


def _emoji(ch: str) -> bool:
    """A pictograph a ZWJ sequence is made of: Extended_Pictographic from
    U+2600 up (not ©, ™, the arrows, the clock faces of the BMP's lower
    blocks, which no sequence joins)."""
    return ord(ch) >= 0x2600 and _pictographic(ch)


def _skin_tone(ch: str) -> bool:
    return 0x1F3FB <= ord(ch) <= 0x1F3FF


def _script(ch: str) -> int | None:
    cp = ord(ch)
    return next((i for i, (a, b) in enumerate(_JOINING_SCRIPTS) if a <= cp <= b), None)


def _letter_or_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LM"


def _kept(text: str, at: int, lines: bool) -> bool:
    ch = text[at]
    before = text[at - 1] if at > 0 else ""
    after = text[at + 1] if at + 1 < len(text) else ""
    if ch < " ":
        return lines and (ch in _LINE_CONTROLS or (ch == "\r" and after == "\n"))
    if ch == _VS16:
        return bool(before) and (_pictographic(before) or (before in _KEYCAP_BASES and after == _KEYCAP))
    if ch not in (_ZWJ, _ZWNJ) or not before or not after:
        return False
    # After the joiner, a pictograph below U+2600 joins only in emoji
    # presentation (🙂‍↔️: U+2194 U+FE0F, Emoji 15.1); bare, it is an arrow.
    if ch == _ZWJ and (_emoji(after) or (_pictographic(after) and text[at + 2:at + 3] == _VS16)):
        # A single VS16 or skin tone may come between the emoji and its joiner.
        base = text[at - 2] if (before == _VS16 or _skin_tone(before)) and at > 1 else before
        if _emoji(base):
            return True
    script = _script(before)
    return script is not None and script == _script(after) and _letter_or_mark(before) and _letter_or_mark(after)


def _mark(ch: str) -> str:
    return f"‹U+{ord(ch):04X}›"


def visible_parts(text: str, lines: bool = True) -> Iterator[tuple[str, bool]]:
    """``text`` as (part, shown) pairs: runs of it as they are, and each
    character :func:`visible` shows, as its ``‹U+XXXX›`` alone (for a caller
    that must never cut one in half)."""
    start = 0
    for match in HIDDEN.finditer(text):
        at = match.start()
        if _kept(text, at, lines):
            continue
        if at > start:
            yield text[start:at], False
        yield _mark(match.group()), True
        start = at + 1
    if start < len(text):
        yield text[start:], False


def visible(text: str, lines: bool = True) -> str:
    """``text`` with every character that reorders or hides text written as
    ``‹U+XXXX›`` (the module says which are kept); anything else as it is.
    ``lines=False`` for a field of one line: its tabs and line breaks shown too."""
    if not HIDDEN.search(text):
        return text
    return "".join(part for part, _ in visible_parts(text, lines))


def visible_deep(value):
    """:func:`visible` on every string (and key) of a JSON-like value: a
    value may hold lines, a key is one line."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {visible(k, lines=False) if isinstance(k, str) else k: visible_deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [visible_deep(v) for v in value]
    return value
