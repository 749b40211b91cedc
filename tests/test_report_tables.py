"""The report's tables from figures: what a reader sees for edge cases of real runs."""
from __future__ import annotations

from prism_ray.report import diversity_table


def _diversity(set_name: str, value: float) -> dict:
    return {"network": "resnet18", "set": set_name, "mean_cosine": value, "max_class": value, "min_class": value}


def test_a_set_of_one_image_per_class_shows_no_diversity_figure_and_says_why():
    nan = float("nan")
    text = diversity_table({"diversity": [_diversity("prism", nan), _diversity("real", 0.921)]})
    assert "| prism | n/a | n/a | n/a |" in text and "| real | 0.9210 | 0.9210 | 0.9210 |" in text
    assert "nan" not in text and "one image per class" in text


def test_sets_of_several_images_per_class_show_their_figures_only():
    text = diversity_table({"diversity": [_diversity("prism", 0.5)]})
    assert "| prism | 0.5000 |" in text and "n/a" not in text
