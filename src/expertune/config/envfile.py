"""Read a SimpleTuner-style config.env file the way a POSIX shell would for plain assignments.

Supported: ``export VAR=value`` and ``VAR=value`` (several per line, ``;`` separated or not),
``export VAR`` (no-op), ``#`` comments, blank lines, backslash line continuation, unquoted values
with backslash escapes, ``'single-quoted'`` (literal) and ``"double-quoted"`` values (with
``\\$ \\" \\\\ \\``` escapes), and ``$VAR`` / ``${VAR}`` / ``${VAR:-word}`` / ``${VAR-word}``
expansion (unquoted or in double quotes) from variables set earlier in the file, then
``os.environ``, unset -> empty; a leading ``~/`` is the home directory. Anything else a shell
would run (commands, ``$(...)``, backticks, pipes, redirections) is a syntax error naming the file
and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from expertune.errors import ConfigError

_NAME_START = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_NAME_CHARS = _NAME_START + "0123456789"
_BLANK = " \t\r"
_WORD_END = _BLANK + "\n;"
_FORBIDDEN = "|&<>()`"


@dataclass(frozen=True)
class EnvAssignment:
    """One ``VAR=value`` assignment: the expanded value and the 1-based line it starts on."""

    name: str
    value: str
    line: int


class _Lexer:
    def __init__(self, text: str, filename: str, environ: Mapping[str, str]):
        self.text, self.filename, self.environ = text, filename, environ
        self.pos, self.line = 0, 1
        self.vars: dict[str, str] = {}
        self.out: list[EnvAssignment] = []
        self.referenced: set[str] = set()  # names some expansion read (helper variables such as BASE_DIR)

    # -- helpers ---------------------------------------------------------------------------
    def error(self, what: str, line: int | None = None) -> ConfigError:
        return ConfigError(f"{self.filename}:{line or self.line}: syntax error: {what}")

    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.text[i] if i < len(self.text) else ""

    def advance(self, n: int = 1) -> str:
        chunk = self.text[self.pos:self.pos + n]
        self.line += chunk.count("\n")
        self.pos += n
        return chunk

    def skip_blanks(self) -> None:
        while True:
            c = self.peek()
            if c and c in _BLANK:
                self.advance()
            elif c == "\\" and self.peek(1) == "\n":
                self.advance(2)
            else:
                return

    def read_name(self) -> str:
        start = self.pos
        if self.peek() and self.peek() in _NAME_START:
            while self.peek() and self.peek() in _NAME_CHARS:
                self.advance()
        return self.text[start:self.pos]

    def lookup(self, name: str) -> str | None:
        self.referenced.add(name)
        if name in self.vars:
            return self.vars[name]
        return self.environ.get(name)

    # -- grammar -----------------------------------------------------------------------------
    def parse(self) -> list[EnvAssignment]:
        while self.pos < len(self.text):
            self.statement()
        return self.out

    def statement(self) -> None:
        self.skip_blanks()
        c = self.peek()
        if c in ("\n", ";"):
            self.advance()
            return
        if c == "#":
            self.skip_comment()
            return
        name = self.read_name()
        if name == "export" and self.peek() in _BLANK + "\\":
            self.skip_blanks()
            while self.peek() and self.peek() not in "\n;#":
                self.assignment(allow_bare=True)
                self.skip_blanks()
        elif name and (self.peek() == "=" or (self.peek() == "+" and self.peek(1) == "=")):
            self.pos -= len(name)  # re-read inside assignment() for one code path
            self.assignment(allow_bare=False)
            self.skip_blanks()
            while self.peek() and self.peek() not in "\n;#":  # `A=1 B=2`; `A=1 cmd` is an error
                start = self.pos
                if not (self.read_name() and self.peek() in ("=", "+")):
                    word = self.text[start:].split("\n", 1)[0].strip()
                    raise self.error(f"expected 'VAR=value', got {word!r} (commands are not supported)")
                self.pos = start
                self.assignment(allow_bare=False)
                self.skip_blanks()
        else:
            word = (name + self.text[self.pos:].split("\n", 1)[0]).strip()
            raise self.error(f"expected 'VAR=value' or 'export VAR=value', got {word!r}")
        self.end_of_statement()

    def end_of_statement(self) -> None:
        self.skip_blanks()
        c = self.peek()
        if c == "#":
            self.skip_comment()
        elif c in ("\n", ";"):
            self.advance()
        elif c:
            raise self.error(f"unexpected {c!r} after an assignment")

    def skip_comment(self) -> None:
        while self.peek() and self.peek() != "\n":
            self.advance()

    def assignment(self, allow_bare: bool) -> None:
        line = self.line
        name = self.read_name()
        if not name:
            raise self.error(f"expected a variable name, got {self.peek()!r}")
        append = self.peek() == "+" and self.peek(1) == "="  # `VAR+=value` (bash; SimpleTuner's config.env)
        if append:
            self.advance()
        if self.peek() != "=":
            if allow_bare and (not self.peek() or self.peek() in _WORD_END + "#"):
                return  # `export VAR` marks an existing variable for export: nothing to record
            raise self.error(f"expected '=' after {name!r}")
        self.advance()
        home = ""
        if self.peek() == "~" and (not self.peek(1) or self.peek(1) in _WORD_END + "/"):
            self.advance()  # a leading unquoted ~ is the home directory, as in the shell
            home = self.lookup("HOME") or str(Path.home())
        value = home + self.word()
        if append:
            before = self.vars[name] if name in self.vars else self.environ.get(name, "")
            # SimpleTuner appends words: `A+="--y"` after `A="--x"` is "--x --y" (a shell would glue them).
            glue = " " if before and value and not before[-1].isspace() and not value[0].isspace() else ""
            value = before + glue + value
        self.vars[name] = value
        self.out.append(EnvAssignment(name, value, line))

    def word(self) -> str:
        parts: list[str] = []
        while True:
            c = self.peek()
            if not c or c in _WORD_END:
                return "".join(parts)
            if c == "'":
                parts.append(self.single_quoted())
            elif c == '"':
                parts.append(self.double_quoted())
            elif c == "\\":
                self.advance()
                nxt = self.advance() if self.peek() else ""
                parts.append("" if nxt == "\n" else nxt)
            elif c == "$":
                parts.append(self.expansion())
            elif c in _FORBIDDEN:
                raise self.error(f"{c!r} is not supported in config.env values (quote the value)")
            else:
                parts.append(self.advance())

    def single_quoted(self) -> str:
        start_line = self.line
        self.advance()
        end = self.text.find("'", self.pos)
        if end < 0:
            raise self.error("unterminated single quote", start_line)
        value = self.advance(end - self.pos)
        self.advance()
        return value

    def double_quoted(self) -> str:
        start_line = self.line
        self.advance()
        parts: list[str] = []
        while True:
            c = self.peek()
            if not c:
                raise self.error("unterminated double quote", start_line)
            if c == '"':
                self.advance()
                return "".join(parts)
            if c == "\\":
                nxt = self.peek(1)
                if nxt == "\n":
                    self.advance(2)
                elif nxt in '$`"\\':
                    self.advance()
                    parts.append(self.advance())
                else:
                    parts.append(self.advance())
            elif c == "$":
                parts.append(self.expansion())
            elif c == "`":
                raise self.error("command substitution (backticks) is not supported")
            else:
                parts.append(self.advance())

    def expansion(self) -> str:
        self.advance()  # the $
        c = self.peek()
        if c == "{":
            return self.braced()
        if c == "(":
            raise self.error("command substitution $(...) is not supported")
        if c and c in _NAME_START:
            return self.lookup(self.read_name()) or ""
        return "$"  # a lone $ (or $1, $@ ...) stays literal

    def braced(self) -> str:
        start_line = self.line
        self.advance()
        name = self.read_name()
        if not name:
            raise self.error("bad substitution: expected ${NAME}", start_line)
        if self.peek() == "}":
            self.advance()
            return self.lookup(name) or ""
        op = ":-" if self.text.startswith(":-", self.pos) else "-" if self.peek() == "-" else ""
        if not op:
            raise self.error(f"bad substitution in ${{{name}...}}: only ${{VAR}}, ${{VAR:-word}} and "
                             f"${{VAR-word}} are supported", start_line)
        self.advance(len(op))
        parts: list[str] = []
        while self.peek() != "}":
            c = self.peek()
            if not c:
                raise self.error("unterminated ${...}", start_line)
            if c == "$":
                parts.append(self.expansion())
            elif c == '"':
                parts.append(self.double_quoted())
            elif c == "'":
                parts.append(self.single_quoted())
            else:
                parts.append(self.advance())
        self.advance()
        value = self.lookup(name)
        use_default = value is None or (op == ":-" and value == "")
        return "".join(parts) if use_default else (value or "")


def parse_env_text(text: str, filename: str = "config.env",
                   environ: Mapping[str, str] | None = None) -> list[EnvAssignment]:
    """All assignments in file order (a variable assigned twice appears twice)."""
    return _Lexer(text, filename, os.environ if environ is None else environ).parse()


@dataclass(frozen=True)
class EnvDocument:
    """A parsed config.env: its assignments in file order and the names its expansions referenced."""

    assignments: list[EnvAssignment]
    referenced: frozenset[str]


def parse_env_document(text: str, filename: str = "config.env",
                       environ: Mapping[str, str] | None = None) -> EnvDocument:
    lexer = _Lexer(text, filename, os.environ if environ is None else environ)
    assignments = lexer.parse()
    return EnvDocument(assignments, frozenset(lexer.referenced))


def read_env_document(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> EnvDocument:
    """Parse a config.env file; a missing or unreadable file is a ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config.env file {p}: {exc}") from None
    return parse_env_document(text, str(p), environ)


def read_env_file(path: str | os.PathLike[str],
                  environ: Mapping[str, str] | None = None) -> list[EnvAssignment]:
    """Parse a config.env file; a missing or unreadable file is a ConfigError."""
    return read_env_document(path, environ).assignments


def final_assignments(assignments: list[EnvAssignment]) -> list[EnvAssignment]:
    """The last assignment of each variable (what the shell ends up with), ordered by line."""
    last: dict[str, EnvAssignment] = {}
    for a in assignments:
        last.pop(a.name, None)
        last[a.name] = a
    return list(last.values())
