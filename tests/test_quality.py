"""Image metrics and the suggested snapshot: the rule on its own, the judges on known images, and compare()
writing the metrics, the plot and each run's suggestion, which export takes by default."""

import json
import shutil

import numpy as np
import pytest

from dreambooth_nb import preset
from dreambooth_nb.results import quality
from dreambooth_nb import storage
from dreambooth_nb.toy import world as toyworld
from dreambooth_nb.results.compare import compare
from dreambooth_nb.results.evaluate import EvalSpec
from dreambooth_nb.results.export import choose_snapshot
from dreambooth_nb.results.quality import Roles, Tolerances, suggest

TOL = Tolerances(prompt=0.25, prior=0.15, gain=0.1)
BASE = {"subject_fidelity": 0.1, "prompt_fidelity": 0.9, "prior_preservation": 1.0, "diversity": 0.3}


def metrics(subject, prompt=0.9, prior=1.0):
    return {"subject_fidelity": subject, "prompt_fidelity": prompt, "prior_preservation": prior, "diversity": 0.3}


# --- The rule ---------------------------------------------------------------------------------------------
def test_suggest_takes_the_best_subject_fidelity_within_the_tolerances():
    steps = {100: metrics(0.3), 200: metrics(0.5, prompt=0.7), 400: metrics(0.8, prompt=0.5)}
    step, why = suggest(steps, base=BASE, tolerances=TOL)
    assert step == 200, why  # 400 learned more but lost the context: 0.5 < 0.9 − 0.25
    assert "1 moved too far" in why
    step, _ = suggest({100: metrics(0.3), 200: metrics(0.6, prior=0.8)}, base=BASE, tolerances=TOL)
    assert step == 100  # 200 drifted: prior preservation 0.8 < 1 − 0.15
    step, _ = suggest({100: metrics(0.5), 200: metrics(0.5)}, base=BASE, tolerances=TOL)
    assert step == 100  # a tie goes to the earlier step


def test_suggest_says_why_there_is_none():
    step, why = suggest({100: metrics(0.15), 200: metrics(0.18)}, base=BASE, tolerances=TOL)
    assert step is None and "has learned the subject yet" in why and "train longer" in why
    step, why = suggest({100: metrics(0.6, prior=0.5), 200: metrics(0.7, prompt=0.1)}, base=BASE, tolerances=TOL)
    assert step is None and "lower learning rate" in why and "step 100: prior preservation 0.50" in why
    step, why = suggest({100: metrics(None)}, base=BASE, tolerances=TOL)
    assert step is None and "could not be measured" in why


def test_missing_context_or_class_prompt_leaves_its_check_out():
    steps = {100: metrics(0.3, prompt=None, prior=None), 200: metrics(0.6, prompt=None, prior=None)}
    assert suggest(steps, base={**BASE, "prompt_fidelity": None}, tolerances=TOL)[0] == 200


def test_roles_of_the_spec_prompts():
    prompts = ["a photo of sks dog", "a photo of a dog", "a photo of sks dog in the snow", "a cat"]
    roles = Roles.of(prompts, instance_prompt="a photo of sks dog", class_prompt="a photo of a dog")
    assert (roles.instance, roles.klass, roles.contexts) == ("a photo of sks dog", "a photo of a dog",
                                                             ["a photo of sks dog in the snow"])
    assert Roles.of(prompts[:1], instance_prompt="x", class_prompt=None) == Roles(None, None, [])


# --- The judges on images whose answer is known --------------------------------------------------------------
def circles(colour, background="white", seeds=range(4)):
    return [toyworld.render(colour, "circle", background=background, size=18, rng=np.random.default_rng(s))
            for s in seeds]


