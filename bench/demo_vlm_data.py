"""Seeded pictures and templated questions for the built-in demo VLM (bench/demo_vlm_train.py).

A picture is either 1-4 copies of one shape in one colour (a single shape sits at the left,
right, top or bottom) or one short printed word, on a plain, noisy or two-tone background, at a
random size (48-192 px, square: the processor resizes to the tower's 64 px). Every question has
one answer word, so evaluation is exact: the lower-cased reply without its final full stop.

Splits never overlap: picture i of split s is drawn from `random.Random(f"{s}:{i}")`, and the
training stream uses split "train", evaluation "eval".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
}
POSITIONS = ("left", "right", "top", "bottom")
WORDS = ("cat", "dog", "sun", "car", "hat", "box", "cup", "fish", "moon", "tree", "bird", "book")
COUNT_WORDS = ("one", "two", "three", "four")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 235, 215), (60, 60, 60), (15, 15, 15))

QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": (
        "What shape is this?",
        "What shape do you see?",
        "Which shape is in the picture?",
        "What kind of shape is shown?",
        "Name the shape.",
    ),
    "colour": (
        "What colour is the shape?",
        "What color is it?",
        "Which colour are the shapes?",
        "What is the colour of the shape in the picture?",
        "Name the color.",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes do you see?",
        "Count the shapes.",
        "How many objects are in the picture?",
        "What is the number of shapes?",
    ),
    "position": (
        "Where is the shape?",
        "Where is the shape in the picture?",
        "On which side is the shape?",
        "Is the shape at the left, right, top or bottom?",
    ),
    "word": (
        "What word is written?",
        "What does the text say?",
        "Read the word.",
        "Which word is in the picture?",
    ),
    "text_colour": (
        "What colour is the text?",
        "What color is the word?",
    ),
}


@dataclass(frozen=True)
class Picture:
    """What a picture shows; `shape` is None for a word picture, `word` None for shapes."""

    image: Image.Image
    shape: str | None
    colour: str
    count: int
    position: str | None
    word: str | None
    # Where the shapes or the word are drawn (L mode, 255 inside) and each shape's centre in
    # pixels: training's per-patch targets (bench/demo_vlm_vision.py).
    mask: Image.Image | None = None
    centres: tuple[tuple[float, float], ...] = ()

    def answer(self, kind: str) -> str:
        """The one-word answer to a question of `kind` (a QUESTIONS key it has)."""
        if kind == "shape":
            return str(self.shape).capitalize()
        if kind in ("colour", "text_colour"):
            return self.colour.capitalize()
        if kind == "count":
            return str(self.count)
        if kind == "position":
            return str(self.position).capitalize()
        return str(self.word)

    def kinds(self) -> tuple[str, ...]:
        """The question kinds this picture answers."""
        if self.word is not None:
            return ("word", "text_colour")
        return ("shape", "colour", "count", "position") if self.position else (
            "shape", "colour", "count"
        )  # fmt: skip


def picture(split: str, index: int, word_share: float = 0.15) -> Picture:
    """Picture `index` of `split`: the same arguments give the same pixels and labels."""
    rng = random.Random(f"{split}:{index}")
    size = rng.randint(48, 192)
    background = _background(rng, size)
    colour = rng.choice(list(COLOURS))
    rgb = _jitter(rng, COLOURS[colour])
    mask = Image.new("L", (size, size), 0)
    if rng.random() < word_share:
        word = rng.choice(WORDS)
        spot = _word_spot(rng, background, word)
        _draw_word(background, word, rgb, spot)
        _draw_word(mask, word, 255, spot)
        return Picture(background, None, colour, 1, None, word, mask)
    shape = rng.choice(SHAPES)
    count = rng.randint(1, 4)
    draws = ((ImageDraw.Draw(background), rgb), (ImageDraw.Draw(mask), 255))
    if count == 1:
        position = rng.choice(POSITIONS)
        radius = size * rng.uniform(0.12, 0.2)
        centres = [_side_centre(rng, position, size, radius)]
    else:
        position = None
        radius = size * rng.uniform(0.07, 0.12)
        centres = _spread(rng, count, size, radius)
    for centre in centres:
        for draw, fill in draws:
            _draw_shape(draw, shape, centre, radius, fill)
    return Picture(background, shape, colour, count, position, None, mask, tuple(centres))


def plain_picture(
    shape: str, colour: str, position: str, size: int = 128, background: str = "white"
) -> Picture:
    """One mid-sized `shape` at `position` on a plain background: for tests."""
    rgb = {"white": (255, 255, 255), "black": (15, 15, 15)}[background]
    image = Image.new("RGB", (size, size), rgb)
    radius = size * 0.16
    centre = {
        "left": (size * 0.22, size / 2),
        "right": (size * 0.78, size / 2),
        "top": (size / 2, size * 0.22),
        "bottom": (size / 2, size * 0.78),
    }[position]
    _draw_shape(ImageDraw.Draw(image), shape, centre, radius, COLOURS[colour])
    return Picture(image, shape, colour, 1, position, None)


def question(rng: random.Random, pic: Picture) -> tuple[str, str, str]:
    """(kind, question, answer) for `pic`, phrasing drawn from `rng`."""
    kind = rng.choice(pic.kinds())
    return kind, rng.choice(QUESTIONS[kind]), pic.answer(kind)


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-20, 20))) for c in rgb)
    return r, g, b


def _background(rng: random.Random, size: int) -> Image.Image:
    base = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (size, size), _jitter(rng, base))
    style = rng.random()
    if style < 0.3:  # two tones, split at a random line
        other = rng.choice(BACKGROUNDS)
        cut = rng.randint(size // 4, 3 * size // 4)
        box = (0, cut, size, size) if rng.random() < 0.5 else (cut, 0, size, size)
        ImageDraw.Draw(image).rectangle(box, fill=_jitter(rng, other))
    elif style < 0.6:  # speckle noise
        grey = np.random.default_rng(rng.getrandbits(64)).normal(
            128, rng.uniform(10, 40), (size, size)
        )
        noise = Image.fromarray(grey.clip(0, 255).astype(np.uint8)).convert("RGB")
        image = Image.blend(image, noise, rng.uniform(0.1, 0.3))
    return image


def _side_centre(
    rng: random.Random, position: str, size: int, radius: float
) -> tuple[float, float]:
    """A centre well inside `position`'s side: one third of the picture from the middle."""
    near = rng.uniform(radius + 1, size * 0.3)
    far = size - near
    along = size / 2 + rng.uniform(-0.12, 0.12) * size
    return {
        "left": (near, along),
        "right": (far, along),
        "top": (along, near),
        "bottom": (along, far),
    }[position]


