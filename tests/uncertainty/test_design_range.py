"""Where a new design lies against the training designs (uncertainty.design_range): the typical neighbour distance,
the nearest training design, the parameters outside the training range and the verdict, in one space or several."""
import numpy as np
import torch

from modules.uncertainty.design_range import FAR, design_spaces, placement, placement_summary, training_reference

GRID = np.array([[x, y] for x in range(5) for y in range(5)], dtype=np.float64)  # spacing 1


def test_the_typical_distance_is_the_median_spacing_of_the_training_designs():
    reference = training_reference({"parameters": GRID}, np.arange(100, 125), raw=GRID * 10, names=["a", "b"])
    assert reference["spaces"]["parameters"]["typical_distance"] == 1.0
    assert reference["low"] == [0.0, 0.0] and reference["high"] == [40.0, 40.0]
    assert reference["dataset_indices"][:2] == [100, 101]


def test_a_design_inside_the_box_is_not_flagged_and_one_outside_is_named_with_why():
    reference = training_reference({"parameters": GRID}, np.arange(100, 125), raw=GRID * 10, names=["a", "b"])
    points = np.array([[2.4, 2.5], [2.0, 2.0 + FAR + 0.5], [9.0, 9.0]])
    rows = placement(reference, {"parameters": points}, ["row 1", "row 2", "row 3"], raw=points * 10)
    assert [row["outside"] for row in rows] == [False, True, True]
    nearest = rows[0]["spaces"]["parameters"]
    assert nearest["nearest_training_design"] == 100 + 2 * 5 + 2 and nearest["distance_ratio"] < 1
    assert [p["name"] for p in rows[2]["parameters_outside_training_range"]] == ["a", "b"]
    summary = placement_summary(rows)
    assert summary.startswith("2 of 3 designs lie outside what the conditioner was trained on")
    assert "row 3: a = 90 outside [0, 40]; b = 90 outside [0, 40]" in summary and "row 1" not in summary
    assert placement_summary(rows[:1]) is None


def test_images_are_outside_when_far_in_either_space():
    reference = training_reference({"pixels": GRID, "features": GRID}, np.arange(25))
    spaces = {"pixels": np.array([[1.0, 1.2], [1.0, 1.2], [30.0, 30.0]]),
              "features": np.array([[1.0, 1.2], [30.0, 30.0], [1.0, 1.2]])}
    rows = placement(reference, spaces, ["a.png", "b.png", "c.png"])
    assert [row["outside"] for row in rows] == [False, True, True]
    assert "in features" in placement_summary(rows) and "in pixels" in placement_summary(rows)
    assert rows[1]["parameters_outside_training_range"] == []


class Features(torch.nn.Module):
    def features(self, images):
        return images.mean(dim=(2, 3))


def test_images_are_compared_as_pooled_pixels_and_as_the_network_s_features():
    images = torch.rand(5, 3, 64, 64)
    spaces = design_spaces(Features(), "images", images, batch_size=2)
    assert spaces["pixels"].shape == (5, 3 * 16 * 16) and spaces["features"].shape == (5, 3)
    np.testing.assert_allclose(spaces["features"], images.mean(dim=(2, 3)).double().numpy(), rtol=1e-6)
    parameters = torch.rand(4, 2)
    assert np.array_equal(design_spaces(None, "parameters", parameters, 2)["parameters"], parameters.double().numpy())
