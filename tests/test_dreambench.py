"""DreamBench: the paper's prompts, its scores on hand-computed embeddings and with tiny judges, the table."""

import numpy as np
import pytest
from PIL import Image

from dreambooth_nb.errors import ConfigError, DreamboothError
from dreambooth_nb.results import dreambench


def images(n, colour=(200, 30, 30)):
    return [Image.new("RGB", (40, 32), tuple((c + 37 * i) % 256 for c in colour)) for i in range(n)]


@pytest.mark.parametrize("live", [False, True])
def test_prompts_are_dreambenchs_25(live):
    texts = dreambench.prompts(token="sks", class_noun="stuffed animal", live=live)
    assert len(texts) == 25 == len(set(texts))
    assert all(t.split().count("sks") == 1 and t.count("stuffed animal") == 1 for t in texts)
    assert texts[0] == "a sks stuffed animal in the jungle" and texts[-1] == "a cube shaped sks stuffed animal"
    assert ("a sks stuffed animal wearing a santa hat" in texts) == live
    assert ("a sks stuffed animal floating in an ocean of milk" in texts) == (not live)


def test_scores_with_a_tiny_judge():
    judge = dreambench.DreamBenchJudge.tiny()
    texts = dreambench.prompts(token="sks", class_noun="dog", live=True)[:2]
    one = dreambench.score(judge, renders={t: images(4) for t in texts}, photos=images(3), token="sks")
    assert set(one) == {"DINO", "CLIP-I", "CLIP-T", "images"} and one["images"] == 8
    assert all(-1.0 <= one[m] <= 1.0 for m in dreambench.METRICS)
    same = dreambench.score(judge, renders={texts[0]: images(4)[:1] * 4}, photos=images(1), token="sks")
    assert same["DINO"] == pytest.approx(1.0, abs=1e-5) and same["CLIP-I"] == pytest.approx(1.0, abs=1e-5)


def test_score_asks_for_the_papers_four_images_per_prompt():
    judge = dreambench.DreamBenchJudge.tiny()
    with pytest.raises(ValueError, match="3 images of 'a sks dog in the snow'.*4 per prompt"):
        dreambench.score(judge, renders={"a sks dog in the jungle": images(4), "a sks dog in the snow": images(3)},
                         photos=images(2), token="sks")
    with pytest.raises(ValueError, match="unique token 'zwx'"):
        dreambench.score(judge, renders={"a sks dog in the jungle": images(4)}, photos=images(2), token="zwx")
    with pytest.raises(DreamboothError, match="no real photos"):
        dreambench.score(judge, renders={"a sks dog in the jungle": images(4)}, photos=[], token="sks")


def test_the_averages_match_a_hand_computation(monkeypatch):
    """Known unit vectors in place of the models: every number below is worked out by hand."""
    judge = dreambench.DreamBenchJudge.tiny()
    e = np.eye(3, dtype=np.float32)
    diagonal = np.full((1, 3), 1 / np.sqrt(3), dtype=np.float32)
    # Images are told apart by their width: generated 10–17, photos 20–21.
    dino = {10: e[0], 11: e[0], 12: e[1], 13: e[1], 14: e[0], 15: e[2], 16: e[2], 17: e[2], 20: e[0], 21: e[1]}
    clip = {w: e[0] for w in range(10, 18)} | {20: e[0], 21: diagonal[0]}
    texts = {"a dog in the jungle": e[0], "a dog in the snow": e[1]}  # the token is gone from CLIP-T's text
    monkeypatch.setattr(judge, "image_embeddings", lambda ims: np.stack([dino[im.width] for im in ims]))
    monkeypatch.setattr(judge, "_clip_images", lambda ims: np.stack([clip[im.width] for im in ims]))
    monkeypatch.setattr(judge, "_clip_texts", lambda ts: np.stack([texts[t] for t in ts]))
    renders = {"a sks dog in the jungle": [Image.new("RGB", (w, 8)) for w in (10, 11, 12, 13)],
               "a sks dog in the snow": [Image.new("RGB", (w, 8)) for w in (14, 15, 16, 17)]}
    one = dreambench.score(judge, renders=renders, photos=[Image.new("RGB", (w, 8)) for w in (20, 21)], token="sks")
    # DINO: each generated image against both photos: e0 scores 1 then 0, e1 0 then 1, e2 0 and 0:
    # 16 pairs, 5 of them 1.
    assert one["DINO"] == pytest.approx(5 / 16, abs=1e-6)
    # CLIP-I: every generated image is e0; photo 1 is e0 (1), photo 2 the diagonal (1/√3).
    assert one["CLIP-I"] == pytest.approx((1 + 1 / np.sqrt(3)) / 2, abs=1e-6)
    # CLIP-T: the jungle's four images match their text (1), the snow's are orthogonal to theirs (0).
    assert one["CLIP-T"] == pytest.approx(0.5, abs=1e-6) and one["images"] == 8
    # Over subjects: the mean over all images, so a subject weighs by its image count.
    other = {"DINO": 1.0, "CLIP-I": 0.0, "CLIP-T": 1.0, "images": 4}
    both = dreambench.average([one, other])
    assert both["DINO"] == pytest.approx((8 * 5 / 16 + 4) / 12, abs=1e-6) and both["images"] == 12
    assert both["CLIP-T"] == pytest.approx((8 * 0.5 + 4) / 12, abs=1e-6)