def _spread(rng: random.Random, count: int, size: int, radius: float) -> list[tuple[float, float]]:
    """`count` centres whose shapes neither overlap nor cross the edge (retry until they fit)."""
    while True:
        centres = [
            (rng.uniform(radius + 1, size - radius - 1), rng.uniform(radius + 1, size - radius - 1))
            for _ in range(count)
        ]
        if all(
            math.dist(a, b) > 2.3 * radius for i, a in enumerate(centres) for b in centres[i + 1 :]
        ):
            return centres


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    radius: float,
    rgb: tuple[int, int, int] | int,
) -> None:
    x, y = centre
    r = radius
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((x - s, y - s, x + s, y + s), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)], rgb)
    elif shape == "star":
        points = [
            (
                x + (r if k % 2 == 0 else r * 0.42) * math.sin(k * math.pi / 5),
                y - (r if k % 2 == 0 else r * 0.42) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(points, fill=rgb)
    else:  # heart: two lobes over a downward point
        lobe = r * 0.52
        draw.ellipse((x - 2 * lobe, y - r * 0.75, x, y - r * 0.75 + 2 * lobe), fill=rgb)
        draw.ellipse((x, y - r * 0.75, x + 2 * lobe, y - r * 0.75 + 2 * lobe), fill=rgb)
        draw.polygon([(x - r * 0.98, y - r * 0.12), (x + r * 0.98, y - r * 0.12), (x, y + r)], rgb)


def _word_spot(rng: random.Random, image: Image.Image, word: str) -> tuple[float, float, float]:
    """(font size, x, y) of `word` drawn at a random size and place wholly inside `image`."""
    size = image.width
    font_size = size * rng.uniform(0.2, 0.28)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), word, font=font)
    x = rng.uniform(0, max(0.0, size - (right - left))) - left
    y = rng.uniform(0, max(0.0, size - (bottom - top))) - top
    return font_size, x, y


def _draw_word(
    image: Image.Image,
    word: str,
    fill: tuple[int, int, int] | int,
    spot: tuple[float, float, float],
) -> None:
    font_size, x, y = spot
    ImageDraw.Draw(image).text((x, y), word, fill=fill, font=ImageFont.load_default(size=font_size))