def test_toy_judge_on_rendered_ground_truth():
    """Base model: plain circles. Step 100 learned the subject and keeps the rest; step 200 copies the photos
    everywhere (the class prompt draws the subject, the context loses its black background)."""
    judge = quality.ToyJudge()
    photos = toyworld.subject_images()
    subject = toyworld.subject_images(n=4, seed=1)
    on_black = [toyworld.render_subject(background="black", rng=np.random.default_rng(s)) for s in range(4)]
    instance, klass, context = (toyworld.SUBJECT_INSTANCE_PROMPT, toyworld.SUBJECT_CLASS_PROMPT,
                                toyworld.SUBJECT_CONTEXT_PROMPT)
    roles = Roles.of([instance, klass, context], instance_prompt=instance, class_prompt=klass)
    base = {instance: circles("red"), klass: circles("blue"), context: circles("green", "black")}
    learned = {instance: subject, klass: circles("blue"), context: on_black}
    overfit = {instance: subject, klass: subject, context: subject}
    report = quality.assess([{"run": "LR 1e-4", "lr": 1e-4, "folder": None, "subjects": [(roles, photos)],
                              "steps": {100: learned, 200: overfit}}], {"images": base}, judge=judge)
    (run,) = report["runs"]
    b, s100, s200 = run["base"], run["steps"]["100"], run["steps"]["200"]
    assert b["subject_fidelity"] < 0.1 < 0.6 < s100["subject_fidelity"]
    assert b["prior_preservation"] == s100["prior_preservation"] == 1.0 and s200["prior_preservation"] < 0.85
    assert b["prompt_fidelity"] == s100["prompt_fidelity"] == 1.0 and s200["prompt_fidelity"] == 0.0
    assert judge.diversity([subject[0]] * 3) == 0.0 < s100["diversity"]  # one image thrice vs four photos
    assert run["suggested"] == 100 and report["suggested"] == {"run": "LR 1e-4", "step": 100}
    assert quality.highlights(report) == [{"run": "LR 1e-4", "step": 100}]
    assert judge.prompt_fidelity(subject, "a photo of sks circle in the snow") is None  # no such context here
    text = quality.summary(report)
    assert "100 ★" in text and "toy world" in text and "LR 1e-4: step 100" in text


def test_the_bleed_matrix_names_a_subject_that_looks_like_another():
    """Two toy subjects, the striped circle and the striped square (same colours, other shapes): renders of each
    scored against both subjects' photos. Each looks like its own photos only; a square prompt that draws the
    circle is named."""
    judge = quality.ToyJudge()
    circle, square = "a photo of sks circle", "a photo of sks square"
    subjects = [(Roles(instance=circle, klass=None, contexts=[]), toyworld.subject_images(4, seed=0)),
                (Roles(instance=square, klass=None, contexts=[]), toyworld.subject_images(4, seed=0, shape="square"))]
    own = {circle: toyworld.subject_images(4, seed=1), square: toyworld.subject_images(4, seed=1, shape="square")}
    found = quality.bleed(judge, own, subjects=subjects)
    (cc, cs), (sc, ss) = found["matrix"]
    assert found["subjects"] == [circle, square] and cc > 0.5 and ss > 0.5 and cs == sc == 0.0
    assert found["alike"] == []
    bled = quality.bleed(judge, {**own, square: toyworld.subject_images(4, seed=2)}, subjects=subjects)
    assert bled["alike"] == [f"'{square}' looks like the photos of '{circle}' ({bled['matrix'][1][0]:.2f}; its own "
                             "0.00)"]
    assert quality.bleed(judge, own, subjects=subjects[:1]) is None  # one subject: nothing to bleed into
    # In a comparison's report: at the run's suggested step (none here: no base renders), else its last
    run = {"run": "lr1e-4", "lr": 1e-4, "folder": None, "subjects": subjects, "steps": {200: own, 400: own}}
    report = quality.assess([run], None, judge=judge)
    assert report["runs"][0]["bleed"]["step"] == 400 and "No subject looks like another." in quality.summary(report)
    lines = quality._bleed_lines("lr1e-4", {"step": 400, **bled})
    assert lines[0].startswith("lr1e-4, step 400: renders of (rows) against photos of") and "looks like" in lines[-1]


def test_tiny_embedding_judge_measures_what_it_should():
    judge = quality.EmbeddingJudge.tiny()
    a, b = circles("red"), circles("blue", "black")
    assert judge.subject_fidelity(a[:1], a[:1]) == pytest.approx(1.0, abs=1e-5)
    assert judge.prior_preservation(a, a) == pytest.approx(1.0, abs=1e-5)
    assert judge.prior_preservation(a, b) < 1.0
    assert judge.diversity([a[0]] * 3) == pytest.approx(0.0, abs=1e-5) and judge.diversity(a[:1]) is None
    assert -1.0 <= judge.prompt_fidelity(a, "a photo of sks dog in the snow") <= 1.0


def test_judge_for_the_toy_model_and_offline(tiny_model, capsys):
    assert isinstance(quality.judge_for(str(toyworld.TOY_MODEL_DIR)), quality.ToyJudge)
    assert quality.judge_for(str(tiny_model)) is None  # HF_HUB_OFFLINE: DINOv2 and CLIP cannot be fetched
    assert "could not be loaded" in capsys.readouterr().out


