"""What the user is told when an answer cites sources it was not given."""

from __future__ import annotations

from app.citations import CitationFilter


def test_removed_citations_are_named_once_each_in_the_warning():
    f = CitationFilter(2)
    assert f.feed("Owls [1] eat mice [4]; voles [4, 2] and shrews [9].") + f.close() == (
        "Owls [1] eat mice ; voles [2] and shrews ."
    )
    assert f.warning() == "The answer cited [4], [9], which are not among the 2 sources given; removed."
    one = CitationFilter(1)
    one.feed("Owls hunt at night [3].")
    assert one.warning() == "The answer cited [3], which is not among the 1 sources given; removed."
    fine = CitationFilter(1)
    fine.feed("Owls hunt at night [1].")
    assert fine.warning() is None
