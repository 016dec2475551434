from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from diffusionx.world import (
    COLORS,
    EDITS,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    canonical_caption,
    caption,
    caption_with_style,
    generate_sessions,
    parse_prompt,
    random_scene,
    read_jsonl,
    render,
    sample_style,
    scene_split,
    write_jsonl,
)
from diffusionx.world.captions import VOCABULARY_WORDS, named_part, partial_caption, unknown_words
from diffusionx.world.scene import OBJECT_ATTRIBUTES, POSITION_XY, RGB, complete
from diffusionx.world.sessions import normalize_session


def test_random_scene_constraints():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(500):
        s = random_scene(rng)
        counts.add(len(s.objects))
        assert 1 <= len(s.objects) <= 3
        assert len({o.position for o in s.objects}) == len(s.objects)
        assert all(o.color != s.background for o in s.objects)
        assert s.background in COLORS and all(o.shape in SHAPES for o in s.objects)
    assert counts == {1, 2, 3}
    assert len(random_scene(rng, n_objects=3).objects) == 3


def test_scene_dict_round_trip():
    s = random_scene(np.random.default_rng(1), 3)
    assert Scene.from_dict(s.to_dict()) == s


def test_render_deterministic_and_distinct():
    rng = np.random.default_rng(2)
    a, b = random_scene(rng), random_scene(rng)
    img = render(a)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert np.array_equal(img, render(a))
    assert not np.array_equal(img, render(b))
    assert render(a, size=32).shape == (32, 32, 3)
    jittered = render(a, rng=np.random.default_rng(3))
    assert jittered.shape == img.shape and not np.array_equal(jittered, img)
    # Anti-aliased: some pixels are mixtures of the two colors.
    s = Scene((SceneObject("circle", "white", "large", "center"),), "black")
    values = set(np.unique(render(s)[..., 0]).tolist())
    assert len(values - {RGB["white"][0], RGB["black"][0]}) > 3


@pytest.mark.parametrize("position", POSITIONS)
def test_color_lands_at_position(position):
    s = Scene((SceneObject("square", "red", "small", position),), "blue")
    img = render(s).astype(int)
    fx, fy = POSITION_XY[position]
    cy, cx = int(fy * 64), int(fx * 64)
    assert tuple(img[cy, cx]) == RGB["red"]
    red = (np.abs(img - np.array(RGB["red"])).sum(-1) < 30)
    ys, xs = np.nonzero(red)
    assert abs(ys.mean() - fy * 64) < 2 and abs(xs.mean() - fx * 64) < 2
    assert tuple(img[0, 0]) == RGB["blue"] or position == "top left"


def test_sizes_and_shapes_differ():
    def area(shape, size):
        img = render(Scene((SceneObject(shape, "white", size, "center"),), "black"))
        return (img[..., 0] > 128).mean()

    assert 0.1 < area("circle", "large") < 0.16 and 0.02 < area("circle", "small") < 0.045
    imgs = [render(Scene((SceneObject(sh, "white", "large", "center"),), "black")) for sh in SHAPES]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i].astype(int) - imgs[j]).mean() > 2


def test_caption_parse_round_trip():
    rng = np.random.default_rng(4)
    captions = set()
    for _ in range(3000):
        s = random_scene(rng)
        c = caption(s, rng)
        captions.add(c)
        parsed = parse_prompt(c)
        assert parsed is not None, c
        assert set(parsed.objects) == set(s.objects) and parsed.background == s.background, c
        assert parsed == s.canonical()
    assert len(captions) > 2900  # paraphrases vary
    s = random_scene(rng)
    assert parse_prompt(canonical_caption(s)) == s


