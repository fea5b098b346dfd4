from __future__ import annotations

import pytest

from kvmaccel.errors import UsageError
from kvmaccel.model.units import format_cpu_spec, format_size, parse_cpu_spec, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("8G", 8 << 30), ("8GiB", 8 << 30), ("512m", 512 << 20), ("2MiB", 2 << 20),
    ("1.5G", 3 << 29), ("1T", 1 << 40), ("64k", 65536),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "8Q", "-1G", "0", "1.1k"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize(("text", "ids", "canonical"), [
    ("0-3,8,^2", {0, 1, 3, 8}, "0-1,3,8"), ("5", {5}, "5"), ("", set(), ""),
    ("0,1,2,3", {0, 1, 2, 3}, "0-3"),
])
def test_cpu_spec_pair(text: str, ids: set[int], canonical: str) -> None:
    assert parse_cpu_spec(text) == frozenset(ids)
    assert format_cpu_spec(parse_cpu_spec(text)) == canonical
    assert parse_cpu_spec(canonical) == frozenset(ids)


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "-1", "^x"])
def test_cpu_spec_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="0-3,8,\\^2"):
        parse_cpu_spec(text)


def test_format_size() -> None:
    assert format_size(8 << 30) == "8G"
    assert format_size(3 << 29) == "1.5G"
    assert format_size(100) == "100B"
