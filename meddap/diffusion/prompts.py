"""Generation prompts: `"{adjective} ultrasound image of {class_phrase} tumor in the breast"`.

The authors' code glued the adjective to the prompt with no space ("colorfulan ultrasound ...") and
wrote "normal tumor" for the normal class; here words are joined by exactly one space, an empty
adjective leaves no leading space, and each class is worded by `diffusion.class_phrases`
(normal -> "no", as the paper).
"""

from __future__ import annotations

import string

from meddap.config import ConfigError

__all__ = ["render_prompt", "class_prompt", "check_template"]

_FIELDS = ("adjective", "class_phrase")


def check_template(template: str, key: str = "generate.prompt_template") -> None:
    """Refuse a template without {class_phrase} or with placeholders other than {adjective}/{class_phrase}."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # unbalanced braces
        raise ConfigError(f"config key '{key}' = {template!r} is not a valid template: {e}.") from None
    if "class_phrase" not in names:
        raise ConfigError(f"config key '{key}' = {template!r} is not allowed: expected a template containing "
                          "{class_phrase} (e.g. \"{adjective} ultrasound image of {class_phrase} tumor in the breast\").")
    unknown = sorted(names - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config key '{key}' = {template!r} uses unknown placeholders {unknown}: "
                          "only {adjective} and {class_phrase} are filled in.")


def render_prompt(template: str, adjective: str, class_phrase: str) -> str:
    """Fill the template; words are separated by one space, none leading or trailing.

    >>> render_prompt("{adjective} ultrasound image of {class_phrase} tumor in the breast", "", "no")
    'ultrasound image of no tumor in the breast'
    """
    check_template(template)
    text = template.format(adjective=adjective.strip(), class_phrase=class_phrase.strip())
    return " ".join(text.split())


def class_prompt(cfg, adjective: str, class_name: str) -> str:
    """The generation prompt of one (adjective, class) under `cfg` (class words from diffusion.class_phrases)."""
    phrases = cfg.diffusion.class_phrases
    if class_name not in phrases:
        raise ConfigError(f"config key 'diffusion.class_phrases' has no phrase for class {class_name!r} "
                          f"(has: {sorted(phrases)}); add e.g. diffusion.class_phrases.{class_name}={class_name}.")
    return render_prompt(cfg.generate.prompt_template, adjective, phrases[class_name])
