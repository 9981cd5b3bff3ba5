"""Display names (uploads.filenames): whatever a client sends becomes a name safe to show and to serve."""

import unicodedata

import pytest

from uploads.filenames import FALLBACK_NAME, MAX_DISPLAY_NAME, display_name, stored_original


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        pytest.param("holiday.mov", "holiday.mov", id="plain"),
        pytest.param("My Report (final) v2.docx", "My Report (final) v2.docx", id="spaces-and-brackets"),
        pytest.param("Ünïcödé 文件.txt", "Ünïcödé 文件.txt", id="unicode"),
        pytest.param("../../etc/passwd", "passwd", id="slash-dotdot"),
        pytest.param("/etc/shadow", "shadow", id="absolute"),
        pytest.param("..\\..\\boot.ini", "boot.ini", id="backslash-dotdot"),
        pytest.param("C:\\Users\\alice\\cv.pdf", "cv.pdf", id="windows-path"),
        pytest.param("mixed/seps\\name.txt", "name.txt", id="mixed-separators"),
        pytest.param("folder/", "folder", id="trailing-slash"),
        pytest.param("..", FALLBACK_NAME, id="dotdot"),
        pytest.param(".", FALLBACK_NAME, id="dot"),
        pytest.param("a/..", FALLBACK_NAME, id="ends-in-dotdot"),
        pytest.param("", FALLBACK_NAME, id="empty"),
        pytest.param("   ", FALLBACK_NAME, id="blank"),
        pytest.param("report\x00.pdf", "report.pdf", id="nul"),
        pytest.param("\x00\x01\x02", FALLBACK_NAME, id="only-controls"),
        pytest.param("bell\x07.txt", "bell.txt", id="bell"),
        pytest.param("esc\x1b[2J.txt", "esc[2J.txt", id="escape-sequence"),
        pytest.param("two\nlines.txt", "twolines.txt", id="newline"),
        pytest.param("c1\x85\x9b.txt", "c1.txt", id="c1-controls"),
        pytest.param("photo\u202egpj.exe", "photogpj.exe", id="right-to-left-override"),
        pytest.param("\u2066isolate\u2069.txt", "isolate.txt", id="bidi-isolate"),
        pytest.param("zero\u200bwidth\u200d.txt", "zerowidth.txt", id="zero-width"),
        pytest.param("many    spaces\u00a0here.txt", "many spaces here.txt", id="collapsed-whitespace"),
        pytest.param(".hidden", "hidden", id="leading-dot"),
        pytest.param(" . name.txt", "name.txt", id="leading-dots-and-spaces"),
        pytest.param("name.txt. . ", "name.txt", id="trailing-dots-and-spaces"),
        pytest.param("CON", "_CON", id="con"),
        pytest.param("nul.txt", "_nul.txt", id="nul-device"),
        pytest.param("com1.tar.gz", "_com1.tar.gz", id="com1"),
        pytest.param("LPT9.log", "_LPT9.log", id="lpt9"),
        pytest.param("CONSOLE.txt", "CONSOLE.txt", id="not-a-device"),
        pytest.param("e\u0301te\u0301.txt", "\u00e9t\u00e9.txt", id="nfc"),
    ],
)
def test_display_name(raw, shown):
    assert display_name(raw) == shown


def test_a_10000_character_name_is_cut_to_255():
    assert display_name("a" * 10_000) == "a" * MAX_DISPLAY_NAME


def test_a_long_name_keeps_its_extension():
    assert display_name("b" * 9_996 + ".pdf") == "b" * 251 + ".pdf"


def test_a_long_name_with_an_overlong_extension_is_cut_plainly():
    name = "a." + "x" * 300

    assert display_name(name) == name[:MAX_DISPLAY_NAME]


def test_a_name_of_exactly_255_characters_is_kept():
    name = "c" * 251 + ".txt"

    assert display_name(name) == name


@pytest.mark.parametrize(
    "raw",
    [
        "../" * 5000,
        "\u202e" * 10_000,
        "\x00" * 10_000,
        "a\u202e/" * 3000 + "b.txt",
        "\U0001d4bb\U0001d4be\U0001d4c1\u212f" * 2500,  # script letters outside the BMP
        "x\\" * 5000,
    ],
)
def test_every_display_name_is_short_and_free_of_separators_and_invisible_characters(raw):
    shown = display_name(raw)

    assert 1 <= len(shown) <= MAX_DISPLAY_NAME
    assert "/" not in shown
    assert "\\" not in shown
    assert not shown.startswith(".")
    assert all(unicodedata.category(ch) not in {"Cc", "Cf", "Cs"} for ch in shown)


def test_the_stored_original_keeps_everything_but_nul():
    raw = "../a\\b\u202e\x07" + "z" * 10_000

    assert stored_original(raw) == raw
    assert stored_original("a\x00b") == "a\ufffdb"
