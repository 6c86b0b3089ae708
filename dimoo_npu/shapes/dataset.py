"""Write the shapes world as a training manifest (JSONL) for `dimoo pretokenize`, with its images.

The mix covers every task the CLI offers: text-to-image (single objects and two-object relations),
inpainting (one object's box, one half of the picture, or a region cutting through an object),
outpainting (everything but a strip through an object), editing (the six edit kinds of
`world.EDITS`), captions and understanding questions. Only training-split objects are used, source and
target pictures alike, so the held-out combinations stay unseen. Images are written once per distinct scene.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dimoo_npu.files.atomic import write_atomically, write_text_atomically
from dimoo_npu.shapes import world

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataMix:
    """How many records of each kind the manifest holds."""

    # Weighted towards what the shipped model (which seeds the retrain) has not learnt: edits and captions.
    t2i: int = 4000  # colour binding learns slowest: 0.69 even on training prompts with 4000 t2i / 5000 mmu
    inpaint: int = 800  # half an object's box or a half of the picture, half a region cutting through an object
    outpaint: int = 600
    mmu: int = 2500  # questions reached 1.00 on held-out images with 3000 and 3400 steps
    caption: int = 2000
    edit: int = 900  # per edit kind
    edit_weights: tuple[tuple[str, float], ...] = ()  # (kind, factor): that kind gets round(edit * factor) records
    two_object_caption_share: float = 0.4
    two_object_share: float = 0.15  # of the text-to-image and inpainting records
    partial_caption_share: float = 0.3  # of single-object text-to-image records: one attribute left out
    seed: int = 0


def scaled(mix: DataMix, factor: float) -> DataMix:
    """``mix`` with every record count scaled (at least one each): small mixes for smoke runs."""
    counts = {
        name: max(1, round(getattr(mix, name) * factor))
        for name in ("t2i", "inpaint", "outpaint", "mmu", "caption", "edit")
    }
    return dataclasses.replace(mix, **counts)


def edit_counts(mix: DataMix) -> dict[str, int]:
    """Records per edit kind: ``mix.edit`` each, scaled by the kinds' ``edit_weights``."""
    weights = dict(mix.edit_weights)
    return {kind: round(mix.edit * weights.get(kind, 1.0)) for kind in world.EDITS}


def scene_key(scene: world.Scene) -> str:
    """A file name that says what the picture shows: 'circle-red-large-32-16' (pixel centre y, x; '+' joins two)."""
    return "+".join("-".join([o.shape, o.colour, o.size, *map(str, o.centre)]) for o in scene.objects) or "empty"


