"""``model.chat_template`` (and ``--chat-template``): a template given as a .jinja file or as
the Jinja text, put on a tokenizer and checked by rendering one turn."""

from __future__ import annotations

from pathlib import Path

from ..config_tree import ConfigError, read_utf8


def chat_template_text(value: str | None, key: str = "model.chat_template") -> str | None:
    """A chat-template setting (``key``) as Jinja text: the file it names, or the text itself."""
    if value is None or "{" in value:  # Jinja text ({{ }}, {% %}); a file name has no braces
        return value
    file = Path(value).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: {value} is neither a file (relative paths start at "
                          f"{Path.cwd()}) nor Jinja template text; give a .jinja file or the "
                          "template itself")
    return read_utf8(file, ConfigError, f"re-save the template as UTF-8 ({key})")


def use_chat_template(tokenizer, setting: str, key: str = "model.chat_template") -> None:
    """Give ``tokenizer`` (and a VLM's processor, which saves it) the template ``setting`` (a
    file or the text), checked by rendering a one-turn conversation."""
    template = chat_template_text(setting, key)
    tokenizer.chat_template = template
    images = getattr(tokenizer, "image_inputs", None)
    if images is not None:
        images.processor.chat_template = template
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True)
    except Exception as error:  # jinja's syntax and runtime errors, or the template's own
        raise ConfigError(f"{key}: the template does not render a one-turn conversation "
                          f"({type(error).__name__}: {error})") from None
