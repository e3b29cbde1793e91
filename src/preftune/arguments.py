"""Command-line argument types: counts checked when the command line is read, so a bad value
is one line of usage error, not a traceback from deep inside a run."""

from __future__ import annotations

import argparse


def at_least(lowest: int):
    """An argparse ``type``: an integer no smaller than ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    parse.__name__ = f"integer >= {lowest}"
    return parse


POSITIVE, COUNT = at_least(1), at_least(0)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # --dtype, a config's model.dtype

# `config explain | schema --kind`: the config files of preftune train, rm train, online,
# diffusion train | online | spm
CONFIG_KINDS = ("train", "rm", "online", "diffusion", "diffusion-online", "diffusion-spm")


class _Columns(argparse.Action):
    """``--column KEY=COLUMN``, repeatable: collects ``{KEY: COLUMN}`` (data.fields' form)."""

    def __call__(self, parser, namespace, value, option_string=None):
        key, equals, column = value.partition("=")
        if not equals or not key.strip() or not column.strip():
            parser.error(f"{option_string} {value!r}: expected KEY=COLUMN, e.g. prompt=question")
        columns = dict(getattr(namespace, self.dest) or {})
        if key.strip() in columns:
            parser.error(f"{option_string} {key.strip()} is given twice")
        columns[key.strip()] = column.strip()
        setattr(namespace, self.dest, columns)


def add_column_option(parser: argparse.ArgumentParser, *aliases: str,
                      example: str = "prompt=question") -> None:
    """``--column KEY=COLUMN`` (repeatable): read the field KEY from a column of another name,
    what a config's data.fields does; the parsed value is ``args.fields``."""
    parser.add_argument("--column", *aliases, dest="fields", action=_Columns, default=None,
                        metavar="KEY=COLUMN",
                        help=f"read field KEY from a column of another name (repeatable), "
                             f"e.g. {example}; what a config's data.fields does")


def add_tokenize_options(parser: argparse.ArgumentParser) -> None:
    """How records become tokens, as a config's data.max_length, data.max_prompt_length and
    model.chat_template: --max-length, --max-prompt-length, --chat-template."""
    parser.add_argument("--max-length", type=POSITIVE, default=1024,
                        help="prompt + response tokens, as data.max_length (longer records "
                             "are cut as in training)")
    parser.add_argument("--max-prompt-length", type=POSITIVE,
                        help="default: 512, or half of --max-length when that is 512 or less")
    parser.add_argument("--chat-template", metavar="FILE_OR_TEXT",
                        help="model.chat_template: render message lists with this template "
                             "(a .jinja file or the Jinja text) instead of the tokenizer's")


def add_dtype_option(parser: argparse.ArgumentParser, which: str,
                     named_by: str = "its config.json") -> None:
    """``--dtype``: what the command's models load in, as a config's model.dtype; ``auto``
    (the default) reads the dtype ``which`` model's weights are saved in (as ``named_by``
    says)."""
    parser.add_argument("--dtype", default="auto",
                        choices=DTYPE_CHOICES,
                        help=f"the models' weights, as model.dtype (default auto: the dtype "
                             f"{which}'s weights are saved in, float32 if {named_by} names "
                             "none); bfloat16 halves their memory on a GPU")
