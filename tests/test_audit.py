"""The photo-folder audit (`dataset.audit`) on toy photo sets with planted problems and on synthetic sizes, and
`scan_images`' treatment of `name.mask.png` files."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth_nb.dataset import audit
from dreambooth_nb.dataset.audit import Finding, summary, thumbnail_similarity
from dreambooth_nb.dataset.crop import centre_crop_box
from dreambooth_nb.dataset.images import scan_images
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.results.quality import EmbeddingJudge
from dreambooth_nb.toy import world
from dreambooth_nb.dataset.crop import center_crop_origin, resized_size


def run(named: dict, *, resolution=32, with_masks=True, embed=None) -> list[Finding]:
    """`audit.audit` on `world.photo_set_with_problems`-style {name: (photo, mask)}."""
    return audit.audit([Path(name) for name in named], [photo for photo, _ in named.values()], resolution=resolution,
                       masks=[mask for _, mask in named.values()] if with_masks else None, embed=embed)


def found(findings) -> set[tuple[str, tuple[str, ...]]]:
    return {(f.kind, tuple(p.name for p in f.photos)) for f in findings}


def with_noise(image: Image.Image, seed: int) -> Image.Image:
    pixels = np.asarray(image, float) + np.random.default_rng(seed).normal(0, 3, np.asarray(image).shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")


# --- the toy photo sets -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_exactly_the_planted_problems(seed):
    findings = run(world.photo_set_with_problems(seed))
    assert found(findings) == {("near-duplicate", ("burst-1.png", "burst-2.png")), ("small subject", ("tiny.png",)),
                               ("cut off", ("edge.png",))}
    assert all(f.crop is None for f in findings if f.kind != "cut off")


def test_small_and_cut_off_subjects_are_measured_on_the_ground_truth():
    photos = world.photo_set_with_problems()
    findings = {f.kind: f for f in run(photos)}
    # The tiny subject: a 5 px disc, pi * 2.5^2 = 19.6 px of the 32x32 crop (2 %); the rendered mask is that disc
    # within one supersampled pixel (1/4 px) of its outline: 2 pi 2.5 / 4 = 3.9 px, under half a percent.
    assert "tiny.png" in findings["small subject"].message and " 2 % " in findings["small subject"].message
    # The edge subject: 48x32 at resolution 32 keeps columns 8..39, the centred square.
    cut = findings["cut off"]
    assert cut.crop == (8, 0, 40, 32) == centre_crop_box((48, 32), 32)
    mask = np.asarray(photos["edge.png"][1], float)
    expected = 1 - mask[:, 8:40].sum() / mask.sum()
    assert f"{expected:.0%}".replace("%", " %") in cut.message and "edge.png" in cut.message
    # ...which is what the geometry gives: a disc of radius 9 at x = 7, cut by the image at x = 0 (7 px left of
    # the centre) and by the crop at x = 8 (1 px right of it); the segment beyond distance t from the centre
    # has area r^2 acos(t/r) - t sqrt(r^2 - t^2). The mask's outline is within 1/4 px: ~2 % of either area.
    segment = lambda t, r=9: r * r * math.acos(t / r) - t * math.sqrt(r * r - t * t)  # noqa: E731
    assert expected == pytest.approx(1 - segment(1) / (math.pi * 81 - segment(7)), abs=0.03)


def test_flags_nothing_on_the_clean_subject_photos():
    # world.subject_images(5) with their ground-truth masks: 32x32 (the crop is the whole photo), subjects of
    # 18-22 px (25 % or more of the crop). Its most alike pair, photos 1 and 3 (gray, 20 and 21 px, centres 1 px
    # apart), has a thumbnail similarity of 0.94: close to a near-duplicate, and under the 0.95 limit.
    pairs = world.subject_photos_with_masks(5)
    assert [np.asarray(p).tolist() for p, _ in pairs] == [np.asarray(p).tolist() for p in world.subject_images(5)]
    assert run({f"subject-{i}.png": pair for i, pair in enumerate(pairs)}) == []


def test_subject_mask_is_the_rendered_shape():
    for size, canvas in ((20, (32, 32)), (9, (48, 32))):
        photo, mask = world.subject_photo_with_mask(size=size, canvas=canvas)
        assert photo.size == mask.size == canvas and mask.mode == "L"
        # Drawn at 4x and box-filtered: the area is pi r^2 within the outline times one supersampled pixel.
        r = size / 2
        assert np.asarray(mask, float).sum() / 255 == pytest.approx(math.pi * r * r, abs=2 * math.pi * r / 4)
    photo, _ = world.subject_photo_with_mask()
    assert np.array_equal(np.asarray(photo), np.asarray(world.render_subject()))


# --- near-duplicates ----------------------------------------------------------------------------------


def test_thumbnail_similarity_is_stable_under_small_shifts_and_noise():
    # A 1 px shift along the stripes moves only the outline, by half a thumbnail pixel: about 1 - 2/(pi d c (1-p))
    # = 0.98 for a d = 18..22 px disc, c = 2 px thumbnail cells, p ~ 0.3 of the picture (measured 0.966 and up,
    # the pixel noise and the stripes' edges taking the rest).
    for size in (18, 20, 22):
        for x in (12.5, 16.0, 18.7):
            for y in (12.5, 16.0, 18.7):
                for background in world.SUBJECT_BACKGROUNDS:
                    a = world.render_subject(background=background, size=size, position=(x, y),
                                             rng=np.random.default_rng(size))
                    b = world.render_subject(background=background, size=size, position=(x + 1, y),
                                             rng=np.random.default_rng(size))
                    similarity = thumbnail_similarity([a, with_noise(b, seed=size)])[0, 1]
                    assert similarity >= audit.NEAR_DUPLICATE_SIMILARITY, (size, x, y, background)
    # A shift across the 8 px stripes is an eighth of their period: their part of the picture then correlates
    # only cos(2 pi / 8) = 0.71 with itself, which is no near-duplicate.
    a = world.render_subject(background="gray")
    assert thumbnail_similarity([a, world.render_subject(background="gray", position=(16, 17))])[0, 1] < 0.9


def test_thumbnail_similarity_separates_different_toy_objects():
    subject = [world.render_subject(background=b) for b in world.SUBJECT_BACKGROUNDS]
    others = [world.render(c, s, background=b, size=20) for c in world.COLOURS for s in world.SHAPES
              for b in world.BACKGROUNDS]
    others += [world.render_identified(name, size=20) for name in world.IDENTIFIERS]
    similarity = thumbnail_similarity(subject + others)[:2, 2:]
    assert similarity.max() < audit.NEAR_DUPLICATE_SIMILARITY
    # The same picture at another size, brightness or contrast is the same picture.
    photo = world.render_subject(rng=np.random.default_rng(0))
    brighter = Image.fromarray(np.clip(np.asarray(photo, float) * 0.8 + 30, 0, 255).astype(np.uint8))
    assert thumbnail_similarity([photo, photo.resize((96, 96), Image.BICUBIC), brighter]).min() > 0.99
    assert thumbnail_similarity([Image.new("RGB", (32, 32), (9, 9, 9)), photo])[0, 1] == 0  # plain grey: like nothing


def test_identical_photos_are_left_to_the_scan_and_near_ones_grouped():
    photos = world.photo_set_with_problems()
    burst = photos["burst-1.png"]
    # A byte copy of burst-1 is the scan's "same picture": the audit takes the two as one photo.
    named = {"burst-1.png": burst, "copy.png": (burst[0].copy(), burst[1]), "photo-1.png": photos["photo-1.png"]}
    assert run(named) == []
    named["burst-2.png"] = photos["burst-2.png"]
    assert found(run(named)) == {("near-duplicate", ("burst-1.png", "burst-2.png"))}
    # Three alike: one finding naming all three, not three pairs.
    named["burst-3.png"] = (with_noise(photos["burst-2.png"][0], seed=3), burst[1])
    message = next(f.message for f in run(named))
    assert found(run(named)) == {("near-duplicate", ("burst-1.png", "burst-2.png", "burst-3.png"))}
    assert "burst-1.png, burst-2.png and burst-3.png look alike" in message and "keep the best one" in message


def test_embeddings_decide_near_duplicates_when_given():
    photos = world.photo_set_with_problems()
    names = list(photos)
    # A deterministic embedding: photos 1 and 2 point the same way (cosine 1), burst-2 is 0.96 alike photo-2,
    # the rest are orthogonal: one group of three (joined through photo-2), and the bursts are not grouped.
    vectors = {id(photo): np.eye(len(names))[i] for i, (photo, _) in enumerate(photos.values())}
    vectors[id(photos["photo-2.png"][0])] = vectors[id(photos["photo-1.png"][0])]
    vectors[id(photos["burst-2.png"][0])] = 0.96 * vectors[id(photos["photo-1.png"][0])] + 0.28 * np.eye(7)[4]
    embed = lambda images: torch.tensor(np.stack([vectors[id(im)] for im in images]))  # noqa: E731
    findings = run(photos, embed=embed)
    assert ("near-duplicate", ("photo-1.png", "photo-2.png", "burst-2.png")) in found(findings)
    assert not any(f.kind == "near-duplicate" and "burst-1.png" in f.message for f in findings)
    # The project's image model (random tiny DINOv2 here): two shots this close embed to nearly the same point.
    judge = EmbeddingJudge.tiny()
    findings = run(photos, embed=judge.image_embeddings)
    assert any({"burst-1.png", "burst-2.png"} <= {p.name for p in f.photos} for f in findings
               if f.kind == "near-duplicate")


# --- sizes --------------------------------------------------------------------------------------------


def test_centre_crop_box_is_trainings_crop():
    for size in [(1600, 900), (900, 1600), (1200, 800), (4000, 3000), (513, 512), (300, 200), (48, 32), (32, 32)]:
        for resolution in (32, 512, 1024):
            top, left = center_crop_origin(size, resolution)
            width, height = resized_size(size, resolution)
            box = centre_crop_box(size, resolution)
            sx, sy = width / size[0], height / size[1]
            # The same square, mapped back to the photo's pixels and rounded: within half a pixel.
            assert box == pytest.approx((left / sx, top / sy, (left + resolution) / sx, (top + resolution) / sy),
                                        abs=0.5)
    assert centre_crop_box((1600, 900), 512) == (350, 0, 1250, 900)


def test_aspect_ratio_and_low_resolution_findings():
    def image(size, original=None):  # random pixels: no two alike
        im = Image.fromarray(np.random.default_rng(size).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        if original:
            im.info["original_size"] = original
        return im

    cases = {"wide.jpg": image((1600, 900)), "camera.jpg": image((1200, 800)), "tall.jpg": image((512, 1024)),
             "small.jpg": image((400, 300)), "blurry.jpg": image((200, 150)),
             "big.jpg": image((683, 512), (4000, 3000))}  # loaded at max_side=512 from a 4000x3000 original
    findings = audit.audit([Path(n) for n in cases], list(cases.values()), resolution=512)
    assert found(findings) == {("aspect ratio", ("wide.jpg",)), ("aspect ratio", ("tall.jpg",)),
                               ("low resolution", ("small.jpg",))}
    by_name = {f.photos[0].name: f.message for f in findings}
    assert "1600x900" in by_name["wide.jpg"] and "44 %" in by_name["wide.jpg"]  # 1 - 900/1600
    assert "50 %" in by_name["tall.jpg"] and "crop the photo square" in by_name["tall.jpg"]
    assert "400x300" in by_name["small.jpg"] and "x1.7" in by_name["small.jpg"]  # 512/300
    # 3:2 camera photos (exactly 1.5) pass; blurry.jpg (under half) is the scan's warning, not repeated here.


def test_a_masked_photo_is_judged_by_its_subject_not_its_shape():
    photo = Image.new("RGB", (1600, 900), (200, 200, 200))
    centred, left = (Image.new("L", (1600, 900), 0) for _ in range(2))
    ImageDraw.Draw(centred).ellipse((500, 150, 1100, 750), fill=255)
    ImageDraw.Draw(left).ellipse((0, 150, 600, 750), fill=255)  # x 0..600; the crop keeps x 350..1250
    findings = audit.audit([Path("centred.jpg"), Path("left.jpg")], [photo, photo], resolution=512,
                           masks=[centred, left.resize((800, 450))])  # a mask at another size is scaled
    assert found(findings) == {("cut off", ("left.jpg",))}
    # Disc of radius 300 centred at x = 300, crop edge at x = 350: the segment beyond t = 50 stays, 39.4 % of it.
    # Drawn with inclusive edges (radius 300.5) and the crop's edge rounded in the 910 px wide training image
    # (x = 349.9 here), the mask's share is within a fraction of a percent: the message's whole percent within 1.
    kept = (300**2 * math.acos(50 / 300) - 50 * math.sqrt(300**2 - 50**2)) / (math.pi * 300**2)
    assert findings[0].crop == (350, 0, 1250, 900)
    cut = int(re.search(r"cuts off (\d+) %", findings[0].message).group(1))
    assert abs(cut - 100 * (1 - kept)) <= 1


def test_empty_mask_and_bad_arguments():
    photo = Image.new("RGB", (64, 64))
    (finding,) = audit.audit([Path("a.png")], [photo], resolution=64, masks=[Image.new("L", (64, 64))])
    assert finding.kind == "small subject" and "marks no subject" in finding.message
    with pytest.raises(ConfigError, match="one image"):
        audit.audit([Path("a.png"), Path("b.png")], [photo], resolution=64)
    with pytest.raises(ConfigError, match="resolution"):
        audit.audit([Path("a.png")], [photo], resolution=0)


def test_summary_lists_findings_by_kind():
    assert summary([]) == "Photo audit: nothing to fix."
    text = summary(run(world.photo_set_with_problems()))
    assert text.splitlines()[0] == "Photo audit: 3 thing(s) to look at (nothing was changed or deleted):"
    assert "Near-duplicate:" in text and "Small subject:" in text and "Cut off:" in text
    assert "  - tiny.png: the subject fills only 2 % of the 32x32 training crop" in text


# --- scan_images and masks ----------------------------------------------------------------------------


def write_set(folder: Path, names) -> None:
    photos = world.photo_set_with_problems()
    for name in names:
        photo, mask = photos[name]
        photo.save(folder / name)
        mask.save(folder / name.replace(".png", ".mask.png"))


def test_scan_pairs_masks_with_their_photos(tmp_path):
    write_set(tmp_path, ["photo-1.png", "photo-2.png", "edge.png"])
    (tmp_path / "photo-2.mask.png").rename(tmp_path / "photo-2.MASK.PNG")  # any case
    shutil.copy(tmp_path / "edge.mask.png", tmp_path / "gone.mask.png")  # no photo of its name
    (tmp_path / "broken.jpg").write_bytes(b"")
    shutil.copy(tmp_path / "edge.mask.png", tmp_path / "broken.mask.png")  # its photo is skipped
    report = scan_images(tmp_path, resolution=32)
    assert [p.name for p in report.usable] == ["edge.png", "photo-1.png", "photo-2.png"]
    assert [p.name for p, _ in report.skipped] == ["broken.jpg"]
    assert {p.name: m.name for p, m in report.masks.items()} == {
        "edge.png": "edge.mask.png", "photo-1.png": "photo-1.mask.png", "photo-2.png": "photo-2.MASK.PNG"}
    orphans = [w for w in report.warnings if ".mask.png is ignored" in w]
    assert len(orphans) == 2 and all("dog1.jpg + dog1.mask.png" in w for w in orphans)
    assert any(w.startswith("gone.mask.png is ignored: there is no photo named gone.jpg") for w in orphans)
    assert any(w.startswith("broken.mask.png is ignored: its photo broken.* was skipped") for w in orphans)
    assert "Masks: 3 of 3 photos have one (.mask.png)" in report.summary()


def test_scan_of_masks_alone_says_there_is_no_photo(tmp_path):
    write_set(tmp_path, ["photo-1.png"])
    (tmp_path / "photo-1.png").unlink()
    with pytest.raises(DataError, match="photo-1.mask.png: a mask, with no photo of its name"):
        scan_images(tmp_path, resolution=32)
