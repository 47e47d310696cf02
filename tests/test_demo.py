"""The demo's report helpers: numbers in significant figures (never 0.00 for a non-zero value),
and single-sensor markers that do not move a map's edges."""

from __future__ import annotations

import math

import pytest
import torch

from lmdfx.bev import viz
from lmdfx.bev.demo import _num, _pcc, _terms


@pytest.mark.parametrize("value, text", [
    (3.1e-4, "3.10e-04"), (-5.06e-4, "-5.06e-04"), (0.0, "0"), (math.nan, "nan"), (0.5222, "0.522"),
    (1.0, "1.00"), (3.8226, "3.82"), (46.04, "46.0"), (0.275, "0.275"), (123456.0, "1.23e+05"), (0.01, "0.0100"),
])
def test_numbers_keep_their_significant_digits(value, text):
    assert _num(value) == text


def test_small_values_never_read_as_zero():
    for value in (1e-3, 4e-5, 2.2e-9, -7e-12):
        assert float(_num(value)) != 0


def test_correlations_near_one_show_how_near():
    assert _pcc(1.0) == "1.00"
    assert _pcc(1 - 1e-7) == "1 − 1.0e-07"
    assert _pcc(0.5) == "0.500"


def test_signed_sums():
    terms = [(0.745, "camera"), (0.513, "radar"), (-0.387, "bias")]
    assert _terms(terms) == "0.745 (camera) + 0.513 (radar) - 0.387 (bias)"
    assert _terms([(-4.32, "camera"), (0.0, "radar")]) == "-4.32 (camera) + 0 (radar)"


def test_markers_beyond_the_map_do_not_widen_it():
    pytest.importorskip("matplotlib")
    fig = viz._figure(3, 3)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(torch.zeros(8, 8).numpy(), origin="lower")
    limits = ax.get_xlim(), ax.get_ylim()
    footprint = torch.zeros(8, 8, dtype=torch.bool)
    footprint[7, 3:5] = True  # a vehicle in the last row: its marker lies above the map
    viz._mark_single_sensor(ax, [("radar", footprint)])
    assert (ax.get_xlim(), ax.get_ylim()) == limits
