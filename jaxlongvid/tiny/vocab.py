"""The fixed vocabulary of the tiny model's synthetic world (shapes, colours, motions, backgrounds).

Everything the data generator can draw, every caption it can write and every prompt the benchmark can parse
comes from the tables below, so the word-level tokenizer is built from :data:`WORDS` and never meets an unknown
word on in-distribution text.

Colour design: object colours are the six fully saturated primaries and secondaries, 60 degrees apart in hue;
every background is achromatic (R = G = B). An object pixel therefore has chroma (max - min channel) of at
least 128 (the dark cells of the patterned shape) and a background pixel has chroma 0, so objects separate
from any background by thresholding chroma, and colours separate from each other by hue.
"""

from __future__ import annotations

# name -> RGB (uint8). Hues 0, 60, ..., 300 degrees, in hue order.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "magenta": (255, 0, 255),
}
COLOUR_HUES: dict[str, float] = {name: 60.0 * i for i, name in enumerate(COLOURS)}

# Shapes; "checkered square" is the patterned kind: cells alternate the full colour and half its intensity, so
# blur or lost detail is visible as a flat square.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "checkered square")
PATTERNED_SHAPES: tuple[str, ...] = ("checkered square",)
DARK_CELL_FACTOR = 0.5  # intensity of the checker's dark cells relative to the full colour

# motion name -> caption phrase
MOTIONS: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "bouncing": "bouncing",
    "circling": "circling",
    "still": "standing still",
}
LINEAR_MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOVING_MOTIONS: tuple[str, ...] = tuple(m for m in MOTIONS if m != "still")

# Backgrounds (all achromatic). Plain ones by grey level; the others are drawn per scene.
PLAIN_BACKGROUNDS: dict[str, int] = {"black": 0, "gray": 128, "white": 255}
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "white", "gradient", "striped", "textured")

# Caption templates: one object, or two joined by "and"; the background part may be left out.
OBJECT_TEMPLATE = "a {colour} {shape} {motion}"
BACKGROUND_TEMPLATE = "on a {background} background"


def _template_words() -> set[str]:
    words = set()
    for template in (OBJECT_TEMPLATE, BACKGROUND_TEMPLATE):
        words.update(w for w in template.split() if not w.startswith("{"))
    return words | {"and"}


def _all_words() -> tuple[str, ...]:
    words = _template_words()
    for phrase in (*COLOURS, *SHAPES, *MOTIONS.values(), *BACKGROUNDS):
        words.update(phrase.split())
    return tuple(sorted(words))


# Every word a caption can contain, sorted: the tokenizer's vocabulary (plus its own special tokens).
WORDS: tuple[str, ...] = _all_words()
