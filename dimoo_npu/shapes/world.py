"""A synthetic world whose pictures can be checked: coloured shapes on a white 128 x 128 canvas.

The embedded default model is trained and evaluated on it, so every attribute lives in one table
here (palette, shapes, sizes, grid positions) and the detector and evaluator read the same tables.
A position names a third of the picture; inside it an object sits at one of several centres, all on
16-pixel code boundaries (left/top 16 or 32, middle 48, 64 or 80, right/bottom 96 or 112). Objects are
16 or 32 pixels wide, so with a 16x downsampling VQ every placement is made of the same code cells, and
each cell's look is seen at many places in training, not only at one grid cell per combination.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
BACKGROUND = (255, 255, 255)
# The one colour table: the renderer paints these values and the detector snaps to the nearest.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 16, "large": 32}  # side of the object's box in pixels
GRID_CENTRES: tuple[int, ...] = (32, 64, 96)  # canonical pixel centre of grid row/column 0, 1, 2
# Every centre an object may take in row/column 0, 1, 2: whole code cells (16 px) around the canonical one.
PLACEMENTS: tuple[tuple[int, ...], ...] = ((16, 32), (48, 64, 80), (96, 112))
# Where one third ends and the next begins: halfway between their nearest placements (40 and 88 px).
REGION_BOUNDS: tuple[float, ...] = tuple(
    (before[-1] + after[0]) / 2 for before, after in zip(PLACEMENTS, PLACEMENTS[1:], strict=False)
)
CODE_CELL = 16  # pixels per side of one image-token cell (16x downsampling)
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COLUMN_NAMES: tuple[str, ...] = ("left", "middle", "right")
_SUPERSAMPLE = 4  # draw 4x larger and box-filter down, for smooth (but deterministic) edges


def position_name(row: int, col: int) -> str:
    """'top left', 'middle right', ..., and 'center' for the middle cell."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROW_NAMES[row]} {COLUMN_NAMES[col]}"


POSITIONS: tuple[str, ...] = tuple(position_name(r, c) for r in range(3) for c in range(3))