def test_caption_examples_and_rejections():
    s = Scene((SceneObject("circle", "red", "large", "left"),), "blue")
    assert parse_prompt("a large red circle on the left on a blue background") == s
    assert parse_prompt("blue background, big red circle at the left") == s
    assert parse_prompt("Blue background, big red circle at the left.") == s
    # partial prompts name part of a scene: what they leave out is None
    assert parse_prompt("a large red circle on the left") == Scene((SceneObject("circle", "red", "large", "left"),))
    red_left = Scene((SceneObject("circle", "red", None, "left"),), "blue")
    assert parse_prompt("red circle on the left, blue background") == red_left
    red_large = Scene((SceneObject("circle", "red", "large"),), "blue")
    assert parse_prompt("a large red circle on a blue background") == red_large
    for bad in ("a photo of a cat", "", "   ", "a large red circle on the left 🙂 on a blue background", "red",
                "a big red", "background", "a red circle on a blue background on a green background",
                "a circle on the left on the right", "a circle, a square, a star and a heart",
                "a circle on the left and a square on the left", "circles", "two circles on the left", None, 3):
        assert parse_prompt(bad) is None, bad


@pytest.mark.parametrize(
    ("prompt", "objects", "background"),
    [
        ("a circle", [("circle", None, None, None)], None),
        ("heart", [("heart", None, None, None)], None),
        ("square on the left", [("square", None, None, "left")], None),
        ("a red star in the top left", [("star", "red", None, "top left")], None),
        ("heart, black background", [("heart", None, None, None)], "black"),
        ("a blue background", [], "blue"),
        ("the background is blue", [], "blue"),
        ("Tiny heart, upper right.", [("heart", None, "small", "top right")], None),
        ("a huge star in the top-left corner", [("star", None, "large", "top left")], None),
        ("a red circle with a blue backdrop", [("circle", "red", None, None)], "blue"),
        ("in the middle, a circle", [("circle", None, None, "center")], None),
        ("a circle at the top center", [("circle", None, None, "top")], None),
        ("a red star on white", [("star", "red", None, None)], "white"),
        ("a red circle, background blue", [("circle", "red", None, None)], "blue"),
        ("two red circles", [("circle", "red", None, None)] * 2, None),
        ("a circle and two small squares",
         [("circle", None, None, None), ("square", None, "small", None), ("square", None, "small", None)], None),
        ("a circle on the left and a square", [("circle", None, None, "left"), ("square", None, None, None)], None),
        ("a circle and a square on the right", [("circle", None, None, None), ("square", None, None, "right")], None),
    ],
)
def test_partial_prompts_parse(prompt, objects, background):
    want = Scene(tuple(SceneObject(*o) for o in objects), background).canonical()
    assert parse_prompt(prompt) == want


def test_unknown_words():
    assert unknown_words("a photo of a cat") == ["photo", "cat"]
    assert unknown_words("A big red circle, top-left.") == []
    assert unknown_words("a cat and a cat") == ["cat"]
    assert {"circle", "red", "big", "backdrop", "upper"} <= VOCABULARY_WORDS


def test_partial_caption_round_trip():
    rng = np.random.default_rng(5)
    partial = 0
    for _ in range(3000):
        full = random_scene(rng)
        named = named_part(full, rng, complete_share=0.0)
        partial += not named.is_complete
        text = caption_with_style(named, sample_style(rng))
        assert parse_prompt(text) == named.canonical(), text
        assert parse_prompt(partial_caption(full, rng)) is not None
    assert partial > 2500
    backdrop = Scene((), "green")
    assert parse_prompt(caption_with_style(backdrop, sample_style(rng))) == backdrop
    with pytest.raises(ValueError):
        caption_with_style(Scene(()), sample_style(rng))


