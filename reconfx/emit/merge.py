"""One ``forward`` from the train-mode and eval-mode renderings of a dual graph.

The two renderings are lists of statements (each element one statement, possibly over several
lines). Statements both modes share are written once; where they differ, the difference appears
where it is: a statement that differs in one token becomes ``dropout_p=0.1 if self.training else
0.0``, and other runs become ``if self.training: ... else: ...``. Each mode executes exactly the
statements of its own rendering, in order, so the merged method computes what each graph does.
An eval-mode choice between the train-mode statements and another way to compute them (stream
batching, :class:`Alternatives`) is written once: ``if self.training or not fits(...): ...``.
"""

from __future__ import annotations

import difflib
import io
import tokenize

from reconfx.emit.render import LINE, statement

__all__ = [
    "Alternatives", "merge_modes"
]

_OPEN_ARG = {"(", ",", "=", "["}
_CLOSE_ARG = {")", ",", "]"}


class Alternatives(str):
    """The statement ``if <test>: <then> else: <otherwise>`` (its text, at ``indent``), with its
    parts kept so that :func:`merge_modes` can fold it into the train-mode statements that run
    the same ops: ``if self.training or <test>: ... else: ...``. ``test`` is ``opener`` +
    ``args`` + ``)``, a call wrapped like any other; ``then`` holds its first branch's statements
    one and two levels deeper than ``indent`` (see :func:`merge_modes`)."""

    indent: str
    opener: str
    args: list[str]
    then: list[list[str]]
    otherwise: list[str]

    def __new__(cls, indent: str, opener: str, args: list[str], then: list[list[str]],
                otherwise: list[str]) -> Alternatives:
        text = "\n".join([statement(indent, "", f"if {opener}", args, "):"), *then[0],
                          f"{indent}else:", *otherwise])
        made = super().__new__(cls, text)
        made.indent, made.opener, made.args = indent, opener, args
        made.then, made.otherwise = then, otherwise
        return made


def merge_modes(train: list[list[str]], eval_: list[list[str]], indent: str) -> list[str]:
    """The statements of one method body. ``train[k]``/``eval_[k]`` are the two modes'
    renderings ``k`` levels deeper than the body's indentation ``indent`` (k = 0, 1, for the
    bodies of ``if self.training:``; train's also 2, for the first branch of a folded
    :class:`Alternatives`)."""
    out: list[str] = []
    matcher = difflib.SequenceMatcher(a=train[0], b=eval_[0], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            out += train[0][i1:i2]
            continue
        if i2 - i1 == j2 - j1:  # the same statements with a token changed: inline where each is
            inline = [_inline(a, b) for a, b in zip(train[0][i1:i2], eval_[0][j1:j2],
                                                     strict=True)]
            if all(inline):
                out += inline
                continue
        if j2 - j1 == 1 and isinstance(eval_[0][j1], Alternatives) and len(train) > 2:
            # train mode runs the ops of the first branch: both go there, differing inside
            choice = eval_[0][j1]
            inner = merge_modes([lines[i1:i2] for lines in train[1:]], choice.then,
                                choice.indent + "    ")
            out += [statement(choice.indent, "", f"if self.training or {choice.opener}",
                              choice.args, "):"), *inner, f"{choice.indent}else:",
                    *choice.otherwise]
            continue
        if i2 > i1:
            out += [f"{indent}if self.training:", *train[1][i1:i2]]
        if j2 > j1:
            out += [f"{indent}{'else:' if i2 > i1 else 'if not self.training:'}",
                    *eval_[1][j1:j2]]
    return out


def _inline(train: str, eval_: str) -> str | None:
    """``train`` with its one differing token written ``A if self.training else B``, or None
    when the statements differ in more than one token or the result does not fit."""
    a, b = _tokens(train), _tokens(eval_)
    if a is None or b is None or len(a) != len(b):
        return None
    differing = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x[0] != y[0]]
    if len(differing) != 1 or not (_constant(a[differing[0]]) and _constant(b[differing[0]])):
        return None
    i = differing[0]
    (text_a, start, end, _kind), (text_b, *_rest) = a[i], b[i]
    expression = f"{text_a} if self.training else {text_b}"
    bare = a[i - 1][0] in _OPEN_ARG and i + 1 < len(a) and a[i + 1][0] in _CLOSE_ARG
    merged = train[:start] + (expression if bare else f"({expression})") + train[end:]
    return merged if all(len(line) <= LINE for line in merged.splitlines()) else None


def _constant(token: tuple[str, int, int, int]) -> bool:
    """A literal operand: a number, a string, True, False or None."""
    return token[3] in (tokenize.NUMBER, tokenize.STRING) or token[0] in ("True", "False", "None")


def _tokens(text: str) -> list[tuple[str, int, int, int]] | None:
    """(text, start offset, end offset, type) of each significant token."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    try:
        found = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    skipped = {tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.INDENT,
               tokenize.DEDENT, tokenize.ENDMARKER}
    return [(t.string, starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1],
             t.type) for t in found if t.type not in skipped]
