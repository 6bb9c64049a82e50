"""What defines each design: the parameter CSV, the image folder, the pixels, and training-time image augmentation."""
import numpy as np
import pytest
import torch
from PIL import Image

from modules.data.design_inputs import (augment_images, check_image_count, image_channels, image_files, natural_key,
                                        read_condition_images, read_images, read_parameters)
from modules.errors import InputError

VALUES = np.array([[1e-3, -0.5, 10.0], [2.5, 0.0, -1e4], [3.0, 7.25, 0.1]])
ROWS = "1e-3,-0.5,10\n2.5,0,-1e4\n3,7.25,0.1\n"


def write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(call, *args, **kwargs) -> str:
    """The one-line message of the InputError that call raises."""
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value.message()


def save_image(folder, name, array, mode=None):
    path = folder / name
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


def mode_of(path) -> str:
    with Image.open(path) as image:
        return image.mode


def gray(value=128, shape=(8, 8)):
    return np.full(shape, value, dtype=np.uint8)


def colour(shape=(8, 8)):
    array = np.zeros(shape + (3,), dtype=np.uint8)
    array[..., 0] = 200  # red: R, G and B differ
    return array


# ---- parameter CSV

def test_csv_with_and_without_header_gives_identical_exact_values(tmp_path):
    with_header, names = read_parameters(write(tmp_path, "a.csv", "thickness,angle,load\n" + ROWS))
    without_header, no_names = read_parameters(write(tmp_path, "b.csv", ROWS))
    assert names == ["thickness", "angle", "load"] and no_names is None
    assert with_header.dtype == np.float64 and with_header.shape == (3, 3)
    np.testing.assert_array_equal(with_header, VALUES)  # exact: 1e-3 is the double 0.001
    np.testing.assert_array_equal(without_header, VALUES)


def test_semicolon_and_tab_separated_files_are_read(tmp_path):
    semicolon, _ = read_parameters(write(tmp_path, "s.csv", "a;b;c\n" + ROWS.replace(",", ";")))
    tab, _ = read_parameters(write(tmp_path, "t.csv", ROWS.replace(",", "\t")))
    np.testing.assert_array_equal(semicolon, VALUES)
    np.testing.assert_array_equal(tab, VALUES)


def test_byte_order_mark_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("\ufeffa,b,c\n\n" + ROWS.replace("\n", "\r\n", 1) + "\n\n").encode("utf-8"))
    values, names = read_parameters(path)
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(values, VALUES)


def test_missing_csv_is_refused(tmp_path):
    assert "nope.csv" in refused(read_parameters, tmp_path / "nope.csv")


def test_row_with_wrong_cell_count_names_line_and_counts(tmp_path):
    path = write(tmp_path, "p.csv", "a,b,c\n1,2,3\n\n4,5\n")
    message = refused(read_parameters, path)
    assert "p.csv:4:" in message and "2 cells" in message and "3" in message


def test_non_numeric_cell_names_line_column_and_header(tmp_path):
    message = refused(read_parameters, write(tmp_path, "p.csv", "a,b,c\n1,2,3\n4,5x,6\n"))
    assert "p.csv:3:" in message and "column 2 (b)" in message and "'5x'" in message


def test_decimal_comma_cell_is_refused_with_a_hint(tmp_path):
    message = refused(read_parameters, write(tmp_path, "p.csv", "a;b\n1,5;2\n"))
    assert "p.csv:2:" in message and "column 1" in message and "decimal point" in message


def test_typo_in_first_design_is_not_taken_for_a_header(tmp_path):
    message = refused(read_parameters, write(tmp_path, "p.csv", "1,2x,3\n4,5,6\n"))
    assert "p.csv:1:" in message and "mixes numbers" in message


@pytest.mark.parametrize("text", ["", "\n\n", "a,b,c\n", "a,b,c\n\n"])
def test_empty_or_header_only_file_has_no_data_rows(tmp_path, text):
    assert "p.csv" in (message := refused(read_parameters, write(tmp_path, "p.csv", text)))
    assert "has no data rows" in message


def test_num_param_mismatch_says_how_many_columns(tmp_path):
    path = write(tmp_path, "p.csv", ROWS)
    message = refused(read_parameters, path, num_param=4)
    assert "p.csv" in message and "has 3 columns but num_param is 4" in message and "set num_param 3" in message
    assert read_parameters(path, num_param=3)[0].shape == (3, 3)


@pytest.mark.parametrize("cell, problem", [("nan", "is nan"), ("inf", "is inf"), ("", "is empty")])
def test_nan_inf_or_empty_cell_names_line_and_column(tmp_path, cell, problem):
    message = refused(read_parameters, write(tmp_path, "p.csv", f"a,b\n1,2\n3,{cell}\n"))
    assert "p.csv:3:" in message and f"column 2 (b) {problem}" in message


# ---- image files and their order