@dataclass(frozen=True)
class ShapeObject:
    """One object: its shape, colour, size and third of the picture (row, col), and where in that third.

    ``offset`` (down, right) in pixels from the canonical centre is a placement, not part of the
    combination: the held-out split and captions depend on (shape, colour, size, row, col) only.
    """

    shape: str
    colour: str
    size: str
    row: int
    col: int
    offset: tuple[int, int] = (0, 0)

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    @property
    def centre(self) -> tuple[int, int]:
        """(y, x) pixel centre of the object's box."""
        return GRID_CENTRES[self.row] + self.offset[0], GRID_CENTRES[self.col] + self.offset[1]

    @property
    def canonical(self) -> ShapeObject:
        """The same combination at its third's canonical centre."""
        return ShapeObject(self.shape, self.colour, self.size, self.row, self.col)

    def cell_span(self, axis: int) -> range:
        """Code cells the object's box touches along ``axis`` (0 = rows, 1 = columns)."""
        half = SIZES[self.size] // 2
        centre = self.centre[axis]
        return range((centre - half) // CODE_CELL, (centre + half - 1) // CODE_CELL + 1)

    def describe(self, leave_out: str | None = None) -> str:
        """'large red circle'; leaving out the size or colour drops the word, leaving out the shape says 'shape'."""
        words = {"size": self.size, "colour": self.colour, "shape": self.shape}
        if leave_out is not None:
            words[leave_out] = "shape" if leave_out == "shape" else ""
        return " ".join(word for word in words.values() if word)


@dataclass(frozen=True)
class Scene:
    """One or two objects; a two-object scene carries the relation its caption states."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # "left of" or "above": objects[0] relative to objects[1]


def all_single_objects() -> list[ShapeObject]:
    """Every single-object combination (3 shapes x 6 colours x 2 sizes x 9 cells = 324)."""
    return [
        ShapeObject(shape, colour, size, row, col)
        for shape, colour, size, (row, col) in itertools.product(
            SHAPES, PALETTE, SIZES, itertools.product(range(3), range(3))
        )
    ]


def is_held_out(obj: ShapeObject) -> bool:
    """About 1 in 7 combinations, never trained on; every (shape, colour, size) keeps >= 7 trained cells."""
    key = SHAPES.index(obj.shape) * 7 + list(PALETTE).index(obj.colour) * 5 + list(SIZES).index(obj.size) * 3
    return (key + obj.row * 3 + obj.col) % 7 == 0


def split_objects(split: str) -> list[ShapeObject]:
    """The single-object combinations of ``split`` ('train' or 'heldout')."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    return [obj for obj in all_single_objects() if is_held_out(obj) == (split == "heldout")]


def render(scene: Scene) -> Image.Image:
    """The scene as a 128 x 128 RGB image on white."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        half = SIZES[obj.size] * _SUPERSAMPLE // 2
        cy, cx = (coordinate * _SUPERSAMPLE for coordinate in obj.centre)
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:  # triangle pointing up, base on the box's bottom edge
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_array(scene: Scene) -> np.ndarray:
    """The scene as uint8 (128, 128, 3)."""
    return np.asarray(render(scene), dtype=np.uint8)


# Several phrasings per caption; {obj} is "large red circle", {pos} a position name.
SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {obj} in the {pos}",
    "there is a {obj} in the {pos}",
    "in the {pos} there is a {obj}",
    "an image of a {obj} in the {pos}",
    "a {obj} placed in the {pos} on a white background",
    "draw a {obj} in the {pos}",
)
RELATION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "left of": ("a {a} to the left of a {b}", "a {a} on the left and a {b} on the right"),
    "above": ("a {a} above a {b}", "a {a} on top and a {b} below it"),
}
# Understanding questions: (attribute, phrasings); {shape} is filled with the object's shape.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is the shape?", "what color is the {shape}?"),
    "shape": ("what shape is it?", "which shape is in the image?"),
    "position": ("where is the {shape}?", "where is the shape?"),
    "size": ("how big is the {shape}?", "is the shape small or large?"),
}


def caption(scene: Scene, rng: random.Random) -> str:
    """One plain-English caption of the scene, phrasing chosen by ``rng``."""
    if scene.relation is None:
        (obj,) = scene.objects
        template = rng.choice(SINGLE_TEMPLATES)
        return template.format(obj=obj.describe(), pos=obj.position)
    first, second = scene.objects
    template = rng.choice(RELATION_TEMPLATES[scene.relation])
    return template.format(a=first.describe(), b=second.describe())


# Captions that leave one attribute out; the picture then shows some value of it. They teach what each
# word does on its own, so a held-out combination can be composed from attributes seen separately.
PARTIAL_ATTRIBUTES: tuple[str, ...] = ("size", "colour", "shape", "position")
NO_POSITION_TEMPLATES: tuple[str, ...] = ("a {obj}", "an image of a {obj}", "draw a {obj}")


def partial_caption(obj: ShapeObject, rng: random.Random) -> str:
    """A caption of a single object naming all but one randomly chosen attribute: 'a red circle in the top left'."""
    leave_out = rng.choice(PARTIAL_ATTRIBUTES)
    if leave_out == "position":
        return rng.choice(NO_POSITION_TEMPLATES).format(obj=obj.describe())
    return rng.choice(SINGLE_TEMPLATES).format(obj=obj.describe(leave_out), pos=obj.position)


def canonical_caption(obj: ShapeObject) -> str:
    """The first phrasing, used for evaluation prompts: 'a large red circle in the top left'."""
    return SINGLE_TEMPLATES[0].format(obj=obj.describe(), pos=obj.position)


def answer(obj: ShapeObject, attribute: str) -> str:
    """The expected answer to a question about ``attribute`` of a single-object image."""
    return {"colour": obj.colour, "shape": obj.shape, "position": obj.position, "size": obj.size}[attribute]


def question(obj: ShapeObject, attribute: str, rng: random.Random) -> str:
    return rng.choice(QUESTIONS[attribute]).format(shape=obj.shape)


def placements(obj: ShapeObject) -> list[ShapeObject]:
    """``obj``'s combination at every placement its third allows (2 to 9 of them)."""
    base_y, base_x = obj.canonical.centre
    return [
        ShapeObject(obj.shape, obj.colour, obj.size, obj.row, obj.col, (y - base_y, x - base_x))
        for y, x in itertools.product(PLACEMENTS[obj.row], PLACEMENTS[obj.col])
    ]


def placed(obj: ShapeObject, rng: random.Random) -> ShapeObject:
    """``obj`` at a random one of its third's placements."""
    return rng.choice(placements(obj))


def two_object_scene(rng: random.Random, relation: str, split: str = "train") -> Scene:
    """Two different-looking objects in the same row ('left of') or column ('above'), in no common code cell.

    A 'train' scene holds trained combinations only, so no held-out object is ever seen in training;
    a 'heldout' scene holds at least one held-out combination. Apart, every code cell shows one object
    only, so two-object scenes use the same cell looks as single objects.
    """
    if relation not in RELATION_TEMPLATES:
        raise ValueError(f"unknown relation {relation!r}; use one of {sorted(RELATION_TEMPLATES)}")
    split_objects(split)  # validates the name
    axis = 1 if relation == "left of" else 0
    while True:
        a, b = (ShapeObject(rng.choice(SHAPES), rng.choice(list(PALETTE)), rng.choice(list(SIZES)), 0, 0) for _ in "ab")
        line, (first, second) = rng.randrange(3), sorted(rng.sample(range(3), 2))
        if relation == "left of":
            a, b = _moved(a, line, first), _moved(b, line, second)
        else:
            a, b = _moved(a, first, line), _moved(b, second, line)
        a, b = placed(a, rng), placed(b, rng)
        held_out = is_held_out(a) or is_held_out(b)
        apart = a.cell_span(axis)[-1] < b.cell_span(axis)[0]
        if apart and (a.shape, a.colour) != (b.shape, b.colour) and held_out == (split == "heldout"):
            return Scene((a, b), relation)


def _moved(obj: ShapeObject, row: int, col: int) -> ShapeObject:
    return ShapeObject(obj.shape, obj.colour, obj.size, row, col)


def sample_scenes(seed: int, count: int, split: str = "train", two_object_share: float = 0.0) -> Iterator[Scene]:
    """``count`` scenes drawn deterministically from ``seed``: combinations from ``split``, random placements."""
    rng = random.Random(seed)
    objects = split_objects(split)
    for _ in range(count):
        if rng.random() < two_object_share:
            yield two_object_scene(rng, rng.choice(sorted(RELATION_TEMPLATES)), split)
        else:
            yield Scene((placed(rng.choice(objects), rng),))


def vocabulary_words() -> list[str]:
    """Every word the captions, questions and answers of this world can use, sorted."""
    texts = [
        *SINGLE_TEMPLATES,
        *NO_POSITION_TEMPLATES,
        *itertools.chain(*RELATION_TEMPLATES.values()),
        *itertools.chain(*QUESTIONS.values()),
        *CAPTION_QUESTIONS,
        *(template for template, _ in EDITS.values()),
    ]
    words = {w for text in texts for w in _words(text.replace("{obj}", "").replace("{pos}", ""))}
    words.update(SHAPES, PALETTE, SIZES, ROW_NAMES, COLUMN_NAMES, ["center"])
    return sorted(w for w in words if "{" not in w)


def _words(text: str) -> list[str]:
    """Split like the word-level tokenizer: punctuation marks are words of their own."""
    for mark in ",?.":
        text = text.replace(mark, f" {mark} ")
    return text.split()


# ---- scenes of one or two objects anywhere, their canonical captions, edits and painting masks ----
#
# Pictures for editing and captions hold one object or two in different thirds with different shapes (so
# "the circle" names one object), in no common code cell. Every edit's target is fixed by the world: a
# recoloured, turned or resized object keeps its centre; a moved or added object sits at its third's
# canonical centre. Training pictures hold trained combinations only, source and target alike.

CAPTION_QUESTIONS: tuple[str, ...] = ("describe the image", "what is in the picture?")
# Edit kind -> (instruction template, public edit type of `dimoo edit`).
EDITS: dict[str, tuple[str, str]] = {
    "recolour": ("make the {shape} {colour}", "edit"),
    "move": ("move the {shape} to the {position}", "edit"),
    "turn": ("turn the {shape} into a {shape2}", "edit_replace"),
    "resize": ("make the {shape} {size}", "edit"),
    "remove": ("remove the {shape}", "edit_remove"),
    "add": ("add a {size} {colour} {shape} in the {position}", "edit_add"),
}


def scene_caption(scene: Scene) -> str:
    """The canonical caption: each object's canonical caption in reading order, joined with 'and'."""
    ordered = sorted(scene.objects, key=lambda obj: (obj.row, obj.col))
    return " and ".join(canonical_caption(obj) for obj in ordered)


def parse_caption(text: str) -> list[dict[str, str]]:
    """The objects a canonical-style caption names: [{'size', 'colour', 'shape', 'position'}, ...] (missing = '')."""
    found = []
    for part in re.split(r"\band\b", text.lower()):
        words = _words(part)
        joined = " ".join(words)
        position = next((p for p in sorted(POSITIONS, key=len, reverse=True) if f"the {p}" in joined), "")
        pick = {name: next((w for w in words if w in table), "") for name, table in _ATTRIBUTE_WORDS.items()}
        found.append({**pick, "position": position})
    return found


_ATTRIBUTE_WORDS = {"size": tuple(SIZES), "colour": tuple(PALETTE), "shape": SHAPES}


def cells(obj: ShapeObject) -> set[tuple[int, int]]:
    """The code cells (row, col) the object's box touches."""
    return set(itertools.product(obj.cell_span(0), obj.cell_span(1)))


def fits(objects: tuple[ShapeObject, ...]) -> bool:
    """Objects in different thirds, with different shapes, sharing no code cell."""
    if len({(o.row, o.col) for o in objects}) < len(objects) or len({o.shape for o in objects}) < len(objects):
        return False
    return all(not cells(a) & cells(b) for a, b in itertools.combinations(objects, 2))


def random_object(rng: random.Random, split: str = "train") -> ShapeObject:
    """A combination of ``split`` at a random placement."""
    return placed(rng.choice(split_objects(split)), rng)


def picture_scene(rng: random.Random, objects: int, split: str = "train") -> Scene:
    """One or two objects of ``split`` ('heldout': at least one held-out) that `fits` allows."""
    while True:
        scene = tuple(random_object(rng) for _ in range(objects))
        if objects == 2 and split == "heldout":
            scene = (random_object(rng, "heldout"), scene[1])
        if fits(scene):
            return Scene(scene)


@dataclass(frozen=True)
class Edit:
    """One instruction with its source and its one right target; ``edited`` is the object it makes (or removes)."""

    kind: str
    instruction: str
    source: Scene
    target: Scene
    edited: ShapeObject

    @property
    def edit_type(self) -> str:
        return EDITS[self.kind][1]


def _with(obj: ShapeObject, **changes) -> ShapeObject:
    """``obj`` with some attributes changed; one moved to another third sits at its canonical centre."""
    fields = {"shape": obj.shape, "colour": obj.colour, "size": obj.size, "row": obj.row, "col": obj.col, **changes}
    offset = (0, 0) if "row" in changes or "col" in changes else obj.offset
    return ShapeObject(**fields, offset=offset)


def _edit(kind: str, source: Scene, index: int, result: ShapeObject | None) -> Edit | None:
    """The edit of ``source.objects[index]`` into ``result`` (None: removed), or None when the target does not fit."""
    obj = source.objects[index]
    others = [o for i, o in enumerate(source.objects) if i != index]
    if kind == "add":
        obj, others = result, list(source.objects)
    target = tuple(others + ([result] if result is not None else []))
    if result is not None and not fits(target):
        return None
    values = {"shape": obj.shape, "colour": obj.colour, "size": obj.size, "position": obj.position}
    if kind != "add" and result is not None:
        values.update(shape2=result.shape, colour=result.colour, size=result.size, position=result.position)
    instruction = EDITS[kind][0].format(**values)
    return Edit(kind, instruction, source, Scene(target), obj if result is None else result)


def edit_result(kind: str, obj: ShapeObject, rng: random.Random) -> ShapeObject:
    """What ``kind`` makes of ``obj``: one attribute changed to another value (for 'add': a new object)."""
    if kind == "recolour":
        return _with(obj, colour=rng.choice([c for c in PALETTE if c != obj.colour]))
    if kind == "turn":
        return _with(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    if kind == "resize":
        return _with(obj, size=rng.choice([s for s in SIZES if s != obj.size]))
    if kind == "move":
        row, col = rng.choice([(r, c) for r in range(3) for c in range(3) if (r, c) != (obj.row, obj.col)])
        return _with(obj, row=row, col=col)
    if kind == "add":
        return rng.choice(split_objects("train"))
    raise ValueError(f"unknown edit kind {kind!r}; use one of {', '.join(EDITS)}")


def sample_edit(kind: str, rng: random.Random) -> Edit:
    """A training edit of ``kind``: every object of source and target a trained combination."""
    if kind not in EDITS:
        raise ValueError(f"unknown edit kind {kind!r}; use one of {', '.join(EDITS)}")
    while True:
        source = picture_scene(rng, 1 if kind == "add" else rng.choice((1, 2)))
        index = rng.randrange(len(source.objects))
        result = None if kind == "remove" else edit_result(kind, source.objects[index], rng)
        if result is not None and is_held_out(result):
            continue
        edit = _edit(kind, source, index, result)
        if edit is not None:
            return edit


def heldout_edits(kind: str, seed: int = 0) -> list[Edit]:
    """One edit per held-out combination whose target shows it (for 'remove': whose source shows it)."""
    rng = random.Random(seed)
    edits = []
    for wanted in split_objects("heldout"):
        while True:
            edit = _edit_to(kind, wanted, rng)
            if edit is not None:
                edits.append(edit)
                break
    return edits


def _edit_to(kind: str, wanted: ShapeObject, rng: random.Random) -> Edit | None:
    """An edit of ``kind`` whose edited object is ``wanted`` (None when the drawn source does not fit)."""
    other = (random_object(rng),) if rng.random() < 0.5 or kind == "add" else ()
    if kind == "remove":
        source = (placed(wanted, rng), *other)
        return _edit(kind, Scene(source), 0, None) if fits(source) else None
    if kind == "add":
        return _edit(kind, Scene(other), 0, wanted) if fits(other) else None
    if kind == "move":
        start = _with(wanted, row=rng.randrange(3), col=rng.randrange(3))
        if (start.row, start.col) == (wanted.row, wanted.col):
            return None
        start, result = placed(start, rng), wanted
    else:
        result = placed(wanted, rng)
        changed = {"recolour": "colour", "turn": "shape", "resize": "size"}[kind]
        table = {"colour": list(PALETTE), "shape": list(SHAPES), "size": list(SIZES)}[changed]
        start = _with(result, **{changed: rng.choice([v for v in table if v != getattr(wanted, changed)])})
    source = (start, *other)
    return _edit(kind, Scene(source), 0, result) if fits(source) else None


def paint_region(obj: ShapeObject, kind: str, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) code cells, end exclusive, cutting through ``obj``'s 2 x 2 cells.

    Inpainting regenerates the region: one row or column of the object's cells, widened outwards by up
    to two cells. Outpainting keeps it (a strip through the object, the object's other half outside) and
    regenerates the rest.
    """
    grid = IMAGE_SIZE // CODE_CELL
    rows, cols = obj.cell_span(0), obj.cell_span(1)
    axis, side = rng.randrange(2), rng.randrange(2)
    span = (rows, cols)[axis]
    cut = span[side]
    reach = rng.randint(0, 2)  # widened away from the object's other half
    low, high = (cut - reach, cut + 1) if side == 0 else (cut, cut + 1 + reach)
    low, high = max(low, 0), min(high, grid)
    other = (cols, rows)[axis]
    across = (other[0], other[-1] + 1) if kind == "inpaint" else (0, grid)
    if axis == 0:
        return low, across[0], high, across[1]
    return across[0], low, across[1], high


def region_mask(region: tuple[int, int, int, int], kind: str) -> Image.Image:
    """The mask image (white = regenerate) of a painting region: the region itself, or its outside."""
    top, left, bottom, right = (value * CODE_CELL for value in region)
    inside, outside = (255, 0) if kind == "inpaint" else (0, 255)
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), outside)
    image.paste(inside, (left, top, right, bottom))
    return image