# --- compare(): metrics into the sidecar, the plot, each run's suggestion, export's default ---------------------
@pytest.fixture
def runs(tiny_model, photos, tmp_path):
    """Two finished runs made of the tiny model (steps 2 and 4), one with a validation history."""
    folders = []
    for lr in (1e-4, 5e-5):
        run = tmp_path / "runs" / f"lr-{lr:g}"
        for step in (2, 4):
            shutil.copytree(tiny_model, storage.snapshot_path(run, step))
        preset(pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(photos),
               instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", resolution=32,
               learning_rate=lr, output_dir=str(run)).to_json(run / "config.json")
        folders.append(run)
    storage.write_json(folders[0] / "history.json", {"steps": [1, 2, 3, 4], "losses": [0.2] * 4, "lrs": [1e-4] * 4,
                                                     "validation": [{"step": 2, "fit": 0.12, "prior": 0.2},
                                                                    {"step": 4, "fit": 0.08, "prior": 0.23}]})
    return folders


def test_compare_measures_marks_and_records_the_suggestion(runs, tiny_model):
    spec = EvalSpec(prompts=["a photo of sks dog", "a photo of a dog", "a photo of sks dog in the snow"],
                    seeds=[0, 1], num_inference_steps=2)
    grid = compare(runs, spec, judge=quality.EmbeddingJudge.tiny(), title="tiny")
    side = json.loads(grid.with_suffix(".json").read_text())
    assert side["rows"] == ["prompt", "seed"] and side["cols"] == ["run", "step"]
    assert side["col_labels"] == [["base model", 0], ["lr-0.0001", 2], ["lr-0.0001", 4], ["lr-5e-05", 2],
                                  ["lr-5e-05", 4]]
    assert side["shape"] == [6, 5] and all(c["labels"]["snapshot"] == str(tiny_model) for c in side["cells"]
                                           if c["col"] == 0)
    report = side["quality"]
    assert report["judge"].startswith("tiny") and "highest subject fidelity" in report["rule"]
    assert set(report["base"]) == set(quality.METRICS) and report["base"]["prior_preservation"] == 1.0
    first = report["runs"][0]
    assert first["steps"]["2"]["validation"] == {"fit": 0.12, "prior": 0.2}
    assert "validation" not in report["runs"][1]["steps"]["2"]  # an older run without it works the same
    # Every snapshot is the base model itself: nothing learned, nothing suggested, and export takes the last.
    assert first["suggested"] is None and "has learned the subject yet" in first["why"]
    assert side["highlight"] == []
    assert (grid.parent / side["metrics_plot"]).is_file()
    saved = json.loads((runs[0] / quality.SUGGESTION_FILE).read_text())
    assert saved["step"] is None and saved["grid"] == str(grid) and saved["spec"] == spec.key()
    assert choose_snapshot(runs[0]) == storage.snapshot_path(runs[0], 4)

    # A suggestion (as a comparison that found one writes it) is what export takes, unless a step is named.
    report["runs"][0].update(suggested=2, why="step 2: subject fidelity 0.61 (base model 0.10)")
    quality.write_suggestions(report, grid=grid, spec_key=spec.key())
    assert quality.suggested_step(runs[0]) == (2, "step 2: subject fidelity 0.61 (base model 0.10)")
    assert choose_snapshot(runs[0]) == storage.snapshot_path(runs[0], 2)
    assert choose_snapshot(runs[0], step=4) == storage.snapshot_path(runs[0], 4)


def test_compare_without_a_judge_or_a_base_model(runs):
    spec = EvalSpec(prompts=["a photo of sks dog"], seeds=[0], num_inference_steps=2)
    grid = compare(runs[:1], spec, judge=None, base=False)
    side = json.loads(grid.with_suffix(".json").read_text())
    assert side["quality"] is None and side["metrics_plot"] is None
    assert side["col_labels"] == [["lr-0.0001", 2], ["lr-0.0001", 4]]
    assert not (runs[0] / quality.SUGGESTION_FILE).exists()
    assert quality.summary(None).startswith("No image metrics")


def test_plot_draws_every_report(tmp_path):
    run = {"run": "LR 1e-4", "lr": 1e-4, "folder": None, "base": BASE, "suggested": 200, "why": "",
           "steps": {"100": {**metrics(0.3), "validation": {"fit": 0.1, "prior": 0.2}}, "200": metrics(0.5)}}
    report = {"judge": "toy", "rule": "", "tolerances": {"prompt": 0.25, "prior": 0.15, "gain": 0.1},
              "base": BASE, "runs": [run], "suggested": {"run": "LR 1e-4", "step": 200}}
    path = quality.plot({"prior off": report, "prior on": report}, path=tmp_path / "m.png", title="t")
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > 300
    with pytest.raises(Exception, match="no metrics"):
        quality.plot({"x": None}, path=tmp_path / "n.png")