def test_named_part_and_complete():
    rng = np.random.default_rng(6)
    for _ in range(500):
        full = random_scene(rng)
        named = named_part(full, rng)
        assert [o.shape for o in named.objects] == [o.shape for o in full.objects]
        done = complete(named, rng)
        assert done.is_complete and len(done.objects) == len(named.objects)
        assert len({o.position for o in done.objects}) == len(done.objects)
        assert all(o.color != done.background for o in done.objects)
        if named.background is not None:
            assert done.background == named.background
        for o in named.objects:  # every named attribute is kept by some completed object
            assert any(
                all(getattr(o, a) in (None, getattr(d, a)) for a in OBJECT_ATTRIBUTES)
                for d in done.objects
            ), (named, done)
        assert complete(full, rng) == full.canonical()
        render(done)
    assert complete(Scene((), "red"), rng) == Scene((), "red")
    assert complete(Scene((SceneObject("circle"),)), np.random.default_rng(0)) == complete(
        Scene((SceneObject("circle"),)), np.random.default_rng(0)
    )


def test_render_refuses_partial_scenes():
    no_position = Scene((SceneObject("circle", "red", "large"),), "blue")
    no_background = Scene((SceneObject("circle", "red", "large", "left"),))
    for partial in (no_position, no_background):
        assert not partial.is_complete
        with pytest.raises(ValueError, match="partial"):
            render(partial)
    assert Scene((), "blue").is_complete
    assert render(Scene((), "blue")).shape == (64, 64, 3)
    assert Scene((SceneObject("circle", None, "large"),), "blue").named_attributes() == 3


def test_normalize_session_plain_strings():
    raw = {"rounds": ["a circle", {"prompt": "a red circle"}, "a photo of a cat"]}
    sess = normalize_session(raw, 7)
    assert sess["id"] == "session-00007"
    assert [r["prompt"] for r in sess["rounds"]] == ["a circle", "a red circle", "a photo of a cat"]
    assert Scene.from_dict(sess["rounds"][0]["scene"]) == Scene((SceneObject("circle"),))
    assert Scene.from_dict(sess["rounds"][1]["scene"]) == Scene((SceneObject("circle", "red"),))
    assert sess["rounds"][2]["scene"] is None
    assert [r["edit"] for r in sess["rounds"]] == ["start", None, None]
    generated = generate_sessions(2, "test")
    assert [normalize_session(s) for s in generated] == generated  # object rounds pass through
    for bad in ({}, {"rounds": []}, {"rounds": [""]}, {"rounds": [3]}, {"rounds": [{"scene": None}]}, []):
        with pytest.raises(ValueError):
            normalize_session(bad)


def test_sessions_schema_and_determinism(tmp_path):
    sessions = generate_sessions(40, "train")
    assert sessions == generate_sessions(40, "train")
    seen_edits = set()
    for sess in sessions:
        assert sess["split"] == "train" and 3 <= len(sess["rounds"]) <= 8
        assert sess["rounds"][0]["edit"] == "start"
        for r in sess["rounds"]:
            assert r["edit"] in EDITS
            seen_edits.add(r["edit"])
            scene = Scene.from_dict(r["scene"])
            assert parse_prompt(r["prompt"]) == scene == scene.canonical()
            if scene.is_complete:  # a partial scene has no split of its own; its hidden scene has
                assert scene_split(scene) == "train"
    assert {"change_attribute", "add_detail", "reword"} <= seen_edits
    path = write_jsonl(sessions, tmp_path / "s.jsonl")
    assert read_jsonl(path) == sessions
    with pytest.raises(ValueError):
        generate_sessions(1, "dev")


def test_every_generated_round_parses_to_its_scene():
    for split in ("train", "validation", "test"):
        for sess in generate_sessions(60, split):
            for r in sess["rounds"]:
                assert parse_prompt(r["prompt"]) == Scene.from_dict(r["scene"]), r


def test_session_edit_mix():
    """DiffusionDB's near-duplicate edits: 74% replace, 18% add, 7% delete; vague starts common."""
    sessions = generate_sessions(200, "validation")
    edits = Counter(r["edit"] for s in sessions for r in s["rounds"][1:])
    replace = edits["change_attribute"] + edits["change_background"]
    add = edits["add_detail"] + edits["add_object"]
    delete = edits["drop_detail"] + edits["remove_object"]
    assert replace > 2 * (add + delete) and add > 1.5 * delete > 0
    assert 0.6 < replace / (replace + add + delete) < 0.85
    assert edits["reword"] > 0 and edits["start_over"] > 0
    starts = [Scene.from_dict(s["rounds"][0]["scene"]) for s in sessions]
    vague = sum(not s.is_complete for s in starts) / len(starts)
    assert 0.5 < vague < 0.9
    assert any(r["scene"]["objects"] and Scene.from_dict(r["scene"]).is_complete for s in sessions for r in s["rounds"])


