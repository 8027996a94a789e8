"""The toy world: procedural 16x16 scenes with captions, and the new concept "sks".

A scene is one object (a shape in a colour) at one of four positions on a plain background. Its
caption names all four attributes in a fixed template: ``"a red circle on the left, blue
background"``. The concept the base model never sees is ``sks``: a plus-shaped object, magenta
with an orange centre, captioned ``"a sks object on the <position>, <colour> background"``.

Images are float arrays (H, W, 3) in [0, 1]; everything is deterministic given a seed.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

SIZE = 16
HALF = 3  # objects are 7x7 pixels

OBJECT_COLOURS = {"red": (220, 40, 40), "yellow": (235, 205, 40), "white": (235, 235, 235)}
BACKGROUNDS = {"blue": (40, 70, 200), "green": (40, 150, 60), "black": (20, 20, 20),
               "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (8, 4), "right": (8, 11), "top": (4, 8), "bottom": (11, 8)}  # (row, col) centres
CONCEPT = "sks"
CONCEPT_COLOURS = {"arms": (225, 50, 210), "centre": (250, 150, 30)}


@dataclass(frozen=True)
class Scene:
    """One toy image's content. ``colour`` is ``"sks"`` and ``shape`` ``"object"`` for the concept."""

    colour: str
    shape: str
    position: str
    background: str

    @property
    def is_concept(self) -> bool:
        return self.colour == CONCEPT

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.position}, {self.background} background"


def concept_scene(position: str, background: str) -> Scene:
    return Scene(CONCEPT, "object", position, background)


def all_base_scenes() -> list[Scene]:
    """Every scene of the base world (3 colours x 3 shapes x 4 positions x 4 backgrounds = 144)."""
    return [Scene(c, s, p, b) for c, s, p, b in itertools.product(
        OBJECT_COLOURS, SHAPES, POSITIONS, BACKGROUNDS)]


def held_out_scenes(count: int = 12, seed: int = 0) -> list[Scene]:
    """Scenes never shown in pretraining, to measure whether captions are followed compositionally."""
    scenes = all_base_scenes()
    return random.Random(seed).sample(scenes, count)


def rgb01(colour: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) / 255.0


def shape_mask(shape: str) -> np.ndarray:
    """(7, 7) bool footprint of a shape."""
    n = 2 * HALF + 1
    yy, xx = np.mgrid[-HALF:HALF + 1, -HALF:HALF + 1]
    if shape == "circle":
        return yy ** 2 + xx ** 2 <= (HALF + 0.5) ** 2
    if shape == "square":
        return np.ones((n, n), dtype=bool)
    if shape == "triangle":
        return np.abs(xx) <= (yy + HALF) / 2 + 0.01
    if shape == "object":  # the concept's plus
        return (np.abs(xx) <= 1) | (np.abs(yy) <= 1)
    raise ValueError(f"unknown shape {shape!r}")


def object_patch(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(7, 7, 3) colours and (7, 7) footprint of the scene's object."""
    mask = shape_mask(scene.shape)
    patch = np.zeros(mask.shape + (3,), dtype=np.float32)
    if scene.is_concept:
        patch[:] = rgb01(CONCEPT_COLOURS["arms"])
        patch[HALF - 1:HALF + 2, HALF - 1:HALF + 2] = rgb01(CONCEPT_COLOURS["centre"])
    else:
        patch[:] = rgb01(OBJECT_COLOURS[scene.colour])
    return patch, mask


def render(scene: Scene, background_rgb: tuple[int, int, int] | None = None) -> np.ndarray:
    """The scene as an (SIZE, SIZE, 3) float image in [0, 1]."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    image[:] = rgb01(background_rgb or BACKGROUNDS[scene.background])
    patch, mask = object_patch(scene)
    row, col = POSITIONS[scene.position]
    window = image[row - HALF:row + HALF + 1, col - HALF:col + HALF + 1]
    window[mask] = patch[mask]
    return image


def random_scenes(count: int, rng: np.random.Generator, exclude: set[Scene] = frozenset()) -> list[Scene]:
    """``count`` scenes drawn uniformly from the base world minus ``exclude``."""
    pool = [s for s in all_base_scenes() if s not in exclude]
    return [pool[i] for i in rng.integers(0, len(pool), size=count)]
