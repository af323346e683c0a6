import pytest

from meddap.config import PAPER_ADJECTIVES, ConfigError, load_config
from meddap.diffusion.prompts import class_prompt, render_prompt

TEMPLATE = "{adjective} ultrasound image of {class_phrase} tumor in the breast"


@pytest.mark.parametrize("adjective", PAPER_ADJECTIVES)
@pytest.mark.parametrize("class_name", ["benign", "malignant", "normal"])
def test_every_adjective_and_class(adjective, class_name):
    cfg = load_config("paper")
    prompt = class_prompt(cfg, adjective, class_name)
    phrase = {"benign": "benign", "malignant": "malignant", "normal": "no"}[class_name]
    tail = f"ultrasound image of {phrase} tumor in the breast"
    assert prompt == (f"{adjective} {tail}" if adjective else tail)
    assert "  " not in prompt and prompt == prompt.strip()
    assert "normal" not in prompt


def test_spacing_is_normalised():
    assert render_prompt(TEMPLATE, "", "no") == "ultrasound image of no tumor in the breast"
    assert render_prompt(TEMPLATE, " dark ", "benign") == "dark ultrasound image of benign tumor in the breast"
    assert render_prompt("an image of {class_phrase}, {adjective}", "", "no") == "an image of no,"
    assert render_prompt("{class_phrase}  tumor {adjective}", "high-contrast", "malignant") == \
        "malignant tumor high-contrast"


def test_template_without_class_phrase_is_refused():
    with pytest.raises(ConfigError, match=r"\{class_phrase\}"):
        render_prompt("{adjective} ultrasound image", "dark", "benign")
    with pytest.raises(ConfigError, match="unknown placeholders"):
        render_prompt("{adjective} {class_phrase} {organ}", "dark", "benign")
    with pytest.raises(ConfigError, match="generate.prompt_template"):
        load_config("demo", ["generate.prompt_template={adjective} ultrasound image"])


def test_missing_class_phrase_names_the_key():
    cfg = load_config("demo")
    cfg.diffusion.class_phrases.pop("normal")
    with pytest.raises(ConfigError, match="diffusion.class_phrases"):
        class_prompt(cfg, "", "normal")