def test_session_edits_are_what_they_say():
    for sess in generate_sessions(120, "validation"):
        for prev, cur in zip(sess["rounds"], sess["rounds"][1:]):
            a, b = Scene.from_dict(prev["scene"]), Scene.from_dict(cur["scene"])
            e = cur["edit"]
            ca, cb = Counter(a.objects), Counter(b.objects)
            if e == "add_detail":
                assert len(a.objects) == len(b.objects) and b.named_attributes() == a.named_attributes() + 1
            elif e == "drop_detail":
                assert len(a.objects) == len(b.objects) and b.named_attributes() == a.named_attributes() - 1
                assert b.objects or b.background is not None
            elif e == "add_object":
                assert len(b.objects) == len(a.objects) + 1 and not ca - cb and a.background == b.background
            elif e == "remove_object":
                assert len(b.objects) == len(a.objects) - 1 and not cb - ca and a.background == b.background
            elif e == "change_background":
                assert a.objects == b.objects and None not in (a.background, b.background)
                assert a.background != b.background
            elif e == "reword":
                assert a == b and prev["prompt"] != cur["prompt"]
            elif e == "change_attribute":
                gone, came = list((ca - cb).elements()), list((cb - ca).elements())
                assert len(gone) == len(came) == 1 and a.background == b.background
                diffs = [f for f in OBJECT_ATTRIBUTES if getattr(gone[0], f) != getattr(came[0], f)]
                assert len(diffs) == 1 and None not in (getattr(gone[0], diffs[0]), getattr(came[0], diffs[0]))
            else:
                assert e == "start_over"


def test_splits_disjoint():
    """Complete rounds (the hidden scene itself) of the three splits never share a scene."""
    scenes = {}
    for split in ("train", "validation", "test"):
        sessions = generate_sessions(60, split)
        assert all(s["split"] == split and s["id"].startswith(split) for s in sessions)
        complete_rounds = [Scene.from_dict(r["scene"]) for s in sessions for r in s["rounds"]]
        scenes[split] = {s.canonical() for s in complete_rounds if s.is_complete and s.objects}
        assert len(scenes[split]) > 30
    assert not scenes["train"] & scenes["test"]
    assert not scenes["train"] & scenes["validation"]
    assert not scenes["validation"] & scenes["test"]


HANDWRITTEN = Path(__file__).parent / "data" / "handwritten_sessions.jsonl"


def test_handwritten_sessions_parse_to_what_a_person_means():
    """30 sessions written by hand as a person iterates on a prompt, each round with the scene the
    person means (written by hand, not by the parser): >= 95% of rounds must parse to exactly it."""
    sessions = read_jsonl(HANDWRITTEN)
    assert len(sessions) == 30 and all(3 <= len(s["rounds"]) <= 8 for s in sessions)
    rounds = [r for s in sessions for r in s["rounds"]]
    wrong = [r["prompt"] for r in rounds if parse_prompt(r["prompt"]) != Scene.from_dict(r["scene"]).canonical()]
    assert len(wrong) <= 0.05 * len(rounds), wrong
    assert not wrong, wrong  # every one, today
    assert all(not unknown_words(r["prompt"]) for r in rounds)
    # the file is a sessions file: its rounds read as they are, and as plain strings
    plain = [normalize_session({"rounds": [r["prompt"] for r in s["rounds"]]}) for s in sessions]
    assert all(r["scene"] is not None for s in plain for r in s["rounds"])
