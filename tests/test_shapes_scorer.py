"""The shapes world's scorer (tools/shapes_scorer.py) against drawn scenes whose answers are known: right on the
ground truth of many random scenes (plain and two-tone backgrounds, every shape, colour, size and cell), wrong
on planted mismatches (another colour, shape or cell named; an object missing; an object drawn twice); and the
training script's tokenizer, which must make every word of the world one token."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tools.shapes_scorer import find_objects, score
from tools.shapes_world import CELLS, COLOURS, SHAPES, Scene, Shape, caption, parse_caption, render, sample_scene

SIDE = 96


def _scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(count)]


def test_every_object_of_random_scenes_is_found_where_it_was_drawn():
    for scene in _scenes(200, seed=1):
        found = sorted((f.colour, f.shape, f.cell) for f in find_objects(render(scene, SIDE)))
        assert found == sorted((o.colour, o.shape, o.cell) for o in scene.objects), caption(scene)


def test_shapes_are_still_told_apart_when_blurred_like_a_vae_reconstruction():
    """A small triangle's tip rounds off under blur and its fill rises towards a circle's; its taper stays."""
    from PIL import ImageFilter

    for shape in SHAPES:
        for size in ("small", "large"):
            scene = Scene((Shape(shape, "green", size, "center"),), ("white", "white"))
            (found,) = find_objects(render(scene, 64).filter(ImageFilter.GaussianBlur(1.2)))
            assert (found.shape, found.cell) == (shape, "center"), (shape, size)


def test_the_true_caption_scores_correct_and_a_planted_mismatch_does_not():
    rng = random.Random(2)
    for scene in _scenes(60, seed=3):
        picture = render(scene, SIDE)
        truth = score(picture, caption(scene))
        assert truth["correct"] and truth["matched"] == len(scene.objects) and not truth["duplicated"]
        first = scene.objects[0]
        for field, choices in (("colour", sorted(COLOURS)), ("shape", SHAPES), ("cell", sorted(CELLS))):
            other = rng.choice([c for c in choices if c != getattr(first, field)])
            planted = Scene((replace(first, **{field: other}), *scene.objects[1:]), scene.background)
            result = score(picture, caption(planted))
            assert not result["correct"] and result["matched"] == len(scene.objects) - 1, (caption(planted), result)


def test_a_missing_object_and_a_drawn_copy_are_counted():
    drawn = Scene((Shape("circle", "red", "large", "top left"),), ("white", "white"))
    named = Scene((*drawn.objects, Shape("square", "blue", "small", "bottom")), drawn.background)
    result = score(render(drawn, SIDE), caption(named))
    assert result["matched"] == 1 and not result["correct"] and result["copies"] == {"red circle": 1, "blue square": 0}
    twice = Scene((*drawn.objects, Shape("circle", "red", "large", "bottom right")), ("grey", "black"))
    result = score(render(twice, SIDE), caption(drawn))
    assert result["duplicated"] and result["copies"] == {"red circle": 2} and result["extra"] == 1


def test_captions_outside_the_grammar_are_refused():
    assert parse_caption("a small red circle at the top left and a large blue square at the center") == [
        ("red", "circle", "top left"), ("blue", "square", "center")]
    for bad in ("a red circle", "a small purple circle at the top", "a small red circle at the moon"):
        with pytest.raises(ValueError, match="not a shapes-world caption"):
            parse_caption(bad)


def test_the_training_tokenizer_makes_every_word_of_the_world_one_token(tmp_path):
    from tools.train_shapes import world_words, write_tokenizer

    tokenizer = write_tokenizer(tmp_path)
    rng = random.Random(4)
    for scene in _scenes(20, seed=5) + [sample_scene(rng)]:
        text = caption(scene)
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[1:-1]
        assert [t.removesuffix("</w>") for t in tokens] == text.split()
    assert len({tokenizer(w).input_ids[1] for w in world_words()}) == len(world_words())


def test_the_dit_tokenizer_makes_every_word_of_the_world_one_piece(tmp_path):
    from tools.train_shapes import world_words, write_t5_tokenizer

    tokenizer = write_t5_tokenizer(tmp_path)
    for scene in _scenes(20, seed=6):
        text = caption(scene)
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
        assert tokens[-1] == "</s>" and [t.removeprefix("\u2581") for t in tokens[:-1]] == text.split()
    assert len({tokenizer(w).input_ids[0] for w in world_words()}) == len(world_words())