def test_table_puts_the_run_beside_the_paper():
    text = dreambench.table({"DINO": 0.61234, "CLIP-I": 0.79, "CLIP-T": 0.3, "images": 3000})
    lines = text.splitlines()
    assert lines[0].startswith("| | DINO") and "| this run (3000 images) | 0.612 | 0.790 | 0.300 |" in lines
    assert "| DreamBooth (Stable Diffusion), paper | 0.668 | 0.803 | 0.305 |" in lines
    assert "| Real images, paper | 0.774 | 0.885 | — |" in lines and "0.696" in text


def test_standard_judge_says_what_to_do_when_it_cannot_load(monkeypatch):
    from transformers import ViTModel

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    dreambench._standard_judge.cache_clear()
    monkeypatch.setattr(ViTModel, "from_pretrained", offline)
    with pytest.raises(DreamboothError, match="facebook/dino-vits16 and openai/clip-vit-base-patch32.*Colab"):
        dreambench.DreamBenchJudge.standard()


def test_the_subjects_token_and_class_come_from_its_prompts():
    assert dreambench.subject_words("a photo of sks dog", "a photo of a dog") == ("sks", "dog")
    assert dreambench.subject_words("a photo of Bob's mug", "a photo of a mug") == ("Bob's", "mug")
    assert dreambench.subject_words("a photo of sks dog", None) == ("sks", "dog")
    with pytest.raises(ConfigError, match="does not name the class 'cat'"):
        dreambench.subject_words("a photo of sks dog", "a photo of a cat")
    with pytest.raises(ConfigError, match="no unique token before 'dog'"):
        dreambench.subject_words("a photo of a dog", "a photo of a dog")


def test_a_run_is_measured_with_the_papers_prompts_and_images(make_config):
    """A trained run's last snapshot (no suggestion yet), rendered with DreamBench's 25 live-subject prompts × 4
    seeds (a dog), scored by the tiny judges; the renders are cached like every render: measuring again
    renders nothing."""
    from dreambooth_nb import train
    from dreambooth_nb.results import evaluate

    final = train(make_config(max_train_steps=1, class_prompt="a photo of a dog"))
    result = dreambench.measure(final.parent.parent, judge=dreambench.DreamBenchJudge.tiny(), num_inference_steps=2)
    assert result.snapshot == final and result.scores["images"] == 25 * 4
    assert set(dreambench.METRICS) <= set(result.scores) and "out/step-000001 (100 images)" in result.table
    rendered = []
    real_render = evaluate.render
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(dreambench, "render", lambda *a, **k: rendered.append(1) or real_render(*a, **k))
        monkeypatch.setattr(evaluate.snapshots, "load_pipeline", lambda *a, **k: pytest.fail("rendered again"))
        again = dreambench.measure(final, judge=dreambench.DreamBenchJudge.tiny(), num_inference_steps=2)
    finally:
        monkeypatch.undo()
    assert rendered and again.scores == result.scores
