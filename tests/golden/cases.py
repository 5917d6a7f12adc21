"""The fixed inputs of the golden files (shared by make_golden.py and the tests)."""

from pathlib import Path

TOP_K = 32
GREEDY_TOKENS = 64
PERPLEXITY_TOKENS = 1024
PERPLEXITY_WINDOW = 512
TINY_INPUT_IDS = [1, 5, 17, 33, 64, 2, 90, 11, 42, 42, 7, 3, 60, 61, 62, 95]

_STORY = (
    "Once upon a time, in a small village nestled between rolling hills and a quiet river, "
    "there lived an old clockmaker named Elias. Every morning he opened the shutters of his "
    "narrow shop, wound the dozens of clocks that lined its walls, and listened to them tick "
    "in a chorus that only he could understand. The villagers said that his clocks never lost "
    "a second, and travellers came from distant towns to buy them. One winter evening, a young "
    "girl knocked on his door holding a broken pocket watch that had belonged to her "
    "grandmother. The glass was cracked, the hands were bent, and the spring had snapped in "
    "two. Elias turned it over in his hands, studied the tiny engraving on its back, and "
    "smiled. He told her to come back in three days. For three nights the lamp in his window "
    "burned until dawn, and when the girl returned, the watch was ticking again. She held it "
    "to her ear, laughed, and asked him how he had known which pieces to replace. Elias "
    "pointed to the engraving, a pair of initials and a date, and explained that every watch "
    "remembers the hands that first wound it. On its face"
)
PROMPTS = [
    _STORY,
    "请用简单的语言解释一下为什么天空是蓝色的。",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n"
    "<|im_start|>assistant\n",
]
TOKENIZER_CASES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "Emoji: 🎉🚀👍🏽 and flags 🇫🇷 and ZWJ 👩‍💻",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "spaces:    four,\ttab,\t\ttwo tabs,\n\n\nthree newlines,  \n  trailing   ",
    "Numbers 1234567 and 3.14159, dates 2026-11-26, ids #42 @user",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "Ünïcödé àccents, Ελληνικά, русский текст, العربية, हिन्दी",
]


def perplexity_text() -> str:
    """A fixed English text that ships on every Debian machine."""
    return Path("/usr/share/common-licenses/GPL-3").read_text()
