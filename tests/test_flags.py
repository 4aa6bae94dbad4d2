"""The flag registry: one bit per name, decoded the same way everywhere."""

from __future__ import annotations

import pytest

from lcowatch import flags


class TestRegistry:
    """Bits are distinct and consecutive; masks encode and decode by name, in bit order."""

    def test_bits_are_unique(self) -> None:
        assert [f.bit for f in flags.FLAGS] == list(range(len(flags.FLAGS)))
        assert len(flags.BY_NAME) == len(flags.FLAGS)

    def test_round_trip(self) -> None:
        mask = flags.value("cloudy", "saturated", "uncalibrated")
        assert flags.decode(mask) == ["saturated", "uncalibrated", "cloudy"]
        assert flags.describe(mask) == "saturated,uncalibrated,cloudy"
        assert flags.describe(0) == ""

    def test_unknown_name_is_an_error(self) -> None:
        with pytest.raises(KeyError):
            flags.value("sunny")
