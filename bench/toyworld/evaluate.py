"""Scores computed from the pixels of a generated toy image, against what its prompt asked for.

- **background**: the median colour of the image's outer ring (objects never touch the border),
  named by the nearest background colour of the world; right when it is the prompted one.
- **position**: the object is every pixel farther than ``OBJECT_DISTANCE`` from that median colour;
  its centroid names the nearest of the four positions; right when it is the prompted one (an
  image with no object is wrong).
- **alignment**: background and position both right (the toy's text-alignment score).
- **fidelity**: the object is the concept, by nearest template: the 9x9 window around the centroid
  is compared (RGB distance, best of +-1 pixel shifts) with every object of the world and the
  concept, each drawn centred on the image's own background colour; right when the concept's
  template is the nearest (``nearest`` names the winner, e.g. ``"red circle"``).
  ``concept_distance`` is the mean RGB distance to the concept's template.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import world

OBJECT_DISTANCE = 0.25
WINDOW = world.HALF + 1  # half-size of the compared window (9x9)


@dataclass(frozen=True)
class Score:
    background: str
    position: str | None
    background_right: bool
    position_right: bool
    is_concept: bool
    concept_distance: float
    nearest: str | None = None

    @property
    def aligned(self) -> bool:
        return self.background_right and self.position_right

    def as_dict(self) -> dict:
        return {**asdict(self), "aligned": self.aligned}


def _ring(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def background_colour(image: np.ndarray) -> np.ndarray:
    return np.median(_ring(image), axis=0)


def nearest_background(colour: np.ndarray) -> str:
    return min(world.BACKGROUNDS, key=lambda n: float(np.linalg.norm(world.rgb01(world.BACKGROUNDS[n]) - colour)))


def object_centroid(image: np.ndarray, background: np.ndarray) -> tuple[float, float] | None:
    mask = np.linalg.norm(image - background, axis=-1) > OBJECT_DISTANCE
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


def nearest_position(centroid: tuple[float, float]) -> str:
    return min(world.POSITIONS, key=lambda p: (world.POSITIONS[p][0] - centroid[0]) ** 2
               + (world.POSITIONS[p][1] - centroid[1]) ** 2)


def _window(image: np.ndarray, row: int, col: int, fill: np.ndarray) -> np.ndarray:
    padded = np.empty((world.SIZE + 2 * WINDOW + 2, world.SIZE + 2 * WINDOW + 2, 3), np.float32)
    padded[:] = fill
    off = WINDOW + 1
    padded[off:off + world.SIZE, off:off + world.SIZE] = image
    return padded[row + 1:row + 1 + 2 * WINDOW + 1, col + 1:col + 1 + 2 * WINDOW + 1]


def templates(background: np.ndarray) -> dict[str, np.ndarray]:
    """Every object of the world (and the concept) centred in a 9x9 window on ``background``."""
    out = {}
    scenes = [world.Scene(c, s, "left", "blue") for c in world.OBJECT_COLOURS for s in world.SHAPES]
    for scene in scenes + [world.concept_scene("left", "blue")]:
        patch, mask = world.object_patch(scene)
        tile = np.empty((2 * WINDOW + 1, 2 * WINDOW + 1, 3), np.float32)
        tile[:] = background
        inner = tile[1:-1, 1:-1]
        inner[mask] = patch[mask]
        out[world.CONCEPT if scene.is_concept else f"{scene.colour} {scene.shape}"] = tile
    return out


def score(image: np.ndarray, prompted: world.Scene) -> Score:
    """Score one (SIZE, SIZE, 3) image in [0, 1] against the scene its prompt describes."""
    bg = background_colour(image)
    bg_name = nearest_background(bg)
    centroid = object_centroid(image, bg)
    if centroid is None:
        return Score(bg_name, None, bg_name == prompted.background, False, False, float("inf"), None)
    position = nearest_position(centroid)
    best: dict[str, float] = {}
    r0, c0 = round(centroid[0]), round(centroid[1])
    for name, tile in templates(bg).items():
        best[name] = min(float(np.linalg.norm(_window(image, r0 + dr, c0 + dc, bg) - tile, axis=-1).mean())
                         for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    nearest = min(best, key=best.get)
    return Score(bg_name, position, bg_name == prompted.background, position == prompted.position,
                 nearest == world.CONCEPT, best[world.CONCEPT], nearest)


def summarise(scores: list[Score]) -> dict[str, float]:
    """Fractions over a list of scores (the unit the experiment reports per seed)."""
    n = max(1, len(scores))
    return {"alignment": sum(s.aligned for s in scores) / n,
            "background": sum(s.background_right for s in scores) / n,
            "position": sum(s.position_right for s in scores) / n,
            "fidelity": sum(s.is_concept for s in scores) / n,
            "concept_distance": float(np.mean([min(s.concept_distance, 1.0) for s in scores])) if scores else 1.0}