def _save_png(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def mask_images() -> dict[str, Image.Image]:
    """Regions to regenerate (white): the 32 x 32 box around every placement centre, and each half of the picture."""
    size, masks = world.IMAGE_SIZE, {}
    half_box = world.SIZES["large"] // 2
    centres = sorted({c for third in world.PLACEMENTS for c in third})
    for cy, cx in itertools.product(centres, centres):
        image = Image.new("L", (size, size), 0)
        image.paste(255, (cx - half_box, cy - half_box, cx + half_box, cy + half_box))
        masks[f"box-{cy}-{cx}"] = image
    for name, box in {
        "left": (0, 0, 64, 128),
        "right": (64, 0, 128, 128),
        "top": (0, 0, 128, 64),
        "bottom": (0, 64, 128, 128),
    }.items():
        image = Image.new("L", (size, size), 0)
        image.paste(255, box)
        masks[f"half-{name}"] = image
    return masks


class ManifestWriter:
    """Collects records and writes each distinct image once under ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.masks = {}
        for name, image in mask_images().items():
            path = folder / "masks" / f"{name}.png"
            _save_png(image, path)
            self.masks[name] = self._relative(path)

    def image(self, scene: world.Scene) -> str:
        path = self.folder / "images" / f"{scene_key(scene)}.png"
        if not path.exists():
            _save_png(world.render(scene), path)
        return self._relative(path)

    def region_mask(self, region: tuple[int, int, int, int], kind: str) -> str:
        """A cut-through painting mask (see `world.paint_region`), written once."""
        path = self.folder / "masks" / f"{kind}-{'-'.join(map(str, region))}.png"
        if not path.exists():
            _save_png(world.region_mask(region, kind), path)
        return self._relative(path)

    def _relative(self, path: Path) -> str:
        """The path as the manifest records it: relative to its folder, so the folder can move."""
        return path.relative_to(self.folder).as_posix()

    def add(self, task: str, **fields) -> None:
        self.records.append({"id": f"{task}-{len(self.records):06d}", "task": task, **fields})

    def write(self) -> Path:
        text = "".join(json.dumps(record) + "\n" for record in self.records)
        return write_text_atomically(self.folder / "manifest.jsonl", text)


def _scenes(rng: random.Random, count: int, two_object_share: float):
    seed = rng.randrange(1 << 30)
    return world.sample_scenes(seed, count, "train", two_object_share)


def _inpaint_mask(writer: ManifestWriter, scene: world.Scene, rng: random.Random) -> str:
    """Half the time a region cutting through an object; else mostly an object's own box, or a half."""
    if rng.random() < 0.5:
        return writer.region_mask(world.paint_region(rng.choice(scene.objects), "inpaint", rng), "inpaint")
    if rng.random() < 0.7:
        cy, cx = rng.choice(scene.objects).centre
        return writer.masks[f"box-{cy}-{cx}"]
    return writer.masks[f"half-{rng.choice(['left', 'right', 'top', 'bottom'])}"]


def write_manifest(folder: str | Path, mix: DataMix = DataMix(), progress: bool = True) -> Path:
    """Render the mix into ``folder`` (images/, masks/, manifest.jsonl); returns the manifest path."""
    folder = Path(folder)
    rng = random.Random(mix.seed)
    writer = ManifestWriter(folder)
    edits = edit_counts(mix)
    total = mix.t2i + mix.inpaint + mix.outpaint + mix.mmu + mix.caption + sum(edits.values())
    bar = tqdm(total=total, desc="shapes manifest", disable=not progress)
    for scene in _scenes(rng, mix.t2i, mix.two_object_share):
        partial = len(scene.objects) == 1 and rng.random() < mix.partial_caption_share
        prompt = world.partial_caption(scene.objects[0], rng) if partial else world.caption(scene, rng)
        writer.add("t2i", prompt=prompt, target_image=writer.image(scene))
        bar.update()
    for scene in _scenes(rng, mix.inpaint, mix.two_object_share):
        mask = _inpaint_mask(writer, scene, rng)
        writer.add("inpaint", prompt=world.caption(scene, rng), target_image=writer.image(scene), mask=mask)
        bar.update()
    for scene in _scenes(rng, mix.outpaint, 0.0):
        mask = writer.region_mask(world.paint_region(scene.objects[0], "outpaint", rng), "outpaint")
        writer.add("inpaint", prompt=world.caption(scene, rng), target_image=writer.image(scene), mask=mask)
        bar.update()
    for kind, count in edits.items():
        for _ in range(count):
            edit = world.sample_edit(kind, rng)
            image, target = writer.image(edit.source), writer.image(edit.target)
            writer.add("edit", prompt=edit.instruction, image=image, target_image=target)
            bar.update()
    for _ in range(mix.caption):
        scene = world.picture_scene(rng, 2 if rng.random() < mix.two_object_caption_share else 1)
        question = rng.choice(world.CAPTION_QUESTIONS)
        writer.add("mmu", prompt=question, image=writer.image(scene), answer=world.scene_caption(scene))
        bar.update()
    for scene in _scenes(rng, mix.mmu, 0.0):
        (obj,) = scene.objects
        attribute = rng.choice(list(world.QUESTIONS))
        writer.add(
            "mmu",
            prompt=world.question(obj, attribute, rng),
            image=writer.image(scene),
            answer=world.answer(obj, attribute),
        )
        bar.update()
    bar.close()
    path = writer.write()
    logger.info("wrote %d records to %s", len(writer.records), path)
    return path