def test_natural_key_sorts_numbers_by_value_and_text_ignoring_case():
    names = ["design_10.png", "Design_2.png", "design_1.png", "DESIGN_100.png", "design_3.png"]
    assert sorted(names, key=natural_key) == ["design_1.png", "Design_2.png", "design_3.png", "design_10.png",
                                              "DESIGN_100.png"]
    assert sorted(["b.png", "A.png", "c.png"], key=natural_key) == ["A.png", "b.png", "c.png"]


def test_image_files_natural_sorted_jpg_matches_jpeg_any_case(tmp_path):
    for name in ["d_10.jpg", "d_2.JPEG", "d_1.jpeg", "notes.txt", ".d_0.jpg"]:
        (tmp_path / name).write_bytes(b"")
    expected = ["d_1.jpeg", "d_2.JPEG", "d_10.jpg"]
    assert [f.name for f in image_files(tmp_path, ".jpg")] == expected
    assert [f.name for f in image_files(tmp_path, "jpeg")] == expected


def test_image_files_refuses_missing_folder_and_lists_what_is_there(tmp_path):
    assert "nowhere" in refused(image_files, tmp_path / "nowhere", ".png")
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    message = refused(image_files, tmp_path, ".png")
    assert str(tmp_path) in message and ".png" in message and ".jpg" in message and ".txt" in message


def files_named(folder, names):
    return [folder / name for name in names]


def test_image_count_matching_designs_passes(tmp_path):
    check_image_count(files_named(tmp_path, ["d_1.png", "d_2.png"]), 2, tmp_path, ".png")


def test_image_count_names_the_missing_image_in_the_middle(tmp_path):
    names = [f"design_{i:03d}.png" for i in range(1, 101) if i != 50]
    message = refused(check_image_count, files_named(tmp_path, names), 100, tmp_path, ".png")
    assert str(tmp_path) in message and "99" in message and "100" in message
    assert "design_050.png is missing (design_049.png is followed by design_051.png)" in message


def test_image_count_names_the_extra_image_at_the_end(tmp_path):
    names = [f"design_{i:03d}.png" for i in range(1, 98)]
    message = refused(check_image_count, files_named(tmp_path, names), 96, tmp_path, ".png")
    assert str(tmp_path) in message and "97" in message and "extra image design_097.png" in message


def test_image_count_without_numbers_names_first_and_last(tmp_path):
    message = refused(check_image_count, files_named(tmp_path, ["alpha.png", "beta.png", "gamma.png"]), 2,
                      tmp_path, ".png")
    assert str(tmp_path) in message and "alpha.png" in message and "gamma.png" in message
    assert "natural-sorted order" in message


# ---- pixels

def test_grayscale_png_has_one_channel(tmp_path):
    assert image_channels([save_image(tmp_path, "g.png", gray())]) == 1


def test_png_with_colour_has_three_channels(tmp_path):
    paths = [save_image(tmp_path, "g.png", gray()), save_image(tmp_path, "c.png", colour())]
    assert image_channels(paths) == 3


def test_rgb_png_with_equal_channels_has_one_channel(tmp_path):
    path = save_image(tmp_path, "rgb_gray.png", gray(90), mode="RGB")
    assert mode_of(path) == "RGB" and image_channels([path]) == 1
    np.testing.assert_allclose(read_images([path], 8, 1), 90 / 255)


def test_gray_ramp_keeps_every_level_not_binarised(tmp_path):
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    images = read_images([save_image(tmp_path, "ramp.png", ramp)], 16, 1)
    assert images.shape == (1, 1, 16, 16) and images.dtype == np.float32
    assert len(np.unique(images)) > 200
    assert images.min() == 0 and images.max() == 1
    np.testing.assert_allclose(images[0, 0], ramp / 255, atol=1e-7)


def test_16_bit_png_is_scaled_by_65535(tmp_path):
    levels = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    path = save_image(tmp_path, "deep.png", levels)
    images = read_images([path], 2, 1)
    np.testing.assert_allclose(images[0, 0], levels / 65535, rtol=1e-6)
    assert image_channels([path]) == 1


def test_non_square_image_is_resized_to_square_not_cropped(tmp_path):
    halves = np.zeros((20, 40), dtype=np.uint8)
    halves[:, 20:] = 255  # left half black, right half white
    images = read_images([save_image(tmp_path, "wide.png", halves)], 16, 1)
    assert images.shape == (1, 1, 16, 16)
    np.testing.assert_allclose(images[0, 0, :, :6], 0, atol=1e-6)
    np.testing.assert_allclose(images[0, 0, :, 10:], 1, atol=1e-6)


def test_colour_image_asked_as_one_channel_is_refused(tmp_path):
    path = save_image(tmp_path, "red.png", colour())
    message = refused(read_images, [path], 8, 1)
    assert "red.png" in message and "has colour but the model was trained on grayscale images" in message


