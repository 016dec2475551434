"""`diffusionx evaluate`'s breakdown: per check, per object count, object/background color swaps."""

from diffusionx.bench.quality import attribute_details


class FixedPredictions:
    """Stands in for the evaluator: reads back the predictions it was given, one per image."""

    def __init__(self, predictions):
        self.predictions = predictions

    def predict_attributes(self, images):
        assert len(images) == len(self.predictions)
        return self.predictions


def obj(shape, color, size="large"):
    return {"shape": shape, "color": color, "size": size, "p": 0.9}


def test_swaps_and_object_counts():
    prompts = [
        "a large red circle on the left on a blue background",  # rendered swapped: blue circle on red
        "a large red circle on the left on a blue background",  # rendered right
        "a red circle and a green star, white background",  # two objects, no positions; right
        "a circle",  # nothing to swap: no colors named
        "a photo of a cat",  # not a world prompt: not scored
    ]
    predictions = [
        {"background": "red", "objects": {"left": obj("circle", "blue")}},
        {"background": "blue", "objects": {"left": obj("circle", "red")}},
        {"background": "white", "objects": {"top": obj("star", "green", "small"), "center": obj("circle", "red")}},
        {"background": "black", "objects": {"center": obj("square", "pink")}},
        {"background": "black", "objects": {}},
    ]
    details = attribute_details(FixedPredictions(predictions), [None] * 5, prompts)
    assert details["color_swap_images"] == 3 and details["color_swap_rate"] == 1 / 3
    one, two = details["by_object_count"]["1"], details["by_object_count"]["2"]
    assert one["n"] == 3 and two["n"] == 1 and two["attribute_accuracy"] == 1.0
    # colors: wrong in the swapped image, right in the other; the bare circle names none
    assert one["color"] == 0.5 and one["shape"] == 2 / 3 and one["background"] == 0.5
    assert details["per_attribute"]["position"] == 1.0


def test_evaluate_measures_refinement_of_the_edge_images(untrained_pair, tmp_path):
    import numpy as np

    from diffusionx.bench.quality import evaluate_pair, mean_psnr
    from diffusionx.world import generate_sessions

    a = np.zeros((8, 8, 3), np.uint8)
    assert mean_psnr([a], [a]) == 100.0 and abs(mean_psnr([a], [a + 1]) - 48.13) < 0.01
    report = evaluate_pair(untrained_pair, generate_sessions(2, "test"), tmp_path, steps=2, batch=2,
                           refine_strengths=(0.0, 0.5))
    keep, half = report["refinement"]
    assert keep["strength"] == 0.0 and keep["psnr_preview_final_db"] == 100.0  # strength 0 changes nothing
    assert half["psnr_preview_final_db"] < 100.0 and half["attribute_accuracy_vs_cloud"] is not None
    assert (tmp_path / "samples.png").exists() and "by_object_count" in report["cloud"]
