"""Notebook 1's photo table in a real browser: JupyterLab 4 in headless Chromium, as a new user meets it.

A project holds four photos, one with a caption file and one with a mask file. JupyterLab opens a copy of
notebook 1 (the tiny model, a tiny random BLIP as captioner and a tiny random CLIPSeg as segmenter, masked loss
on, no drafting when the cell runs) and runs all cells. The test reads the table's caption boxes, presses
"Draft captions" and sees the three missing captions appear in their boxes and on disk (the existing one left
byte for byte), edits one caption by typing and leaving the box and finds it saved, presses "Make masks" and
sees the notes say which masks were made, and finds no traceback in the notebook or JupyterLab's log console.

The machinery (JupyterLab on a free port with a token, Chromium, Run All, the failure evidence) is
test_lab_training's: its `lab` and `page` fixtures run here on this module's `lab_dirs`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import test_lab_training as training
from test_lab_training import (MISSING, NOTEBOOKS, REQUIRE_ENV, _decoded, _menu, _open_and_run_all,
                               assert_log_console_clean, run_keeping_evidence)

# Module-scoped fixtures of the training test, resolved against this module's `lab_dirs` ("root", "served").
lab, page = training.lab, training.page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

NAME = "01_setup.ipynb"
N_PHOTOS = 4
CAPTIONED, MASKED = 0, 1  # subject-0 has a caption file, subject-1 a mask file
EXISTING_CAPTION = "[trigger] on a table"
TYPED_CAPTION = "[trigger] beside a red ball"


@pytest.fixture(scope="module")
def lab_dirs(tiny_model, tmp_path_factory):
    """A project with four photos (one captioned, one masked), and the server's root holding notebook 1 with
    parameters: the tiny model, a tiny BLIP and a tiny CLIPSeg, masked loss, no upload and no drafting."""
    if MISSING:  # only with DREAMBOOTH_NB_REQUIRE_BROWSER=1 (CI): a missing piece fails instead of skipping
        pytest.fail(f"{REQUIRE_ENV}=1 but {MISSING}")
    import nbformat
    from PIL import Image, ImageDraw
    from tiny_captioner import build_tiny_blip
    from tiny_segmenter import build_tiny_clipseg

    from dreambooth_nb.notebook.demo import inject_parameters, write_subject

    root = tmp_path_factory.mktemp("browser-photos")
    project = root / "project"
    instance = project / "instance"
    instance_prompt, class_prompt, _ = write_subject(instance, n=N_PHOTOS)
    (instance / f"subject-{CAPTIONED}.txt").write_text(EXISTING_CAPTION)
    with Image.open(instance / f"subject-{MASKED}.png") as photo:
        mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).ellipse((mask.width // 4, mask.height // 4, 3 * mask.width // 4, 3 * mask.height // 4),
                                 fill=255)
    mask.save(instance / f"subject-{MASKED}.mask.png")
    served = root / "lab"
    served.mkdir()
    parameters = dict(PROJECT_DIR=str(project), MODEL_ID=str(tiny_model), UPLOAD_PHOTOS=False, PRESET="object",
                      FIT_TO_GPU=True, INSTANCE_PROMPT=instance_prompt, CLASS_PROMPT=class_prompt,
                      PRIOR_PRESERVATION="off", RESOLUTION=32, LEARNING_RATE=1e-4, MAX_STEPS=8,
                      CAPTIONER=str(build_tiny_blip(root / "captioner")), DRAFT_CAPTIONS=False, MASKED_LOSS=True,
                      MASK_SEGMENTER=str(build_tiny_clipseg(root / "segmenter")), CLASS_IMAGES_FROM_CAPTIONS=False)
    nbformat.write(inject_parameters(nbformat.read(NOTEBOOKS / NAME, as_version=4), parameters),
                   str(served / NAME))
    return {"root": root, "project": project, "instance": instance, "served": served}


class PhotoPanel:
    """The photo table's parts, found by what they show (one subject: one table)."""

    def __init__(self, page):
        self.page = page
        self.draft = page.locator("button.widget-button", has_text="Draft captions").last
        self.box = page.locator(".widget-vbox", has=self.draft).last
        self.masks = self.box.locator("button.widget-button", has_text="Make masks")
        self.rows = self.box.locator(".widget-hbox", has=page.locator("textarea"))
        self.captions = self.box.locator(".widget-textarea textarea")
        self.status = self.box.locator(".widget-hprogress + .widget-html .widget-html-content")

    def texts(self) -> list[str]:
        """What each caption box holds, in the table's order."""
        return [self.captions.nth(i).input_value() for i in range(self.captions.count())]

    def status_if(self, predicate) -> str | None:
        """The status line's text if `predicate(text)`, else None."""
        text = self.status.inner_text().strip()
        return text if predicate(text) else None

    def note(self, i: int) -> str:
        return self.rows.nth(i).locator(".widget-html-content").inner_text().strip()

    def wait(self, what: str, predicate, *, timeout: float):
        """Poll `predicate()` until it returns something true; fail naming `what` and the status line."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"never {what} within {timeout:.0f} s; the status says: "
                                     f"{self.status.inner_text().strip()!r}")
            time.sleep(0.2)


def test_photo_table_drafts_edits_and_masks_in_jupyterlab(page, lab, lab_dirs):
    panel = PhotoPanel(page)
    run_keeping_evidence(lambda: _scenario(page, lab, panel, lab_dirs["instance"]), page=page, lab=lab, panel=panel,
                         folder=lab_dirs["root"] / "evidence")


def _scenario(page, lab, panel: PhotoPanel, instance: Path) -> None:
    # Open notebook 1 and Run All; the table shows one caption box per photo.
    _open_and_run_all(page, lab, NAME)
    dialog = page.locator(".jp-Dialog")
    panel.draft.or_(dialog).first.wait_for(timeout=120_000)
    if dialog.is_visible():  # Run All raced the kernel's start: take the default kernel and run all again
        dialog.locator("button.jp-mod-accept").click()
        page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r" \| Idle$")).wait_for(timeout=90_000)
        _menu(page, "Run", "runmenu:run-all")
        panel.draft.wait_for(timeout=120_000)
    panel.box.scroll_into_view_if_needed()
    panel.wait("4 caption boxes", lambda: panel.captions.count() == N_PHOTOS, timeout=30)
    assert panel.rows.count() == N_PHOTOS, f"{panel.rows.count()} rows for {N_PHOTOS} photos"
    photos = [Path(p) for p in lab.evaluate(NAME, "[str(p) for p in tables[0].photos]")]
    assert [p.name for p in photos] == [f"subject-{i}.png" for i in range(N_PHOTOS)], photos
    assert _decoded(panel.box.locator(".widget-image"), N_PHOTOS), "the thumbnails are not all shown"
    assert panel.masks.is_visible(), "Make masks is hidden although MASKED_LOSS is on"
    boxes = panel.texts()
    assert boxes == [EXISTING_CAPTION if i == CAPTIONED else "" for i in range(N_PHOTOS)], boxes
    assert "Mask: its own file." in panel.note(MASKED), panel.note(MASKED)
    for i in range(N_PHOTOS):
        if i != MASKED:
            assert "No mask yet: Make masks" in panel.note(i), (i, panel.note(i))
    existing = (instance / f"subject-{CAPTIONED}.txt").read_bytes()

    # Draft captions: the three empty boxes fill (in the background thread), the files follow.
    t0 = time.monotonic()
    panel.draft.click()
    ended = ("Drafted", "Every photo", "Failed", "Stopped")
    status = panel.wait("'Drafted 3 caption(s)'", lambda: panel.status_if(lambda t: t.startswith(ended)), timeout=60)
    assert status.startswith("Drafted 3 caption(s) (1 photo(s) had one)"), status
    drafted = panel.wait("the drafted captions in their boxes", lambda: all(panel.texts()) and panel.texts(),
                         timeout=10)
    print(f"\ndrafting took {time.monotonic() - t0:.1f} s; boxes: {drafted}")
    for i, (photo, text) in enumerate(zip(photos, drafted)):
        file = photo.with_suffix(".txt")
        if i == CAPTIONED:
            assert text == EXISTING_CAPTION and file.read_bytes() == existing, f"the existing caption changed: {text!r}"
        else:
            assert "[trigger]" in text, f"{photo.name}'s draft has no [trigger]: {text!r}"
            assert file.is_file() and file.read_text().strip() == text, f"{file.name} does not hold the box's {text!r}"
            assert "Drafted" in panel.note(i), (i, panel.note(i))

    # Edit a caption by typing, then leave the box: it is saved to its file.
    edited = next(i for i in range(N_PHOTOS) if i != CAPTIONED)
    file = photos[edited].with_suffix(".txt")
    box = panel.captions.nth(edited)
    box.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(TYPED_CAPTION)
    page.keyboard.press("Tab")
    panel.wait(f"{file.name} saved with the typed caption", lambda: file.read_text() == TYPED_CAPTION + "\n", timeout=15)
    panel.wait(f"'Saved {file.name}.'", lambda: panel.status_if(lambda t: t == f"Saved {file.name}."), timeout=10)
    assert (instance / f"subject-{CAPTIONED}.txt").read_bytes() == existing

    # Make masks: the photos without a mask file get one, made automatically; the mask file stays its own.
    t0 = time.monotonic()
    panel.masks.click()
    auto = [i for i in range(N_PHOTOS) if i != MASKED]
    panel.wait("'Mask: made automatically' beside every photo without a mask file",
               lambda: all("Mask: made automatically" in panel.note(i) for i in auto), timeout=60)
    print(f"masking took {time.monotonic() - t0:.1f} s")
    assert "Mask: its own file." in panel.note(MASKED), panel.note(MASKED)
    assert not panel.masks.is_disabled(), "Make masks stays disabled after masking"
    summary = panel.box.locator(".widget-html-content").first.inner_text()
    assert f"{N_PHOTOS} with a mask" in summary, summary
    cached = lab.evaluate(NAME, "len(list(mask_cache_dir(tables[0].config).glob('*.png')))",
                          setup="from dreambooth_nb.training.data import mask_cache_dir")
    assert cached == len(auto), f"{cached} automatic masks cached where training reads them, {len(auto)} expected"
    on_disk = [photo.with_suffix(".txt").read_text().strip() for photo in photos]
    assert on_disk == panel.texts(), f"the boxes and the caption files differ: {panel.texts()} != {on_disk}"

    # No traceback in the notebook, nor in JupyterLab's log console (where a widget callback's error lands).
    page.wait_for_timeout(500)
    notebook = page.locator(".jp-Notebook").inner_text()
    assert "Traceback" not in notebook, "the notebook shows a traceback"
    assert_log_console_clean(page)