def test_grayscale_image_asked_as_three_channels_is_replicated(tmp_path):
    ramp = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    images = read_images([save_image(tmp_path, "g.png", ramp)], 8, 3)
    assert images.shape == (1, 3, 8, 8)
    for channel in range(3):
        np.testing.assert_allclose(images[0, channel], ramp / 255, atol=1e-7)


def test_colour_image_keeps_its_channels_and_drops_alpha(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[..., 3] = 255, 51, 0  # fully transparent: alpha is dropped, not composited
    images = read_images([save_image(tmp_path, "rgba.png", rgba)], 8, 3)
    np.testing.assert_allclose(images[0, :, 0, 0], [1.0, 0.0, 0.2], atol=1e-7)


def save_palette_image(folder, name, palette):
    """A "P" image whose left half is palette entry 0 and right half entry 1."""
    indices = np.zeros((8, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    image = Image.fromarray(indices)
    image.putpalette([level for rgb in palette for level in rgb])
    image.save(folder / name)
    return folder / name


def test_palette_image_is_expanded_through_its_palette(tmp_path):
    gray_path = save_palette_image(tmp_path, "gray.png", [(60, 60, 60), (200, 200, 200)])
    assert mode_of(gray_path) == "P" and image_channels([gray_path]) == 1
    np.testing.assert_allclose(read_images([gray_path], 8, 1)[0, 0, 0, [0, 7]], [60 / 255, 200 / 255], atol=1e-7)
    colour_path = save_palette_image(tmp_path, "colour.png", [(0, 0, 0), (255, 0, 0)])
    assert image_channels([colour_path]) == 3
    np.testing.assert_allclose(read_images([colour_path], 8, 3)[0, :, 0, 7], [1, 0, 0])


def test_corrupt_image_is_refused_naming_it(tmp_path):
    broken = tmp_path / "design_7.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image")
    assert "design_7.png" in refused(read_images, [broken], 8, 1)
    assert "design_7.png" in refused(image_channels, [broken])


def test_jpeg_is_read(tmp_path):
    path = save_image(tmp_path, "shape.jpeg", gray(128, (16, 16)))
    images, paths, channels = read_condition_images(tmp_path, ".jpg", 8, None)
    assert paths == [path] and channels == 1 and images.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(images, 128 / 255, atol=2 / 255)  # JPEG is lossy


def test_condition_images_from_a_folder_or_one_file(tmp_path):
    save_image(tmp_path, "d_10.png", gray(10))
    second = save_image(tmp_path, "d_2.png", colour())
    images, paths, channels = read_condition_images(tmp_path, "png", 4, None)
    assert [p.name for p in paths] == ["d_2.png", "d_10.png"] and channels == 3 and images.shape == (2, 3, 4, 4)
    single, paths, channels = read_condition_images(second, ".png", 4, 3)
    assert paths == [second] and single.shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(single[0], images[0])
    assert "missing.png" in refused(read_condition_images, tmp_path / "missing.png", ".png", 4, None)


# ---- training-time augmentation

def batch(count=64, size=6):
    """[count, 2, size, size] copies of one image whose pixels are all different and positive."""
    image = torch.arange(1, 2 * size * size + 1, dtype=torch.float32).reshape(2, size, size) / (2 * size * size)
    return image.expand(count, -1, -1, -1).clone()


def test_augmentation_off_returns_the_images_unchanged():
    images = batch()
    assert torch.equal(augment_images(images, False, 0, torch.Generator().manual_seed(0)), images)


def test_flips_are_exact_flips_and_all_four_occur():
    images = batch()
    out = augment_images(images, True, 0, torch.Generator().manual_seed(0))
    variants = [images[0], images[0].flip(-1), images[0].flip(-2), images[0].flip(-1).flip(-2)]
    seen = [next(k for k, v in enumerate(variants) if torch.equal(o, v)) for o in out]  # StopIteration if no match
    assert set(seen) == {0, 1, 2, 3}


def shifted(image, dy, dx):
    """image [C, H, W] moved down by dy and right by dx, zero-filled: the reference for the vectorised version."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    for y in range(height):
        for x in range(width):
            if 0 <= y - dy < height and 0 <= x - dx < width:
                out[:, y, x] = image[:, y - dy, x - dx]
    return out


def test_shifts_move_content_and_fill_with_zeros():
    images = batch(count=32)
    out = augment_images(images, False, 2, torch.Generator().manual_seed(1))
    found = []
    for o in out:
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(o, shifted(images[0], dy, dx))]
        assert len(matches) == 1
        found.append(matches[0])
    assert len(set(found)) > 5 and any(dy != 0 and dx != 0 for dy, dx in found)
    assert out.min() == 0  # shifted images have zero-filled borders, never wrapped-around content


def test_same_seed_gives_same_augmentation():
    images = batch()
    first = augment_images(images, True, 2, torch.Generator().manual_seed(7))
    again = augment_images(images, True, 2, torch.Generator().manual_seed(7))
    other = augment_images(images, True, 2, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
