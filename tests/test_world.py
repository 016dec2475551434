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
    generate_sessions,
    parse_prompt,
    random_scene,
    read_jsonl,
    render,
    scene_split,
    write_jsonl,
)
from diffusionx.world.scene import POSITION_XY, RGB


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
    for bad in ("a photo of a cat", "", "a large red circle on the left", "red circle on the left, blue background",
                "a large red circle on a blue background", "a large red circle on the left 🙂 on a blue background"):
        assert parse_prompt(bad) is None, bad


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
            assert parse_prompt(r["prompt"]) == scene.canonical()
            assert scene_split(scene) == "train"
    assert {"change_attribute", "add_detail", "reword"} <= seen_edits
    path = write_jsonl(sessions, tmp_path / "s.jsonl")
    assert read_jsonl(path) == sessions
    with pytest.raises(ValueError):
        generate_sessions(1, "dev")


def test_session_edits_are_what_they_say():
    for sess in generate_sessions(80, "validation"):
        for prev, cur in zip(sess["rounds"], sess["rounds"][1:]):
            a, b = Scene.from_dict(prev["scene"]), Scene.from_dict(cur["scene"])
            e = cur["edit"]
            if e in ("add_detail", "add_object"):
                assert set(a.objects) < set(b.objects) and len(b.objects) == len(a.objects) + 1
                new = (set(b.objects) - set(a.objects)).pop()
                assert new.size == ("small" if e == "add_detail" else "large")
            elif e == "remove_object":
                assert set(b.objects) < set(a.objects)
            elif e == "change_background":
                assert a.objects == b.objects and a.background != b.background
            elif e == "reword":
                assert a == b and prev["prompt"] != cur["prompt"]
            elif e == "change_attribute":
                assert len(set(a.objects) ^ set(b.objects)) == 2 and a.background == b.background


def test_splits_disjoint():
    scenes = {}
    for split in ("train", "validation", "test"):
        sessions = generate_sessions(30, split)
        assert all(s["split"] == split and s["id"].startswith(split) for s in sessions)
        scenes[split] = {Scene.from_dict(r["scene"]).canonical() for s in sessions for r in s["rounds"]}
    assert not scenes["train"] & scenes["test"]
    assert not scenes["train"] & scenes["validation"]
    assert not scenes["validation"] & scenes["test"]
