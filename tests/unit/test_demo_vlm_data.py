"""bench/demo_vlm_data.py and demo_vlm_eval.py's scoring: pictures are a pure function of
(split, index), the splits differ, labels match the pixels, answers parse exactly."""

from __future__ import annotations

import random

from fovea.bench.demo_vlm_data import COLOURS, QUESTIONS, picture, plain_picture, question
from fovea.bench.demo_vlm_eval import eval_pictures, is_right, questions


def test_a_picture_is_a_pure_function_of_split_and_index() -> None:
    a, b = picture("train", 7), picture("train", 7)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.shape, a.colour, a.count, a.position, a.word) == (
        b.shape, b.colour, b.count, b.position, b.word
    )  # fmt: skip


def test_the_eval_split_shares_no_picture_with_training() -> None:
    train = {picture("train", i).image.tobytes() for i in range(300)}
    assert not any(p.image.tobytes() in train for p in eval_pictures(100))


def test_eval_pictures_show_shapes_and_every_count() -> None:
    pics = eval_pictures(200)
    assert all(p.shape is not None and p.word is None for p in pics)
    assert sorted({p.count for p in pics}) == [1, 2, 3, 4]


def test_a_plain_picture_has_its_colour_where_its_shape_is() -> None:
    pic = plain_picture("square", "blue", "top", size=100)
    assert pic.image.getpixel((50, 22)) == COLOURS["blue"]
    assert pic.image.getpixel((50, 78)) == (255, 255, 255)
    assert [pic.answer(k) for k in ("shape", "colour", "count", "position")] == [
        "Square", "Blue", "1", "Top"
    ]  # fmt: skip


def test_questions_come_from_the_picture_kinds() -> None:
    rng = random.Random(0)
    word = next(p for p in (picture("train", i) for i in range(100)) if p.word)
    kind, text, answer = question(rng, word)
    assert kind in ("word", "text_colour") and text in QUESTIONS[kind]
    assert answer == (word.word if kind == "word" else word.colour.capitalize())


def test_every_eval_picture_is_asked_shape_colour_and_count() -> None:
    qs = questions(2)
    assert [(i, k) for i, k, _ in qs] == [
        (0, "shape"), (0, "colour"), (0, "count"), (1, "shape"), (1, "colour"), (1, "count")
    ]  # fmt: skip


def test_replies_are_scored_on_their_first_word() -> None:
    assert is_right("Red", "Red") and is_right("red.", "Red") and is_right("Three", "3")
    assert not is_right("Reddish", "Red") and not is_right("", "Red")
    assert not is_right("It is red", "Red")
