"""Where the labels of the baseline and the reference points go, so that no two overlap.

A label is a box of known size (pixels) whose centre sits `dx`, `dy` pixels from its anchor, the point it
names; the anchor is given as fractions of the plot area (0 to 1 from the bottom left), because the
interactive plots resize with the window. A placement is therefore checked for every plot-area size in a
`Frame`'s ranges: two boxes count as apart when they are separated horizontally at every width or
vertically at every height. Box edges move linearly with the size, so the ends of a range (and a change of
sign in between) decide it. The PNG has one size, a frame whose ranges are single values.

Labels are placed greedily, in order, at the nearest free spot around their point (above first), avoiding
the labels already placed, every labelled marker and any fixed text (such as the accuracy-drop note), and
not covering other points where there is room.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

GAP = 3.0  # pixels kept between two boxes
_STEP = 7.0  # pixels between the rings of candidate spots
_RINGS = 14
_NEAR_RINGS = 8  # rings in which a label may dodge unlabelled points
# Candidate directions around a point in degrees, most natural first: above, below, right, left, then between.
_ANGLES = (90, 270, 0, 180, 45, 135, 315, 225, 67.5, 112.5, 292.5, 247.5, 22.5, 157.5, 337.5, 202.5)


@dataclass(frozen=True)
class Frame:
    """The plot area's possible sizes in pixels: (smallest, largest) width and height."""

    width: tuple[float, float]
    height: tuple[float, float]

    @classmethod
    def fixed(cls, width: float, height: float) -> Frame:
        return cls((width, width), (height, height))


@dataclass(frozen=True)
class Box:
    """`width` × `height` pixels centred (`dx`, `dy`) pixels (up is positive) from the anchor at fractions
    (`fx`, `fy`) of the plot area."""

    fx: float
    fy: float
    width: float
    height: float
    dx: float = 0.0
    dy: float = 0.0

    def edges(self, width: float, height: float) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in pixels from the plot area's bottom left, for a plot area of that size."""
        x, y = self.fx * width + self.dx, self.fy * height + self.dy
        return x - self.width / 2, y - self.height / 2, x + self.width / 2, y + self.height / 2


def _least_distance(slope: float, offset: float, sizes: tuple[float, float]) -> float:
    """The smallest |slope × size + offset| for a size in the range."""
    first, last = (slope * s + offset for s in sizes)
    return 0.0 if first * last <= 0 else min(abs(first), abs(last))


def apart(a: Box, b: Box, frame: Frame, gap: float = GAP) -> bool:
    """Whether `a` and `b` keep at least `gap` pixels between them at every size in `frame`."""
    x_room = (a.width + b.width) / 2 + gap
    y_room = (a.height + b.height) / 2 + gap
    return (
        _least_distance(a.fx - b.fx, a.dx - b.dx, frame.width) >= x_room
        or _least_distance(a.fy - b.fy, a.dy - b.dy, frame.height) >= y_room
    )


def inside(box: Box, frame: Frame) -> bool:
    """Whether the box stays within the plot area at every size in `frame`."""
    for width in frame.width:
        for height in frame.height:
            left, bottom, right, top = box.edges(width, height)
            if left < 0 or bottom < 0 or right > width or top > height:
                return False
    return True


def _candidates(label: Box, clearance: float) -> Iterator[Box]:
    """Spots around the anchor, nearest ring first, each clear of a marker of radius `clearance`: the box's
    edge is `reach` pixels from the anchor along one of sixteen directions."""
    for ring in range(_RINGS):
        reach = clearance + GAP + ring * _STEP
        for angle in _ANGLES:
            ux, uy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            across = min(
                label.width / 2 / abs(ux) if abs(ux) > 1e-9 else math.inf,
                label.height / 2 / abs(uy) if abs(uy) > 1e-9 else math.inf,
            )
            yield replace(label, dx=ux * (reach + across), dy=uy * (reach + across))


def _fallback(label: Box, taken: Sequence[Box], frame: Frame, clearance: float) -> Box:
    """Straight above the point, as far as it takes to clear everything (always ends: each box is passed)."""
    dy = label.height / 2 + clearance + GAP
    box = replace(label, dx=0.0, dy=dy)
    while not all(apart(box, other, frame) for other in taken):
        dy += _STEP
        box = replace(label, dx=0.0, dy=dy)
    return box


def _first(spots: Sequence[Box], rules: Sequence[tuple[Sequence[Box], Frame]], within: Frame | None) -> Box | None:
    """The first spot apart from every box of every (boxes, frame) rule, inside `within` unless None."""
    for spot in spots:
        if within is not None and not inside(spot, within):
            continue
        if all(apart(spot, other, frame) for boxes, frame in rules for other in boxes):
            return spot
    return None


def place(
    labels: Sequence[Box],
    obstacles: Sequence[Box],
    frame: Frame,
    clearances: Sequence[float],
    points: Sequence[Box] = (),
    typical: Frame | None = None,
) -> list[Box]:
    """Offsets for `labels` (their dx, dy are ignored): each apart from the others and from `obstacles` at
    every size of `frame`, inside the plot area where possible; `clearances` are the radii of the labelled
    markers, in pixels. Where a spot near the point allows, a label also leaves the other plotted `points`
    uncovered at the `typical` size (a wish, not a rule: it never sends a label far from its point)."""
    placed: list[Box] = []
    for label, clearance in zip(labels, clearances, strict=True):
        hard = (tuple([*obstacles, *placed]), frame)
        soft = (points, typical or frame)
        spots = list(_candidates(label, clearance))
        near = spots[: _NEAR_RINGS * len(_ANGLES)]
        tries = ((near, [hard, soft], frame), (spots, [hard], frame), (near, [hard, soft], None), (spots, [hard], None))
        spot = next((s for options, rules, within in tries if (s := _first(options, rules, within))), None)
        placed.append(spot or _fallback(label, hard[0], frame, clearance))
    return placed


def overlapping(boxes: Sequence[Box], frame: Frame, gap: float = 0.0) -> list[tuple[int, int]]:
    """Pairs of boxes that come closer than `gap` at some size in `frame` (none, after `place`)."""
    pairs = [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))]
    return [(i, j) for i, j in pairs if not apart(boxes[i], boxes[j], frame, gap)]
